//! Activation ranges without data: analytic ranges from BatchNormalization statistics (the
//! moments [`super::moments`] derives, mean +- k std), and ranges observed on a batch of inputs
//! (min/max or a percentile).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::lower::Program;
use crate::onnx::pb::ModelProto;

/// Float range per tensor.
pub type Ranges = HashMap<String, (f32, f32)>;

/// Ranges of `tensors` over a batch: min/max, or the (100-p, p) percentiles when `percentile`.
pub fn observe(
    program: &Program,
    x: &Tensor,
    tensors: &[String],
    percentile: Option<f64>,
) -> Result<Ranges> {
    let (_, ts) = program.forward_tensors(x, tensors)?;
    let mut out = Ranges::new();
    for (name, t) in tensors.iter().zip(ts) {
        let mut v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let r = match percentile {
            None => v
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                }),
            Some(p) => {
                v.sort_unstable_by(f32::total_cmp);
                let at = |q: f64| v[(((v.len() - 1) as f64) * q / 100.0).round() as usize];
                (at(100.0 - p), at(p))
            }
        };
        out.insert(name.clone(), r);
    }
    Ok(out)
}

/// Default k (ranges are mean +- k std) for a point quantized at `bits`, when `--bn-k` is not
/// given. Chosen by a sweep on the shared CIFAR ResNet-20 teachers (3,000 test images): 8 bits
/// wants wide ranges (k = 9: resolution is plentiful and the BN-Gaussian model underestimates real
/// tails), 4 bits a tighter clip (k = 4.5); widths in between are interpolated.
pub fn default_bn_k(bits: u8) -> f64 {
    match bits {
        0..=2 => 3.0,
        3 => 3.75,
        4 => 4.5,
        5 => 5.6,
        6 => 6.75,
        7 => 7.9,
        _ => 9.0,
    }
}

/// Analytic ranges (mean +- k std per channel, widened over channels, within the tensor's
/// bounds) for `tensors` of `model`, whose BatchNormalization statistics `bn` describes (see
/// [`super::moments`]). The network input has per-channel `input` (mean, variance): its
/// domain's. Tensors the statistics do not reach are left out.
pub fn bn_ranges(
    model: &ModelProto,
    bn: &crate::onnx::bn::BnReport,
    input: (&[f64], &[f64]),
    tensors: &[(String, f64)],
) -> Ranges {
    let m = super::moments::propagate(model, bn, input);
    tensors
        .iter()
        .filter_map(|(t, k)| {
            let (lo, hi) = m.get(t)?.range(*k);
            Some((t.clone(), (lo as f32, hi as f32)))
        })
        .collect()
}
