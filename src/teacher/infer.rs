//! Estimating the input's statistics from the teacher alone: a BatchNormalization on the input
//! gives them directly; the BN after the first conv gives the input's per-channel mean by least
//! squares on its running means (each output's mean is a known weighted sum of the input
//! means, padding included), and its spread by matching its running variances under a
//! natural-image correlation model (neighbouring pixels and colour channels correlated).

use super::domain::{CHANNEL_CORR, Estimate, SPATIAL_DECAY, classify};
use crate::onnx::LoadedModel;
use crate::onnx::bn::BnReport;
use crate::onnx::graph::{GraphIndex, attr_int, attr_ints, attr_string};
use crate::onnx::padding::AutoPad;

/// Per-channel affine map x' = a x + b from the graph input to the first conv (preprocessing
/// ops with constant operands), with the tensor it arrives at.
struct Path {
    a: Vec<f64>,
    b: Vec<f64>,
    tensor: String,
    /// Extra zero padding from Pad nodes: (top, left, bottom, right).
    pad: [usize; 4],
}

/// Estimates the input statistics from the BN that sees the input first: a BN on the input
/// itself, or the BN right after the first conv. None when the graph does not start that way.
pub fn estimate(model: &LoadedModel, bn: &BnReport, (h, w): (usize, usize)) -> Option<Estimate> {
    let graph = model.graph();
    let g = GraphIndex::new(graph);
    let input = graph
        .input
        .iter()
        .find(|v| g.is_graph_input(&v.name))?
        .name
        .clone();
    let dir = Some(model.dir());
    let konst = |name: &str| -> Option<Vec<f64>> {
        g.resolve_constant(name, dir)
            .ok()
            .flatten()
            .map(|r| r.data.to_f64())
    };
    let channels = 3usize;
    let mut path = Path {
        a: vec![1.0; channels],
        b: vec![0.0; channels],
        tensor: input,
        pad: [0; 4],
    };
    let per_channel = |v: &[f64]| -> Option<Vec<f64>> {
        match v.len() {
            1 => Some(vec![v[0]; channels]),
            n if n == channels => Some(v.to_vec()),
            _ => None,
        }
    };
    for _ in 0..16 {
        let cons: Vec<usize> = g
            .consumers(&path.tensor)
            .iter()
            .copied()
            .filter(|&c| g.node(c).op_type != "Shape")
            .collect();
        if cons.len() != 1 {
            return None;
        }
        let n = g.node(cons[0]);
        let other = |n: &crate::onnx::pb::NodeProto| -> Option<(Vec<f64>, bool)> {
            let k = n.input.iter().position(|i| *i == path.tensor)?;
            let o = n.input.get(1 - k.min(1))?;
            Some((per_channel(&konst(o)?)?, k == 0))
        };
        match n.op_type.as_str() {
            "Identity" | "Dropout" | "Cast" => {}
            "Sub" | "Add" | "Mul" | "Div" => {
                let (c, first) = other(n)?;
                for ((a, b), c) in path.a.iter_mut().zip(path.b.iter_mut()).zip(c) {
                    (*a, *b) = match (n.op_type.as_str(), first) {
                        ("Add", _) => (*a, *b + c),
                        ("Sub", true) => (*a, *b - c),
                        ("Sub", false) => (-*a, c - *b),
                        ("Mul", _) => (*a * c, *b * c),
                        ("Div", true) => (*a / c, *b / c),
                        _ => return None,
                    };
                }
            }
            "Pad" => {
                let mode = attr_string(n, "mode").unwrap_or_else(|| "constant".into());
                let pads = match n.input.get(1).filter(|s| !s.is_empty()) {
                    Some(p) => konst(p)?.iter().map(|&v| v as i64).collect(),
                    None => attr_ints(n, "pads")?,
                };
                let value = n
                    .input
                    .get(2)
                    .filter(|s| !s.is_empty())
                    .and_then(|v| konst(v))
                    .map_or(0.0, |v| v.first().copied().unwrap_or(0.0));
                // Only zero padding of the spatial axes of an NCHW tensor.
                if mode != "constant"
                    || value != 0.0
                    || pads.len() != 8
                    || pads.iter().any(|&p| p < 0)
                    || pads[0] != 0
                    || pads[1] != 0
                    || pads[4] != 0
                    || pads[5] != 0
                {
                    return None;
                }
                path.pad[0] += pads[2] as usize;
                path.pad[1] += pads[3] as usize;
                path.pad[2] += pads[6] as usize;
                path.pad[3] += pads[7] as usize;
            }
            "BatchNormalization" => {
                let l = bn.layers.iter().find(|l| l.node_index == cons[0])?;
                let s = l.stats.as_ref()?;
                let mean: Vec<f64> = (0..channels)
                    .map(|k| (s.running_mean[k] as f64 - path.b[k]) / path.a[k])
                    .collect();
                let std: Vec<f64> = (0..channels)
                    .map(|k| (s.running_var[k] as f64).sqrt() / path.a[k].abs())
                    .collect();
                let (kind, confidence) = classify(&mean, &std);
                return Some(Estimate {
                    bn: l.name.clone(),
                    direct: true,
                    mean,
                    std,
                    mean_misfit: 0.0,
                    kind,
                    confidence,
                });
            }
            "Conv" => return through_conv(&g, bn, cons[0], &path, (h, w), &konst),
            _ => return None,
        }
        path.tensor = n.output.first()?.clone();
    }
    None
}

/// The estimate through the first conv and the BN after it.
fn through_conv(
    g: &GraphIndex,
    bn: &BnReport,
    ci: usize,
    path: &Path,
    (h, w): (usize, usize),
    konst: &dyn Fn(&str) -> Option<Vec<f64>>,
) -> Option<Estimate> {
    let conv = g.node(ci);
    if conv.input.first() != Some(&path.tensor) {
        return None;
    }
    let wt = g.initializer(conv.input.get(1)?)?;
    let dims: Vec<usize> = wt.dims.iter().map(|&d| d as usize).collect();
    if dims.len() != 4 {
        return None;
    }
    let (o, cg, kh, kw) = (dims[0], dims[1], dims[2], dims[3]);
    let weights = konst(conv.input.get(1)?)?;
    let group = attr_int(conv, "group", 1).max(1) as usize;
    let channels = path.a.len();
    if cg * group != channels || !o.is_multiple_of(group) {
        return None;
    }
    let bias = match conv.input.get(2).filter(|s| !s.is_empty()) {
        Some(b) => konst(b)?,
        None => vec![0.0; o],
    };
    // The BN reading the conv's output (through Identity only).
    let mut t = conv.output.first()?.clone();
    let mut layer = None;
    for _ in 0..4 {
        let cons = g.consumers(&t);
        if let Some(l) = cons.iter().find_map(|&c| {
            bn.layers
                .iter()
                .find(|l| l.node_index == c && l.input == t && l.stats.is_some())
        }) {
            layer = Some(l);
            break;
        }
        match cons
            .iter()
            .find(|&&c| g.node(c).op_type == "Identity")
            .map(|&c| g.node(c))
        {
            Some(n) => t = n.output.first()?.clone(),
            None => break,
        }
    }
    let layer = layer?;
    let stats = layer.stats.as_ref()?;
    if stats.running_mean.len() != o {
        return None;
    }
    let s = attr_ints(conv, "strides").unwrap_or_else(|| vec![1, 1]);
    let d = attr_ints(conv, "dilations").unwrap_or_else(|| vec![1, 1]);
    let pads: Vec<usize> = attr_ints(conv, "pads")
        .unwrap_or_default()
        .iter()
        .map(|&p| p.max(0) as usize)
        .collect();
    let auto = AutoPad::parse(&attr_string(conv, "auto_pad").unwrap_or_default()).ok()?;
    let (s, d) = (
        [s.first().copied()? as usize, s.get(1).copied()? as usize],
        [d.first().copied()? as usize, d.get(1).copied()? as usize],
    );
    let ins = [h + path.pad[0] + path.pad[2], w + path.pad[1] + path.pad[3]];
    let p = auto.resolve(&ins, &[kh, kw], &s, &d, &pads).ok()?;
    // How many output positions see each tap inside the image (not on padding).
    let counts = |axis: usize, k: usize, pad_before: usize| -> Vec<f64> {
        let (n, begin) = ([h, w][axis], [path.pad[0], path.pad[1]][axis] + p[axis].0);
        let full = ins[axis] + p[axis].0 + p[axis].1;
        let span = (k - 1) * d[axis] + 1;
        if full < span {
            return vec![0.0; k];
        }
        let outs = (full - span) / s[axis] + 1;
        let _ = pad_before;
        (0..k)
            .map(|t| {
                (0..outs)
                    .filter(|&i| {
                        let r = (i * s[axis] + t * d[axis]) as i64 - begin as i64;
                        r >= 0 && (r as usize) < n
                    })
                    .count() as f64
                    / outs as f64
            })
            .collect()
    };
    let (ch, cw) = (counts(0, kh, p[0].0), counts(1, kw, p[1].0));
    let og = o / group;
    // A[o][c]: the mean of output o per unit of mean in (conv-input) channel c.
    let mut a = vec![vec![0.0f64; channels]; o];
    for oo in 0..o {
        let gi = oo / og;
        for cl in 0..cg {
            let c = gi * cg + cl;
            for y in 0..kh {
                for x in 0..kw {
                    a[oo][c] += weights[((oo * cg + cl) * kh + y) * kw + x] * ch[y] * cw[x];
                }
            }
        }
    }
    let rhs: Vec<f64> = (0..o)
        .map(|k| stats.running_mean[k] as f64 - bias[k])
        .collect();
    let m_conv = least_squares(&a, &rhs)?;
    let fit: f64 = (0..o)
        .map(|k| {
            let p: f64 = (0..channels).map(|c| a[k][c] * m_conv[c]).sum();
            (p - rhs[k]).powi(2)
        })
        .sum::<f64>();
    let scale: f64 = rhs.iter().map(|v| v * v).sum::<f64>().max(1e-30);
    let mean_misfit = (fit / scale).sqrt();
    // Spread: var(y_o) = s^2 q_o under the correlation model; s from the geometric mean of
    // var_o / q_o over the outputs.
    let size = h.max(w) as f64;
    let rho = |dy: f64, dx: f64| (-(SPATIAL_DECAY / size) * (dy * dy + dx * dx).sqrt()).exp();
    let mut logs = Vec::new();
    for oo in 0..o {
        let gi = oo / og;
        let mut q = 0.0;
        let taps: Vec<(usize, usize, usize, f64)> = (0..cg)
            .flat_map(|cl| (0..kh).flat_map(move |y| (0..kw).map(move |x| (cl, y, x))))
            .map(|(cl, y, x)| {
                let c = gi * cg + cl;
                (
                    c,
                    y,
                    x,
                    weights[((oo * cg + cl) * kh + y) * kw + x] / path.a[c],
                )
            })
            .collect();
        for &(c1, y1, x1, w1) in &taps {
            for &(c2, y2, x2, w2) in &taps {
                let rc = if c1 == c2 { 1.0 } else { CHANNEL_CORR };
                let dy = (y1 as f64 - y2 as f64) * d[0] as f64;
                let dx = (x1 as f64 - x2 as f64) * d[1] as f64;
                q += w1 * w2 * rc * rho(dy, dx);
            }
        }
        let v = stats.running_var[oo] as f64;
        if q > 1e-20 && v > 1e-20 {
            logs.push((v / q).ln());
        }
    }
    if logs.is_empty() {
        return None;
    }
    logs.sort_by(f64::total_cmp);
    // The median is robust to filters whose response the correlation model gets wrong.
    let s_in = (logs[logs.len() / 2] / 2.0).exp();
    let mean: Vec<f64> = (0..channels)
        .map(|c| (m_conv[c] - path.b[c]) / path.a[c])
        .collect();
    let std = vec![s_in; channels];
    let (kind, confidence) = classify(&mean, &std);
    Some(Estimate {
        bn: layer.name.clone(),
        direct: false,
        mean,
        std,
        mean_misfit,
        kind,
        confidence: confidence * (1.0 - mean_misfit.min(1.0)),
    })
}

/// Least squares for A x = b (rows of A), ridge-regularised toward a common value across x so
/// that nearly collinear channels share their estimate instead of diverging.
fn least_squares(a: &[Vec<f64>], b: &[f64]) -> Option<Vec<f64>> {
    let n = a.first()?.len();
    // The common value first: x = c * 1.
    let s1: Vec<f64> = a.iter().map(|r| r.iter().sum()).collect();
    let den: f64 = s1.iter().map(|v| v * v).sum();
    if den <= 0.0 {
        return None;
    }
    let common = s1.iter().zip(b).map(|(s, y)| s * y).sum::<f64>() / den;
    let mut m = vec![vec![0.0; n]; n];
    let mut r = vec![0.0; n];
    for (row, &y) in a.iter().zip(b) {
        for i in 0..n {
            r[i] += row[i] * y;
            for j in 0..n {
                m[i][j] += row[i] * row[j];
            }
        }
    }
    let trace: f64 = (0..n).map(|i| m[i][i]).sum();
    let lambda = 1e-3 * trace / n as f64;
    for i in 0..n {
        m[i][i] += lambda;
        r[i] += lambda * common;
    }
    solve(m, r)
}

/// Gaussian elimination with partial pivoting.
fn solve(mut m: Vec<Vec<f64>>, mut r: Vec<f64>) -> Option<Vec<f64>> {
    let n = r.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
        if m[piv][col].abs() < 1e-300 {
            return None;
        }
        m.swap(col, piv);
        r.swap(col, piv);
        for row in col + 1..n {
            let f = m[row][col] / m[col][col];
            let pivot = m[col].clone();
            for (x, p) in m[row].iter_mut().zip(&pivot).skip(col) {
                *x -= f * p;
            }
            r[row] -= f * r[col];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| m[i][k] * x[k]).sum();
        x[i] = (r[i] - s) / m[i][i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_recovers_channel_means() {
        let a = vec![
            vec![1.0, 0.5, 0.2],
            vec![0.3, 1.0, 0.1],
            vec![0.2, 0.1, 1.0],
            vec![0.5, 0.5, 0.5],
        ];
        let x = [120.0, 110.0, 100.0];
        let b: Vec<f64> = a
            .iter()
            .map(|r: &Vec<f64>| r.iter().zip(&x).map(|(p, q)| p * q).sum())
            .collect();
        let got = least_squares(&a, &b).unwrap();
        for (g, e) in got.iter().zip(x) {
            assert!((g - e).abs() < 0.5, "{got:?}");
        }
    }
}
