//! Shape and data-movement ops: Shape, ConstantOfShape, Constant, Identity, Dropout, Reshape,
//! Flatten, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice, Pad, Gather, Expand. Each works on
//! device floats and on host integers (shape sub-graphs).

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};

use super::shape::axes_of;
use candle_core::Tensor;
use ndarray::Axis;

use super::math::full;
use super::{Builder, NodeCtx, Op, axis, input, opt, opt_ints};
use crate::lower::value::{Ints, RunCtx, Value};
use crate::onnx::tensor::{self, Values};

pub fn register(reg: &mut HashMap<&'static str, Builder>) {
    reg.insert("Identity", |_| Ok(Box::new(Identity)));
    reg.insert("Dropout", |n| {
        ensure!(
            n.used_outputs() <= 1,
            "the mask output of Dropout is not supported"
        );
        Ok(Box::new(Identity))
    });
    reg.insert("Constant", constant);
    reg.insert("Concat", |n| {
        ensure!(n.has("axis"), "attribute axis is required");
        Ok(Box::new(Concat {
            axis: n.int("axis", 0)?,
        }))
    });
    reg.insert("Split", split);
    reg.insert("Slice", slice);
    reg.insert("Pad", pad);
    reg.insert("Gather", |n| {
        Ok(Box::new(Gather {
            axis: n.int("axis", 0)?,
        }))
    });
}

// ------------------------------------------------------------ host integer helpers

/// Selects `idx` along `axis` of host integers.
fn ints_select(x: &Ints, ax: usize, idx: &[usize]) -> Ints {
    Ints::from_array(x.view().select(Axis(ax), idx))
}

fn ints_concat(parts: &[Ints], ax: usize) -> Result<Ints> {
    let first = &parts[0];
    for p in parts {
        ensure!(
            p.dims.len() == first.dims.len(),
            "concatenated ranks differ"
        );
    }
    let views: Vec<_> = parts.iter().map(Ints::view).collect();
    Ok(Ints::from_array(ndarray::concatenate(Axis(ax), &views)?))
}

pub(super) fn ints_transpose(x: &Ints, perm: &[usize]) -> Ints {
    Ints::from_array(x.view().permuted_axes(perm).to_owned())
}

/// Selects `idx` along `axis` of either kind of value.
fn select(v: &Value, ax: usize, idx: &[usize]) -> Result<Value> {
    Ok(match v {
        Value::I(i) => Value::I(ints_select(i, ax, idx)),
        Value::F(t) => {
            let contiguous_run = idx.windows(2).all(|w| w[1] == w[0] + 1);
            Value::F(if !idx.is_empty() && contiguous_run {
                t.narrow(ax, idx[0], idx.len())?
            } else {
                let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                t.index_select(&Tensor::new(ids, t.device())?, ax)?
            })
        }
    })
}

pub(super) fn reshape(v: &Value, dims: Vec<usize>) -> Result<Value> {
    Ok(match v {
        Value::F(t) => Value::F(t.reshape(dims)?),
        Value::I(i) => Value::I(Ints::new(dims, i.data.clone())),
    })
}

// ------------------------------------------------------------ ops

struct Identity;

impl Op for Identity {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        Ok(vec![input(inputs, 0)?.clone()])
    }
}

struct Constant(Value);

/// A decoded ONNX tensor as a value: floats on the device, integers on the host.
pub fn tensor_value(t: &crate::onnx::pb::TensorProto, ctx: &RunCtx) -> Result<Value> {
    tensor_value_at(t, ctx, std::path::Path::new("."))
}

/// Like [`tensor_value`], resolving external data relative to `model_dir`.
pub fn tensor_value_at(
    t: &crate::onnx::pb::TensorProto,
    ctx: &RunCtx,
    model_dir: &std::path::Path,
) -> Result<Value> {
    let d = tensor::decode(t, Some(model_dir)).map_err(anyhow::Error::msg)?;
    Ok(match d.values {
        Values::I64(v) => Value::I(Ints::new(d.dims, v)),
        Values::F32(v) => Value::F(Tensor::from_vec(v, d.dims, &ctx.device)?.to_dtype(ctx.dtype)?),
        Values::F64(v) => Value::F(Tensor::from_vec(v, d.dims, &ctx.device)?.to_dtype(ctx.dtype)?),
    })
}

fn constant(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let data = crate::onnx::graph::constant_node_value(n.node, None).map_err(anyhow::Error::msg)?;
    let v = match data.values {
        Values::I64(v) => Value::I(Ints::new(data.dims, v)),
        other => {
            let f: Vec<f64> = match other {
                Values::F32(v) => v.into_iter().map(f64::from).collect(),
                Values::F64(v) => v,
                Values::I64(_) => unreachable!(),
            };
            Value::F(Tensor::from_vec(f, data.dims, &n.ctx.device)?.to_dtype(n.ctx.dtype)?)
        }
    };
    Ok(Box::new(Constant(v)))
}

impl Op for Constant {
    fn run(&self, _: &RunCtx, _: &[Option<&Value>]) -> Result<Vec<Value>> {
        Ok(vec![self.0.clone()])
    }
}

struct Concat {
    axis: i64,
}

impl Op for Concat {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let vals: Vec<&Value> = inputs.iter().flatten().copied().collect();
        ensure!(!vals.is_empty(), "no inputs");
        let ax = axis(self.axis, vals[0].dims().len())?;
        if vals.iter().all(|v| matches!(v, Value::I(_))) {
            let parts: Vec<Ints> = vals.iter().map(|v| v.ints()).collect::<Result<_>>()?;
            return Ok(vec![Value::I(ints_concat(&parts, ax)?)]);
        }
        let ts: Vec<Tensor> = vals.iter().map(|v| v.float(ctx)).collect::<Result<_>>()?;
        Ok(vec![Value::F(Tensor::cat(&ts, ax)?)])
    }
}

struct Split {
    axis: i64,
    split: Option<Vec<i64>>,
    outputs: usize,
}

fn split(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let outputs = if n.has("num_outputs") {
        n.int("num_outputs", 0)? as usize
    } else {
        n.node.output.len()
    };
    Ok(Box::new(Split {
        axis: n.int("axis", 0)?,
        split: n.ints("split")?,
        outputs,
    }))
}

impl Op for Split {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let dims = x.dims();
        let ax = axis(self.axis, dims.len())?;
        let n = dims[ax];
        let sizes: Vec<usize> = match axes_of(&self.split, inputs)? {
            Some(s) => s.iter().map(|&v| v.max(0) as usize).collect(),
            None => {
                // Equal parts; with num_outputs the last part may be smaller.
                let k = self.outputs.max(1);
                let part = n.div_ceil(k);
                (0..k)
                    .map(|i| part.min(n.saturating_sub(i * part)))
                    .collect()
            }
        };
        ensure!(
            sizes.iter().sum::<usize>() == n,
            "split sizes {sizes:?} do not add up to {n}"
        );
        let mut start = 0;
        let mut out = Vec::new();
        for s in sizes {
            out.push(select(x, ax, &(start..start + s).collect::<Vec<_>>())?);
            start += s;
        }
        Ok(out)
    }
}

/// Indices ONNX Slice selects along an axis of length `dim`.
pub fn slice_indices(dim: usize, start: i64, end: i64, step: i64) -> Result<Vec<usize>> {
    ensure!(step != 0, "slice step must not be 0");
    let d = dim as i64;
    let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let (mut s, mut e) = (norm(start), norm(end));
    let mut out = Vec::new();
    if step > 0 {
        s = s.clamp(0, d);
        e = e.clamp(0, d);
        while s < e {
            out.push(s as usize);
            s += step;
        }
    } else {
        s = s.clamp(0, (d - 1).max(0));
        e = e.clamp(-1, d - 1);
        while s > e && d > 0 {
            out.push(s as usize);
            s += step;
        }
    }
    Ok(out)
}

/// Slice parameters given as attributes (before opset 10).
struct SliceAttrs {
    starts: Vec<i64>,
    ends: Vec<i64>,
    axes: Option<Vec<i64>>,
}

struct Slice {
    attrs: Option<SliceAttrs>,
}

fn slice(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let attrs = if n.opset < 10 {
        let starts = n.ints("starts")?.context("attribute starts is required")?;
        let ends = n.ints("ends")?.context("attribute ends is required")?;
        Some(SliceAttrs {
            starts,
            ends,
            axes: n.ints("axes")?,
        })
    } else {
        None
    };
    Ok(Box::new(Slice { attrs }))
}

impl Op for Slice {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let dims = x.dims();
        let (starts, ends, axes, steps) = match &self.attrs {
            Some(a) => (a.starts.clone(), a.ends.clone(), a.axes.clone(), None),
            None => (
                input(inputs, 1)?.ints()?.data,
                input(inputs, 2)?.ints()?.data,
                opt_ints(inputs, 3)?,
                opt_ints(inputs, 4)?,
            ),
        };
        ensure!(
            starts.len() == ends.len(),
            "starts and ends differ in length"
        );
        let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
        ensure!(
            axes.len() == starts.len() && steps.len() == starts.len(),
            "starts/ends/axes/steps differ in length"
        );
        let mut y = x.clone();
        for i in 0..starts.len() {
            let ax = axis(axes[i], dims.len())?;
            let idx = slice_indices(dims[ax], starts[i], ends[i], steps[i])?;
            if idx.len() != dims[ax] || steps[i] != 1 {
                y = select(&y, ax, &idx)?;
            }
        }
        Ok(vec![y])
    }
}

struct Pad {
    mode: String,
    /// Before opset 11: pads and value as attributes.
    attrs: Option<(Vec<i64>, f32)>,
}

fn pad(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let mode = n.string("mode", "constant")?;
    ensure!(
        matches!(mode.as_str(), "constant" | "reflect" | "edge"),
        "pad mode '{mode}' is not supported (constant, reflect, edge)"
    );
    let attrs = if n.opset < 11 {
        Some((
            n.ints("pads")?.context("attribute pads is required")?,
            n.float("value", 0.0)?,
        ))
    } else {
        None
    };
    Ok(Box::new(Pad { mode, attrs }))
}

impl Op for Pad {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        let r = x.rank();
        let (pads, value, axes) = match &self.attrs {
            Some((p, v)) => (p.clone(), *v as f64, None),
            None => {
                let value = match opt(inputs, 2) {
                    Some(v) => v
                        .float(ctx)?
                        .flatten_all()?
                        .to_dtype(candle_core::DType::F64)?
                        .to_vec1::<f64>()?
                        .first()
                        .copied()
                        .unwrap_or(0.0),
                    None => 0.0,
                };
                (input(inputs, 1)?.ints()?.data, value, opt_ints(inputs, 3)?)
            }
        };
        let axes: Vec<usize> = match axes {
            Some(a) => a.iter().map(|&v| axis(v, r)).collect::<Result<_>>()?,
            None => (0..r).collect(),
        };
        ensure!(
            pads.len() == 2 * axes.len(),
            "pads has {} values for {} axes",
            pads.len(),
            axes.len()
        );
        let k = axes.len();
        let mut y = x;
        for (i, &ax) in axes.iter().enumerate() {
            let (b, e) = (pads[i], pads[i + k]);
            // Negative pads crop.
            let n = y.dim(ax)? as i64;
            let (cb, ce) = ((-b).max(0), (-e).max(0));
            if cb + ce > 0 {
                ensure!(
                    cb + ce < n,
                    "pads {pads:?} crop axis {ax} of size {n} entirely"
                );
                y = y.narrow(ax, cb as usize, (n - cb - ce) as usize)?;
            }
            let (b, e) = (b.max(0) as usize, e.max(0) as usize);
            if b + e == 0 {
                continue;
            }
            y = match self.mode.as_str() {
                "edge" => y.pad_with_same(ax, b, e)?,
                "reflect" => {
                    let n = y.dim(ax)?;
                    ensure!(
                        b < n && e < n,
                        "reflect padding {b}/{e} needs more than {n} elements"
                    );
                    let idx: Vec<u32> = (1..=b)
                        .rev()
                        .chain(0..n)
                        .chain((n - 1 - e..n - 1).rev())
                        .map(|i| i as u32)
                        .collect();
                    y.index_select(&Tensor::new(idx, y.device())?, ax)?
                }
                _ if value == 0.0 => y.pad_with_zeros(ax, b, e)?,
                _ => {
                    let mut shape = y.dims().to_vec();
                    let mut parts = Vec::new();
                    if b > 0 {
                        shape[ax] = b;
                        parts.push(full(value, &shape, ctx)?);
                    }
                    parts.push(y.clone());
                    if e > 0 {
                        shape[ax] = e;
                        parts.push(full(value, &shape, ctx)?);
                    }
                    Tensor::cat(&parts, ax)?
                }
            };
        }
        Ok(vec![Value::F(y)])
    }
}

struct Gather {
    axis: i64,
}

impl Op for Gather {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let idx = input(inputs, 1)?.ints()?;
        let dims = x.dims();
        let ax = axis(self.axis, dims.len())?;
        let n = dims[ax] as i64;
        let flat: Vec<usize> = idx
            .data
            .iter()
            .map(|&i| {
                let j = if i < 0 { i + n } else { i };
                ensure!(
                    (0..n).contains(&j),
                    "index {i} is out of range for axis of size {n}"
                );
                Ok(j as usize)
            })
            .collect::<Result<_>>()?;
        let picked = match x {
            Value::I(i) => Value::I(ints_select(i, ax, &flat)),
            Value::F(t) => {
                let ids: Vec<u32> = flat.iter().map(|&i| i as u32).collect();
                Value::F(t.index_select(&Tensor::new(ids, t.device())?, ax)?)
            }
        };
        let out: Vec<usize> = dims[..ax]
            .iter()
            .chain(&idx.dims)
            .chain(&dims[ax + 1..])
            .copied()
            .collect();
        Ok(vec![reshape(&picked, out)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_index_rules_match_onnx() {
        assert_eq!(slice_indices(5, 0, i64::MAX, 2).unwrap(), vec![0, 2, 4]);
        assert_eq!(
            slice_indices(5, -1, i64::MIN, -1).unwrap(),
            vec![4, 3, 2, 1, 0]
        );
        assert_eq!(slice_indices(5, 1, -1, 1).unwrap(), vec![1, 2, 3]);
        assert_eq!(slice_indices(5, 10, 20, 1).unwrap(), Vec::<usize>::new());
        assert_eq!(slice_indices(5, 3, 0, -2).unwrap(), vec![3, 1]);
        assert!(slice_indices(5, 0, 5, 0).is_err());
    }

    #[test]
    fn host_integer_helpers() {
        let x = Ints::new(vec![2, 3], (0..6).collect());
        assert_eq!(ints_select(&x, 1, &[2, 0]).data, vec![2, 0, 5, 3]);
        assert_eq!(ints_transpose(&x, &[1, 0]).data, vec![0, 3, 1, 4, 2, 5]);
        let c = ints_concat(&[x.clone(), x.clone()], 0).unwrap();
        assert_eq!(c.dims, vec![4, 3]);
    }
}
