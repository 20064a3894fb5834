//! Neural-network ops: BatchNormalization (inference), pooling, Gemm, MatMul, Softmax/LogSoftmax,
//! and the registration of the family (Conv and ConvTranspose in `conv`, Resize/Upsample in
//! `resize`). On the CPU, BatchNormalization and pooling run on `crate::kernels`; elsewhere
//! pooling is built from narrow/reshape rather than candle's max_pool2d, whose gradient is wrong
//! (../shared/notes/candle.md). Every op here has a finite-difference gradient test.

use std::collections::HashMap;

use anyhow::{Result, ensure};
use candle_core::{D, Tensor};

use super::conv::{conv, conv_transpose};
use super::resize::resize;
use super::window::{Window, lift, lift_axis, lift_pads, pad_spatial, strided, unlift};
use super::{Builder, NodeCtx, Op, axis, input, opt};
use crate::lower::value::{RunCtx, Value};

pub fn register(reg: &mut HashMap<&'static str, Builder>) {
    reg.insert("Conv", conv);
    reg.insert("ConvTranspose", conv_transpose);
    reg.insert("BatchNormalization", batch_norm);
    reg.insert("MaxPool", |n| pool(n, true));
    reg.insert("AveragePool", |n| pool(n, false));
    reg.insert("GlobalAveragePool", |_| {
        Ok(Box::new(GlobalPool { max: false }))
    });
    reg.insert("GlobalMaxPool", |_| Ok(Box::new(GlobalPool { max: true })));
    reg.insert("Gemm", gemm);
    reg.insert("MatMul", |_| Ok(Box::new(MatMul)));
    reg.insert("Softmax", |n| softmax(n, false));
    reg.insert("LogSoftmax", |n| softmax(n, true));
    reg.insert("Resize", resize);
    reg.insert("Upsample", resize);
}

// ---------------------------------------------------------------- BatchNormalization

struct BatchNorm {
    eps: f64,
}

fn batch_norm(n: &NodeCtx) -> Result<Box<dyn Op>> {
    ensure!(
        n.int("training_mode", 0)? == 0 && n.used_outputs() <= 1,
        "training-mode BatchNormalization (running-stat outputs) is not supported; export the model in eval mode"
    );
    Ok(Box::new(BatchNorm {
        eps: n.float("epsilon", 1e-5)? as f64,
    }))
}

impl Op for BatchNorm {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        ensure!(
            x.rank() >= 2,
            "input must have a channel axis, got shape {:?}",
            x.dims()
        );
        let c = x.dim(1)?;
        let p = |i: usize| -> Result<Tensor> {
            let t = input(inputs, i)?.float(ctx)?;
            ensure!(
                t.elem_count() == c,
                "parameter {i} has {} values for {c} channels",
                t.elem_count()
            );
            Ok(t.flatten_all()?)
        };
        let (scale, bias) = (p(1)?, p(2)?);
        let (mean, var) = if ctx.bn_batch_stats {
            channel_moments(&x)?
        } else {
            (p(3)?, p(4)?)
        };
        // y = (x - mean) * a + bias with a = scale / sqrt(var + eps), as ONNX Runtime computes
        // it, fused into one per-channel affine x * a + (bias - mean * a).
        let a = (scale / (var + self.eps)?.sqrt()?)?;
        let y = crate::kernels::channel_affine(&x, &a, &(bias - (mean * &a)?)?)?;
        Ok(vec![Value::F(y)])
    }
}

pub use crate::kernels::channel_moments;

// ---------------------------------------------------------------- pooling

struct Pool {
    w: Window,
    max: bool,
    ceil_mode: bool,
    count_include_pad: bool,
}

fn pool(n: &NodeCtx, max: bool) -> Result<Box<dyn Op>> {
    ensure!(
        n.used_outputs() <= 1,
        "the Indices output of MaxPool is not supported"
    );
    let w = Window::parse(n, false)?;
    ensure!(
        w.dilations.iter().all(|&d| d == 1),
        "{} dilations {:?} are not supported",
        n.node.op_type,
        w.dilations
    );
    Ok(Box::new(Pool {
        w,
        max,
        ceil_mode: n.int("ceil_mode", 0)? != 0,
        count_include_pad: !max && n.int("count_include_pad", 0)? != 0,
    }))
}

impl Op for Pool {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (x, lifted) = lift(&input(inputs, 0)?.float(ctx)?)?;
        let (n, c, h, w) = x.dims4()?;
        let r = 2 - lifted as usize;
        let k = lift_axis(self.w.kernel.clone().expect("required at build"), lifted, 1);
        let s = lift_axis(Window::per_axis(&self.w.strides, r, 1), lifted, 1);
        let spatial = if lifted { vec![w] } else { vec![h, w] };
        let pads = lift_pads(
            self.w.resolve_pads(
                &spatial,
                &k[lifted as usize..],
                &s[lifted as usize..],
                &[1, 1][..r],
            )?,
            lifted,
        );
        let ins = [h, w];
        let spec = crate::kernels::Pool2dSpec {
            kernel: [k[0], k[1]],
            stride: [s[0], s[1]],
            pad: [pads[0].0, pads[1].0, pads[0].1, pads[1].1],
            ceil_mode: self.ceil_mode,
            max: self.max,
            count_include_pad: self.count_include_pad,
        };
        if crate::kernels::enabled(x.device()) {
            return Ok(vec![Value::F(unlift(
                crate::kernels::pool2d(&x, spec)?,
                lifted,
            )?)]);
        }
        let outs: Vec<usize> = (0..2)
            .map(|i| spec.out_len(ins[i], i).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?;
        // Fast path with a correct candle gradient: average over non-overlapping, unpadded windows.
        if !self.max
            && pads.iter().all(|&p| p == (0, 0))
            && k == s
            && outs[0] * k[0] == h
            && outs[1] * k[1] == w
        {
            return Ok(vec![Value::F(unlift(x.avg_pool2d((k[0], k[1]))?, lifted)?)]);
        }
        // Pad so every window (and the strided reads below) stays inside the tensor.
        let ext: Vec<(usize, usize)> = (0..2)
            .map(|i| {
                (
                    pads[i].0,
                    (outs[i] * s[i] + k[i]).saturating_sub(pads[i].0 + ins[i]),
                )
            })
            .collect();
        let fill = if self.max { f64::NEG_INFINITY } else { 0.0 };
        let xp = pad_spatial(&x, &ext, fill)?;
        let mut acc: Option<Tensor> = None;
        for i in 0..k[0] {
            let rows = strided(&xp, 2, i, outs[0], s[0])?;
            for j in 0..k[1] {
                let win = strided(&rows, 3, j, outs[1], s[1])?;
                acc = Some(match acc {
                    None => win,
                    Some(a) if self.max => a.maximum(&win)?,
                    Some(a) => (a + win)?,
                });
            }
        }
        let acc = acc.expect("kernel is non-empty");
        let y = if self.max {
            acc
        } else {
            // Divisor per output position: the window clipped to the input (or to the padded
            // input with count_include_pad), as ONNX Runtime and PyTorch count it.
            let count = |o: usize, axis: usize| -> f64 {
                let start = (o * s[axis]) as i64 - pads[axis].0 as i64;
                let end = start + k[axis] as i64;
                let (lo, hi) = if self.count_include_pad {
                    (-(pads[axis].0 as i64), (ins[axis] + pads[axis].1) as i64)
                } else {
                    (0, ins[axis] as i64)
                };
                (end.min(hi) - start.max(lo)).max(1) as f64
            };
            let div: Vec<f64> = (0..outs[0])
                .flat_map(|a| (0..outs[1]).map(move |b| (a, b)))
                .map(|(a, b)| count(a, 0) * count(b, 1))
                .collect();
            let div =
                Tensor::from_vec(div, (1, 1, outs[0], outs[1]), x.device())?.to_dtype(x.dtype())?;
            acc.broadcast_div(&div)?
        };
        debug_assert_eq!(y.dims(), &[n, c, outs[0], outs[1]]);
        Ok(vec![Value::F(unlift(y, lifted)?)])
    }
}

struct GlobalPool {
    max: bool,
}

impl Op for GlobalPool {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        ensure!(
            x.rank() >= 3,
            "expected N x C x spatial..., got {:?}",
            x.dims()
        );
        let flat = x.flatten_from(2)?;
        let y = if self.max {
            flat.max_keepdim(2)?
        } else {
            flat.mean_keepdim(2)?
        };
        let mut shape = vec![1usize; x.rank()];
        shape[0] = x.dim(0)?;
        shape[1] = x.dim(1)?;
        Ok(vec![Value::F(y.reshape(shape)?)])
    }
}

// ---------------------------------------------------------------- Gemm / MatMul

struct Gemm {
    alpha: f64,
    beta: f64,
    trans_a: bool,
    trans_b: bool,
}

fn gemm(n: &NodeCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Gemm {
        alpha: n.float("alpha", 1.0)? as f64,
        beta: n.float("beta", 1.0)? as f64,
        trans_a: n.int("transA", 0)? != 0,
        trans_b: n.int("transB", 0)? != 0,
    }))
}

impl Op for Gemm {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = input(inputs, 0)?.float(ctx)?;
        let b = input(inputs, 1)?.float(ctx)?;
        ensure!(
            a.rank() == 2 && b.rank() == 2,
            "Gemm needs 2-D A and B, got {:?} and {:?}",
            a.dims(),
            b.dims()
        );
        let a = if self.trans_a { a.t()? } else { a };
        let b = if self.trans_b { b.t()? } else { b };
        let mut y = a.matmul(&b)?;
        if self.alpha != 1.0 {
            y = (y * self.alpha)?;
        }
        if let Some(c) = opt(inputs, 2) {
            let c = c.float(ctx)?;
            let c = if self.beta != 1.0 {
                (c * self.beta)?
            } else {
                c
            };
            y = y.broadcast_add(&c)?;
        }
        Ok(vec![Value::F(y)])
    }
}

struct MatMul;

impl Op for MatMul {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = input(inputs, 0)?.float(ctx)?;
        let b = input(inputs, 1)?.float(ctx)?;
        // numpy semantics: 1-D operands get a unit axis that is removed afterwards.
        let (a1, b1) = (a.rank() == 1, b.rank() == 1);
        let a = if a1 { a.unsqueeze(0)? } else { a };
        let b = if b1 { b.unsqueeze(1)? } else { b };
        let mut y = if a.rank() == 2 && b.rank() == 2 {
            a.matmul(&b)?
        } else {
            a.broadcast_matmul(&b)?
        };
        if b1 {
            y = y.squeeze(D::Minus1)?;
        }
        if a1 {
            let r = y.rank();
            y = y.squeeze(if b1 { r - 1 } else { r - 2 })?;
        }
        Ok(vec![Value::F(y)])
    }
}

// ---------------------------------------------------------------- Softmax

struct Softmax {
    axis: i64,
    log: bool,
    /// Before opset 13 the input is coerced to 2-D at `axis`.
    coerce_2d: bool,
}

fn softmax(n: &NodeCtx, log: bool) -> Result<Box<dyn Op>> {
    let new = n.opset >= 13;
    Ok(Box::new(Softmax {
        axis: n.int("axis", if new { -1 } else { 1 })?,
        log,
        coerce_2d: !new,
    }))
}

impl Op for Softmax {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        let ax = axis(self.axis, x.rank())?;
        // candle_nn::ops::softmax_last_dim has no gradient; softmax / log_softmax do.
        let f = |t: &Tensor, d: usize| -> Result<Tensor> {
            Ok(if self.log {
                candle_nn::ops::log_softmax(t, d)?
            } else {
                candle_nn::ops::softmax(t, d)?
            })
        };
        let y = if self.coerce_2d {
            let dims = x.dims().to_vec();
            let rows: usize = dims[..ax].iter().product();
            f(&x.reshape((rows, x.elem_count() / rows.max(1)))?, 1)?.reshape(dims)?
        } else {
            f(&x, ax)?
        };
        Ok(vec![Value::F(y)])
    }
}
