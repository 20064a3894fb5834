//! Spatial padding of Conv, ConvTranspose and pooling: the `auto_pad` attribute parsed into an
//! enum once, and the SAME arithmetic written once.

use anyhow::{Result, bail, ensure};

/// How a windowed op pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoPad {
    /// `NOTSET`: the explicit `pads` attribute.
    Explicit,
    /// No padding.
    Valid,
    /// Output size ceil(in / stride); an odd total puts the extra pixel at the end.
    SameUpper,
    /// As `SameUpper`, extra pixel at the beginning.
    SameLower,
}

impl AutoPad {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "NOTSET" | "" => AutoPad::Explicit,
            "VALID" => AutoPad::Valid,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            other => {
                bail!("auto_pad '{other}' is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
            }
        })
    }

    pub fn is_same(self) -> bool {
        matches!(self, AutoPad::SameUpper | AutoPad::SameLower)
    }

    /// Splits a total padding between begin and end.
    pub fn split(self, total: usize) -> (usize, usize) {
        let small = total / 2;
        match self {
            AutoPad::SameLower => (total - small, small),
            _ => (small, total - small),
        }
    }

    /// (begin, end) padding per spatial axis of a Conv or pooling window: inputs `ins`, kernel
    /// `k`, strides `s`, dilations `d`, explicit `pads` ([begin..., end...]; empty = zeros).
    pub fn resolve(
        self,
        ins: &[usize],
        k: &[usize],
        s: &[usize],
        d: &[usize],
        pads: &[usize],
    ) -> Result<Vec<(usize, usize)>> {
        let rank = ins.len();
        Ok(match self {
            AutoPad::Valid => vec![(0, 0); rank],
            AutoPad::SameUpper | AutoPad::SameLower => (0..rank)
                .map(|i| {
                    let out = ins[i].div_ceil(s[i]);
                    self.split(((out - 1) * s[i] + (k[i] - 1) * d[i] + 1).saturating_sub(ins[i]))
                })
                .collect(),
            AutoPad::Explicit => {
                if pads.is_empty() {
                    return Ok(vec![(0, 0); rank]);
                }
                ensure!(
                    pads.len() == 2 * rank,
                    "pads has {} values, expected {}",
                    pads.len(),
                    2 * rank
                );
                (0..rank).map(|i| (pads[i], pads[i + rank])).collect()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_puts_the_odd_pixel_where_the_mode_says() {
        // 32 -> 16 with k3 s2: total 1.
        let up = AutoPad::SameUpper
            .resolve(&[32], &[3], &[2], &[1], &[])
            .unwrap();
        let low = AutoPad::SameLower
            .resolve(&[32], &[3], &[2], &[1], &[])
            .unwrap();
        assert_eq!(up, vec![(0, 1)]);
        assert_eq!(low, vec![(1, 0)]);
        // k3 s1: one each side.
        let s1 = AutoPad::SameUpper
            .resolve(&[7, 7], &[3, 3], &[1, 1], &[1, 1], &[])
            .unwrap();
        assert_eq!(s1, vec![(1, 1), (1, 1)]);
        let ex = AutoPad::Explicit
            .resolve(&[8, 8], &[3, 3], &[1, 1], &[1, 1], &[1, 2, 3, 4])
            .unwrap();
        assert_eq!(ex, vec![(1, 3), (2, 4)]);
        assert_eq!(
            AutoPad::Valid
                .resolve(&[8], &[3], &[1], &[1], &[1, 1])
                .unwrap(),
            vec![(0, 0)]
        );
        assert!(AutoPad::parse("SAME").is_err());
        assert!(
            AutoPad::Explicit
                .resolve(&[8, 8], &[3, 3], &[1, 1], &[1, 1], &[1, 1])
                .is_err()
        );
    }
}
