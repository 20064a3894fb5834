//! Fake quantization for training (quantization-aware fine-tuning): the forward value is what
//! the exported QDQ model computes (the same `quantize_weight` and `QParams` arithmetic, round
//! half to even, saturation), the backward pass is the straight-through estimator. Weights train
//! on min/max scales: with `Scales::Exact` the export then rounds each weight scale up to a
//! short significand (a relative change of at most 2^-(bits-1) for the bits the layer allows).

use super::{QParams, WeightScheme, channel_major, from_channel_major, quantize_weight};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk: fixed, so sums over chunks do not depend on the thread count.
const CHUNK: usize = 1 << 15;

/// The dequantized values of a weight with output channels on `axis` (0, or 1 for a 2-D
/// Gemm weight), exactly as the exported model's DequantizeLinear produces them.
pub fn dequantized_weight(
    v: &[f32],
    dims: &[usize],
    axis: usize,
    bits: u8,
    scheme: WeightScheme,
) -> Vec<f32> {
    let rows = channel_major(v, dims, axis);
    let channels = dims[axis];
    let q = quantize_weight(&rows, channels, bits, scheme);
    from_channel_major(&q.dequantized(), dims, axis)
}

/// Straight-through fake quantization of a weight tensor: the forward value is the dequantized
/// weight, the gradient reaches `w` unchanged.
pub fn fake_quant_weight(
    w: &Tensor,
    axis: usize,
    bits: u8,
    scheme: WeightScheme,
) -> Result<Tensor> {
    let v: Vec<f32> = w
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    let deq = dequantized_weight(&v, w.dims(), axis, bits, scheme);
    let q = Tensor::from_vec(deq, w.dims(), w.device())?.to_dtype(w.dtype())?;
    // q + (w - w) is exactly q in the forward pass and has gradient 1 with respect to w.
    Ok((q + (w - w.detach())?)?)
}

/// A BatchNormalization the export folds into a layer: per output channel `a` = gamma /
/// sqrt(var + eps) and the folded bias `(bias - mean) * a + beta`, computed as the export does.
#[derive(Debug, Clone)]
pub struct Fold {
    pub a: Vec<f64>,
    pub bias: Vec<f32>,
}

impl Fold {
    /// From the BN's current values and the layer's own bias (zeros when it has none).
    pub fn new(
        gamma: &[f32],
        beta: &[f32],
        mean: &[f32],
        var: &[f32],
        eps: f32,
        bias: &[f32],
    ) -> Self {
        let a: Vec<f64> = gamma
            .iter()
            .zip(var)
            .map(|(&g, &v)| g as f64 / (v as f64 + eps as f64).sqrt())
            .collect();
        let bias = (0..a.len())
            .map(|o| {
                let b0 = bias.get(o).copied().unwrap_or(0.0) as f64;
                ((b0 - mean[o] as f64) * a[o] + beta[o] as f64) as f32
            })
            .collect();
        Self { a, bias }
    }
}

/// Straight-through fake quantization of a weight on exactly the grid the export will give it:
/// the weight folded with `fold` (when its BN is folded at export), quantized per channel with
/// the exact scales of `input` (the layer's input grid) and `bias`
/// ([`super::quantize_weight_exact`]), then unfolded again, so the trained student is the one
/// exported.
pub fn fake_quant_weight_exact(
    w: &Tensor,
    axis: usize,
    bits: u8,
    scheme: WeightScheme,
    fold: Option<&Fold>,
    bias: Option<&[f32]>,
    input: &QParams,
) -> Result<Tensor> {
    let v: Vec<f32> = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let dims = w.dims();
    let channels = dims[axis];
    let orig = channel_major(&v, dims, axis);
    let mut rows = orig.clone();
    let per = rows.len() / channels.max(1);
    if let Some(f) = fold {
        for (row, &a) in rows.chunks_mut(per.max(1)).zip(&f.a) {
            for x in row {
                *x = (*x as f64 * a) as f32;
            }
        }
    }
    let bias = fold.map(|f| f.bias.as_slice()).or(bias);
    let (q, _) = super::quantize_weight_exact(&rows, channels, bits, scheme, input, bias);
    let deq: Vec<f32> = q
        .dequantized()
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let c = i / per.max(1);
            match fold {
                // A channel the BN zeroes keeps its float weight: nothing reaches the output.
                Some(f) if f.a[c] != 0.0 => (d as f64 / f.a[c]) as f32,
                Some(_) => orig[i],
                None => d,
            }
        })
        .collect();
    let q = Tensor::from_vec(from_channel_major(&deq, dims, axis), dims, w.device())?
        .to_dtype(w.dtype())?;
    Ok((q + (w - w.detach())?)?)
}

struct Activation(QParams);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        "datafree-fake-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fake quant: not contiguous".into()))?;
        let q = &self.0;
        let f = |x: f32| q.dequantize(q.quantize(x));
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..b].par_iter().map(|&x| f(x)).collect()),
            CpuStorage::F64(v) => {
                CpuStorage::F64(v[a..b].par_iter().map(|&x| f(x as f32) as f64).collect())
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "fake quant: float tensors only".into(),
                ));
            }
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.clone()))
    }
}

/// Straight-through fake quantization of an activation on the grid `q` (QuantizeLinear then
/// DequantizeLinear, as ONNX defines them).
pub fn fake_quant_activation(x: &Tensor, q: QParams) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(x.contiguous()?.apply_op1(Activation(q))?);
    }
    let y = x
        .to_device(&crate::device::HOST)?
        .contiguous()?
        .apply_op1_no_bwd(&Activation(q))?;
    Ok((y.to_device(x.device())? + (x - x.detach())?)?)
}

/// An activation range that training learns (LSQ-style, Esser et al. 2020): `lo = width * a`,
/// `hi = width * b` with `a`, `b` trainable, so one optimiser step size is relative to each
/// range's starting width. The forward value is always the exact grid
/// `QParams::activation(lo, hi, ..)` that the export writes.
#[derive(Clone)]
pub struct LearnedRange {
    pub a: candle_core::Var,
    pub b: candle_core::Var,
    pub width: f32,
    /// Whether `lo` trains (ranges that start at 0, e.g. after ReLU, keep it there).
    pub learn_lo: bool,
}

impl LearnedRange {
    pub fn new(lo: f32, hi: f32, device: &Device) -> Result<Self> {
        let width = (hi - lo).max(1e-8);
        Ok(Self {
            a: candle_core::Var::new(&[lo / width], device)?,
            b: candle_core::Var::new(&[hi / width], device)?,
            width,
            learn_lo: lo < 0.0,
        })
    }

    /// The current range (what the grid and the export use).
    pub fn range(&self) -> Result<(f32, f32)> {
        let a = self.a.as_tensor().to_vec1::<f32>()?[0];
        let b = self.b.as_tensor().to_vec1::<f32>()?[0];
        Ok(((self.width * a).min(0.0), (self.width * b).max(0.0)))
    }

    /// The trainable variables (`a` only where `lo` trains).
    pub fn vars(&self) -> Vec<candle_core::Var> {
        let mut v = vec![self.b.clone()];
        if self.learn_lo {
            v.insert(0, self.a.clone());
        }
        v
    }
}

struct Learned {
    q: QParams,
    width: f32,
    learn_lo: bool,
}

impl candle_core::CustomOp3 for Learned {
    fn name(&self) -> &'static str {
        "datafree-learned-fake-quant"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Activation(self.q).cpu_fwd(s, l)
    }

    /// LSQ's gradients for the grid y = (clamp(round(x/s) + z, 0, qmax) - z) * s with
    /// s = (hi - lo) / qmax: inside the grid dy/dx = 1 and dy/dhi = -dy/dlo = (round(u) - u) /
    /// qmax (u = x/s + z, the rounding error moves the range); above it dy/dhi = 1, below it
    /// dy/dlo = 1, and dy/dx = 0 (a clipped value does not move with x).
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let q = &self.q;
        let xs: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let gs: Vec<f32> = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let qmax = q.qmax as f32;
        let mut gx = vec![0f32; xs.len()];
        // Per-chunk range gradients, summed in chunk order (deterministic).
        let parts: Vec<(f64, f64)> = gx
            .par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
            .map(|(out, (xs, gs))| {
                let (mut glo, mut ghi) = (0f64, 0f64);
                for ((o, &x), &g) in out.iter_mut().zip(xs).zip(gs) {
                    let u = x / q.scale + q.zero_point as f32;
                    let r = super::round_even(u);
                    if r > qmax {
                        ghi += g as f64;
                    } else if r < q.qmin as f32 {
                        glo += g as f64;
                    } else {
                        let e = ((r - u) / qmax) as f64 * g as f64;
                        ghi += e;
                        glo -= e;
                        *o = g;
                    }
                }
                (glo, ghi)
            })
            .collect();
        let (glo, ghi) = parts
            .iter()
            .fold((0f64, 0f64), |(a, b), (l, h)| (a + l, b + h));
        let gx = Tensor::from_vec(gx, x.dims(), x.device())?.to_dtype(x.dtype())?;
        let w = self.width as f64;
        let ga = Tensor::new(&[(glo * w) as f32], a.device())?.to_dtype(a.dtype())?;
        let gb = Tensor::new(&[(ghi * w) as f32], b.device())?.to_dtype(b.dtype())?;
        Ok((Some(gx), self.learn_lo.then_some(ga), Some(gb)))
    }
}

/// Fake quantization of an activation on the grid of a learned range: the same forward value
/// as [`fake_quant_activation`] on `QParams::activation(range, bits, scales)`, with gradients
/// for the input and the range (see `Learned::bwd`). On other devices the op runs on the host
/// (candle carries values and gradients across).
pub fn fake_quant_learned(
    x: &Tensor,
    r: &LearnedRange,
    bits: u8,
    scales: super::Scales,
) -> Result<Tensor> {
    let (lo, hi) = r.range()?;
    let op = Learned {
        q: QParams::activation(lo, hi, bits, scales),
        width: r.width,
        learn_lo: r.learn_lo,
    };
    if x.device().is_cpu() {
        return Ok(x
            .contiguous()?
            .apply_op3(r.a.as_tensor(), r.b.as_tensor(), op)?);
    }
    let host = |t: &Tensor| t.to_device(&crate::device::HOST);
    let y =
        host(x)?
            .contiguous()?
            .apply_op3(&host(r.a.as_tensor())?, &host(r.b.as_tensor())?, op)?;
    Ok(y.to_device(x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Scales;
    use rand::{Rng, SeedableRng};

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Sum of 12 uniforms minus 6: close enough to N(0, 1) for a range test.
        (0..n)
            .map(|_| (0..12).map(|_| r.random::<f32>()).sum::<f32>() - 6.0)
            .collect()
    }

    #[test]
    fn learned_range_forward_is_the_fixed_grid_and_gradients_follow_lsq() {
        let v = normal(4096, 1);
        let x = candle_core::Var::new(v.as_slice(), &Device::Cpu).unwrap();
        let r = LearnedRange::new(-1.5, 2.0, &Device::Cpu).unwrap();
        let (lo, hi) = r.range().unwrap();
        let q = QParams::activation(lo, hi, 4, Scales::Exact);
        let y = fake_quant_learned(x.as_tensor(), &r, 4, Scales::Exact).unwrap();
        let fixed = fake_quant_activation(x.as_tensor(), q).unwrap();
        let (y, fixed): (Vec<f32>, Vec<f32>) = (y.to_vec1().unwrap(), fixed.to_vec1().unwrap());
        assert_eq!(y, fixed);
        // d sum(y) / dx: 1 on the grid, 0 where it saturates.
        let loss = fake_quant_learned(x.as_tensor(), &r, 4, Scales::Exact)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gx: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let (blo, bhi) = q.bounds();
        let (mut above, mut below) = (0, 0);
        for (&xi, &g) in v.iter().zip(&gx) {
            let code = q.quantize(xi);
            if code == q.qmax && xi > bhi + q.scale / 2.0 {
                above += 1;
                assert_eq!(g, 0.0, "x {xi} above the grid");
            } else if code == 0 && xi < blo - q.scale / 2.0 {
                below += 1;
                assert_eq!(g, 0.0, "x {xi} below the grid");
            } else {
                assert_eq!(g, 1.0, "x {xi} on the grid");
            }
        }
        assert!(above > 10 && below > 10, "{above} {below}");
        // Each saturated value pulls its end by width; rounding errors add a small rest.
        let gb = grads
            .get(r.b.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let ga = grads
            .get(r.a.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let per = r.width * v.len() as f32 / q.qmax as f32 * 0.5;
        assert!(
            (gb - above as f32 * r.width).abs() <= per,
            "{gb} vs {above}"
        );
        assert!(
            (ga - below as f32 * r.width).abs() <= per,
            "{ga} vs {below}"
        );
    }

    #[test]
    fn ranges_starting_at_zero_keep_their_lower_end() {
        let r = LearnedRange::new(0.0, 3.0, &Device::Cpu).unwrap();
        assert!(!r.learn_lo);
        assert_eq!(r.vars().len(), 1);
        let x = Tensor::new(&[-1.0f32, 0.5, 4.0], &Device::Cpu).unwrap();
        let loss = fake_quant_learned(&x, &r, 4, Scales::Exact)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(r.a.as_tensor()).is_none());
        assert!(grads.get(r.b.as_tensor()).is_some());
    }

    #[test]
    fn training_a_too_wide_range_lowers_the_quantization_error() {
        // N(0, 1) data on a 4-bit grid over [-8, 8]: steps of about 1, so most values round to
        // -1, 0, 1; minimising the error must narrow the range (the MSE-optimal 4-bit range of a
        // unit Gaussian is about +-2.5).
        let v = normal(8192, 2);
        let x = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let r = LearnedRange::new(-8.0, 8.0, &Device::Cpu).unwrap();
        let mse = |r: &LearnedRange| -> Tensor {
            let y = fake_quant_learned(&x, r, 4, Scales::Exact).unwrap();
            (y - &x).unwrap().sqr().unwrap().mean_all().unwrap()
        };
        let before = mse(&r).to_scalar::<f32>().unwrap();
        let mut opt = crate::train::optim::Adam::new(r.vars(), 0.02, (0.9, 0.999));
        for _ in 0..100 {
            opt.step(&mse(&r).backward().unwrap()).unwrap();
        }
        let after = mse(&r).to_scalar::<f32>().unwrap();
        let (lo, hi) = r.range().unwrap();
        assert!(after < before * 0.5, "mse {before} -> {after}");
        assert!(
            lo > -5.0 && hi < 5.0 && lo < -1.0 && hi > 1.0,
            "[{lo}, {hi}]"
        );
    }
}
