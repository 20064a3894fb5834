//! Quantization: bit-width specs, ONNX-exact quantizer arithmetic (round half to even, saturate),
//! where activations are quantized (placement) and how their ranges are found (calibration).
//! The fake-quantized student is the ONNX graph itself with QuantizeLinear/DequantizeLinear
//! nodes, so our simulation (the lowering) and ONNX Runtime run the same graph.

pub mod calibrate;
pub mod fake;
pub mod placement;

use anyhow::{Result, bail, ensure};

/// `wNaM`: N-bit weights, M-bit activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BitSpec {
    pub weights: u8,
    pub activations: u8,
}

impl std::str::FromStr for BitSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let Some(rest) = t.strip_prefix('w') else {
            bail!("bits '{s}' must look like w4a4 (N-bit weights, M-bit activations)")
        };
        let Some((w, a)) = rest.split_once('a') else {
            bail!("bits '{s}' must look like w4a4")
        };
        let (w, a): (u8, u8) = (
            w.parse()
                .map_err(|_| anyhow::anyhow!("bits '{s}': '{w}' is not a number"))?,
            a.parse()
                .map_err(|_| anyhow::anyhow!("bits '{s}': '{a}' is not a number"))?,
        );
        ensure!(
            (2..=8).contains(&w) && (2..=8).contains(&a),
            "bits '{s}': widths must be 2..=8"
        );
        Ok(Self {
            weights: w,
            activations: a,
        })
    }
}

impl std::fmt::Display for BitSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "w{}a{}", self.weights, self.activations)
    }
}

/// Weight quantization scheme (per output channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightScheme {
    /// Zero point 0, range +-(2^(N-1)-1): what runtimes fuse.
    Symmetric,
    /// Per-channel min/max with a zero point (the GDFQ/ZeroQ reference scheme).
    Asymmetric,
}

/// Affine quantization parameters of one tensor (or channel): q = sat(round_even(x/s) + zp).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
    pub qmin: i32,
    pub qmax: i32,
}

impl QParams {
    /// Unsigned M-bit activation grid (uint8 container, values 0..2^M-1) covering [lo, hi] and 0.
    pub fn activation(lo: f32, hi: f32, bits: u8) -> Self {
        let qmax = (1i32 << bits) - 1;
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = ((hi - lo) / qmax as f32).max(1e-8);
        let zero_point = ((-lo / scale).round_ties_even() as i32).clamp(0, qmax);
        Self {
            scale,
            zero_point,
            qmin: 0,
            qmax,
        }
    }

    /// ONNX QuantizeLinear on one value.
    pub fn quantize(&self, x: f32) -> i32 {
        ((x / self.scale).round_ties_even() as i64 + self.zero_point as i64)
            .clamp(self.qmin as i64, self.qmax as i64) as i32
    }

    pub fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }

    /// The float interval the grid represents (the Clip bounds of a k-bit grid).
    pub fn bounds(&self) -> (f32, f32) {
        (self.dequantize(self.qmin), self.dequantize(self.qmax))
    }
}

/// Per-output-channel weight quantization into an int8 container.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
    pub zero_points: Vec<i8>,
}

/// Quantizes `w` (channel-major: `channels` rows) to `bits`.
pub fn quantize_weight(
    w: &[f32],
    channels: usize,
    bits: u8,
    scheme: WeightScheme,
) -> QuantizedWeight {
    let per = w.len() / channels.max(1);
    let mut out = QuantizedWeight {
        values: Vec::with_capacity(w.len()),
        scales: vec![],
        zero_points: vec![],
    };
    for row in w.chunks(per.max(1)) {
        let p = match scheme {
            WeightScheme::Symmetric => {
                let qmax = (1i32 << (bits - 1)) - 1;
                let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                QParams {
                    scale: (m / qmax as f32).max(1e-12),
                    zero_point: 0,
                    qmin: -qmax,
                    qmax,
                }
            }
            WeightScheme::Asymmetric => {
                let (qmin, qmax) = (-(1i32 << (bits - 1)), (1i32 << (bits - 1)) - 1);
                let lo = row.iter().fold(0.0f32, |m, &v| m.min(v));
                let hi = row.iter().fold(0.0f32, |m, &v| m.max(v));
                let scale = ((hi - lo) / (qmax - qmin) as f32).max(1e-12);
                let zero_point =
                    ((qmin as f32 - lo / scale).round_ties_even() as i32).clamp(qmin, qmax);
                QParams {
                    scale,
                    zero_point,
                    qmin,
                    qmax,
                }
            }
        };
        out.values.extend(row.iter().map(|&v| p.quantize(v) as i8));
        out.scales.push(p.scale);
        out.zero_points.push(p.zero_point as i8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bit_specs() {
        assert_eq!(
            "w4a8".parse::<BitSpec>().unwrap(),
            BitSpec {
                weights: 4,
                activations: 8
            }
        );
        assert!("w1a4".parse::<BitSpec>().is_err());
        assert!("4/4".parse::<BitSpec>().is_err());
    }

    #[test]
    fn rounding_is_half_to_even_and_saturates_like_onnx() {
        let p = QParams {
            scale: 1.0,
            zero_point: 0,
            qmin: 0,
            qmax: 15,
        };
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, 14.5, 15.5, 300.0].map(|x| p.quantize(x)),
            [0, 2, 2, 0, 14, 15, 15]
        );
        let a = QParams::activation(0.0, 6.0, 4);
        assert_eq!((a.zero_point, a.qmax), (0, 15));
        assert_eq!(a.bounds(), (0.0, 6.0));
        let b = QParams::activation(-1.0, 3.0, 8);
        assert_eq!(
            b.dequantize(b.quantize(0.0)),
            0.0,
            "zero is exactly representable"
        );
    }

    #[test]
    fn per_channel_weights() {
        let w = [0.5, -1.0, 0.25, 2.0, 0.0, -0.5];
        let q = quantize_weight(&w, 2, 4, WeightScheme::Symmetric);
        // 0.5 / f32(1/7) = 3.4999998 rounds to 3, as QuantizeLinear computes with the stored scale.
        assert_eq!(q.values, vec![3, -7, 2, 7, 0, -2]);
        assert_eq!(q.scales, vec![1.0 / 7.0, 2.0 / 7.0]);
        let a = quantize_weight(&w, 2, 4, WeightScheme::Asymmetric);
        for (c, row) in w.chunks(3).enumerate() {
            for (k, &v) in row.iter().enumerate() {
                let deq = (a.values[c * 3 + k] as f32 - a.zero_points[c] as f32) * a.scales[c];
                assert!((deq - v).abs() <= a.scales[c] / 2.0 + 1e-6);
            }
        }
    }
}
