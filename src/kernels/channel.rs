//! Per-channel ops on N x C x ... tensors: sums (BN statistics, bias and BN-affine gradients)
//! and the fused affine `x * a[c] + b[c]` (inference BN, conditional BN, bias add).

use super::{Elem, dispatch, enabled, err, sum8, view};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// (N, C, plane size) of an N x C x ... layout.
fn ncp(dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    if dims.len() < 2 {
        return Err(err(format!(
            "per-channel op expects N x C x ..., got {dims:?}"
        )));
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

/// Per-channel sum of `x` (or of `x * other`).
fn channel_reduce<T: Elem>(
    x: &[T],
    other: Option<&[T]>,
    (n, c, p): (usize, usize, usize),
) -> Vec<T> {
    (0..c)
        .into_par_iter()
        .map(|ci| {
            let mut total = T::ZERO;
            for ni in 0..n {
                let at = (ni * c + ci) * p;
                total += sum8(&x[at..at + p], other.map(|o| &o[at..at + p]));
            }
            total
        })
        .collect()
}

struct Sum;
struct Dot;
struct Affine;
struct Scale;

impl CustomOp1 for Sum {
    fn name(&self) -> &'static str {
        "datafree-channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = ncp(l.dims())?;
        dispatch!(s, "channel_sum", |T| {
            let v = channel_reduce::<T>(view(s, l, "channel_sum")?, None, d);
            Ok((T::storage(v), Shape::from(d.1)))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut shape = vec![1usize; x.rank()];
        shape[1] = x.dim(1)?;
        Ok(Some(g.reshape(shape)?.broadcast_as(x.shape())?))
    }
}

impl CustomOp2 for Dot {
    fn name(&self) -> &'static str {
        "datafree-channel-dot"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = ncp(l1.dims())?;
        if l1.dims() != l2.dims() {
            return Err(err("channel dot: operands differ in shape"));
        }
        dispatch!(s1, "channel_dot", |T| {
            let v = channel_reduce::<T>(
                view(s1, l1, "channel_dot")?,
                Some(view(s2, l2, "channel_dot")?),
                d,
            );
            Ok((T::storage(v), Shape::from(d.1)))
        })
    }
}

fn affine<T: Elem>(x: &[T], a: &[T], b: Option<&[T]>, (n, c, p): (usize, usize, usize)) -> Vec<T> {
    let mut y = vec![T::ZERO; n * c * p];
    y.par_chunks_mut(p.max(1))
        .zip(x.par_chunks(p.max(1)))
        .enumerate()
        .for_each(|(i, (yp, xp))| {
            let (s, t) = (a[i % c], b.map_or(T::ZERO, |b| b[i % c]));
            for (d, &v) in yp.iter_mut().zip(xp) {
                *d = v * s + t;
            }
        });
    y
}

fn check_vec(l: &Layout, c: usize, what: &str) -> candle_core::Result<()> {
    if l.shape().elem_count() != c {
        return Err(err(format!(
            "channel affine: {what} has {} values for {c} channels",
            l.shape().elem_count()
        )));
    }
    Ok(())
}

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "datafree-channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = ncp(l1.dims())?;
        check_vec(l2, d.1, "the scale")?;
        check_vec(l3, d.1, "the shift")?;
        dispatch!(s1, "channel_affine", |T| {
            let y = affine::<T>(
                view(s1, l1, "channel_affine")?,
                view(s2, l2, "channel_affine")?,
                Some(view(s3, l3, "channel_affine")?),
                d,
            );
            Ok((T::storage(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let gx = x
            .track_op()
            .then(|| g.apply_op2_no_bwd(a, &Scale))
            .transpose()?;
        let ga = a
            .track_op()
            .then(|| g.apply_op2_no_bwd(x, &Dot)?.reshape(a.shape()))
            .transpose()?;
        let gb = b
            .track_op()
            .then(|| g.apply_op1_no_bwd(&Sum)?.reshape(b.shape()))
            .transpose()?;
        Ok((gx, ga, gb))
    }
}

impl CustomOp2 for Scale {
    fn name(&self) -> &'static str {
        "datafree-channel-scale"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = ncp(l1.dims())?;
        check_vec(l2, d.1, "the scale")?;
        dispatch!(s1, "channel_scale", |T| {
            let y = affine::<T>(
                view(s1, l1, "channel_scale")?,
                view(s2, l2, "channel_scale")?,
                None,
                d,
            );
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
}

/// The C-channel view `[1, C, 1, ...]` of a per-channel vector, for broadcasting.
fn channel_view(v: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let mut shape = vec![1usize; x.rank()];
    shape[1] = x.dim(1)?;
    v.reshape(shape)
}

/// Per-channel sum over every axis but 1, as a C vector.
pub fn channel_sum(x: &Tensor) -> candle_core::Result<Tensor> {
    if enabled(x.device()) {
        return x.contiguous()?.apply_op1(Sum);
    }
    // Reduce the trailing (contiguous) dims first: candle's reductions over non-contiguous dims
    // are much slower.
    let f = if x.rank() > 2 {
        x.flatten_from(2)?
    } else {
        x.unsqueeze(2)?
    };
    f.sum(2)?.sum(0)
}

/// `x * a[c] + b[c]` for per-channel vectors `a`, `b` (C values each, any shape).
pub fn channel_affine(x: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if enabled(x.device()) {
        let c = x.dim(1)?;
        return x.contiguous()?.apply_op3(
            &a.contiguous()?.reshape(c)?,
            &b.contiguous()?.reshape(c)?,
            Affine,
        );
    }
    x.broadcast_mul(&channel_view(a, x)?)?
        .broadcast_add(&channel_view(b, x)?)
}

/// Per-channel batch mean and biased variance of an N x C x ... tensor (the statistics
/// BatchNormalization normalises with in training, and that BNS losses match), as C vectors.
pub fn channel_moments(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let count = (x.elem_count() / x.dim(1)?.max(1)).max(1) as f64;
    let mean = (channel_sum(x)? / count)?;
    let sq = (channel_sum(&x.sqr()?)? / count)?;
    let var = (sq - mean.sqr()?)?;
    Ok((mean, var))
}
