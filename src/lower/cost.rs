//! Multiply-accumulates per image of a model, from one forward pass of a single image (so
//! every shape is the one the model really computes).

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::onnx::LoadedModel;

/// MACs per image of every Conv, ConvTranspose, Gemm and MatMul with a constant weight, for one
/// input of shape `input` (batch 1, in the file's layout).
pub fn macs(model: &LoadedModel, input: &[usize]) -> Result<u64> {
    let g = model.graph();
    let inits: std::collections::HashMap<&str, usize> = g
        .initializer
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dims.iter().product::<i64>().max(1) as usize,
            )
        })
        .collect();
    // (node input, node output, weight elements, op) of every layer with a constant weight.
    let layers: Vec<(String, String, usize, String)> = g
        .node
        .iter()
        .filter(|n| {
            matches!(
                n.op_type.as_str(),
                "Conv" | "ConvTranspose" | "Gemm" | "MatMul"
            )
        })
        .filter_map(|n| {
            let w = *inits.get(n.input.get(1)?.as_str())?;
            Some((
                n.input[0].clone(),
                n.output.first()?.clone(),
                w,
                n.op_type.clone(),
            ))
        })
        .collect();
    if layers.is_empty() {
        return Ok(0);
    }
    let p = super::lower(model, &crate::device::HOST, DType::F32)?;
    let x = Tensor::zeros(input, DType::F32, &crate::device::HOST)?;
    let names: Vec<String> = layers
        .iter()
        .flat_map(|(i, o, _, _)| [i.clone(), o.clone()])
        .collect();
    let (_, t) = p.forward_tensors(&x, &names)?;
    let mut total = 0u64;
    for (k, (_, _, w, op)) in layers.iter().enumerate() {
        let (inp, out) = (&t[2 * k], &t[2 * k + 1]);
        let total_of = |t: &Tensor| t.elem_count() as u64;
        total += match op.as_str() {
            // Each input element meets weight / C_in of the kernel's values.
            "ConvTranspose" => total_of(inp) * (*w as u64) / inp.dim(1)? as u64,
            // Each output element sums weight / C_out products.
            "Conv" => total_of(out) * (*w as u64) / out.dim(1)? as u64,
            _ => total_of(out) * (*w as u64) / *out.dims().last().unwrap_or(&1) as u64,
        };
    }
    Ok(total)
}
