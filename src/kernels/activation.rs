//! ReLU and LeakyReLU as one op with a cheap backward (candle's ReLU backward builds a
//! comparison, a cast and a product, and gives gradient 1 at exactly 0 where PyTorch gives 0);
//! clamping (Clip, ReLU6, HardSigmoid, HardSwish) likewise: candle's clamp is a broadcast maximum
//! and minimum whose backward builds a dozen full-size tensors (measured: most of a MobileNet
//! fixture's input-gradient step).

use super::{Elem, dispatch, enabled, err, view};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const BLOCK: usize = 1 << 14;

fn map2<T: Elem>(x: &[T], other: Option<&[T]>, slope: T) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(BLOCK).enumerate().for_each(|(i, out)| {
        let xs = &x[i * BLOCK..][..out.len()];
        // Branch-free (a data-dependent branch mispredicts on every other element).
        match other {
            // forward: max(x, 0) + slope * min(x, 0)
            None => {
                for (d, &v) in out.iter_mut().zip(xs) {
                    *d = v.max0() + slope * v.min0();
                }
            }
            // backward: g * (1 or slope by the sign of x)
            Some(g) => {
                let gs = &g[i * BLOCK..][..out.len()];
                for ((d, &v), &gv) in out.iter_mut().zip(xs).zip(gs) {
                    *d = gv * T::select_pos(v, T::ONE, slope);
                }
            }
        }
    });
    y
}

struct Leaky(f64);
struct LeakyGrad(f64);

impl CustomOp1 for Leaky {
    fn name(&self) -> &'static str {
        "datafree-leaky-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(s, "leaky_relu", |T| {
            let y = map2::<T>(view(s, l, "leaky_relu")?, None, T::from_f64(self.0));
            Ok((T::storage(y), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&g.contiguous()?, &LeakyGrad(self.0))?,
        ))
    }
}

impl CustomOp2 for LeakyGrad {
    fn name(&self) -> &'static str {
        "datafree-leaky-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            return Err(err("leaky_relu gradient: shapes differ"));
        }
        dispatch!(s1, "leaky_relu", |T| {
            let y = map2::<T>(
                view(s1, l1, "leaky_relu")?,
                Some(view(s2, l2, "leaky_relu")?),
                T::from_f64(self.0),
            );
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
}

/// `max(x, 0) + slope * min(x, 0)`; slope 0 is ReLU (gradient 0 at exactly 0, as PyTorch).
pub fn leaky_relu(x: &Tensor, slope: f64) -> candle_core::Result<Tensor> {
    if enabled(x.device()) {
        return x.contiguous()?.apply_op1(Leaky(slope));
    }
    // As a product with a constant mask: candle's own relu, maximum and minimum pass the
    // gradient at exactly 0, which sums of ReLU outputs (residual blocks) hit often.
    let pos = x.gt(0.0)?.to_dtype(x.dtype())?;
    if slope == 0.0 {
        return x * pos;
    }
    x * ((pos * (1.0 - slope))? + slope)?
}

/// ReLU.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    leaky_relu(x, 0.0)
}

/// `min(max(x, lo), hi)` with gradient 1 strictly inside (lo, hi) and 0 elsewhere (as PyTorch's
/// hardtanh, the op behind ReLU6 and the hard activations).
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> candle_core::Result<Tensor> {
    if enabled(x.device()) {
        return x.contiguous()?.apply_op1(Clamp(lo, hi));
    }
    x.clamp(lo, hi)
}

fn clamp_map<T: Elem>(x: &[T], g: Option<&[T]>, lo: T, hi: T) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(BLOCK).enumerate().for_each(|(i, out)| {
        let xs = &x[i * BLOCK..][..out.len()];
        match g {
            None => {
                for (d, &v) in out.iter_mut().zip(xs) {
                    // max then min: with lo > hi everything becomes hi, as ONNX's Clip.
                    let c = if v < lo { lo } else { v };
                    *d = if c > hi { hi } else { c };
                }
            }
            Some(g) => {
                let gs = &g[i * BLOCK..][..out.len()];
                for ((d, &v), &gv) in out.iter_mut().zip(xs).zip(gs) {
                    *d = if v > lo && v < hi { gv } else { T::ZERO };
                }
            }
        }
    });
    y
}

struct Clamp(f64, f64);
struct ClampGrad(f64, f64);

impl CustomOp1 for Clamp {
    fn name(&self) -> &'static str {
        "datafree-clamp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(s, "clamp", |T| {
            let y = clamp_map::<T>(
                view(s, l, "clamp")?,
                None,
                T::from_f64(self.0),
                T::from_f64(self.1),
            );
            Ok((T::storage(y), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &g.contiguous()?,
            &ClampGrad(self.0, self.1),
        )?))
    }
}

impl CustomOp2 for ClampGrad {
    fn name(&self) -> &'static str {
        "datafree-clamp-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            return Err(err("clamp gradient: shapes differ"));
        }
        dispatch!(s1, "clamp", |T| {
            let y = clamp_map::<T>(
                view(s1, l1, "clamp")?,
                Some(view(s2, l2, "clamp")?),
                T::from_f64(self.0),
                T::from_f64(self.1),
            );
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
}
