//! Resize and Upsample (nearest and linear, the ONNX coordinate modes), built from
//! index_select and weighted adds, whose gradients are right where candle's upsampling's are
//! not (../shared/notes/candle.md).

use anyhow::{Result, bail, ensure};
use candle_core::{DType, Tensor};

use super::{NodeCtx, Op, input, opt};
use crate::lower::value::{RunCtx, Value};

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

pub(super) fn resize(n: &NodeCtx) -> Result<Box<dyn Op>> {
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
