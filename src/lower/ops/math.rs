//! Arithmetic: Add, Sub, Mul, Div (numpy broadcasting, on the device for floats and on the host
//! for shape integers), ReduceMean/Max/Min/Sum, Cast.

use std::collections::HashMap;

use anyhow::{Result, bail, ensure};
use candle_core::Tensor;

use super::{Builder, NodeCtx, Op, axis, input, opt_ints};
use crate::lower::value::{Ints, RunCtx, Value};
use crate::onnx::pb::tensor_proto::DataType;

pub fn register(reg: &mut HashMap<&'static str, Builder>) {
    reg.insert("Add", |_| Ok(Box::new(Binary(Arith::Add))));
    reg.insert("Sub", |_| Ok(Box::new(Binary(Arith::Sub))));
    reg.insert("Mul", |_| Ok(Box::new(Binary(Arith::Mul))));
    reg.insert("Div", |_| Ok(Box::new(Binary(Arith::Div))));
    reg.insert("ReduceMean", |n| reduce(n, Reduction::Mean));
    reg.insert("ReduceMax", |n| reduce(n, Reduction::Max));
    reg.insert("ReduceMin", |n| reduce(n, Reduction::Min));
    reg.insert("ReduceSum", |n| reduce(n, Reduction::Sum));
    reg.insert("Cast", cast);
}

/// numpy broadcast of two shapes.
pub fn broadcast_dims(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r {
                a[i + a.len() - r]
            } else {
                1
            };
            let db = if i + b.len() >= r {
                b[i + b.len() - r]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                (x, y) => bail!("shapes {a:?} and {b:?} do not broadcast ({x} vs {y})"),
            }
        })
        .collect()
}

/// Index into a tensor of `dims` for the multi-index `idx` of a broadcast output of rank `r`.
fn source_index(dims: &[usize], idx: &[usize]) -> usize {
    let off = idx.len() - dims.len();
    dims.iter().enumerate().fold(0, |acc, (i, &d)| {
        acc * d + if d == 1 { 0 } else { idx[off + i] }
    })
}

/// Applies `f` element-wise to broadcast host integers.
pub fn ints_broadcast(a: &Ints, b: &Ints, f: impl Fn(i64, i64) -> Result<i64>) -> Result<Ints> {
    let dims = broadcast_dims(&a.dims, &b.dims)?;
    let n: usize = dims.iter().product();
    let mut idx = vec![0usize; dims.len()];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(f(
            a.data[source_index(&a.dims, &idx)],
            b.data[source_index(&b.dims, &idx)],
        )?);
        for k in (0..dims.len()).rev() {
            idx[k] += 1;
            if idx[k] < dims[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Ok(Ints::new(dims, out))
}

#[derive(Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

struct Binary(Arith);

impl Op for Binary {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        if let (Value::I(x), Value::I(y)) = (a, b) {
            let r = ints_broadcast(x, y, |p, q| {
                Ok(match self.0 {
                    Arith::Add => p.wrapping_add(q),
                    Arith::Sub => p.wrapping_sub(q),
                    Arith::Mul => p.wrapping_mul(q),
                    Arith::Div => {
                        ensure!(q != 0, "integer division by zero");
                        p / q
                    }
                })
            })?;
            return Ok(vec![Value::I(r)]);
        }
        let (x, y) = (a.float(ctx)?, b.float(ctx)?);
        let z = match self.0 {
            Arith::Add => x.broadcast_add(&y)?,
            Arith::Sub => x.broadcast_sub(&y)?,
            Arith::Mul => x.broadcast_mul(&y)?,
            Arith::Div => x.broadcast_div(&y)?,
        };
        Ok(vec![Value::F(z)])
    }
}

#[derive(Clone, Copy)]
enum Reduction {
    Mean,
    Max,
    Min,
    Sum,
}

struct Reduce {
    kind: Reduction,
    axes: Option<Vec<i64>>,
    keepdims: bool,
    noop_with_empty_axes: bool,
}

fn reduce(n: &NodeCtx, kind: Reduction) -> Result<Box<dyn Op>> {
    Ok(Box::new(Reduce {
        kind,
        axes: n.ints("axes")?,
        keepdims: n.int("keepdims", 1)? != 0,
        noop_with_empty_axes: n.int("noop_with_empty_axes", 0)? != 0,
    }))
}

impl Op for Reduce {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        // Opset 18 moved axes from an attribute to an optional input.
        let axes = match (&self.axes, opt_ints(inputs, 1)?) {
            (Some(a), _) => a.clone(),
            (None, Some(a)) => a,
            (None, None) => vec![],
        };
        if axes.is_empty() && self.noop_with_empty_axes {
            return Ok(vec![Value::F(x)]);
        }
        let mut ax: Vec<usize> = if axes.is_empty() {
            (0..x.rank()).collect()
        } else {
            axes.iter()
                .map(|&a| axis(a, x.rank()))
                .collect::<Result<_>>()?
        };
        ax.sort_unstable();
        ax.dedup();
        let mut y = x;
        for &a in ax.iter().rev() {
            y = match self.kind {
                Reduction::Mean => y.mean_keepdim(a)?,
                Reduction::Max => y.max_keepdim(a)?,
                Reduction::Min => y.min_keepdim(a)?,
                Reduction::Sum => y.sum_keepdim(a)?,
            };
            if !self.keepdims {
                y = y.squeeze(a)?;
            }
        }
        Ok(vec![Value::F(y)])
    }
}

struct Cast {
    to_float: bool,
}

fn cast(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let to = n.int("to", 0)? as i32;
    let to_float = match DataType::try_from(to) {
        Ok(DataType::Float | DataType::Double | DataType::Float16 | DataType::Bfloat16) => true,
        Ok(
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Uint8
            | DataType::Uint16
            | DataType::Uint32
            | DataType::Uint64
            | DataType::Bool,
        ) => false,
        _ => bail!("Cast to element type {to} is not supported"),
    };
    Ok(Box::new(Cast { to_float }))
}

impl Op for Cast {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?;
        // Floats are computed in the program's dtype whatever the target float type.
        Ok(vec![if self.to_float {
            Value::F(x.float(ctx)?)
        } else {
            Value::I(x.ints()?)
        }])
    }
}

/// A float tensor filled with `v` (used by ConstantOfShape and Pad).
pub fn full(v: f64, dims: &[usize], ctx: &RunCtx) -> Result<Tensor> {
    Ok((Tensor::ones(dims, ctx.dtype, &ctx.device)? * v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_broadcasting() {
        let a = Ints::new(vec![2, 1], vec![1, 2]);
        let b = Ints::vector(vec![10, 20, 30]);
        let c = ints_broadcast(&a, &b, |x, y| Ok(x + y)).unwrap();
        assert_eq!(c.dims, vec![2, 3]);
        assert_eq!(c.data, vec![11, 21, 31, 12, 22, 32]);
        assert!(broadcast_dims(&[2, 3], &[4]).is_err());
        assert_eq!(broadcast_dims(&[], &[3]).unwrap(), vec![3]);
    }
}
