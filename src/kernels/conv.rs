//! 2-D convolution: im2col + gemm per sample for dense and grouped convs, direct loops for
//! depthwise. Forward, input gradient and weight gradient are separate ops so that backward
//! computes only what tracks.

use super::depthwise::{depthwise_forward, depthwise_input_grad, depthwise_weight_grad};
use super::gemm::{Mat, matmul, matmul_col_major};
use super::{Elem, dispatch, enabled, err, view};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Stride, padding (top, left, bottom, right), dilation and groups of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dSpec {
    pub stride: [usize; 2],
    pub pad: [usize; 4],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Conv2dSpec {
    /// The same padding on every side, the same stride and dilation on both axes.
    pub fn uniform(padding: usize, stride: usize, dilation: usize, groups: usize) -> Self {
        Conv2dSpec {
            stride: [stride; 2],
            pad: [padding; 4],
            dilation: [dilation; 2],
            groups,
        }
    }

    fn geom(&self, x: &[usize], w: &[usize]) -> candle_core::Result<Geom> {
        let (&[n, c, h, wd], &[o, cg, kh, kw]) = (x, w) else {
            return Err(err(format!(
                "conv2d expects N x C x H x W input and O x C/groups x kH x kW weight, got {x:?} and {w:?}"
            )));
        };
        let g = self.groups;
        if g == 0 || c % g != 0 || o % g != 0 || cg * g != c {
            return Err(err(format!(
                "conv2d: {c} input channels, {o} output channels and weight {w:?} do not fit {g} groups"
            )));
        }
        if self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(err("conv2d: stride and dilation must be >= 1"));
        }
        let out = |len: usize, pb: usize, pe: usize, k: usize, s: usize, d: usize| {
            let span = len + pb + pe;
            let reach = d * k.checked_sub(1)? + 1;
            (span >= reach).then(|| (span - reach) / s + 1)
        };
        let [sh, sw] = self.stride;
        let [dh, dw] = self.dilation;
        let [pt, pl, pb, pr] = self.pad;
        let (Some(oh), Some(ow)) = (out(h, pt, pb, kh, sh, dh), out(wd, pl, pr, kw, sw, dw)) else {
            return Err(err(format!(
                "conv2d: kernel {kh}x{kw} (dilation {dh}x{dw}) is larger than the padded input {h}x{wd}"
            )));
        };
        Ok(Geom {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            oh,
            ow,
            cg,
            og: o / g,
            k: cg * kh * kw,
            p: oh * ow,
            hw: h * wd,
        })
    }

    fn pointwise(&self, g: &Geom) -> bool {
        g.kh == 1 && g.kw == 1 && self.stride == [1, 1] && self.pad == [0; 4]
    }

    fn depthwise(&self, g: &Geom) -> bool {
        self.groups > 1 && g.cg == 1
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Input and output channels per group.
    pub(super) cg: usize,
    pub(super) og: usize,
    /// Reduction length (cg * kh * kw) and output positions (oh * ow).
    pub(super) k: usize,
    pub(super) p: usize,
    pub(super) hw: usize,
}

/// Output positions `lo..hi` whose input index `o * stride + off` lies in `0..len`.
fn span(off: isize, stride: usize, len: usize, out: usize) -> (usize, usize) {
    let s = stride as isize;
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let hi = if off >= len as isize {
        0
    } else {
        (len as isize - off + s - 1) / s
    };
    let (lo, hi) = (lo as usize, (hi as usize).min(out));
    (lo.min(hi), hi)
}

/// One kernel tap's row/column offsets and valid output ranges.
pub(super) struct Tap {
    pub(super) offy: isize,
    pub(super) offx: isize,
    pub(super) ys: (usize, usize),
    pub(super) xs: (usize, usize),
}

pub(super) fn taps(s: &Conv2dSpec, g: &Geom) -> Vec<Tap> {
    let mut v = Vec::with_capacity(g.kh * g.kw);
    for i in 0..g.kh {
        let offy = (i * s.dilation[0]) as isize - s.pad[0] as isize;
        for j in 0..g.kw {
            let offx = (j * s.dilation[1]) as isize - s.pad[1] as isize;
            v.push(Tap {
                offy,
                offx,
                ys: span(offy, s.stride[0], g.h, g.oh),
                xs: span(offx, s.stride[1], g.w, g.ow),
            });
        }
    }
    v
}

/// Unfolds group `gi` of one sample into `col` (k rows of oh*ow).
fn im2col<T: Elem>(xn: &[T], g: &Geom, s: &Conv2dSpec, taps: &[Tap], gi: usize, col: &mut [T]) {
    let (sh, sw) = (s.stride[0], s.stride[1]);
    for ci in 0..g.cg {
        let plane = &xn[(gi * g.cg + ci) * g.hw..][..g.hw];
        for (t, tap) in taps.iter().enumerate() {
            let row = &mut col[(ci * taps.len() + t) * g.p..][..g.p];
            let ((ylo, yhi), (xlo, xhi)) = (tap.ys, tap.xs);
            row[..ylo * g.ow].fill(T::ZERO);
            row[yhi * g.ow..].fill(T::ZERO);
            if sw == 1 && sh == 1 && g.w == g.ow {
                contiguous_tap(plane, row, g, tap);
                continue;
            }
            for oy in ylo..yhi {
                let iy = ((oy * sh) as isize + tap.offy) as usize;
                let src = &plane[iy * g.w..][..g.w];
                let dst = &mut row[oy * g.ow..][..g.ow];
                dst[..xlo].fill(T::ZERO);
                dst[xhi..].fill(T::ZERO);
                if sw == 1 {
                    let s0 = (xlo as isize + tap.offx) as usize;
                    dst[xlo..xhi].copy_from_slice(&src[s0..s0 + (xhi - xlo)]);
                } else {
                    for (ox, d) in dst.iter_mut().enumerate().take(xhi).skip(xlo) {
                        *d = src[((ox * sw) as isize + tap.offx) as usize];
                    }
                }
            }
        }
    }
}

/// One tap's im2col row at stride 1 when input and output rows have the same width ("same"
/// padding): output position d reads input position d + offy * w + offx, so the valid rows are
/// one shifted copy, and only the columns that fall off the left or right edge are zeroed after.
/// A copy and two fills per image row cost more than the data moved on 8-32-wide rows.
fn contiguous_tap<T: Elem>(plane: &[T], row: &mut [T], g: &Geom, tap: &Tap) {
    let ((ylo, yhi), (xlo, xhi)) = (tap.ys, tap.xs);
    if ylo >= yhi {
        return;
    }
    let delta = tap.offy * g.w as isize + tap.offx;
    let d0 = ((ylo * g.ow) as isize).max(-delta);
    let d1 = ((yhi * g.ow) as isize).min(g.hw as isize - delta);
    if d1 > d0 {
        let (d0, d1) = (d0 as usize, d1 as usize);
        let s0 = (d0 as isize + delta) as usize;
        row[d0..d1].copy_from_slice(&plane[s0..s0 + (d1 - d0)]);
    }
    // Every position of the valid rows outside d0..d1 is in an edge column: zeroed here.
    // Column by column: a strided loop, not a memset call of one or two elements per row.
    let rows = &mut row[ylo * g.ow..yhi * g.ow];
    for c in (0..xlo.min(g.ow)).chain(xhi.max(xlo)..g.ow) {
        for v in rows[c..].iter_mut().step_by(g.ow) {
            *v = T::ZERO;
        }
    }
}

/// Folds `col` back onto group `gi` of one sample's input gradient, accumulating.
fn col2im<T: Elem>(col: &[T], g: &Geom, s: &Conv2dSpec, taps: &[Tap], gi: usize, gxn: &mut [T]) {
    let (sh, sw) = (s.stride[0], s.stride[1]);
    for ci in 0..g.cg {
        let plane = &mut gxn[(gi * g.cg + ci) * g.hw..][..g.hw];
        for (t, tap) in taps.iter().enumerate() {
            let row = &col[(ci * taps.len() + t) * g.p..][..g.p];
            let (xlo, xhi) = tap.xs;
            for oy in tap.ys.0..tap.ys.1 {
                let iy = ((oy * sh) as isize + tap.offy) as usize;
                let src = &row[oy * g.ow..][..g.ow];
                let dst = &mut plane[iy * g.w..][..g.w];
                if sw == 1 {
                    let s0 = (xlo as isize + tap.offx) as usize;
                    for (d, &v) in dst[s0..s0 + (xhi - xlo)].iter_mut().zip(&src[xlo..xhi]) {
                        *d += v;
                    }
                } else {
                    for (ox, &v) in src.iter().enumerate().take(xhi).skip(xlo) {
                        dst[((ox * sw) as isize + tap.offx) as usize] += v;
                    }
                }
            }
        }
    }
}

fn col_buffer<T: Elem>(s: &Conv2dSpec, g: &Geom) -> Vec<T> {
    if s.pointwise(g) {
        Vec::new()
    } else {
        vec![T::ZERO; g.k * g.p]
    }
}

fn forward<T: Elem>(x: &[T], w: &[T], s: &Conv2dSpec, g: &Geom) -> Vec<T> {
    let mut y = vec![T::ZERO; g.n * g.o * g.p];
    if s.depthwise(g) {
        depthwise_forward(x, w, s, g, &mut y);
        return y;
    }
    let taps = taps(s, g);
    let pw = s.pointwise(g);
    y.par_chunks_mut(g.o * g.p).enumerate().for_each_init(
        || col_buffer::<T>(s, g),
        |col, (n, yn)| {
            let xn = &x[n * g.c * g.hw..][..g.c * g.hw];
            for gi in 0..s.groups {
                let b: &[T] = if pw {
                    &xn[gi * g.cg * g.hw..][..g.cg * g.hw]
                } else {
                    im2col(xn, g, s, &taps, gi, col);
                    col
                };
                let wg = &w[gi * g.og * g.k..][..g.og * g.k];
                let yg = &mut yn[gi * g.og * g.p..][..g.og * g.p];
                matmul(
                    g.og,
                    g.p,
                    g.k,
                    yg,
                    false,
                    Mat::rows(wg, g.k),
                    Mat::rows(b, g.p),
                );
            }
        },
    );
    y
}

/// At stride 1 the input gradient is itself a convolution: of the output gradient with the
/// flipped, transposed kernel and the complementary padding. That runs as a forward conv (one
/// gemm into the gradient) instead of a gemm into a 9x larger column buffer plus col2im.
fn flipped_input_grad<T: Elem>(gy: &[T], w: &[T], s: &Conv2dSpec, g: &Geom) -> Option<Vec<T>> {
    let reach = [s.dilation[0] * (g.kh - 1), s.dilation[1] * (g.kw - 1)];
    let [pt, pl, pb, pr] = s.pad;
    if s.stride != [1, 1] || pt.max(pb) > reach[0] || pl.max(pr) > reach[1] {
        return None;
    }
    let spec = Conv2dSpec {
        stride: [1, 1],
        pad: [reach[0] - pt, reach[1] - pl, reach[0] - pb, reach[1] - pr],
        dilation: s.dilation,
        groups: s.groups,
    };
    let kk = g.kh * g.kw;
    // w'[gi*cg + ci][oo][i][j] = w[gi*og + oo][ci][kh-1-i][kw-1-j]
    let mut wf = vec![T::ZERO; g.c * g.og * kk];
    for gi in 0..s.groups {
        for ci in 0..g.cg {
            for oo in 0..g.og {
                let src = &w[((gi * g.og + oo) * g.cg + ci) * kk..][..kk];
                let dst = &mut wf[((gi * g.cg + ci) * g.og + oo) * kk..][..kk];
                for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = v;
                }
            }
        }
    }
    let fg = spec
        .geom(&[g.n, g.o, g.oh, g.ow], &[g.c, g.og, g.kh, g.kw])
        .ok()?;
    debug_assert_eq!((fg.oh, fg.ow), (g.h, g.w));
    Some(forward(gy, &wf, &spec, &fg))
}

fn input_grad<T: Elem>(gy: &[T], w: &[T], s: &Conv2dSpec, g: &Geom) -> Vec<T> {
    if let Some(gx) = flipped_input_grad(gy, w, s, g) {
        return gx;
    }
    let mut gx = vec![T::ZERO; g.n * g.c * g.hw];
    if s.depthwise(g) {
        depthwise_input_grad(gy, w, s, g, &mut gx);
        return gx;
    }
    let taps = taps(s, g);
    let pw = s.pointwise(g);
    gx.par_chunks_mut(g.c * g.hw).enumerate().for_each_init(
        || col_buffer::<T>(s, g),
        |col, (n, gxn)| {
            let gyn = &gy[n * g.o * g.p..][..g.o * g.p];
            for gi in 0..s.groups {
                let wt = Mat::t(&w[gi * g.og * g.k..][..g.og * g.k], g.k);
                let gg = Mat::rows(&gyn[gi * g.og * g.p..][..g.og * g.p], g.p);
                if pw {
                    let dst = &mut gxn[gi * g.cg * g.hw..][..g.cg * g.hw];
                    matmul(g.k, g.p, g.og, dst, false, wt, gg);
                } else {
                    matmul(g.k, g.p, g.og, col, false, wt, gg);
                    col2im(col, g, s, &taps, gi, gxn);
                }
            }
        },
    );
    gx
}

/// Samples per partial weight gradient: partials are summed in a fixed order, so the result
/// does not depend on how many threads computed them.
const CHUNK: usize = 4;

fn weight_grad<T: Elem>(x: &[T], gy: &[T], s: &Conv2dSpec, g: &Geom) -> Vec<T> {
    if s.depthwise(g) {
        return depthwise_weight_grad(x, gy, s, g);
    }
    let taps = taps(s, g);
    let pw = s.pointwise(g);
    let partials: Vec<Vec<T>> = (0..g.n.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(
            || col_buffer::<T>(s, g),
            |col, chunk| {
                let mut acc = vec![T::ZERO; g.o * g.k];
                for (i, n) in (chunk * CHUNK..g.n.min(chunk * CHUNK + CHUNK)).enumerate() {
                    let xn = &x[n * g.c * g.hw..][..g.c * g.hw];
                    let gyn = &gy[n * g.o * g.p..][..g.o * g.p];
                    for gi in 0..s.groups {
                        let b: &[T] = if pw {
                            &xn[gi * g.cg * g.hw..][..g.cg * g.hw]
                        } else {
                            im2col(xn, g, s, &taps, gi, col);
                            col
                        };
                        // Each group's block column-major (k x og): see matmul_col_major.
                        let dst = &mut acc[gi * g.og * g.k..][..g.og * g.k];
                        let gg = Mat::rows(&gyn[gi * g.og * g.p..][..g.og * g.p], g.p);
                        matmul_col_major(g.og, g.k, g.p, dst, i > 0, gg, Mat::t(b, g.p));
                    }
                }
                acc
            },
        )
        .collect();
    let total = sum_in_order(partials, g.o * g.k);
    let mut gw = vec![T::ZERO; g.o * g.k];
    for (block, out) in total.chunks(g.og * g.k).zip(gw.chunks_mut(g.og * g.k)) {
        for (kk, row) in block.chunks(g.og).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                out[o * g.k + kk] = v;
            }
        }
    }
    gw
}

fn sum_in_order<T: Elem>(partials: Vec<Vec<T>>, len: usize) -> Vec<T> {
    let mut it = partials.into_iter();
    let mut total = it.next().unwrap_or_else(|| vec![T::ZERO; len]);
    for p in it {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

// ------------------------------------------------------------------ depthwise (cg == 1)

// ------------------------------------------------------------------ candle ops

struct Conv2d(Conv2dSpec);
struct InputGrad {
    spec: Conv2dSpec,
    /// The input's height and width (ambiguous from the output when stride > 1).
    hw: (usize, usize),
}
struct WeightGrad {
    spec: Conv2dSpec,
    /// Input channels per group and kernel size.
    shape: (usize, usize, usize),
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "datafree-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0.geom(l1.dims(), l2.dims())?;
        dispatch!(s1, "conv2d", |T| {
            let y = forward::<T>(
                view(s1, l1, "conv2d")?,
                view(s2, l2, "conv2d")?,
                &self.0,
                &g,
            );
            Ok((T::storage(y), Shape::from((g.n, g.o, g.oh, g.ow))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let gx = if x.track_op() {
            let (_, _, h, wd) = x.dims4()?;
            Some(gy.apply_op2_no_bwd(
                w,
                &InputGrad {
                    spec: self.0,
                    hw: (h, wd),
                },
            )?)
        } else {
            None
        };
        let gw = if w.track_op() {
            let (_, cg, kh, kw) = w.dims4()?;
            Some(x.apply_op2_no_bwd(
                &gy,
                &WeightGrad {
                    spec: self.0,
                    shape: (cg, kh, kw),
                },
            )?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "datafree-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c) = (l1.dims()[0], l2.dims()[1] * self.spec.groups);
        let g = self.spec.geom(&[n, c, self.hw.0, self.hw.1], l2.dims())?;
        if l1.dims() != [g.n, g.o, g.oh, g.ow] {
            return Err(err(format!(
                "conv2d input gradient: output gradient {:?} does not match the conv's output {:?}",
                l1.dims(),
                [g.n, g.o, g.oh, g.ow]
            )));
        }
        dispatch!(s1, "conv2d", |T| {
            let gx = input_grad::<T>(
                view(s1, l1, "conv2d")?,
                view(s2, l2, "conv2d")?,
                &self.spec,
                &g,
            );
            Ok((T::storage(gx), Shape::from((g.n, g.c, g.h, g.w))))
        })
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "datafree-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (cg, kh, kw) = self.shape;
        let o = l2.dims().get(1).copied().unwrap_or(0);
        let g = self.spec.geom(l1.dims(), &[o, cg, kh, kw])?;
        if l2.dims() != [g.n, g.o, g.oh, g.ow] {
            return Err(err(format!(
                "conv2d weight gradient: output gradient {:?} does not match the conv's output {:?}",
                l2.dims(),
                [g.n, g.o, g.oh, g.ow]
            )));
        }
        dispatch!(s1, "conv2d", |T| {
            let gw = weight_grad::<T>(
                view(s1, l1, "conv2d")?,
                view(s2, l2, "conv2d")?,
                &self.spec,
                &g,
            );
            Ok((T::storage(gw), Shape::from((g.o, cg, kh, kw))))
        })
    }
}

/// 2-D convolution of N x C x H x W by O x C/groups x kH x kW. Our kernels on the CPU; elsewhere
/// candle's conv2d (explicit padding when it is not uniform, subsampling when strides differ).
pub fn conv2d(x: &Tensor, w: &Tensor, spec: Conv2dSpec) -> candle_core::Result<Tensor> {
    if enabled(x.device()) {
        return x.contiguous()?.apply_op2(&w.contiguous()?, Conv2d(spec));
    }
    builtin(x, w, spec)
}

fn builtin(x: &Tensor, w: &Tensor, spec: Conv2dSpec) -> candle_core::Result<Tensor> {
    let [pt, pl, pb, pr] = spec.pad;
    let [sh, sw] = spec.stride;
    let [dh, dw] = spec.dilation;
    if dh != dw {
        return Err(err(format!(
            "conv2d: different dilations per axis ({dh}, {dw}) need the CPU kernels"
        )));
    }
    let uniform = pt == pl && pt == pb && pt == pr;
    let (x, p) = if uniform {
        (x.clone(), pt)
    } else {
        (x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?, 0)
    };
    if sh == sw {
        let (_, _, h, wd) = x.dims4()?;
        if sh == 1 || h == wd {
            return x.conv2d(w, p, sh, dh, spec.groups);
        }
        // candle's conv backward computes the output padding from the height alone: convolve a
        // zero-extended square and crop (the extra rows lie beyond every valid output's window).
        let (_, _, kh, kw) = w.dims4()?;
        let side = h.max(wd);
        let sq = x
            .pad_with_zeros(2, 0, side - h)?
            .pad_with_zeros(3, 0, side - wd)?;
        let out = |len: usize, k: usize| (len + 2 * p - (k - 1) * dh - 1) / sh + 1;
        return sq
            .conv2d(w, p, sh, dh, spec.groups)?
            .narrow(2, 0, out(h, kh))?
            .narrow(3, 0, out(wd, kw));
    }
    // Per-axis strides: convolve at stride 1 and keep every s-th row / column.
    let full = x.conv2d(w, p, 1, dh, spec.groups)?;
    let pick = |t: &Tensor, dim: usize, s: usize| -> candle_core::Result<Tensor> {
        let len = t.dim(dim)?;
        let idx: Vec<u32> = (0..len).step_by(s).map(|i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), t.device())?;
        t.index_select(&idx, dim)
    };
    pick(&pick(&full, 2, sh)?, 3, sw)
}
