//! What Conv, ConvTranspose and pooling share: the window attributes (kernel, strides,
//! dilations, padding) parsed once, and lifting 1-D inputs to 2-D so one code path serves both.

use anyhow::{Result, bail, ensure};
use candle_core::Tensor;

use super::NodeCtx;
use crate::onnx::padding::AutoPad;

/// Spatial window parameters shared by Conv, ConvTranspose and pooling (2-D after lifting 1-D).
#[derive(Debug, Clone)]
pub(super) struct Window {
    pub(super) auto_pad: AutoPad,
    pub(super) kernel: Option<Vec<usize>>,
    pub(super) strides: Vec<usize>,
    pub(super) dilations: Vec<usize>,
    /// [begin_h, begin_w, end_h, end_w] for 2-D.
    pub(super) pads: Vec<usize>,
}

pub(super) fn positive(v: Vec<i64>, what: &str) -> Result<Vec<usize>> {
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
    pub(super) fn parse(n: &NodeCtx, default_kernel: bool) -> Result<Self> {
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
    pub(super) fn per_axis(v: &[usize], rank: usize, d: usize) -> Vec<usize> {
        if v.is_empty() {
            vec![d; rank]
        } else {
            v.to_vec()
        }
    }

    /// (begin, end) padding per spatial axis for inputs `ins`, kernel `k`.
    pub(super) fn resolve_pads(
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
pub(super) fn transpose_split(a: AutoPad, total: usize) -> (usize, usize) {
    if a == AutoPad::SameUpper {
        AutoPad::SameUpper.split(total)
    } else {
        AutoPad::SameLower.split(total)
    }
}

/// Lifts a 3-D (N, C, L) tensor to 4-D (N, C, 1, L) so 1-D ops run through the 2-D code.
pub(super) fn lift(x: &Tensor) -> Result<(Tensor, bool)> {
    match x.rank() {
        4 => Ok((x.clone(), false)),
        3 => Ok((x.unsqueeze(2)?, true)),
        r => bail!("expected a 3-D or 4-D input, got rank {r}"),
    }
}

pub(super) fn unlift(x: Tensor, lifted: bool) -> Result<Tensor> {
    Ok(if lifted { x.squeeze(2)? } else { x })
}

/// Lifts per-axis values of a 1-D op to 2-D (a unit first axis).
pub(super) fn lift_axis(v: Vec<usize>, lifted: bool, unit: usize) -> Vec<usize> {
    if lifted { [vec![unit], v].concat() } else { v }
}

pub(super) fn lift_pads(p: Vec<(usize, usize)>, lifted: bool) -> Vec<(usize, usize)> {
    if lifted {
        [vec![(0, 0)], p].concat()
    } else {
        p
    }
}

/// Zero- (or `value`-) pads the spatial dims of a 4-D tensor.
pub(super) fn pad_spatial(x: &Tensor, pads: &[(usize, usize)], value: f64) -> Result<Tensor> {
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
pub(super) fn strided(
    x: &Tensor,
    dim: usize,
    start: usize,
    count: usize,
    step: usize,
) -> Result<Tensor> {
    if step == 1 {
        return Ok(x.narrow(dim, start, count)?);
    }
    let y = x.narrow(dim, start, count * step)?;
    let mut shape = y.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, step);
    Ok(y.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?)
}
