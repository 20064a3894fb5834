//! Conv and ConvTranspose. On the CPU the convolution runs on `crate::kernels` (forward and
//! both gradients); elsewhere on candle's own ops.

use anyhow::{Result, ensure};
use candle_core::Tensor;

use super::window::{Window, lift, lift_axis, lift_pads, positive, transpose_split, unlift};
use super::{NodeCtx, Op, input, opt};
use crate::lower::value::{RunCtx, Value};
use crate::onnx::padding::AutoPad;

struct Conv {
    w: Window,
    groups: usize,
}

pub(super) fn conv(n: &NodeCtx) -> Result<Box<dyn Op>> {
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

pub(super) fn conv_transpose(n: &NodeCtx) -> Result<Box<dyn Op>> {
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
