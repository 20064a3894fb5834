//! Integer-factor 2-D upsampling, nearest and bilinear (half-pixel centres, PyTorch's
//! `align_corners=False`, ONNX Resize `half_pixel`), forward and backward.

use super::{Elem, dispatch, enabled, err, view};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpMode {
    Nearest,
    Bilinear,
}

/// Per output index along one axis: the two source indices and their weights.
fn axis_taps(len: usize, factor: usize, mode: UpMode) -> Vec<(usize, usize, f64, f64)> {
    (0..len * factor)
        .map(|o| match mode {
            UpMode::Nearest => (o / factor, o / factor, 1.0, 0.0),
            UpMode::Bilinear => {
                let src = ((o as f64 + 0.5) / factor as f64 - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(len - 1);
                let i1 = (i0 + 1).min(len - 1);
                let l1 = src - i0 as f64;
                (i0, i1, 1.0 - l1, l1)
            }
        })
        .collect()
}

struct Geom {
    planes: usize,
    h: usize,
    w: usize,
    shape: [usize; 2],
}

fn geom(dims: &[usize]) -> candle_core::Result<Geom> {
    match *dims {
        [n, c, h, w] if h > 0 && w > 0 => Ok(Geom {
            planes: n * c,
            h,
            w,
            shape: [n, c],
        }),
        _ => Err(err(format!(
            "upsampling expects a non-empty N x C x H x W tensor, got {dims:?}"
        ))),
    }
}

fn forward<T: Elem>(x: &[T], f: usize, mode: UpMode, g: &Geom) -> Vec<T> {
    let (ty, tx) = (axis_taps(g.h, f, mode), axis_taps(g.w, f, mode));
    let tx: Vec<(usize, usize, T, T)> = tx
        .into_iter()
        .map(|(a, b, wa, wb)| (a, b, T::from_f64(wa), T::from_f64(wb)))
        .collect();
    let (oh, ow) = (g.h * f, g.w * f);
    let mut y = vec![T::ZERO; g.planes * oh * ow];
    y.par_chunks_mut(oh * ow).enumerate().for_each(|(pi, yp)| {
        let plane = &x[pi * g.h * g.w..][..g.h * g.w];
        for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
            let (r0, r1) = (&plane[y0 * g.w..][..g.w], &plane[y1 * g.w..][..g.w]);
            let (wy0, wy1) = (T::from_f64(wy0), T::from_f64(wy1));
            for (d, &(x0, x1, wx0, wx1)) in yp[oy * ow..][..ow].iter_mut().zip(&tx) {
                *d = match mode {
                    UpMode::Nearest => r0[x0],
                    UpMode::Bilinear => {
                        wy0 * (wx0 * r0[x0] + wx1 * r0[x1]) + wy1 * (wx0 * r1[x0] + wx1 * r1[x1])
                    }
                };
            }
        }
    });
    y
}

fn backward<T: Elem>(gy: &[T], f: usize, mode: UpMode, g: &Geom) -> Vec<T> {
    let (ty, tx) = (axis_taps(g.h, f, mode), axis_taps(g.w, f, mode));
    let (oh, ow) = (g.h * f, g.w * f);
    let mut gx = vec![T::ZERO; g.planes * g.h * g.w];
    gx.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(pi, gxp)| {
            let gp = &gy[pi * oh * ow..][..oh * ow];
            for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
                let row = &gp[oy * ow..][..ow];
                for (&v, &(x0, x1, wx0, wx1)) in row.iter().zip(&tx) {
                    match mode {
                        UpMode::Nearest => gxp[y0 * g.w + x0] += v,
                        UpMode::Bilinear => {
                            for (r, wr) in [(y0, wy0), (y1, wy1)] {
                                for (c, wc) in [(x0, wx0), (x1, wx1)] {
                                    gxp[r * g.w + c] += T::from_f64(wr * wc) * v;
                                }
                            }
                        }
                    }
                }
            }
        });
    gx
}

struct Up {
    factor: usize,
    mode: UpMode,
}
struct UpGrad {
    factor: usize,
    mode: UpMode,
    input: [usize; 4],
}

impl CustomOp1 for Up {
    fn name(&self) -> &'static str {
        "datafree-upsample2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geom(l.dims())?;
        let f = self.factor;
        dispatch!(s, "upsample2d", |T| {
            let y = forward::<T>(view(s, l, "upsample2d")?, f, self.mode, &g);
            Ok((
                T::storage(y),
                Shape::from((g.shape[0], g.shape[1], g.h * f, g.w * f)),
            ))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, c, h, w) = x.dims4()?;
        Ok(Some(gy.contiguous()?.apply_op1_no_bwd(&UpGrad {
            factor: self.factor,
            mode: self.mode,
            input: [n, c, h, w],
        })?))
    }
}

impl CustomOp1 for UpGrad {
    fn name(&self) -> &'static str {
        "datafree-upsample2d-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geom(&self.input)?;
        let [n, c, h, w] = self.input;
        if l.dims() != [n, c, h * self.factor, w * self.factor] {
            return Err(err("upsampling gradient has the wrong shape"));
        }
        dispatch!(s, "upsample2d", |T| {
            let gx = backward::<T>(view(s, l, "upsample2d")?, self.factor, self.mode, &g);
            Ok((T::storage(gx), Shape::from(self.input.to_vec())))
        })
    }
}

/// Upsamples N x C x H x W by an integer factor on both spatial axes.
pub fn upsample2d(x: &Tensor, factor: usize, mode: UpMode) -> candle_core::Result<Tensor> {
    if factor == 0 {
        return Err(err("upsampling factor must be >= 1"));
    }
    if enabled(x.device()) {
        return x.contiguous()?.apply_op1(Up { factor, mode });
    }
    // Other devices: gathers and weighted sums, whose candle gradients are correct.
    let (_, _, h, w) = x.dims4()?;
    let along = |t: &Tensor, dim: usize, len: usize| -> candle_core::Result<Tensor> {
        let taps = axis_taps(len, factor, mode);
        let idx = |f: fn(&(usize, usize, f64, f64)) -> usize| {
            let v: Vec<u32> = taps.iter().map(|t| f(t) as u32).collect();
            Tensor::new(v.as_slice(), t.device())
        };
        let a = t.index_select(&idx(|t| t.0)?, dim)?;
        if mode == UpMode::Nearest {
            return Ok(a);
        }
        let b = t.index_select(&idx(|t| t.1)?, dim)?;
        let mut shape = vec![1usize; 4];
        shape[dim] = taps.len();
        let weight = |f: fn(&(usize, usize, f64, f64)) -> f64| {
            let v: Vec<f64> = taps.iter().map(f).collect();
            Tensor::new(v.as_slice(), t.device())?
                .to_dtype(t.dtype())?
                .reshape(shape.clone())
        };
        a.broadcast_mul(&weight(|t| t.2)?)?
            .broadcast_add(&b.broadcast_mul(&weight(|t| t.3)?)?)
    };
    along(&along(x, 2, h)?, 3, w)
}
