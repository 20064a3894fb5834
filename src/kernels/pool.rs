//! Max and average pooling over 2-D windows (any kernel and stride, padding, ceil_mode,
//! count_include_pad), with their gradients; parallel over N x C planes.

use super::{Elem, dispatch, err, view};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dSpec {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// top, left, bottom, right
    pub pad: [usize; 4],
    pub ceil_mode: bool,
    pub max: bool,
    /// Average pooling: divide by the whole window, padding included.
    pub count_include_pad: bool,
}

impl Pool2dSpec {
    /// Output length along `axis` (0: rows, 1: columns) by the ONNX / PyTorch rules: with
    /// ceil_mode a last window may not start in the end padding.
    pub fn out_len(&self, len: usize, axis: usize) -> Result<usize, String> {
        let (k, s) = (self.kernel[axis], self.stride[axis]);
        let (pb, pe) = (self.pad[axis], self.pad[axis + 2]);
        let span = len + pb + pe;
        if k == 0 || s == 0 || span < k {
            return Err(format!(
                "pooling window {k} (stride {s}) does not fit the padded input {span}"
            ));
        }
        let mut out = if self.ceil_mode {
            (span - k).div_ceil(s) + 1
        } else {
            (span - k) / s + 1
        };
        if self.ceil_mode && (out - 1) * s >= len + pb {
            out -= 1;
        }
        Ok(out)
    }

    fn geom(&self, dims: &[usize]) -> candle_core::Result<PoolGeom> {
        let &[n, c, h, w] = dims else {
            return Err(err(format!("pooling expects N x C x H x W, got {dims:?}")));
        };
        let oh = self.out_len(h, 0).map_err(err)?;
        let ow = self.out_len(w, 1).map_err(err)?;
        Ok(PoolGeom {
            planes: n * c,
            h,
            w,
            oh,
            ow,
            shape: [n, c],
        })
    }

    /// The input rows (or columns) of output `o` along `axis`, and the divisor's extent.
    fn window(&self, o: usize, axis: usize, len: usize) -> (usize, usize, usize) {
        let start = (o * self.stride[axis]) as isize - self.pad[axis] as isize;
        let end = start + self.kernel[axis] as isize;
        let lo = start.max(0) as usize;
        let hi = (end.min(len as isize).max(0) as usize).max(lo);
        let count = if self.count_include_pad {
            (end.min((len + self.pad[axis + 2]) as isize) - start) as usize
        } else {
            hi - lo
        };
        (lo, hi, count.max(1))
    }
}

struct PoolGeom {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    shape: [usize; 2],
}

/// Position (in the plane) of the first maximum of the window.
fn argmax<T: Elem>(plane: &[T], w: usize, rows: (usize, usize), cols: (usize, usize)) -> usize {
    let (mut best, mut at) = (T::NEG_INF, rows.0 * w + cols.0);
    for iy in rows.0..rows.1 {
        for (ix, &v) in plane[iy * w..][cols.0..cols.1].iter().enumerate() {
            if v > best {
                best = v;
                at = iy * w + cols.0 + ix;
            }
        }
    }
    at
}

fn forward<T: Elem>(x: &[T], s: &Pool2dSpec, g: &PoolGeom) -> Vec<T> {
    let mut y = vec![T::ZERO; g.planes * g.oh * g.ow];
    y.par_chunks_mut(g.oh * g.ow)
        .enumerate()
        .for_each(|(pi, yp)| {
            let plane = &x[pi * g.h * g.w..][..g.h * g.w];
            for oy in 0..g.oh {
                let (y0, y1, cy) = s.window(oy, 0, g.h);
                for ox in 0..g.ow {
                    let (x0, x1, cx) = s.window(ox, 1, g.w);
                    yp[oy * g.ow + ox] = if s.max {
                        if y0 == y1 || x0 == x1 {
                            T::NEG_INF
                        } else {
                            plane[argmax(plane, g.w, (y0, y1), (x0, x1))]
                        }
                    } else {
                        let mut sum = T::ZERO;
                        for iy in y0..y1 {
                            for &v in &plane[iy * g.w..][x0..x1] {
                                sum += v;
                            }
                        }
                        sum / T::from_f64((cy * cx) as f64)
                    };
                }
            }
        });
    y
}

/// Input gradient: max pooling routes each output's gradient to its window's first maximum
/// (`x` given), average pooling spreads it over the window (`x` None).
fn backward<T: Elem>(x: Option<&[T]>, gy: &[T], s: &Pool2dSpec, g: &PoolGeom) -> Vec<T> {
    let mut gx = vec![T::ZERO; g.planes * g.h * g.w];
    gx.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(pi, gxp)| {
            let gp = &gy[pi * g.oh * g.ow..][..g.oh * g.ow];
            let plane = x.map(|x| &x[pi * g.h * g.w..][..g.h * g.w]);
            for oy in 0..g.oh {
                let (y0, y1, cy) = s.window(oy, 0, g.h);
                for ox in 0..g.ow {
                    let (x0, x1, cx) = s.window(ox, 1, g.w);
                    if y0 == y1 || x0 == x1 {
                        continue;
                    }
                    let v = gp[oy * g.ow + ox];
                    match plane {
                        Some(plane) => gxp[argmax(plane, g.w, (y0, y1), (x0, x1))] += v,
                        None => {
                            let v = v / T::from_f64((cy * cx) as f64);
                            for iy in y0..y1 {
                                for d in &mut gxp[iy * g.w..][x0..x1] {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
            }
        });
    gx
}

struct Pool(Pool2dSpec);
struct MaxGrad(Pool2dSpec);
struct AvgGrad {
    spec: Pool2dSpec,
    input: [usize; 4],
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        "datafree-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0.geom(l.dims())?;
        dispatch!(s, "pool2d", |T| {
            let y = forward::<T>(view(s, l, "pool2d")?, &self.0, &g);
            Ok((
                T::storage(y),
                Shape::from((g.shape[0], g.shape[1], g.oh, g.ow)),
            ))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let gy = gy.contiguous()?;
        Ok(Some(if self.0.max {
            x.apply_op2_no_bwd(&gy, &MaxGrad(self.0))?
        } else {
            let (n, c, h, w) = x.dims4()?;
            gy.apply_op1_no_bwd(&AvgGrad {
                spec: self.0,
                input: [n, c, h, w],
            })?
        }))
    }
}

impl CustomOp2 for MaxGrad {
    fn name(&self) -> &'static str {
        "datafree-maxpool2d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0.geom(l1.dims())?;
        if l2.dims() != [g.shape[0], g.shape[1], g.oh, g.ow] {
            return Err(err(
                "max-pool gradient: output gradient has the wrong shape",
            ));
        }
        dispatch!(s1, "pool2d", |T| {
            let gx = backward::<T>(
                Some(view(s1, l1, "pool2d")?),
                view(s2, l2, "pool2d")?,
                &self.0,
                &g,
            );
            Ok((T::storage(gx), l1.shape().clone()))
        })
    }
}

impl CustomOp1 for AvgGrad {
    fn name(&self) -> &'static str {
        "datafree-avgpool2d-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.spec.geom(&self.input)?;
        if l.dims() != [g.shape[0], g.shape[1], g.oh, g.ow] {
            return Err(err(
                "average-pool gradient: output gradient has the wrong shape",
            ));
        }
        dispatch!(s, "pool2d", |T| {
            let gx = backward::<T>(None, view(s, l, "pool2d")?, &self.spec, &g);
            Ok((T::storage(gx), Shape::from(self.input.to_vec())))
        })
    }
}

/// Pools an N x C x H x W CPU tensor (callers check `kernels::enabled` first).
pub fn pool2d(x: &Tensor, spec: Pool2dSpec) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Pool(spec))
}
