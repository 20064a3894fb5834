//! Fake quantization for training (quantization-aware fine-tuning): the forward value is what
//! the exported QDQ model computes (the same `quantize_weight` and `QParams` arithmetic, round
//! half to even, saturation), the backward pass is the straight-through estimator. Weights train
//! on min/max scales: with `Scales::Exact` the export then rounds each weight scale up to a
//! short significand (a relative change of at most 2^-(bits-1) for the bits the layer allows).

use super::{QParams, WeightScheme, quantize_weight};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

/// The dequantized values of a weight with output channels on `axis` (0, or 1 for a 2-D
/// Gemm weight), exactly as the exported model's DequantizeLinear produces them.
pub fn dequantized_weight(
    v: &[f32],
    dims: &[usize],
    axis: usize,
    bits: u8,
    scheme: WeightScheme,
) -> Vec<f32> {
    let transposed = axis == 1 && dims.len() == 2;
    let (k, n) = if transposed {
        (dims[0], dims[1])
    } else {
        (0, 0)
    };
    let rows: Vec<f32> = if transposed {
        (0..n)
            .flat_map(|j| (0..k).map(move |i| v[i * n + j]))
            .collect()
    } else {
        v.to_vec()
    };
    let channels = dims[axis];
    let q = quantize_weight(&rows, channels, bits, scheme);
    let per = rows.len() / channels.max(1);
    let deq: Vec<f32> = q
        .values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = i / per.max(1);
            (x as i32 - q.zero_points[c] as i32) as f32 * q.scales[c]
        })
        .collect();
    if transposed {
        (0..k)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| deq[j * k + i])
            .collect()
    } else {
        deq
    }
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
            CpuStorage::F32(v) => CpuStorage::F32(v[a..b].iter().map(|&x| f(x)).collect()),
            CpuStorage::F64(v) => {
                CpuStorage::F64(v[a..b].iter().map(|&x| f(x as f32) as f64).collect())
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
        .to_device(&Device::Cpu)?
        .contiguous()?
        .apply_op1_no_bwd(&Activation(q))?;
    Ok((y.to_device(x.device())? + (x - x.detach())?)?)
}
