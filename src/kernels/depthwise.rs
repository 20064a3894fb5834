//! Depthwise convolution (one input channel per group): direct loops over the kernel taps,
//! parallel over output planes (forward), input planes (input gradient) or channels (weight
//! gradient), each summing in a fixed order.

use rayon::prelude::*;

use super::conv::{Conv2dSpec, Geom, Tap, taps};
use super::{Elem, sum8};

/// `dst[..] += wv * src[..]` for one output row of one tap (stride-1 columns vectorise).
#[inline]
pub(super) fn axpy_row<T: Elem>(dst: &mut [T], src: &[T], wv: T, tap: &Tap, sw: usize) {
    let (xlo, xhi) = tap.xs;
    if sw == 1 {
        let s0 = (xlo as isize + tap.offx) as usize;
        for (d, &v) in dst[xlo..xhi].iter_mut().zip(&src[s0..s0 + (xhi - xlo)]) {
            *d += wv * v;
        }
    } else {
        for (ox, d) in dst.iter_mut().enumerate().take(xhi).skip(xlo) {
            *d += wv * src[((ox * sw) as isize + tap.offx) as usize];
        }
    }
}

pub(super) fn depthwise_forward<T: Elem>(x: &[T], w: &[T], s: &Conv2dSpec, g: &Geom, y: &mut [T]) {
    let taps = taps(s, g);
    let kk = g.kh * g.kw;
    y.par_chunks_mut(g.p).enumerate().for_each(|(idx, yp)| {
        let (n, oc) = (idx / g.o, idx % g.o);
        let xp = &x[(n * g.c + oc / g.og) * g.hw..][..g.hw];
        for (tap, &wv) in taps.iter().zip(&w[oc * kk..][..kk]) {
            for oy in tap.ys.0..tap.ys.1 {
                let iy = ((oy * s.stride[0]) as isize + tap.offy) as usize;
                axpy_row(
                    &mut yp[oy * g.ow..][..g.ow],
                    &xp[iy * g.w..][..g.w],
                    wv,
                    tap,
                    s.stride[1],
                );
            }
        }
    });
}

pub(super) fn depthwise_input_grad<T: Elem>(
    gy: &[T],
    w: &[T],
    s: &Conv2dSpec,
    g: &Geom,
    gx: &mut [T],
) {
    let taps = taps(s, g);
    let kk = g.kh * g.kw;
    let sw = s.stride[1];
    gx.par_chunks_mut(g.hw).enumerate().for_each(|(idx, gxp)| {
        let (n, c) = (idx / g.c, idx % g.c);
        for oc in c * g.og..(c + 1) * g.og {
            let gp = &gy[(n * g.o + oc) * g.p..][..g.p];
            for (tap, &wv) in taps.iter().zip(&w[oc * kk..][..kk]) {
                let (xlo, xhi) = tap.xs;
                for oy in tap.ys.0..tap.ys.1 {
                    let iy = ((oy * s.stride[0]) as isize + tap.offy) as usize;
                    let src = &gp[oy * g.ow..][..g.ow];
                    let dst = &mut gxp[iy * g.w..][..g.w];
                    if sw == 1 {
                        let s0 = (xlo as isize + tap.offx) as usize;
                        for (d, &v) in dst[s0..s0 + (xhi - xlo)].iter_mut().zip(&src[xlo..xhi]) {
                            *d += wv * v;
                        }
                    } else {
                        for (ox, &v) in src.iter().enumerate().take(xhi).skip(xlo) {
                            dst[((ox * sw) as isize + tap.offx) as usize] += wv * v;
                        }
                    }
                }
            }
        }
    });
}

pub(super) fn depthwise_weight_grad<T: Elem>(
    x: &[T],
    gy: &[T],
    s: &Conv2dSpec,
    g: &Geom,
) -> Vec<T> {
    let taps = taps(s, g);
    let kk = g.kh * g.kw;
    let sw = s.stride[1];
    let mut gw = vec![T::ZERO; g.o * kk];
    gw.par_chunks_mut(kk).enumerate().for_each(|(oc, gwk)| {
        for n in 0..g.n {
            let xp = &x[(n * g.c + oc / g.og) * g.hw..][..g.hw];
            let gp = &gy[(n * g.o + oc) * g.p..][..g.p];
            for (tap, acc) in taps.iter().zip(gwk.iter_mut()) {
                let (xlo, xhi) = tap.xs;
                for oy in tap.ys.0..tap.ys.1 {
                    let iy = ((oy * s.stride[0]) as isize + tap.offy) as usize;
                    let grow = &gp[oy * g.ow..][..g.ow];
                    let xrow = &xp[iy * g.w..][..g.w];
                    if sw == 1 {
                        let s0 = (xlo as isize + tap.offx) as usize;
                        *acc += sum8(&grow[xlo..xhi], Some(&xrow[s0..s0 + (xhi - xlo)]));
                    } else {
                        for (ox, &v) in grow.iter().enumerate().take(xhi).skip(xlo) {
                            *acc += v * xrow[((ox * sw) as isize + tap.offx) as usize];
                        }
                    }
                }
            }
        }
    });
    gw
}
