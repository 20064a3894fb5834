//! Neural-network ops: Conv, ConvTranspose, BatchNormalization (inference), pooling, Gemm, MatMul,
//! Softmax/LogSoftmax, Resize/Upsample. On the CPU, Conv, BatchNormalization and pooling run on
//! `crate::kernels`; elsewhere pooling and resizing are built from narrow/reshape/index_select
//! rather than candle's max_pool2d / upsample_nearest2d, whose gradients are wrong
//! (../shared/notes/candle.md). Every op here has a finite-difference gradient test.

use std::collections::HashMap;

use anyhow::{Result, bail, ensure};
use candle_core::{D, DType, Tensor};

use super::{Builder, NodeCtx, Op, axis, input, opt};
use crate::lower::value::{RunCtx, Value};
use crate::onnx::padding::AutoPad;

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

/// Spatial window parameters shared by Conv, ConvTranspose and pooling (2-D after lifting 1-D).
#[derive(Debug, Clone)]
struct Window {
    auto_pad: AutoPad,
    kernel: Option<Vec<usize>>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    /// [begin_h, begin_w, end_h, end_w] for 2-D.
    pads: Vec<usize>,
}

fn positive(v: Vec<i64>, what: &str) -> Result<Vec<usize>> {
    v.into_iter()
        .map(|x| {
            if x >= 0 {
                Ok(x as usize)
            } else {
                bail!("{what} must not be negative, got {x}")
            }
        })
        .collect()
}

impl Window {
    fn parse(n: &NodeCtx, default_kernel: bool) -> Result<Self> {
        let auto_pad = AutoPad::parse(&n.string("auto_pad", "NOTSET")?)?;
        let kernel = n
            .ints("kernel_shape")?
            .map(|k| positive(k, "kernel_shape"))
            .transpose()?;
        ensure!(
            default_kernel || kernel.is_some(),
            "attribute kernel_shape is required"
        );
        let rank = kernel.as_ref().map(Vec::len);
        let strides = positive(n.ints("strides")?.unwrap_or_default(), "strides")?;
        let dilations = positive(n.ints("dilations")?.unwrap_or_default(), "dilations")?;
        let pads = positive(n.ints("pads")?.unwrap_or_default(), "pads")?;
        if let Some(r) = rank {
            ensure!(
                (1..=2).contains(&r),
                "only 1-D and 2-D windows are supported, kernel_shape has {r} dims"
            );
        }
        Ok(Self {
            auto_pad,
            kernel,
            strides,
            dilations,
            pads,
        })
    }

    /// Per-axis values for `rank` spatial dims, defaulting to `d`.
    fn per_axis(v: &[usize], rank: usize, d: usize) -> Vec<usize> {
        if v.is_empty() {
            vec![d; rank]
        } else {
            v.to_vec()
        }
    }

    /// (begin, end) padding per spatial axis for inputs `ins`, kernel `k`.
    fn resolve_pads(
        &self,
        ins: &[usize],
        k: &[usize],
        s: &[usize],
        d: &[usize],
    ) -> Result<Vec<(usize, usize)>> {
        self.auto_pad.resolve(ins, k, s, d, &self.pads)
    }
}

/// ConvTranspose's split of a total padding (ONNX: the extra pixel goes first unless
/// SAME_UPPER, also for explicit pads with `output_shape`).
fn transpose_split(a: AutoPad, total: usize) -> (usize, usize) {
    if a == AutoPad::SameUpper {
        AutoPad::SameUpper.split(total)
    } else {
        AutoPad::SameLower.split(total)
    }
}

/// Lifts a 3-D (N, C, L) tensor to 4-D (N, C, 1, L) so 1-D ops run through the 2-D code.
fn lift(x: &Tensor) -> Result<(Tensor, bool)> {
    match x.rank() {
        4 => Ok((x.clone(), false)),
        3 => Ok((x.unsqueeze(2)?, true)),
        r => bail!("expected a 3-D or 4-D input, got rank {r}"),
    }
}

fn unlift(x: Tensor, lifted: bool) -> Result<Tensor> {
    Ok(if lifted { x.squeeze(2)? } else { x })
}

/// Lifts per-axis values of a 1-D op to 2-D (a unit first axis).
fn lift_axis(v: Vec<usize>, lifted: bool, unit: usize) -> Vec<usize> {
    if lifted { [vec![unit], v].concat() } else { v }
}

fn lift_pads(p: Vec<(usize, usize)>, lifted: bool) -> Vec<(usize, usize)> {
    if lifted {
        [vec![(0, 0)], p].concat()
    } else {
        p
    }
}

/// Zero- (or `value`-) pads the spatial dims of a 4-D tensor.
fn pad_spatial(x: &Tensor, pads: &[(usize, usize)], value: f64) -> Result<Tensor> {
    let mut x = x.clone();
    for (i, &(b, e)) in pads.iter().enumerate() {
        if b == 0 && e == 0 {
            continue;
        }
        let dim = 2 + i;
        x = if value == 0.0 {
            x.pad_with_zeros(dim, b, e)?
        } else {
            let mut parts = Vec::new();
            let mut shape = x.dims().to_vec();
            if b > 0 {
                shape[dim] = b;
                parts.push((Tensor::ones(shape.clone(), x.dtype(), x.device())? * value)?);
            }
            parts.push(x.clone());
            if e > 0 {
                shape[dim] = e;
                parts.push((Tensor::ones(shape.clone(), x.dtype(), x.device())? * value)?);
            }
            Tensor::cat(&parts, dim)?
        };
    }
    Ok(x)
}

/// Takes every `step`-th of `count` elements along `dim`, starting at `start`. The tensor must have
/// at least `start + count * step` elements there (callers pad).
fn strided(x: &Tensor, dim: usize, start: usize, count: usize, step: usize) -> Result<Tensor> {
    if step == 1 {
        return Ok(x.narrow(dim, start, count)?);
    }
    let y = x.narrow(dim, start, count * step)?;
    let mut shape = y.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, step);
    Ok(y.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?)
}

// ---------------------------------------------------------------- Conv

struct Conv {
    w: Window,
    groups: usize,
}

fn conv(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let groups = n.int("group", 1)?;
    ensure!(groups >= 1, "group must be >= 1, got {groups}");
    Ok(Box::new(Conv {
        w: Window::parse(n, true)?,
        groups: groups as usize,
    }))
}

impl Op for Conv {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (x, lifted) = lift(&input(inputs, 0)?.float(ctx)?)?;
        let w = input(inputs, 1)?.float(ctx)?;
        let w = if lifted { w.unsqueeze(2)? } else { w };
        let (_, _, ih, iw) = x.dims4()?;
        let (m, _, kh, kw) = w.dims4()?;
        let k = [kh, kw];
        if let Some(ks) = &self.w.kernel {
            ensure!(
                lift_axis(ks.clone(), lifted, 1) == k,
                "kernel_shape {ks:?} does not match the weight's {k:?}"
            );
        }
        let s = lift_axis(
            Window::per_axis(&self.w.strides, 2 - lifted as usize, 1),
            lifted,
            1,
        );
        let d = lift_axis(
            Window::per_axis(&self.w.dilations, 2 - lifted as usize, 1),
            lifted,
            1,
        );
        let spatial = if lifted { vec![iw] } else { vec![ih, iw] };
        let pads = lift_pads(
            self.w.resolve_pads(
                &spatial,
                &k[lifted as usize..],
                &s[lifted as usize..],
                &d[lifted as usize..],
            )?,
            lifted,
        );
        let spec = crate::kernels::Conv2dSpec {
            stride: [s[0], s[1]],
            pad: [pads[0].0, pads[1].0, pads[0].1, pads[1].1],
            dilation: [d[0], d[1]],
            groups: self.groups,
        };
        let y = crate::kernels::conv2d(&x, &w, spec)?;
        let y = match opt(inputs, 2) {
            Some(b) => {
                let ones = Tensor::ones(m, y.dtype(), y.device())?;
                crate::kernels::channel_affine(&y, &ones, &b.float(ctx)?)?
            }
            None => y,
        };
        Ok(vec![Value::F(unlift(y, lifted)?)])
    }
}

// ---------------------------------------------------------------- ConvTranspose

struct ConvTranspose {
    w: Window,
    groups: usize,
    output_padding: Vec<usize>,
    output_shape: Option<Vec<usize>>,
}

fn conv_transpose(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let groups = n.int("group", 1)?;
    ensure!(groups >= 1, "group must be >= 1, got {groups}");
    Ok(Box::new(ConvTranspose {
        w: Window::parse(n, true)?,
        groups: groups as usize,
        output_padding: positive(
            n.ints("output_padding")?.unwrap_or_default(),
            "output_padding",
        )?,
        output_shape: n
            .ints("output_shape")?
            .map(|v| positive(v, "output_shape"))
            .transpose()?,
    }))
}

impl Op for ConvTranspose {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (x, lifted) = lift(&input(inputs, 0)?.float(ctx)?)?;
        let w = input(inputs, 1)?.float(ctx)?;
        let w = if lifted { w.unsqueeze(2)? } else { w };
        let (_, c, ih, iw) = x.dims4()?;
        let (_, mg, kh, kw) = w.dims4()?;
        let r = 2 - lifted as usize;
        let s = lift_axis(Window::per_axis(&self.w.strides, r, 1), lifted, 1);
        let d = lift_axis(Window::per_axis(&self.w.dilations, r, 1), lifted, 1);
        let op = lift_axis(Window::per_axis(&self.output_padding, r, 0), lifted, 0);
        ensure!(
            s[0] == s[1] || lifted,
            "different strides per axis ({s:?}) are not supported"
        );
        ensure!(
            d[0] == d[1] || lifted,
            "different dilations per axis ({d:?}) are not supported"
        );
        let ins = [ih, iw];
        let k = [kh, kw];
        let full: Vec<usize> = (0..2)
            .map(|i| (ins[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1)
            .collect();
        let pads: Vec<(usize, usize)> = if let Some(os) = &self.output_shape {
            let os = lift_axis(os.clone(), lifted, 1);
            (0..2)
                .map(|i| transpose_split(self.w.auto_pad, (full[i] + op[i]).saturating_sub(os[i])))
                .collect()
        } else if self.w.auto_pad.is_same() {
            (0..2)
                .map(|i| {
                    transpose_split(
                        self.w.auto_pad,
                        (full[i] + op[i]).saturating_sub(ins[i] * s[i]),
                    )
                })
                .collect()
        } else if self.w.auto_pad == AutoPad::Valid {
            vec![(0, 0); 2]
        } else {
            lift_pads(
                {
                    let p = Window::per_axis(&self.w.pads, 2 * r, 0);
                    (0..r).map(|i| (p[i], p[i + r])).collect()
                },
                lifted,
            )
        };
        // Full transposed convolution per group, then output padding and cropping.
        let xs = x.chunk(self.groups, 1)?;
        let ws = w.chunk(self.groups, 0)?;
        ensure!(
            xs.len() == self.groups && c % self.groups == 0,
            "channels {c} do not split into {} groups",
            self.groups
        );
        let ys = xs
            .iter()
            .zip(&ws)
            .map(|(xg, wg)| xg.conv_transpose2d(wg, 0, 0, s[1], d[1]))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut y = Tensor::cat(&ys, 1)?;
        for i in 0..2 {
            let dim = 2 + i;
            if op[i] > 0 {
                y = y.pad_with_zeros(dim, 0, op[i])?;
            }
            let len = y.dim(dim)? as i64 - pads[i].0 as i64 - pads[i].1 as i64;
            ensure!(len > 0, "pads crop the whole output");
            y = y.narrow(dim, pads[i].0, len as usize)?;
        }
        let y = match opt(inputs, 2) {
            Some(b) => y.broadcast_add(&b.float(ctx)?.reshape((1, mg * self.groups, 1, 1))?)?,
            None => y,
        };
        Ok(vec![Value::F(unlift(y, lifted)?)])
    }
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

// ---------------------------------------------------------------- Resize / Upsample

struct Resize {
    linear: bool,
    coord: CoordTransform,
    nearest_mode: NearestMode,
    /// Upsample (opset 7) keeps its scales in an attribute.
    attr_scales: Option<Vec<f32>>,
    /// Index of the scales / sizes inputs (Resize 11+: 2 and 3; Resize 10 / Upsample 9: 1, none).
    scales_input: usize,
    sizes_input: Option<usize>,
}

fn resize(n: &NodeCtx) -> Result<Box<dyn Op>> {
    let is_upsample = n.node.op_type == "Upsample";
    let mode = n.string("mode", "nearest")?;
    let linear = match mode.as_str() {
        "nearest" => false,
        "linear" | "bilinear" => true,
        other => bail!("mode '{other}' is not supported (nearest, linear)"),
    };
    ensure!(n.int("antialias", 0)? == 0, "antialias is not supported");
    ensure!(!n.has("axes"), "the axes attribute is not supported");
    let old = is_upsample || n.opset < 11;
    let coord = CoordTransform::parse(&n.string(
        "coordinate_transformation_mode",
        if old { "asymmetric" } else { "half_pixel" },
    )?)?;
    let policy = n.string("keep_aspect_ratio_policy", "stretch")?;
    ensure!(
        policy == "stretch",
        "keep_aspect_ratio_policy '{policy}' is not supported"
    );
    Ok(Box::new(Resize {
        linear,
        coord,
        // Before opset 11 nearest resizing floored (asymmetric + floor).
        nearest_mode: NearestMode::parse(&n.string(
            "nearest_mode",
            if old { "floor" } else { "round_prefer_floor" },
        )?)?,
        attr_scales: n.floats("scales")?,
        scales_input: if old { 1 } else { 2 },
        sizes_input: if old { None } else { Some(3) },
    }))
}

/// Resize's `coordinate_transformation_mode`: how an output index maps to the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoordTransform {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNn,
}

impl CoordTransform {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "half_pixel" => Self::HalfPixel,
            "pytorch_half_pixel" => Self::PytorchHalfPixel,
            "align_corners" => Self::AlignCorners,
            "asymmetric" => Self::Asymmetric,
            "tf_half_pixel_for_nn" => Self::TfHalfPixelForNn,
            other => bail!("coordinate_transformation_mode '{other}' is not supported"),
        })
    }
}

/// Resize's `nearest_mode`: how a fractional source index rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

impl NearestMode {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "round_prefer_floor" => Self::RoundPreferFloor,
            "round_prefer_ceil" => Self::RoundPreferCeil,
            "floor" => Self::Floor,
            "ceil" => Self::Ceil,
            other => bail!("nearest_mode '{other}' is not supported"),
        })
    }
}

impl Resize {
    /// Source coordinate of output index `o` along an axis of `len` -> `out` with `scale`.
    fn source(&self, o: usize, len: usize, out: usize, scale: f64) -> f64 {
        let o = o as f64;
        match self.coord {
            CoordTransform::HalfPixel => (o + 0.5) / scale - 0.5,
            CoordTransform::PytorchHalfPixel => {
                if out > 1 {
                    (o + 0.5) / scale - 0.5
                } else {
                    0.0
                }
            }
            CoordTransform::AlignCorners => {
                if out == 1 {
                    0.0
                } else {
                    o * (len as f64 - 1.0) / (out as f64 - 1.0)
                }
            }
            CoordTransform::TfHalfPixelForNn => (o + 0.5) / scale,
            CoordTransform::Asymmetric => o / scale,
        }
    }

    fn nearest(&self, x: f64) -> f64 {
        let frac = x - x.floor();
        match self.nearest_mode {
            NearestMode::Floor => x.floor(),
            NearestMode::Ceil => x.ceil(),
            NearestMode::RoundPreferCeil => {
                if frac == 0.5 {
                    x.ceil()
                } else {
                    x.round()
                }
            }
            NearestMode::RoundPreferFloor => {
                if frac == 0.5 {
                    x.floor()
                } else {
                    x.round()
                }
            }
        }
    }

    /// Resizes `x` along `dim` from `len` to `out` elements.
    fn axis(&self, x: &Tensor, dim: usize, out: usize, scale: f64) -> Result<Tensor> {
        let len = x.dim(dim)?;
        if out == len && scale == 1.0 {
            return Ok(x.clone());
        }
        let dev = x.device();
        let clampi = |v: f64| v.max(0.0).min(len as f64 - 1.0);
        if !self.linear {
            let idx: Vec<u32> = (0..out)
                .map(|o| clampi(self.nearest(self.source(o, len, out, scale))) as u32)
                .collect();
            return Ok(x.index_select(&Tensor::new(idx, dev)?, dim)?);
        }
        let (mut i0, mut i1, mut wt) = (Vec::new(), Vec::new(), Vec::new());
        for o in 0..out {
            let src = clampi(self.source(o, len, out, scale));
            let lo = src.floor();
            i0.push(lo as u32);
            i1.push((lo as usize + 1).min(len - 1) as u32);
            wt.push(src - lo);
        }
        let a = x.index_select(&Tensor::new(i0, dev)?, dim)?;
        let b = x.index_select(&Tensor::new(i1, dev)?, dim)?;
        let mut shape = vec![1usize; x.rank()];
        shape[dim] = out;
        let w = Tensor::from_vec(wt, shape, dev)?.to_dtype(x.dtype())?;
        // a + (b - a) * w
        Ok(a.broadcast_add(&(b - &a)?.broadcast_mul(&w)?)?)
    }
}

impl Op for Resize {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input(inputs, 0)?.float(ctx)?;
        let dims = x.dims().to_vec();
        let rank = dims.len();
        let sizes = match self.sizes_input.and_then(|i| opt(inputs, i)) {
            Some(v) => Some(v.ints()?.data).filter(|s| !s.is_empty()),
            None => None,
        };
        let scales: Option<Vec<f64>> = match (&self.attr_scales, opt(inputs, self.scales_input)) {
            (Some(s), _) => Some(s.iter().map(|&v| v as f64).collect()),
            (None, Some(v)) => {
                let t = v
                    .float(ctx)?
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                (!t.is_empty()).then_some(t)
            }
            (None, None) => None,
        };
        let (out, scale): (Vec<usize>, Vec<f64>) = match (sizes, scales) {
            (Some(s), _) => {
                ensure!(
                    s.len() == rank,
                    "sizes has {} values for rank {rank}",
                    s.len()
                );
                let out: Vec<usize> = s.iter().map(|&v| v.max(1) as usize).collect();
                let scale = (0..rank).map(|i| out[i] as f64 / dims[i] as f64).collect();
                (out, scale)
            }
            (None, Some(sc)) => {
                ensure!(
                    sc.len() == rank,
                    "scales has {} values for rank {rank}",
                    sc.len()
                );
                (
                    (0..rank)
                        .map(|i| ((dims[i] as f64 * sc[i]).floor() as usize).max(1))
                        .collect(),
                    sc,
                )
            }
            (None, None) => bail!("neither scales nor sizes given"),
        };
        ensure!(
            out[..rank.saturating_sub(2)] == dims[..rank.saturating_sub(2)],
            "only the last two axes can be resized, got {dims:?} -> {out:?}"
        );
        let mut y = x;
        for d in rank.saturating_sub(2)..rank {
            y = self.axis(&y, d, out[d], scale[d])?;
        }
        Ok(vec![Value::F(y)])
    }
}
