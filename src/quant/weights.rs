//! Per-output-channel weight quantization: min/max grids (symmetric or asymmetric), exact
//! scales whose every sum fits f32, and clipping of a channel's range by the least squared error
//! of the weight or of the layer's output.

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
    /// As `mse`, but the error weighed is the layer's OUTPUT error under the input's
    /// BN-derived per-channel moments (each weight's error by its input's variance, plus the
    /// shift of the output mean); `mse` where no statistics reach the layer's input.
    Output,
}

impl WeightClip {
    pub fn clips(self) -> bool {
        self != Self::None
    }
}

/// A layer input's per-channel Gaussian moments, which [`output_weight_clip`] weighs a
/// channel's quantization error by, and the correlation of the values one weight row reads
/// within a channel.
#[derive(Debug, Clone, Copy)]
pub struct InputMoments<'a> {
    pub mean: &'a [f64],
    pub var: &'a [f64],
    pub window_corr: f64,
}

/// The symmetric `bits`-bit clipping threshold of each channel (channel-major `w`) with the
/// least squared quantization error, searched over 1% steps from 20% to 100% of max |w|. Round
/// half to even and saturation as ONNX; 100% (no clipping) wins ties.
pub fn mse_weight_clip(w: &[f32], channels: usize, bits: u8) -> Vec<f32> {
    let per = (w.len() / channels.max(1)).max(1);
    w.chunks(per)
        .map(|row| best_clip(row, bits, |d| d.iter().map(|&e| (e as f64).powi(2)).sum()))
        .collect()
}

/// The symmetric clip of each channel (channel-major `w` of a weight stored as `dims`, output
/// channels on `axis`) with the least expected error of the layer's output under the `input`
/// moments: over the weight errors e_k, (1 - r) sum_k e_k^2 var_k + r sum_c var_c (sum_{k in c}
/// e_k)^2 + (sum_k e_k mean_k)^2, channels independent, values within a channel correlated by
/// r = `window_corr`, zero padding ignored. Searched as [`mse_weight_clip`]; its result where
/// the weight's shape does not match the input's channels.
pub fn output_weight_clip(
    w: &[f32],
    dims: &[usize],
    axis: usize,
    bits: u8,
    input: InputMoments,
) -> Vec<f32> {
    let channels = dims.get(axis).copied().unwrap_or(1).max(1);
    let per = (w.len() / channels).max(1);
    let Some(at) = RowInputs::new(dims, axis, input.mean.len(), per) else {
        return mse_weight_clip(w, channels, bits);
    };
    w.chunks(per)
        .enumerate()
        .map(|(j, row)| {
            let ch: Vec<usize> = (0..row.len()).map(|k| at.channel(j, k)).collect();
            let rho = input.window_corr;
            let mut sums = vec![0.0f64; input.mean.len()];
            best_clip(row, bits, |d| {
                let (mut spread, mut shift) = (0.0f64, 0.0f64);
                sums.iter_mut().for_each(|s| *s = 0.0);
                for (&e, &c) in d.iter().zip(&ch) {
                    let e = e as f64;
                    spread += e * e * input.var[c];
                    shift += e * input.mean[c];
                    sums[c] += e;
                }
                let coherent: f64 = if rho == 0.0 {
                    0.0
                } else {
                    sums.iter().zip(input.var).map(|(s, v)| s * s * v).sum()
                };
                (1.0 - rho) * spread + rho * coherent + shift * shift
            })
        })
        .collect()
}

/// Which input channel each element of a channel-major weight row multiplies.
struct RowInputs {
    /// Input channels one group of outputs reads, output channels per group, and the weights
    /// per input channel in a row (kernel window; spatial positions of a flattened input).
    in_per_group: usize,
    out_per_group: usize,
    window: usize,
}

impl RowInputs {
    fn new(dims: &[usize], axis: usize, in_channels: usize, per: usize) -> Option<Self> {
        let (in_per_group, out) = if dims.len() >= 3 && axis == 0 {
            (dims[1], dims[0])
        } else if dims.len() == 2 {
            (in_channels, dims[axis])
        } else {
            return None;
        };
        let ok = in_per_group > 0
            && in_channels.is_multiple_of(in_per_group)
            && per.is_multiple_of(in_per_group)
            && out % (in_channels / in_per_group) == 0;
        ok.then(|| Self {
            in_per_group,
            out_per_group: out / (in_channels / in_per_group),
            window: per / in_per_group,
        })
    }

    fn channel(&self, row: usize, k: usize) -> usize {
        row / self.out_per_group * self.in_per_group + k / self.window
    }
}

/// The clip in [20%, 100%] of max |row| (1% steps, 100% winning ties) whose `bits`-bit
/// symmetric grid gives the least `err` of the errors (value - quantized value); round half
/// to even and saturation as ONNX.
fn best_clip(row: &[f32], bits: u8, mut err: impl FnMut(&[f32]) -> f64) -> f32 {
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if m == 0.0 {
        return 0.0;
    }
    let mut d = vec![0.0f32; row.len()];
    let mut err_at = |c: f32| -> f64 {
        let s = c / qmax;
        for (e, &v) in d.iter_mut().zip(row) {
            *e = v - (v / s).round_ties_even().clamp(-qmax, qmax) * s;
        }
        err(&d)
    };
    let mut best = (err_at(m), m);
    for k in (20..100).rev() {
        let c = m * k as f32 / 100.0;
        let e = err_at(c);
        if e < best.0 {
            best = (e, c);
        }
    }
    best.1
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
/// +-`clips` per channel; without `clips` they are found first: by the layer's output error
/// where its `input` moments are given ([`output_weight_clip`]), else by the weight's own
/// ([`mse_weight_clip`]). Returns the clips used.
pub fn clip_weight(
    w: &mut [f32],
    dims: &[usize],
    axis: usize,
    bits: u8,
    clips: Option<&[f32]>,
    input: Option<InputMoments>,
) -> Vec<f32> {
    let channels = dims.get(axis).copied().unwrap_or(1);
    let mut rows = channel_major(w, dims, axis);
    let clips = match (clips, input) {
        (Some(c), _) => c.to_vec(),
        (None, Some(input)) => output_weight_clip(&rows, dims, axis, bits, input),
        (None, None) => mse_weight_clip(&rows, channels, bits),
    };
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
        let used = clip_weight(&mut c, &[2, 1024], 0, 4, None, None);
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
        let clips = clip_weight(&mut w, &[3, 2], 1, 8, Some(&[2.5, 6.0]), None);
        assert_eq!(clips, vec![2.5, 6.0]);
        assert_eq!(w, vec![1.0, 5.0, -2.0, 6.0, 2.5, -6.0]);
    }

    /// Deterministic bell-shaped values (sums of 4 uniforms).
    fn bell(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        (0..n).map(|_| (0..4).map(|_| uniform()).sum()).collect()
    }

    #[test]
    fn output_clip_is_the_mse_clip_for_white_inputs() {
        // A 3 x 3 conv, 4 -> 6 channels: with zero-mean unit-variance inputs the output error
        // is the weight error.
        let w = bell(6 * 4 * 9, 7);
        let white = InputMoments {
            mean: &[0.0; 4],
            var: &[1.0; 4],
            window_corr: 0.0,
        };
        let dims = [6, 4, 3, 3];
        assert_eq!(
            output_weight_clip(&w, &dims, 0, 4, white),
            mse_weight_clip(&w, 6, 4)
        );
    }

    #[test]
    fn output_clip_weighs_each_input_channel_and_the_mean_shift() {
        // One output channel over two input channels (a 1 x 1 conv of 2 x 64 weights): channel
        // 0 is silent (variance and mean 0), channel 1 carries everything with a large mean.
        let mut w = bell(64, 3);
        w.extend(bell(64, 11).iter().map(|v| v * 0.5));
        let dims = [1, 2, 8, 8];
        let input = InputMoments {
            mean: &[0.0, 3.0],
            var: &[0.0, 1.0],
            window_corr: 0.0,
        };
        let expected = |c: f32| -> f64 {
            let s = c / 7.0;
            let d: Vec<f64> = w
                .iter()
                .map(|&v| (v - (v / s).round_ties_even().clamp(-7.0, 7.0) * s) as f64)
                .collect();
            let spread: f64 = d[64..].iter().map(|e| e * e).sum();
            let shift: f64 = d[64..].iter().map(|e| e * 3.0).sum();
            spread + shift * shift
        };
        let out = output_weight_clip(&w, &dims, 0, 4, input)[0];
        let mse = mse_weight_clip(&w, 1, 4)[0];
        assert!(expected(out) <= expected(mse), "{out} vs {mse}");
        let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for k in 20..=100 {
            assert!(expected(out) <= expected(max * k as f32 / 100.0) + 1e-12);
        }
        // The error of the silent channel's weights does not count: the clip differs from the
        // one of the weights alone.
        assert_ne!(out, mse);
    }

    #[test]
    fn row_inputs_follow_groups_and_flattened_features() {
        // Depthwise 3 x 3 over 4 channels: row j reads channel j only.
        let r = RowInputs::new(&[4, 1, 3, 3], 0, 4, 9).unwrap();
        assert_eq!(r.channel(2, 0), 2);
        assert_eq!(r.channel(3, 8), 3);
        // Two groups, 6 -> 4 channels: rows 0-1 read channels 0-2, rows 2-3 channels 3-5.
        let r = RowInputs::new(&[4, 3, 1, 1], 0, 6, 3).unwrap();
        assert_eq!((r.channel(1, 2), r.channel(2, 0)), (2, 3));
        // Gemm over a flattened 2-channel 2 x 2 map (K = 8): weights 4..8 read channel 1.
        let r = RowInputs::new(&[10, 8], 0, 2, 8).unwrap();
        assert_eq!((r.channel(5, 3), r.channel(5, 4)), (0, 1));
        // A shape the channels do not divide: no mapping (the weight MSE is used).
        assert!(RowInputs::new(&[10, 7], 0, 2, 7).is_none());
    }
}
