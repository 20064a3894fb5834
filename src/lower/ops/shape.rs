//! Shape and layout ops: Shape, ConstantOfShape, Reshape, Flatten, Transpose, Squeeze,
//! Unsqueeze, Expand. On float
//! tensors they are views; on host integers (the shape sub-graphs of dynamic-batch exports)
//! they compute concrete shapes at every call.

use std::collections::HashMap;

use anyhow::{Context, Result, bail, ensure};

use candle_core::Tensor;

use super::array::{ints_transpose, reshape, tensor_value};
use super::math::{broadcast_dims, full, ints_broadcast};
use super::{Builder, NodeCtx, Op, axis, input, opt_ints};
use crate::lower::value::{Ints, RunCtx, Value};

pub fn register(reg: &mut HashMap<&'static str, Builder>) {
    reg.insert("Shape", |n| {
        Ok(Box::new(Shape {
            start: n.int("start", 0)?,
            end: if n.has("end") {
                Some(n.int("end", 0)?)
            } else {
                None
            },
        }))
    });
    reg.insert("ConstantOfShape", constant_of_shape);
    reg.insert("Reshape", |n| {
        Ok(Box::new(Reshape {
            allowzero: n.int("allowzero", 0)? != 0,
        }))
    });
    reg.insert("Flatten", |n| {
        Ok(Box::new(Flatten {
            axis: n.int("axis", 1)?,
        }))
    });
    reg.insert("Squeeze", |n| {
        Ok(Box::new(Squeeze {
            axes: n.ints("axes")?,
        }))
    });
    reg.insert("Unsqueeze", |n| {
        Ok(Box::new(Unsqueeze {
            axes: n.ints("axes")?,
        }))
    });
    reg.insert("Transpose", |n| {
        Ok(Box::new(Transpose {
            perm: n.ints("perm")?,
        }))
    });
    reg.insert("Expand", |_| Ok(Box::new(Expand)));
}

struct Shape {
    start: i64,
    end: Option<i64>,
}

impl Op for Shape {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let dims = input(inputs, 0)?.dims();
        let r = dims.len() as i64;
        let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let (s, e) = (clampi(self.start), clampi(self.end.unwrap_or(r)));
        let v: Vec<i64> = dims[s..e.max(s)].iter().map(|&d| d as i64).collect();
        Ok(vec![Value::I(Ints::vector(v))])
    }
}

struct ConstantOfShape(Value);

fn constant_of_shape(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let v = match n.tensor("value")? {
        Some(t) => tensor_value(t, n.ctx)?,
        None => Value::F(Tensor::zeros(1, n.ctx.dtype, &n.ctx.device)?),
    };
    Ok(Box::new(ConstantOfShape(v)))
}

impl Op for ConstantOfShape {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let shape = input(inputs, 0)?.ints()?.data;
        ensure!(
            shape.iter().all(|&d| d >= 0),
            "negative dimension in shape {shape:?}"
        );
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        Ok(vec![match &self.0 {
            Value::I(i) => Value::I(Ints::new(
                dims.clone(),
                vec![i.data[0]; dims.iter().product()],
            )),
            Value::F(t) => {
                let v = t
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?[0];
                Value::F(full(v, &dims, ctx)?)
            }
        }])
    }
}

struct Reshape {
    allowzero: bool,
}

impl Op for Reshape {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let spec = input(inputs, 1)?.ints().context("shape input")?.data;
        let dims = x.dims();
        let total: usize = dims.iter().product();
        let mut out: Vec<Option<usize>> = Vec::with_capacity(spec.len());
        for (i, &s) in spec.iter().enumerate() {
            out.push(match s {
                -1 => None,
                0 if !self.allowzero => Some(*dims.get(i).with_context(|| {
                    format!("shape {spec:?}: 0 at axis {i} copies a dim the input {dims:?} lacks")
                })?),
                s if s >= 0 => Some(s as usize),
                s => bail!("invalid dimension {s} in shape {spec:?}"),
            });
        }
        ensure!(
            out.iter().filter(|d| d.is_none()).count() <= 1,
            "shape {spec:?} has more than one -1"
        );
        let known: usize = out.iter().flatten().product();
        let out: Vec<usize> = out
            .into_iter()
            .map(|d| match d {
                Some(d) => Ok(d),
                None if known > 0 && total.is_multiple_of(known) => Ok(total / known),
                None => bail!("cannot infer -1 in shape {spec:?} for input {dims:?}"),
            })
            .collect::<Result<_>>()?;
        ensure!(
            out.iter().product::<usize>() == total,
            "cannot reshape {dims:?} to {out:?}"
        );
        Ok(vec![reshape(x, out)?])
    }
}

struct Flatten {
    axis: i64,
}

impl Op for Flatten {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let dims = x.dims();
        let r = dims.len() as i64;
        let a = if self.axis < 0 {
            self.axis + r
        } else {
            self.axis
        };
        ensure!(
            (0..=r).contains(&a),
            "axis {} is out of range for rank {r}",
            self.axis
        );
        let rows: usize = dims[..a as usize].iter().product();
        let cols: usize = dims[a as usize..].iter().product();
        Ok(vec![reshape(x, vec![rows, cols])?])
    }
}

struct Transpose {
    perm: Option<Vec<i64>>,
}

impl Op for Transpose {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let r = x.dims().len();
        let perm: Vec<usize> = match &self.perm {
            Some(p) => p.iter().map(|&a| axis(a, r)).collect::<Result<_>>()?,
            None => (0..r).rev().collect(),
        };
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        ensure!(
            sorted == (0..r).collect::<Vec<_>>(),
            "perm {perm:?} is not a permutation of rank {r}"
        );
        Ok(vec![match x {
            Value::F(t) => Value::F(t.permute(perm)?),
            Value::I(i) => Value::I(ints_transpose(i, &perm)),
        }])
    }
}

/// Axes from the attribute (older opsets) or input 1 (opset 13+).
pub(super) fn axes_of(
    attr: &Option<Vec<i64>>,
    inputs: &[Option<&Value>],
) -> Result<Option<Vec<i64>>> {
    Ok(match attr {
        Some(a) => Some(a.clone()),
        None => opt_ints(inputs, 1)?,
    })
}

struct Squeeze {
    axes: Option<Vec<i64>>,
}

impl Op for Squeeze {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let dims = x.dims();
        let drop: Vec<usize> = match axes_of(&self.axes, inputs)? {
            Some(a) => a
                .iter()
                .map(|&v| axis(v, dims.len()))
                .collect::<Result<_>>()?,
            None => (0..dims.len()).filter(|&i| dims[i] == 1).collect(),
        };
        for &a in &drop {
            ensure!(
                dims[a] == 1,
                "cannot squeeze axis {a} of size {} in {dims:?}",
                dims[a]
            );
        }
        let out: Vec<usize> = (0..dims.len())
            .filter(|i| !drop.contains(i))
            .map(|i| dims[i])
            .collect();
        Ok(vec![reshape(x, out)?])
    }
}

struct Unsqueeze {
    axes: Option<Vec<i64>>,
}

impl Op for Unsqueeze {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let dims = x.dims();
        let axes = axes_of(&self.axes, inputs)?.context("axes are required")?;
        let r = dims.len() + axes.len();
        let mut ax: Vec<usize> = axes.iter().map(|&a| axis(a, r)).collect::<Result<_>>()?;
        ax.sort_unstable();
        let mut out = dims.clone();
        for a in ax {
            out.insert(a, 1);
        }
        Ok(vec![reshape(x, out)?])
    }
}

struct Expand;

impl Op for Expand {
    fn run(&self, _: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        let shape: Vec<usize> = input(inputs, 1)?
            .ints()?
            .data
            .iter()
            .map(|&d| d.max(0) as usize)
            .collect();
        let out = broadcast_dims(&x.dims(), &shape)?;
        Ok(vec![match x {
            Value::F(t) => Value::F(t.broadcast_as(out)?.contiguous()?),
            Value::I(i) => {
                let zeros = Ints::new(out.clone(), vec![0; out.iter().product()]);
                Value::I(ints_broadcast(i, &zeros, |a, _| Ok(a))?)
            }
        }])
    }
}
