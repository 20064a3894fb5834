//! QuantizeLinear / DequantizeLinear with ONNX semantics (round half to even, saturation to the
//! zero point's container type, per-tensor or per-axis), and a straight-through gradient for the
//! rounding so a fake-quantized student trains through them.

use std::collections::HashMap;

use anyhow::{Result, bail, ensure};
use candle_core::{DType, Tensor};

use super::{Builder, NodeCtx, Op, axis, input, opt};
use crate::lower::value::{RunCtx, Value};
use crate::onnx::pb::tensor_proto::DataType;

pub fn register(reg: &mut HashMap<&'static str, Builder>) {
    reg.insert("QuantizeLinear", quantize);
    reg.insert("DequantizeLinear", |n| {
        ensure!(
            n.int("block_size", 0)? == 0,
            "blocked quantization (block_size) is not supported"
        );
        Ok(Box::new(Dequantize {
            axis: n.int("axis", 1)?,
        }))
    });
}

/// Integer range of a quantized container type.
pub fn container_range(t: DataType) -> Result<(f64, f64)> {
    Ok(match t {
        DataType::Uint8 => (0.0, 255.0),
        DataType::Int8 => (-128.0, 127.0),
        DataType::Uint16 => (0.0, 65535.0),
        DataType::Int16 => (-32768.0, 32767.0),
        DataType::Int4 => (-8.0, 7.0),
        DataType::Uint4 => (0.0, 15.0),
        other => bail!("quantized type {} is not supported", other.as_str_name()),
    })
}

/// Round half to even, element-wise: adding and subtracting 1.5 * 2^(mantissa bits) lets the
/// floating-point unit round (its default mode is round-to-nearest-even). Exact for
/// |x| < 2^22 (f32) / 2^51 (f64); beyond that every caller saturates anyway.
pub fn round_half_even(x: &Tensor) -> candle_core::Result<Tensor> {
    let magic = if x.dtype() == DType::F64 {
        6755399441055744.0
    } else {
        12582912.0
    };
    (x + magic)? - magic
}

/// Reshapes a per-axis parameter so it broadcasts along `axis` of a rank-`rank` tensor.
fn along(p: &Tensor, ax: usize, rank: usize) -> Result<Tensor> {
    if p.rank() == 0 || p.elem_count() == 1 {
        return Ok(p.flatten_all()?.reshape(vec![1usize; rank.max(1)])?);
    }
    let mut shape = vec![1usize; rank];
    shape[ax] = p.elem_count();
    Ok(p.reshape(shape)?)
}

struct Quantize {
    axis: i64,
    range: (f64, f64),
}

fn quantize(n: &NodeCtx) -> Result<Box<dyn Op>> {
    ensure!(
        n.int("block_size", 0)? == 0,
        "blocked quantization (block_size) is not supported"
    );
    // The output type is the zero point's; without a zero point it is uint8.
    let t = match n.input_type(2) {
        Some(t) => {
            DataType::try_from(t).map_err(|_| anyhow::anyhow!("unknown zero-point type {t}"))?
        }
        None if n.node.input.get(2).is_some_and(|s| !s.is_empty()) => {
            bail!("the zero point must be a constant")
        }
        None => DataType::Uint8,
    };
    Ok(Box::new(Quantize {
        axis: n.int("axis", 1)?,
        range: container_range(t)?,
    }))
}

impl Op for Quantize {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        let ax = if x.rank() == 0 {
            0
        } else {
            axis(self.axis, x.rank())?
        };
        let scale = along(&input(inputs, 1)?.float(ctx)?, ax, x.rank())?;
        let xs = x.broadcast_div(&scale)?;
        // Straight-through: forward rounds, backward passes the gradient unchanged.
        let r = (&xs + (round_half_even(&xs)? - &xs)?.detach())?;
        let r = match opt(inputs, 2) {
            Some(zp) => r.broadcast_add(&along(&zp.float(ctx)?, ax, x.rank())?)?,
            None => r,
        };
        Ok(vec![Value::F(r.clamp(self.range.0, self.range.1)?)])
    }
}

struct Dequantize {
    axis: i64,
}

impl Op for Dequantize {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let q = input(inputs, 0)?.float(ctx)?;
        let ax = if q.rank() == 0 {
            0
        } else {
            axis(self.axis, q.rank())?
        };
        let scale = along(&input(inputs, 1)?.float(ctx)?, ax, q.rank())?;
        let q = match opt(inputs, 2) {
            Some(zp) => q.broadcast_sub(&along(&zp.float(ctx)?, ax, q.rank())?)?,
            None => q,
        };
        Ok(vec![Value::F(q.broadcast_mul(&scale)?)])
    }
}
