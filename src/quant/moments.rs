//! Per-channel Gaussian moments of a network's tensors, derived from its BatchNormalization
//! statistics alone (the `ptq-bn` ranges):
//! - a tensor a BN normalizes has that BN's running mean and variance (what training measured);
//! - a BN's output is N(beta, gamma^2) per channel;
//! - moments flow forward through elementwise activations (ReLU in closed form; Clip/ReLU6,
//!   LeakyReLU, PReLU, HardSigmoid, HardSwish, Sigmoid, Tanh by quadrature, with their output
//!   bounds), sums and differences, products with constants or gates (squeeze-excitation),
//!   channel concatenation and padding, windowed pooling and reshapes (not global pooling,
//!   whose spread depends on spatial correlation the statistics do not give);
//! - where a BN describes a sum (pre-activation nets: BN after the residual Add) and one
//!   operand is known, the other gets the sum's spread around the remaining mean.
//!
//! A range is then mean +- k std per channel, widened over channels, cut to the tensor's bounds.

use std::collections::HashMap;

use crate::onnx::bn::BnReport;
use crate::onnx::graph::{GraphIndex, attr_float, attr_int, attr_ints};
use crate::onnx::pb::{ModelProto, NodeProto};

/// Per-channel Gaussian moments of a tensor, with the bounds its values cannot leave.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub bounds: (f64, f64),
}

const UNBOUNDED: (f64, f64) = (f64::NEG_INFINITY, f64::INFINITY);

impl Moments {
    fn new(mean: Vec<f64>, var: Vec<f64>) -> Self {
        Self {
            mean,
            var,
            bounds: UNBOUNDED,
        }
    }

    fn channels(&self) -> usize {
        self.mean.len()
    }

    /// The range mean +- k std over all channels, within the bounds.
    pub fn range(&self, k: f64) -> (f64, f64) {
        let mut lo = f64::INFINITY;
        let mut hi = f64::NEG_INFINITY;
        for (&a, &v) in self.mean.iter().zip(&self.var) {
            lo = lo.min(a - k * v.sqrt());
            hi = hi.max(a + k * v.sqrt());
        }
        (lo.max(self.bounds.0), hi.min(self.bounds.1))
    }

    /// x -> a x + b per channel (a, b of length 1 or C).
    fn affine(&self, a: &[f64], b: &[f64]) -> Self {
        let at = |v: &[f64], c: usize| v[if v.len() == 1 { 0 } else { c }];
        let c = self.channels();
        let mean = (0..c).map(|i| at(a, i) * self.mean[i] + at(b, i)).collect();
        let var = (0..c).map(|i| at(a, i).powi(2) * self.var[i]).collect();
        let (amin, amax) = a
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
                (l.min(x), h.max(x))
            });
        let (bmin, bmax) = b
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
                (l.min(x), h.max(x))
            });
        let bounds = if amin >= 0.0 && self.bounds != UNBOUNDED {
            let (l, h) = self.bounds;
            let cand = [l * amin, l * amax, h * amin, h * amax];
            let lo = cand.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = cand.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (lo + bmin, hi + bmax)
        } else {
            UNBOUNDED
        };
        Self { mean, var, bounds }
    }
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

/// Moments of f(X) for X ~ N(m, v), by Simpson's rule over m +- 8 std.
fn through(f: &dyn Fn(f64) -> f64, m: f64, v: f64) -> (f64, f64) {
    let s = v.sqrt();
    if s < 1e-12 {
        return (f(m), 0.0);
    }
    const N: usize = 400;
    let h = 16.0 / N as f64;
    let (mut e, mut e2) = (0.0, 0.0);
    for i in 0..=N {
        let z = -8.0 + h * i as f64;
        let w = if i == 0 || i == N {
            1.0
        } else if i % 2 == 1 {
            4.0
        } else {
            2.0
        } * h
            / 3.0
            * phi(z);
        let y = f(m + s * z);
        e += w * y;
        e2 += w * y * y;
    }
    (e, (e2 - e * e).max(0.0))
}

/// An elementwise activation: its function, per channel, and its output bounds.
struct Activation {
    f: Box<dyn Fn(f64, usize) -> f64>,
    bounds: (f64, f64),
}

/// Constant values of input `i` of `n`, if it has one.
fn constant(g: &GraphIndex, n: &NodeProto, i: usize) -> Option<Vec<f64>> {
    let name = n.input.get(i).filter(|s| !s.is_empty())?;
    g.resolve_constant(name, None)
        .ok()
        .flatten()
        .map(|r| r.data.to_f64())
}

fn activation(g: &GraphIndex, n: &NodeProto) -> Option<Activation> {
    let act = |f: Box<dyn Fn(f64, usize) -> f64>, bounds| Some(Activation { f, bounds });
    match n.op_type.as_str() {
        "LeakyRelu" => {
            let a = attr_float(n, "alpha", 0.01) as f64;
            act(
                Box::new(move |x, _| if x >= 0.0 { x } else { a * x }),
                UNBOUNDED,
            )
        }
        "PRelu" => {
            let slope = constant(g, n, 1)?;
            act(
                Box::new(move |x, c| {
                    let a = slope[if slope.len() == 1 { 0 } else { c % slope.len() }];
                    if x >= 0.0 { x } else { a * x }
                }),
                UNBOUNDED,
            )
        }
        "Clip" => {
            // Opset 11+: min and max are inputs; before, attributes.
            let lo = constant(g, n, 1)
                .and_then(|v| v.first().copied())
                .or_else(|| crate::onnx::graph::attr(n, "min").map(|a| a.f as f64))
                .unwrap_or(f64::NEG_INFINITY);
            let hi = constant(g, n, 2)
                .and_then(|v| v.first().copied())
                .or_else(|| crate::onnx::graph::attr(n, "max").map(|a| a.f as f64))
                .unwrap_or(f64::INFINITY);
            act(Box::new(move |x, _| x.clamp(lo, hi)), (lo, hi))
        }
        "HardSigmoid" => {
            let (a, b) = (
                attr_float(n, "alpha", 0.2) as f64,
                attr_float(n, "beta", 0.5) as f64,
            );
            act(
                Box::new(move |x, _| (a * x + b).clamp(0.0, 1.0)),
                (0.0, 1.0),
            )
        }
        "HardSwish" => act(
            Box::new(|x, _| x * (x / 6.0 + 0.5).clamp(0.0, 1.0)),
            (-0.375, f64::INFINITY),
        ),
        "Sigmoid" => act(Box::new(|x, _| 1.0 / (1.0 + (-x).exp())), (0.0, 1.0)),
        "Tanh" => act(Box::new(|x, _| x.tanh()), (-1.0, 1.0)),
        _ => None,
    }
}

/// Moments of every tensor the BN statistics reach. `input` is the network input's per-channel
/// (mean, variance).
pub fn propagate(
    model: &ModelProto,
    bn: &BnReport,
    input: (&[f64], &[f64]),
) -> HashMap<String, Moments> {
    let graph = model.graph.as_ref().expect("validated");
    let g = GraphIndex::new(graph);
    let stats: HashMap<usize, &crate::onnx::bn::BnStats> = bn
        .layers
        .iter()
        .filter_map(|l| l.stats.as_ref().map(|s| (l.node_index, s)))
        .collect();
    // What a BN says about the tensor it normalizes: its running statistics.
    let described = |t: &str| -> Option<Moments> {
        g.consumers(t).iter().find_map(|&c| {
            let n = g.node(c);
            (n.op_type == "BatchNormalization" && n.input.first().map(String::as_str) == Some(t))
                .then(|| stats.get(&c))
                .flatten()
                .map(|s| {
                    Moments::new(
                        s.running_mean.iter().map(|&v| v as f64).collect(),
                        s.running_var.iter().map(|&v| v as f64).collect(),
                    )
                })
        })
    };
    let mut m: HashMap<String, Moments> = HashMap::new();
    for v in &graph.input {
        if g.is_graph_input(&v.name) {
            m.insert(
                v.name.clone(),
                Moments::new(input.0.to_vec(), input.1.to_vec()),
            );
        }
    }
    for (i, n) in graph.node.iter().enumerate() {
        let get = |k: usize| n.input.get(k).and_then(|x| m.get(x)).cloned();
        let out = forward(&g, n, i, &stats, &get);
        let Some(name) = n.output.first() else {
            continue;
        };
        // Measured statistics win over propagated ones; the propagated bounds still hold.
        let out = match (described(name), out) {
            (Some(mut d), Some(o)) => {
                d.bounds = o.bounds;
                Some(d)
            }
            (d, o) => d.or(o),
        };
        if let Some(o) = out {
            m.insert(name.clone(), o);
        }
    }
    // A BN after a concatenation describes its parts: an unknown part takes its channels of
    // the whole (dense blocks: each layer's output is normalized by the next layer's BN).
    for n in graph
        .node
        .iter()
        .rev()
        .filter(|n| n.op_type == "Concat" && attr_int(n, "axis", 1) == 1)
    {
        let Some(s) = n.output.first().and_then(|o| m.get(o)).cloned() else {
            continue;
        };
        let unknown: Vec<&String> = n.input.iter().filter(|i| !m.contains_key(*i)).collect();
        if unknown.len() != 1 {
            continue;
        }
        let mut at = 0;
        for i in &n.input {
            match m.get(i) {
                Some(k) => at += k.channels(),
                None => {
                    let known: usize = n
                        .input
                        .iter()
                        .filter_map(|x| m.get(x))
                        .map(Moments::channels)
                        .sum();
                    let len = s.channels().saturating_sub(known);
                    if len == 0 {
                        break;
                    }
                    let part =
                        Moments::new(s.mean[at..at + len].to_vec(), s.var[at..at + len].to_vec());
                    m.insert(i.clone(), part);
                    break;
                }
            }
        }
    }
    // A BN after a sum describes the sum: an unknown operand takes the sum's spread around the
    // mean the known operand leaves (pre-activation residual branches).
    for n in graph.node.iter().rev().filter(|n| n.op_type == "Add") {
        let (Some(s), [a, b]) = (
            n.output.first().and_then(|o| m.get(o)).cloned(),
            n.input.as_slice(),
        ) else {
            continue;
        };
        for (unknown, known) in [(a, b), (b, a)] {
            if m.contains_key(unknown) || g.is_initializer(unknown) {
                continue;
            }
            if let Some(k) = m.get(known).filter(|k| k.channels() == s.channels()) {
                let mean = s.mean.iter().zip(&k.mean).map(|(x, y)| x - y).collect();
                let d = Moments::new(mean, s.var.clone());
                m.insert(unknown.clone(), d);
            }
        }
    }
    m
}

/// Correlation of two values of one image channel within a 3 x 3 window, averaged over the
/// window's pairs: 0.92-0.93 for neighbours, 0.86 diagonally, 0.82-0.85 two apart (measured on
/// photographs, the CIFAR-10 test images; docs/results.md, "Weight clipping by output error").
pub const IMAGE_WINDOW_CORRELATION: f64 = 0.85;

/// What a weight clip knows of a layer's input.
#[derive(Debug, Clone)]
pub struct LayerInput {
    pub moments: Moments,
    /// Correlation of the values one weight row reads within a channel: natural images' for
    /// the network input, 0 (unknown) inside the network.
    pub window_corr: f64,
}

/// What `model`'s BN statistics (or, for the network input, its domain's `input` moments) say
/// about the given layer inputs, keyed by tensor; inputs they do not reach are left out. For a
/// weight clip, unlike a range, a global pool's output may take its input's per-pixel moments:
/// the same mean, and a spread no larger.
pub fn layer_inputs(
    model: &ModelProto,
    bn: &BnReport,
    input: (&[f64], &[f64]),
    tensors: &[String],
) -> HashMap<String, LayerInput> {
    let m = propagate(model, bn, input);
    let graph = model.graph.as_ref().expect("validated");
    let g = GraphIndex::new(graph);
    // Back through ops that keep each channel's values or their mean, a few steps at most.
    let back = |t: &str, global_pool: bool| -> Option<&str> {
        let n = g.node(g.producer(t)?);
        let spatial_mean = n.op_type == "ReduceMean"
            && attr_ints(n, "axes").is_some_and(|a| a.iter().all(|&x| x >= 2));
        let keeps = match n.op_type.as_str() {
            "Pad" | "Identity" | "Flatten" | "Reshape" | "Squeeze" => true,
            "GlobalAveragePool" | "AveragePool" => global_pool,
            _ => global_pool && spatial_mean,
        };
        keeps.then(|| n.input.first().map(String::as_str)).flatten()
    };
    let reads_image = |t: &str| {
        let mut at = t;
        for _ in 0..8 {
            if g.is_graph_input(at) {
                return true;
            }
            match back(at, false) {
                Some(x) => at = x,
                None => return false,
            }
        }
        false
    };
    tensors
        .iter()
        .filter_map(|t| {
            let mut at = t.as_str();
            for _ in 0..8 {
                if let Some(x) = m.get(at) {
                    let window_corr = if reads_image(t) {
                        IMAGE_WINDOW_CORRELATION
                    } else {
                        0.0
                    };
                    let moments = x.clone();
                    return Some((
                        t.clone(),
                        LayerInput {
                            moments,
                            window_corr,
                        },
                    ));
                }
                at = back(at, true)?;
            }
            None
        })
        .collect()
}

impl LayerInput {
    pub fn as_input(&self) -> crate::quant::InputMoments<'_> {
        crate::quant::InputMoments {
            mean: &self.moments.mean,
            var: &self.moments.var,
            window_corr: self.window_corr,
        }
    }
}

/// The output moments of one node from its inputs'.
fn forward(
    g: &GraphIndex,
    n: &NodeProto,
    index: usize,
    stats: &HashMap<usize, &crate::onnx::bn::BnStats>,
    get: &dyn Fn(usize) -> Option<Moments>,
) -> Option<Moments> {
    match n.op_type.as_str() {
        "BatchNormalization" => stats.get(&index).map(|s| {
            Moments::new(
                s.bias.iter().map(|&b| b as f64).collect(),
                s.scale.iter().map(|&g| (g as f64).powi(2)).collect(),
            )
        }),
        "Relu" => get(0).map(|x| {
            let (mean, var) = x
                .mean
                .iter()
                .zip(&x.var)
                .map(|(&a, &b)| rectified(a, b))
                .unzip();
            let (l, h) = x.bounds;
            Moments {
                mean,
                var,
                bounds: (l.max(0.0), h.max(0.0)),
            }
        }),
        "LeakyRelu" | "PRelu" | "Clip" | "HardSigmoid" | "HardSwish" | "Sigmoid" | "Tanh" => {
            let x = get(0)?;
            let a = activation(g, n)?;
            let (mean, var) = (0..x.channels())
                .map(|c| through(&|v| (a.f)(v, c), x.mean[c], x.var[c]))
                .unzip();
            Some(Moments {
                mean,
                var,
                bounds: a.bounds,
            })
        }
        "Add" | "Sub" => {
            let sign = if n.op_type == "Add" { 1.0 } else { -1.0 };
            match (get(0), get(1)) {
                (Some(a), Some(b)) if a.channels() == b.channels() => {
                    let mean = a
                        .mean
                        .iter()
                        .zip(&b.mean)
                        .map(|(x, y)| x + sign * y)
                        .collect();
                    let var = a.var.iter().zip(&b.var).map(|(x, y)| x + y).collect();
                    let bounds = if sign > 0.0 {
                        (a.bounds.0 + b.bounds.0, a.bounds.1 + b.bounds.1)
                    } else {
                        (a.bounds.0 - b.bounds.1, a.bounds.1 - b.bounds.0)
                    };
                    Some(Moments { mean, var, bounds })
                }
                // A constant offset: x + c, x - c, or c - x.
                (Some(x), None) => {
                    let c = per_channel(constant(g, n, 1)?, x.channels())?;
                    Some(x.affine(&[1.0], &c.iter().map(|v| sign * v).collect::<Vec<_>>()))
                }
                (None, Some(x)) => {
                    let c = per_channel(constant(g, n, 0)?, x.channels())?;
                    Some(x.affine(&[sign], &c))
                }
                _ => None,
            }
        }
        "Mul" | "Div" => match (get(0), get(1)) {
            (Some(a), Some(b)) if n.op_type == "Mul" && a.channels() == b.channels() => {
                Some(product(&a, &b))
            }
            (Some(x), None) => {
                let c = per_channel(constant(g, n, 1)?, x.channels())?;
                let c = if n.op_type == "Div" {
                    c.iter().map(|v| 1.0 / v).collect()
                } else {
                    c
                };
                Some(x.affine(&c, &[0.0]))
            }
            (None, Some(x)) if n.op_type == "Mul" => {
                let c = per_channel(constant(g, n, 0)?, x.channels())?;
                Some(x.affine(&c, &[0.0]))
            }
            _ => None,
        },
        "Concat" if attr_int(n, "axis", 1) == 1 => {
            let parts: Option<Vec<Moments>> = (0..n.input.len()).map(get).collect();
            let parts = parts?;
            let mut out = Moments::new(vec![], vec![]);
            out.bounds = (f64::INFINITY, f64::NEG_INFINITY);
            for p in parts {
                out.mean.extend(p.mean);
                out.var.extend(p.var);
                out.bounds = (out.bounds.0.min(p.bounds.0), out.bounds.1.max(p.bounds.1));
            }
            Some(out)
        }
        // Small windows keep the per-pixel statistics (a conservative range). A global pool's
        // spread is the spread of image means, which the per-pixel statistics cannot tell
        // (it depends on how correlated the pixels are): left to observation.
        "AveragePool" => {
            let area: i64 = attr_ints(n, "kernel_shape")
                .unwrap_or_default()
                .iter()
                .product();
            if area < 16 { get(0) } else { None }
        }
        "Identity" | "Dropout" | "MaxPool" | "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
            get(0)
        }
        // Spatial slicing keeps the channels; channel padding (option-A shortcuts) adds zeros.
        "Slice" => get(0),
        "Pad" => get(0).map(|x| pad_channels(g, n, x)),
        _ => None,
    }
}

/// Moments of a product of independent per-channel variables (a gate times a signal).
fn product(a: &Moments, b: &Moments) -> Moments {
    let c = a.channels();
    let mean = (0..c).map(|i| a.mean[i] * b.mean[i]).collect();
    let var = (0..c)
        .map(|i| a.var[i] * b.var[i] + a.var[i] * b.mean[i].powi(2) + b.var[i] * a.mean[i].powi(2))
        .collect();
    let (l1, h1) = a.bounds;
    let (l2, h2) = b.bounds;
    let cand = [l1 * l2, l1 * h2, h1 * l2, h1 * h2];
    let bounds = if cand.iter().all(|v| v.is_finite()) {
        (
            cand.iter().copied().fold(f64::INFINITY, f64::min),
            cand.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    } else if l2 >= 0.0 && h2 <= 1.0 {
        // A gate in [0, 1] keeps the signal's bounds and 0.
        (l1.min(0.0), h1.max(0.0))
    } else if l1 >= 0.0 && h1 <= 1.0 {
        (l2.min(0.0), h2.max(0.0))
    } else {
        UNBOUNDED
    };
    Moments { mean, var, bounds }
}

/// A constant's values as per-channel (length 1 or `c`, from shapes like [C], [1, C, 1, 1]).
fn per_channel(v: Vec<f64>, c: usize) -> Option<Vec<f64>> {
    (v.len() == 1 || v.len() == c).then_some(v)
}

/// Channel padding of a Pad node (pads on axis 1 add zero channels); other pads keep moments.
fn pad_channels(g: &GraphIndex, n: &NodeProto, x: Moments) -> Moments {
    let pads = n
        .input
        .get(1)
        .and_then(|p| g.resolve_constant(p, None).ok().flatten())
        .and_then(|r| r.data.as_i64().map(<[i64]>::to_vec))
        .or_else(|| attr_ints(n, "pads"));
    let Some(p) = pads.filter(|p| p.len() >= 4 && p.len() % 2 == 0) else {
        return x;
    };
    let r = p.len() / 2;
    let (b, e) = (p[1].max(0) as usize, p[1 + r].max(0) as usize);
    let mut mean = vec![0.0; b];
    let mut var = vec![0.0; b];
    mean.extend(&x.mean);
    var.extend(&x.var);
    mean.extend(vec![0.0; e]);
    var.extend(vec![0.0; e]);
    let bounds = if b + e > 0 {
        (x.bounds.0.min(0.0), x.bounds.1.max(0.0))
    } else {
        x.bounds
    };
    Moments { mean, var, bounds }
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
        // Quadrature agrees with the closed form.
        let (qm, qv) = through(&|x| x.max(0.0), 0.3, 2.0);
        let (cm, cv) = rectified(0.3, 2.0);
        assert!(
            (qm - cm).abs() < 1e-4 && (qv - cv).abs() < 1e-4,
            "{qm} {qv}"
        );
    }

    #[test]
    fn clipped_and_gated_moments() {
        // ReLU6 of N(3, 9): mean below 3, variance below 9, bounded to [0, 6].
        let (m, v) = through(&|x| x.clamp(0.0, 6.0), 3.0, 9.0);
        assert!((m - 3.0).abs() < 1e-6, "symmetric clip keeps the mean: {m}");
        assert!(v < 9.0 && v > 4.0, "{v}");
        // A gate of mean 0.5 halves a signal's mean.
        let x = Moments::new(vec![2.0], vec![1.0]);
        let gate = Moments {
            mean: vec![0.5],
            var: vec![0.01],
            bounds: (0.0, 1.0),
        };
        let p = product(&x, &gate);
        assert!((p.mean[0] - 1.0).abs() < 1e-12);
        assert_eq!(p.bounds, UNBOUNDED);
        // A bounded signal (ReLU6) times a gate stays within the signal's bounds.
        let relu6 = Moments {
            bounds: (0.0, 6.0),
            ..x
        };
        assert_eq!(product(&relu6, &gate).bounds, (0.0, 6.0));
    }
}
