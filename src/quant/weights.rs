//! Per-output-channel weight quantization: min/max grids (symmetric or asymmetric), exact
//! scales whose every sum fits f32, and MSE clipping of a channel's range.

use super::{F32_EXACT, QParams, WeightScheme, ceil_mantissa, odd_mantissa, quantize_bias};

/// Per-output-channel weight quantization into an int8 container.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
    pub zero_points: Vec<i8>,
}

impl QuantizedWeight {
    /// The float values DequantizeLinear gives, channel-major as `values`.
    pub fn dequantized(&self) -> Vec<f32> {
        let per = self.values.len() / self.scales.len().max(1);
        self.values
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = i / per.max(1);
                (x as i32 - self.zero_points[c] as i32) as f32 * self.scales[c]
            })
            .collect()
    }
}

/// The min/max grid of one channel's weights.
fn weight_params(row: &[f32], bits: u8, scheme: WeightScheme) -> QParams {
    match scheme {
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
            let scale = {
                let (lo, hi) = min_max(row);
                ((hi - lo) / (qmax - qmin) as f32).max(1e-12)
            };
            with_scale(
                row,
                QParams {
                    scale,
                    zero_point: 0,
                    qmin,
                    qmax,
                },
                scale,
            )
        }
    }
}

fn min_max(row: &[f32]) -> (f32, f32) {
    (
        row.iter().fold(0.0f32, |m, &v| m.min(v)),
        row.iter().fold(0.0f32, |m, &v| m.max(v)),
    )
}

/// `p` with another scale (an asymmetric grid's zero point moves with it).
fn with_scale(row: &[f32], p: QParams, scale: f32) -> QParams {
    let zero_point = if p.qmin == -p.qmax {
        0
    } else {
        ((p.qmin as f32 - min_max(row).0 / scale).round_ties_even() as i32).clamp(p.qmin, p.qmax)
    };
    QParams {
        scale,
        zero_point,
        ..p
    }
}

/// Quantizes `w` (channel-major: `channels` rows) to `bits` with min/max scales.
pub fn quantize_weight(
    w: &[f32],
    channels: usize,
    bits: u8,
    scheme: WeightScheme,
) -> QuantizedWeight {
    let per = w.len() / channels.max(1);
    let mut out = QuantizedWeight::with_capacity(w.len(), channels);
    for row in w.chunks(per.max(1)) {
        out.push(row, weight_params(row, bits, scheme));
    }
    out
}

/// How weight ranges are chosen before quantization.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightClip {
    /// Each channel's min/max (nothing clipped).
    #[default]
    None,
    /// Each channel clipped symmetrically where its squared quantization error is least: the
    /// float weights are clamped to +-c, so min/max quantization of the clamped weights (the
    /// export, every engine) uses the clipped grid with no extra parameters.
    Mse,
}

/// The symmetric `bits`-bit clipping threshold of each channel (channel-major `w`) with the
/// least squared quantization error, searched over 1% steps from 20% to 100% of max |w|. Round
/// half to even and saturation as ONNX; 100% (no clipping) wins ties.
pub fn mse_weight_clip(w: &[f32], channels: usize, bits: u8) -> Vec<f32> {
    let per = (w.len() / channels.max(1)).max(1);
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    w.chunks(per)
        .map(|row| {
            let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if m == 0.0 {
                return 0.0;
            }
            let err = |c: f32| -> f64 {
                let s = c / qmax;
                row.iter()
                    .map(|&v| {
                        let q = (v / s).round_ties_even().clamp(-qmax, qmax) * s;
                        ((v - q) as f64).powi(2)
                    })
                    .sum()
            };
            let mut best = (err(m), m);
            for k in (20..100).rev() {
                let c = m * k as f32 / 100.0;
                let e = err(c);
                if e < best.0 {
                    best = (e, c);
                }
            }
            best.1
        })
        .collect()
}

/// A weight's values channel-major: as stored for output channels on axis 0, the columns of a
/// 2-D weight for axis 1 (Gemm without transB, MatMul).
pub fn channel_major<T: Copy>(v: &[T], dims: &[usize], axis: usize) -> Vec<T> {
    if axis == 1 && dims.len() == 2 {
        let (k, n) = (dims[0], dims[1]);
        (0..n)
            .flat_map(|j| (0..k).map(move |i| v[i * n + j]))
            .collect()
    } else {
        v.to_vec()
    }
}

/// The inverse of [`channel_major`]: back to the weight's stored layout.
pub fn from_channel_major<T: Copy>(rows: &[T], dims: &[usize], axis: usize) -> Vec<T> {
    if axis == 1 && dims.len() == 2 {
        let (k, n) = (dims[0], dims[1]);
        (0..k)
            .flat_map(|i| (0..n).map(move |j| rows[j * k + i]))
            .collect()
    } else {
        rows.to_vec()
    }
}

/// Clamps a weight with output channels on `axis` (0, or 1 for a 2-D Gemm weight) to
/// +-`clips` per channel; without `clips` they are found first ([`mse_weight_clip`]). Returns
/// the clips used.
pub fn clip_weight(
    w: &mut [f32],
    dims: &[usize],
    axis: usize,
    bits: u8,
    clips: Option<&[f32]>,
) -> Vec<f32> {
    let channels = dims.get(axis).copied().unwrap_or(1);
    let mut rows = channel_major(w, dims, axis);
    let clips = clips.map_or_else(|| mse_weight_clip(&rows, channels, bits), <[f32]>::to_vec);
    let per = (rows.len() / channels.max(1)).max(1);
    for (i, v) in rows.iter_mut().enumerate() {
        let c = clips[i / per];
        *v = v.clamp(-c, c);
    }
    w.copy_from_slice(&from_channel_major(&rows, dims, axis));
    clips
}

impl QuantizedWeight {
    fn with_capacity(values: usize, channels: usize) -> Self {
        Self {
            values: Vec::with_capacity(values),
            scales: Vec::with_capacity(channels),
            zero_points: Vec::with_capacity(channels),
        }
    }

    fn push(&mut self, row: &[f32], p: QParams) {
        self.values.extend(row.iter().map(|&v| p.quantize(v) as i8));
        self.scales.push(p.scale);
        self.zero_points.push(p.zero_point as i8);
    }
}

/// Quantizes a layer's weights (channel-major) for `Scales::Exact`: each channel's scale is
/// rounded up to the longest significand (at most 16 bits) for which the layer's accumulation
/// with an input on the grid `input`, plus the bias, stays below 2^24 units of s_in * 2^e, so
/// every partial sum, in any order, is exact in f32 (and ORT's requantization product too).
/// Returns the weights and whether every channel got such a scale (one that cannot, e.g. a
/// huge bias, keeps its min/max scale).
pub fn quantize_weight_exact(
    w: &[f32],
    channels: usize,
    bits: u8,
    scheme: WeightScheme,
    input: &QParams,
    bias: Option<&[f32]>,
) -> (QuantizedWeight, bool) {
    let per = w.len() / channels.max(1);
    let mut out = QuantizedWeight::with_capacity(w.len(), channels);
    let m_in = odd_mantissa(input.scale);
    let mut all_exact = true;
    for (c, row) in w.chunks(per.max(1)).enumerate() {
        let free = weight_params(row, bits, scheme);
        let fits = |p: &QParams| {
            let l1: u64 = row
                .iter()
                .map(|&v| (p.quantize(v) - p.zero_point).unsigned_abs() as u64)
                .sum();
            let b = bias.map_or(0, |b| {
                quantize_bias(b[c], p.scale * input.scale).unsigned_abs() as u64
            });
            (input.span() * l1 + b).saturating_mul(m_in * odd_mantissa(p.scale)) < F32_EXACT
        };
        let exact = (1..=16)
            .rev()
            .map(|m| with_scale(row, free, ceil_mantissa(free.scale, m)))
            .find(|p| fits(p));
        all_exact &= exact.is_some();
        out.push(row, exact.unwrap_or(free));
    }
    (out, all_exact)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mse_clip_cuts_a_long_tailed_channel_and_keeps_a_uniform_one() {
        // Channel 0: 1024 bell-shaped values (sums of 4 uniforms), whose rare large values
        // stretch a 4-bit min/max grid (+-7 steps); channel 1: values uniform on the grid of
        // its max, where clipping only adds error.
        let mut state = 12345u32;
        let mut uniform = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let mut w: Vec<f32> = (0..1024)
            .map(|_| (0..4).map(|_| uniform()).sum::<f32>())
            .collect();
        w.extend((0..1024).map(|i| (i % 15) as f32 - 7.0));
        let clips = mse_weight_clip(&w, 2, 4);
        let max0 = w[..1024].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            clips[0] < 0.9 * max0 && clips[0] > 0.4 * max0,
            "{clips:?} of {max0}"
        );
        assert_eq!(clips[1], 7.0);
        let err = |w: &[f32], c: f32| -> f32 {
            let s = c / 7.0;
            w.iter()
                .map(|&v| (v - (v / s).round_ties_even().clamp(-7.0, 7.0) * s).powi(2))
                .sum()
        };
        assert!(err(&w[..1024], clips[0]) < 0.9 * err(&w[..1024], max0));
        // Clamping to the clips: min/max quantization of the result uses the clipped grid.
        let mut c = w.clone();
        let used = clip_weight(&mut c, &[2, 1024], 0, 4, None);
        assert_eq!(used, clips);
        let cmax = c[..1024].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(cmax, clips[0]);
        assert_eq!(&c[1024..], &w[1024..]);
        let q = quantize_weight(&c, 2, 4, WeightScheme::Symmetric);
        assert!(
            (q.scales[0] - clips[0] / 7.0).abs() < 1e-7,
            "{:?}",
            q.scales
        );
    }

    #[test]
    fn clip_weight_reads_channels_on_the_gemm_axis() {
        // A 2-D weight [k=3, n=2] with output channels on axis 1 (columns).
        let mut w = vec![1.0f32, 5.0, -2.0, 6.0, 3.0, -9.0];
        let clips = clip_weight(&mut w, &[3, 2], 1, 8, Some(&[2.5, 6.0]));
        assert_eq!(clips, vec![2.5, 6.0]);
        assert_eq!(w, vec![1.0, 5.0, -2.0, 6.0, 2.5, -6.0]);
    }
}
