//! 2-D convolution as a candle custom op whose backward pass computes only the gradients of
//! arguments that track: a frozen teacher (weights are plain tensors, not `Var`s) pays for the
//! input gradient alone, where candle's built-in conv always computes the weight gradient too.
//! The arithmetic is candle's own (conv2d, conv_transpose2d); CPU only, other devices use the
//! built-in op.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct FrozenAwareConv {
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
    pub groups: usize,
}

fn tensor_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("conv operands must be contiguous".into()))?;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], l.shape(), &Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], l.shape(), &Device::Cpu),
        _ => Err(candle_core::Error::Msg("conv supports f32 and f64".into())),
    }
}

impl FrozenAwareConv {
    /// Applies `f` to matching group slices of `a` (split on `a_dim`) and `b` (on `b_dim`) and
    /// concatenates the results on `out_dim`.
    fn per_group<F>(
        &self,
        a: &Tensor,
        a_dim: usize,
        b: &Tensor,
        b_dim: usize,
        out_dim: usize,
        f: F,
    ) -> candle_core::Result<Tensor>
    where
        F: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    {
        if self.groups == 1 {
            return f(a, b);
        }
        let (a, b) = (a.chunk(self.groups, a_dim)?, b.chunk(self.groups, b_dim)?);
        let parts = (0..self.groups)
            .map(|k| f(&a[k], &b[k]))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, out_dim)
    }
}

impl CustomOp2 for FrozenAwareConv {
    fn name(&self) -> &'static str {
        "conv2d-frozen-aware"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (tensor_of(s1, l1)?, tensor_of(s2, l2)?);
        let y = x.conv2d(&w, self.padding, self.stride, self.dilation, self.groups)?;
        let shape = y.shape().clone();
        let flat = y.flatten_all()?;
        let storage = match flat.dtype() {
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            _ => CpuStorage::F32(flat.to_vec1()?),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (p, s, d) = (self.padding, self.stride, self.dilation);
        let gx = if x.track_op() {
            let (gh, kh) = (g.dim(2)?, w.dim(2)?);
            let out = (gh - 1) * s + d * (kh - 1) + 1 - 2 * p;
            let out_padding = x.dim(2)? - out;
            // Per group: the gradient of group k's input comes from group k's outputs and weights.
            Some(self.per_group(g, 1, w, 0, 1, |g, w| {
                g.conv_transpose2d(w, p, out_padding, s, d)
            })?)
        } else {
            None
        };
        let gw = if w.track_op() {
            let (kh, kw) = (w.dim(2)?, w.dim(3)?);
            let gw = self.per_group(x, 1, g, 1, 0, |x, g| {
                x.transpose(0, 1)?
                    .conv2d(&g.transpose(0, 1)?, p, d, s, 1)?
                    .transpose(0, 1)
            })?;
            let (gk0, gk1) = (gw.dim(2)?, gw.dim(3)?);
            Some(if gk0 != kh || gk1 != kw {
                gw.narrow(2, 0, kh)?.narrow(3, 0, kw)?
            } else {
                gw
            })
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// conv2d that skips gradient work for frozen operands on the CPU.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.conv2d(w, padding, stride, dilation, groups);
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        FrozenAwareConv {
            padding,
            stride,
            dilation,
            groups,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Gradients of sum(y^2).
    fn sq_sum_grads(y: Tensor) -> candle_core::backprop::GradStore {
        y.sqr().unwrap().sum_all().unwrap().backward().unwrap()
    }

    #[test]
    fn frozen_weights_get_no_gradient_and_trainable_ones_match_candle() {
        let dev = Device::Cpu;
        let xv: Vec<f64> = (0..2 * 4 * 7 * 7)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0)
            .collect();
        let wv: Vec<f64> = (0..6 * 2 * 3 * 3)
            .map(|i| ((i * 11 % 17) as f64 - 8.0) / 9.0)
            .collect();
        let x = Var::from_vec(xv, (2, 4, 7, 7), &dev).unwrap();
        let frozen = Tensor::from_vec(wv.clone(), (6, 2, 3, 3), &dev).unwrap();
        let grads = sq_sum_grads(conv2d(x.as_tensor(), &frozen, 1, 2, 1, 2).unwrap());
        assert!(
            grads.get(&frozen).is_none(),
            "a frozen weight must not get a gradient"
        );
        let gx = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // Same gradients as candle's built-in conv, for the input and a trainable weight.
        let w = Var::from_vec(wv, (6, 2, 3, 3), &dev).unwrap();
        let ours = sq_sum_grads(conv2d(x.as_tensor(), w.as_tensor(), 1, 2, 1, 2).unwrap());
        let theirs = sq_sum_grads(x.as_tensor().conv2d(w.as_tensor(), 1, 2, 1, 2).unwrap());
        for v in [x.as_tensor(), w.as_tensor()] {
            let a = ours
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let b = theirs
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-9));
        }
        let tx = theirs
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(gx.iter().zip(&tx).all(|(p, q)| (p - q).abs() < 1e-9));
    }
}
