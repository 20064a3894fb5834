//! Activations: Relu, LeakyRelu, PRelu, Clip, Sigmoid, HardSigmoid, HardSwish, Tanh.
//! Built from candle primitives whose gradients are checked (sigmoid as 1/(1+exp(-x))).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;

use super::{Builder, NodeCtx, Op, input, opt};
use crate::lower::value::{RunCtx, Value};

pub fn register(reg: &mut HashMap<&'static str, Builder>) {
    reg.insert("Relu", |_| Ok(Box::new(Unary(Kind::Relu))));
    reg.insert("LeakyRelu", |n| {
        Ok(Box::new(Unary(Kind::Leaky(n.float("alpha", 0.01)? as f64))))
    });
    reg.insert("Sigmoid", |_| Ok(Box::new(Unary(Kind::Sigmoid))));
    reg.insert("HardSigmoid", |n| {
        Ok(Box::new(Unary(Kind::HardSigmoid(
            n.float("alpha", 0.2)? as f64,
            n.float("beta", 0.5)? as f64,
        ))))
    });
    reg.insert("HardSwish", |_| Ok(Box::new(Unary(Kind::HardSwish))));
    reg.insert("Tanh", |_| Ok(Box::new(Unary(Kind::Tanh))));
    reg.insert("PRelu", |_| Ok(Box::new(PRelu)));
    reg.insert("Clip", clip);
}

enum Kind {
    Relu,
    Leaky(f64),
    Sigmoid,
    HardSigmoid(f64, f64),
    HardSwish,
    Tanh,
}

struct Unary(Kind);

pub fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

fn hard_sigmoid(x: &Tensor, alpha: f64, beta: f64) -> candle_core::Result<Tensor> {
    crate::kernels::clamp(&x.affine(alpha, beta)?, 0.0, 1.0)
}

impl Op for Unary {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        let y = match self.0 {
            Kind::Relu => crate::kernels::relu(&x)?,
            Kind::Leaky(a) => crate::kernels::leaky_relu(&x, a)?,
            Kind::Sigmoid => sigmoid(&x)?,
            Kind::HardSigmoid(a, b) => hard_sigmoid(&x, a, b)?,
            Kind::HardSwish => (&x * hard_sigmoid(&x, 1.0 / 6.0, 0.5)?)?,
            Kind::Tanh => x.tanh()?,
        };
        Ok(vec![Value::F(y)])
    }
}

struct PRelu;

impl Op for PRelu {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        let slope = input(inputs, 1)?.float(ctx)?;
        let y = x
            .relu()?
            .broadcast_add(&x.minimum(0.0)?.broadcast_mul(&slope)?)?;
        Ok(vec![Value::F(y)])
    }
}

struct Clip {
    min: Option<f64>,
    max: Option<f64>,
}

fn clip(n: &NodeCtx) -> Result<Box<dyn Op>> {
    // Before opset 11 the bounds are attributes; from 11 they are optional inputs.
    let (min, max) = if n.opset < 11 {
        (
            Some(n.float("min", f32::MIN)? as f64),
            Some(n.float("max", f32::MAX)? as f64),
        )
    } else {
        (None, None)
    };
    Ok(Box::new(Clip { min, max }))
}

impl Op for Clip {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let y = input(inputs, 0)?.float(ctx)?;
        let bound = |attr: Option<f64>, i: usize| -> Result<Option<f64>> {
            Ok(match attr {
                Some(v) => Some(v),
                None => match opt(inputs, i) {
                    Some(v) => Some(
                        v.float(ctx)?
                            .flatten_all()?
                            .to_dtype(candle_core::DType::F64)?
                            .to_vec1::<f64>()?[0],
                    ),
                    None => None,
                },
            })
        };
        let lo = bound(self.min, 1)?.unwrap_or(f64::NEG_INFINITY);
        let hi = bound(self.max, 2)?.unwrap_or(f64::INFINITY);
        Ok(vec![Value::F(crate::kernels::clamp(&y, lo, hi)?)])
    }
}
