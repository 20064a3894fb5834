//! Quantization: bit-width specs, ONNX-exact quantizer arithmetic (round half to even, saturate),
//! where activations are quantized (placement) and how their ranges are found (calibration).
//! The fake-quantized student is the ONNX graph itself with QuantizeLinear/DequantizeLinear
//! nodes, so our simulation (the lowering) and ONNX Runtime run the same graph.

pub mod calibrate;
pub mod fake;
pub mod moments;
pub mod placement;
mod weights;

pub use weights::{
    InputMoments, QuantizedWeight, WeightClip, channel_major, clip_weight, from_channel_major,
    mse_weight_clip, output_weight_clip, quantize_weight, quantize_weight_exact,
};

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

/// How scales are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scales {
    /// Scales with short significands: 8-bit activation scales are powers of two (ORT fuses
    /// those layers and requantizes with s_in * s_w / s_out, exact only then), narrower ones
    /// have 6-bit significands, zero points are even, and each weight scale gets the longest
    /// significand for which every sum its layer computes fits f32's 24 bits. The float
    /// arithmetic between QuantizeLinear and DequantizeLinear is then exact, so any engine (ORT
    /// fused or not, tract, our simulation) computes the same codes whatever its summation order.
    Exact,
    /// Scales straight from the ranges (range / levels).
    Free,
}

/// Accumulations stay exact in f32 below this many units (24-bit significand).
pub(crate) const F32_EXACT: u64 = 1 << 24;

/// Significand bits of activation scales below 8 bits with `Scales::Exact` (what is left of
/// the 24 bits goes to the weight scales).
const ACTIVATION_SIGNIFICAND: u32 = 6;

/// The last place of a `bits`-bit significand at the magnitude of `s`.
fn significand_unit(s: f32, bits: u32) -> f64 {
    ((s as f64).log2().floor() - (bits as f64 - 1.0)).exp2()
}

/// `s` rounded up to a `bits`-bit significand: never smaller, so nothing more is clipped.
pub(crate) fn ceil_mantissa(s: f32, bits: u32) -> f32 {
    let unit = significand_unit(s, bits);
    ((s as f64 / unit).ceil() * unit) as f32
}

/// `s` rounded to the nearest (in ratio) `bits`-bit significand: below 8 bits, where a grid
/// has few levels, rounding a range estimate either way is unbiased.
fn nearest_mantissa(s: f32, bits: u32) -> f32 {
    let up = ceil_mantissa(s, bits);
    let unit = significand_unit(s, bits);
    let down = ((s as f64 / unit).floor() * unit) as f32;
    if (up as f64 / s as f64) <= (s as f64 / down as f64) {
        up
    } else {
        down
    }
}

/// The odd integer m with `s = m * 2^e`: what a product with `s` adds to an integer's width.
pub(crate) fn odd_mantissa(s: f32) -> u64 {
    let bits = s.to_bits();
    let m = (bits & 0x7F_FFFF) as u64 | if bits >> 23 & 0xFF != 0 { 0x80_0000 } else { 0 };
    m >> m.trailing_zeros()
}

/// `v.round_ties_even()`, without the libm call it compiles to on x86-64 targets without SSE4.1
/// (Rust's default): the fake-quantization ops round every activation of every training step.
/// Below 2^22 in magnitude, adding and subtracting 1.5 * 2^23 rounds to the nearest integer,
/// ties to even (the FPU's rounding mode); larger values, NaN and infinities take the exact call.
/// The one difference: a negative value that rounds to zero gives +0.0.
#[inline]
pub fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if v.abs() < 4_194_304.0 {
        (v + MAGIC) - MAGIC
    } else {
        v.round_ties_even()
    }
}

/// The int32 bias code of `b` on the accumulator grid `scale` (= s_input * s_weight).
pub fn quantize_bias(b: f32, scale: f32) -> i32 {
    (b as f64 / scale as f64)
        .round_ties_even()
        .clamp(i32::MIN as f64, i32::MAX as f64) as i32
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
    /// Unsigned M-bit activation grid (uint8 container, values 0..2^M-1) covering [lo, hi] and 0;
    /// with `Scales::Exact` the scale is rounded to a short significand and the zero point is
    /// even (see [`Scales`]).
    pub fn activation(lo: f32, hi: f32, bits: u8, scales: Scales) -> Self {
        let qmax = (1i32 << bits) - 1;
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = ((hi - lo) / qmax as f32).max(1e-8);
        let scale = match scales {
            // At 8 bits resolution is plentiful and a cut range costs the tails real data has
            // (heavier than the BN Gaussians'): the power of two is rounded up, never down.
            // Measured, w8a8 ptq-bn on the seven shared BN teachers (ORT, 10k images): top-1
            // drops summing 2.68 points rounding up vs 2.91 to the nearest, worst CIFAR-10 drop
            // 0.48 vs 0.53.
            Scales::Exact if bits == 8 => ceil_mantissa(scale, 1),
            Scales::Exact => nearest_mantissa(scale, ACTIVATION_SIGNIFICAND),
            Scales::Free => scale,
        };
        // The zero point sits at the same fraction of the grid as 0 of the range, so a scale
        // rounded down (or up) shrinks (or widens) both ends in proportion: placed at
        // -lo / scale it would keep `lo` and cut all of the difference from `hi` (measured on
        // cifar10_wrn10_1_preact: a [-2.89, 2.40] range kept only [-2.88, 1.11]).
        let ideal = -lo / (hi - lo).max(f32::MIN_POSITIVE) * qmax as f32;
        let zero_point = match scales {
            // Even, because ORT's QLinearAdd rounds after adding the zero point while ONNX
            // rounds before: on the exact ties these scales produce, the two agree only when
            // the zero point is even (measured: an odd one flipped half of an Add's codes).
            Scales::Exact => {
                let z = (ideal / 2.0).round_ties_even() as i32 * 2;
                z.clamp(0, qmax & !1)
            }
            Scales::Free => (ideal.round_ties_even() as i32).clamp(0, qmax),
        };
        Self {
            scale,
            zero_point,
            qmin: 0,
            qmax,
        }
    }

    /// Like [`QParams::activation`] for a range known exactly (the network input's, from its
    /// domain): the scale is rounded up, never down, so nothing in the range is clipped (with
    /// `Scales::Exact` to a power of two at 8 bits, as every 8-bit scale: a longer significand
    /// there would shorten the first layer's weight scales, which must keep its sums exact).
    pub fn activation_covering(lo: f32, hi: f32, bits: u8, scales: Scales) -> Self {
        let qmax = (1i32 << bits) - 1;
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let round = |s: f32| match scales {
            Scales::Exact if bits == 8 => ceil_mantissa(s.max(1e-8), 1),
            Scales::Exact => ceil_mantissa(s.max(1e-8), ACTIVATION_SIGNIFICAND),
            Scales::Free => s.max(1e-8),
        };
        if lo == 0.0 {
            return Self {
                scale: round(hi / qmax as f32),
                zero_point: 0,
                qmin: 0,
                qmax,
            };
        }
        // The zero point is rounded up (to even with exact scales) so the grid reaches `lo`;
        // the levels that costs are taken from the top, so it still reaches `hi`.
        let slack = if scales == Scales::Exact { 2 } else { 1 };
        let scale = round((hi - lo) / (qmax - slack) as f32);
        let ideal = -lo / scale;
        let zero_point = match scales {
            Scales::Exact => ((ideal / 2.0).ceil() as i32 * 2).clamp(0, qmax & !1),
            Scales::Free => (ideal.ceil() as i32).clamp(0, qmax),
        };
        Self {
            scale,
            zero_point,
            qmin: 0,
            qmax,
        }
    }

    /// ONNX QuantizeLinear on one value.
    pub fn quantize(&self, x: f32) -> i32 {
        (round_even(x / self.scale) as i64 + self.zero_point as i64)
            .clamp(self.qmin as i64, self.qmax as i64) as i32
    }

    pub fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }

    /// The largest |q - zp| on the grid.
    pub fn span(&self) -> u64 {
        (self.zero_point - self.qmin).max(self.qmax - self.zero_point) as u64
    }

    /// The float interval the grid represents (the Clip bounds of a k-bit grid).
    pub fn bounds(&self) -> (f32, f32) {
        (self.dequantize(self.qmin), self.dequantize(self.qmax))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_even_is_round_ties_even() {
        // Every float in [-2^23, 2^23] sampled densely around the integers, halves and the
        // 2^22 switch, plus the special values.
        let mut checked = 0;
        let mut v = 0.0f32;
        while v < 9.0e6 {
            for x in [
                v,
                -v,
                v.next_up(),
                v.next_down(),
                -v.next_up(),
                -v.next_down(),
            ] {
                assert_eq!(round_even(x), x.round_ties_even(), "{x}");
                assert_eq!(
                    round_even(x + 0.5),
                    (x + 0.5).round_ties_even(),
                    "{x} + 0.5"
                );
                checked += 1;
            }
            v = if v < 64.0 {
                v + 0.125
            } else {
                v * 1.0009 + 0.5
            };
        }
        assert!(checked > 10_000);
        assert_eq!(round_even(2.5), 2.0);
        assert_eq!(round_even(3.5), 4.0);
        assert_eq!(round_even(-2.5), -2.0);
        assert_eq!(round_even(4_194_303.5), 4_194_304.0);
        assert_eq!(round_even(4_194_304.5), 4_194_304.0);
        assert!(round_even(f32::NAN).is_nan());
        assert_eq!(round_even(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_even(f32::NEG_INFINITY), f32::NEG_INFINITY);
    }

    #[test]
    fn covering_grids_reach_both_ends_of_a_known_range() {
        // Raw pixels: exactly one pixel per step.
        let p = QParams::activation_covering(0.0, 255.0, 8, Scales::Exact);
        assert_eq!((p.scale, p.zero_point), (1.0, 0));
        for (lo, hi) in [(-2.1179, 2.64), (-2.4291, 2.7537), (-1.0, 1.0), (-0.3, 7.1)] {
            for bits in [4u8, 6, 8] {
                for scales in [Scales::Exact, Scales::Free] {
                    let p = QParams::activation_covering(lo, hi, bits, scales);
                    let (a, b) = p.bounds();
                    assert!(
                        a <= lo && b >= hi,
                        "{lo}..{hi} at {bits} bits: grid {a}..{b}"
                    );
                    // And not much wider: the reserved steps plus the significand's rounding
                    // (up to a factor 2 for the power-of-two scales at 8 bits).
                    let rounding = if bits == 8 && scales == Scales::Exact {
                        1.0
                    } else {
                        1.0 / 32.0
                    };
                    assert!(
                        (b - a) - (hi - lo) <= 3.0 * p.scale + (hi - lo) * rounding,
                        "{lo}..{hi}: {a}..{b}"
                    );
                    if scales == Scales::Exact {
                        assert_eq!(p.zero_point % 2, 0);
                    }
                }
            }
        }
    }

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
        let a = QParams::activation(0.0, 6.0, 4, Scales::Free);
        assert_eq!((a.zero_point, a.qmax), (0, 15));
        assert_eq!(a.bounds(), (0.0, 6.0));
        let b = QParams::activation(-1.0, 3.0, 8, Scales::Free);
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

    #[test]
    fn short_significands() {
        for s in [0.1f32, 0.0371, 1.0, 3.3e-5, 7.0] {
            for bits in [1, 4, 6] {
                let c = ceil_mantissa(s, bits);
                assert!(
                    c >= s && c <= s * (1.0 + 2f32.powi(1 - bits as i32)),
                    "{s} {bits} {c}"
                );
                assert!(odd_mantissa(c) < 1 << bits, "{s} {bits} {c}");
            }
        }
        assert_eq!(odd_mantissa(0.75), 3);
        // 5.4 / 255 = 0.0212 is nearer (in ratio) to 2^-6, but an 8-bit grid never cuts its
        // range: 2^-5.
        let a = QParams::activation(-0.3, 5.1, 8, Scales::Exact);
        assert_eq!(
            a.scale,
            2f32.powi(-5),
            "8-bit activation scales are powers of two, rounded up"
        );
        let (lo, hi) = a.bounds();
        assert!(lo <= -0.3 && hi >= 5.1, "{a:?}");
        // The zero point keeps 0 at its place in the range: the extra width goes to both ends
        // in proportion (-0.3 of 5.4 = 5.6% of the grid: code 14).
        assert_eq!(a.zero_point, 14, "{a:?}");
        assert_eq!(a.zero_point % 2, 0, "{a:?}");
        assert_eq!(nearest_mantissa(1.40, 1), 1.0);
        assert_eq!(nearest_mantissa(1.42, 1), 2.0);
        let b = QParams::activation(0.0, 5.1, 4, Scales::Exact);
        assert!(odd_mantissa(b.scale) < 1 << ACTIVATION_SIGNIFICAND);
        assert!((b.bounds().1 / 5.1 - 1.0).abs() < 2f32.powi(-(ACTIVATION_SIGNIFICAND as i32)));
    }

    /// The point of `Scales::Exact`: a layer's dot products come out bit-identical whatever the
    /// summation order (sequential, reversed, pairwise, as different engines and kernels add),
    /// and equal the exact (f64) value. With free scales the same sums differ between orders.
    #[test]
    fn exact_scales_make_every_summation_order_agree() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (channels, per) = (32usize, 576usize);
        let w: Vec<f32> = (0..channels * per)
            .map(|_| rng.random_range(-0.3f32..0.3) * rng.random_range(0.0f32..1.0))
            .collect();
        let bias: Vec<f32> = (0..channels)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let pairwise = |v: &[f32]| -> f32 {
            let mut v = v.to_vec();
            while v.len() > 1 {
                v = v.chunks(2).map(|p| p.iter().sum()).collect();
            }
            v[0]
        };
        let mut differ = [0usize; 2];
        for (k, scales) in [Scales::Exact, Scales::Free].into_iter().enumerate() {
            for (bits, abits) in [(4u8, 4u8), (7, 8), (4, 8)] {
                let input = QParams::activation(0.0, 3.7, abits, scales);
                let q = match scales {
                    Scales::Exact => {
                        let (q, exact) = quantize_weight_exact(
                            &w,
                            channels,
                            bits,
                            WeightScheme::Symmetric,
                            &input,
                            Some(&bias),
                        );
                        assert!(exact);
                        q
                    }
                    Scales::Free => quantize_weight(&w, channels, bits, WeightScheme::Symmetric),
                };
                // Large codes make large sums: the hardest case for exactness.
                let x: Vec<f32> = (0..per)
                    .map(|_| input.dequantize(rng.random_range(input.qmax / 2..=input.qmax)))
                    .collect();
                for (c, (&bc, &sc)) in bias.iter().zip(&q.scales).enumerate() {
                    let b = quantize_bias(bc, sc * input.scale) as f32 * (sc * input.scale);
                    let row = &q.values[c * per..(c + 1) * per];
                    let terms: Vec<f32> = std::iter::once(b)
                        .chain(x.iter().zip(row).map(|(&xi, &wi)| xi * (wi as f32 * sc)))
                        .collect();
                    let exact: f64 = terms.iter().map(|&t| t as f64).sum();
                    let sums = [
                        terms.iter().sum::<f32>(),
                        terms.iter().rev().sum::<f32>(),
                        pairwise(&terms),
                    ];
                    if scales == Scales::Exact {
                        assert!(
                            sums.iter().all(|&s| s as f64 == exact),
                            "w{bits}a{abits} channel {c}: {sums:?} vs {exact}"
                        );
                    }
                    differ[k] += sums.iter().any(|&s| s != sums[0]) as usize;
                }
            }
        }
        assert_eq!(differ[0], 0);
        assert!(
            differ[1] > 0,
            "free scales should show order-dependent sums"
        );
    }
}
