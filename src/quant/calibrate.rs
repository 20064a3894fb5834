//! Activation ranges without data: analytic ranges from BatchNormalization statistics (each BN
//! output is taken as N(beta, gamma^2) per channel, moments are propagated through ReLU
//! (rectified Gaussian), Add, Slice/Pad, pooling and reshapes, and the range is mean +- k std),
//! and ranges observed on a batch of inputs (min/max or a percentile).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::lower::Program;
use crate::onnx::graph::GraphIndex;
use crate::onnx::pb::ModelProto;

/// Float range per tensor.
pub type Ranges = HashMap<String, (f32, f32)>;

/// Seeded N(0, 1) inputs (candle's CPU RNG cannot be seeded).
pub fn noise(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

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

/// Per-channel Gaussian moments of a tensor.
#[derive(Debug, Clone)]
struct Moments {
    mean: Vec<f64>,
    var: Vec<f64>,
    nonneg: bool,
}

fn phi(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Standard normal CDF (Abramowitz-Stegun 7.1.26 erf, |error| < 1.5e-7).
fn cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
            + 0.254829592)
            * t
            * (-z * z).exp();
    if x >= 0.0 {
        0.5 * (1.0 + y)
    } else {
        0.5 * (1.0 - y)
    }
}

/// Moments of max(0, X) for X ~ N(m, v).
fn rectified(m: f64, v: f64) -> (f64, f64) {
    let s = v.sqrt();
    if s < 1e-12 {
        return (m.max(0.0), 0.0);
    }
    let a = m / s;
    let e = m * cdf(a) + s * phi(a);
    let e2 = (m * m + v) * cdf(a) + m * s * phi(a);
    (e, (e2 - e * e).max(0.0))
}

/// Analytic ranges (mean +- k std per channel, widened over channels) for `tensors` of `teacher`,
/// whose BatchNormalization nodes are still present. The network input is taken as N(0, 1) per
/// channel (a normalised image). Tensors whose moments cannot be derived are left out.
pub fn bn_ranges(
    teacher: &ModelProto,
    bn_stats: &HashMap<String, (Vec<f32>, Vec<f32>)>,
    input_channels: usize,
    tensors: &[(String, f64)],
) -> Ranges {
    let graph = teacher.graph.as_ref().expect("validated");
    let g = GraphIndex::new(graph);
    let mut m: HashMap<String, Moments> = HashMap::new();
    for v in &graph.input {
        if g.is_graph_input(&v.name) {
            m.insert(
                v.name.clone(),
                Moments {
                    mean: vec![0.0; input_channels],
                    var: vec![1.0; input_channels],
                    nonneg: false,
                },
            );
        }
    }
    for n in &graph.node {
        let get = |i: usize| n.input.get(i).and_then(|x| m.get(x)).cloned();
        let out = match n.op_type.as_str() {
            "BatchNormalization" => bn_stats.get(&n.name).map(|(gamma, beta)| Moments {
                mean: beta.iter().map(|&b| b as f64).collect(),
                var: gamma.iter().map(|&g| (g as f64).powi(2)).collect(),
                nonneg: false,
            }),
            "Relu" => get(0).map(|x| {
                let (mean, var) = x
                    .mean
                    .iter()
                    .zip(&x.var)
                    .map(|(&a, &b)| rectified(a, b))
                    .unzip();
                Moments {
                    mean,
                    var,
                    nonneg: true,
                }
            }),
            "Add" | "Sub" => match (get(0), get(1)) {
                (Some(a), Some(b)) if a.mean.len() == b.mean.len() => {
                    let sign = if n.op_type == "Add" { 1.0 } else { -1.0 };
                    Some(Moments {
                        mean: a
                            .mean
                            .iter()
                            .zip(&b.mean)
                            .map(|(x, y)| x + sign * y)
                            .collect(),
                        var: a.var.iter().zip(&b.var).map(|(x, y)| x + y).collect(),
                        nonneg: a.nonneg && b.nonneg && sign > 0.0,
                    })
                }
                _ => None,
            },
            "Identity" | "Dropout" | "MaxPool" | "AveragePool" | "GlobalAveragePool"
            | "GlobalMaxPool" | "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => get(0),
            // Spatial slicing keeps the channels; channel padding (option-A shortcuts) adds zeros.
            "Slice" => get(0),
            "Pad" => get(0).map(|x| pad_channels(&g, n, x)),
            _ => None,
        };
        if let (Some(o), Some(name)) = (out, n.output.first()) {
            m.insert(name.clone(), o);
        }
    }
    tensors
        .iter()
        .filter_map(|(t, k)| {
            let (t, k) = (t, *k);
            let x = m.get(t)?;
            let mut lo = f64::INFINITY;
            let mut hi = f64::NEG_INFINITY;
            for (&a, &v) in x.mean.iter().zip(&x.var) {
                lo = lo.min(a - k * v.sqrt());
                hi = hi.max(a + k * v.sqrt());
            }
            if x.nonneg {
                lo = lo.max(0.0);
            }
            Some((t.clone(), (lo as f32, hi as f32)))
        })
        .collect()
}

/// Channel padding of a Pad node (pads on axis 1 add zero channels); other pads keep moments.
fn pad_channels(g: &GraphIndex, n: &crate::onnx::pb::NodeProto, x: Moments) -> Moments {
    let pads = n
        .input
        .get(1)
        .and_then(|p| g.resolve_constant(p, None).ok().flatten())
        .and_then(|r| r.data.as_i64().map(<[i64]>::to_vec))
        .or_else(|| crate::onnx::graph::attr_ints(n, "pads"));
    let Some(p) = pads.filter(|p| p.len() >= 4 && p.len() % 2 == 0) else {
        return x;
    };
    let r = p.len() / 2;
    let (b, e) = (p[1].max(0) as usize, p[1 + r].max(0) as usize);
    let mut out = Moments {
        mean: vec![0.0; b],
        var: vec![0.0; b],
        nonneg: x.nonneg,
    };
    out.mean.extend(&x.mean);
    out.var.extend(&x.var);
    out.mean.extend(vec![0.0; e]);
    out.var.extend(vec![0.0; e]);
    out
}

/// BN scale/bias per BN node name, for [`bn_ranges`].
pub fn bn_affine(bn: &crate::onnx::bn::BnReport) -> HashMap<String, (Vec<f32>, Vec<f32>)> {
    bn.layers
        .iter()
        .filter_map(|l| {
            l.stats
                .as_ref()
                .map(|s| (l.name.clone(), (s.scale.clone(), s.bias.clone())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectified_gaussian_moments() {
        // max(0, N(0,1)): mean 1/sqrt(2 pi), variance 1/2 - 1/(2 pi).
        let (m, v) = rectified(0.0, 1.0);
        assert!((m - 0.398942).abs() < 1e-5);
        assert!((v - (0.5 - 1.0 / (2.0 * std::f64::consts::PI))).abs() < 1e-5);
        assert!((cdf(1.0) - 0.841345).abs() < 1e-6);
    }
}
