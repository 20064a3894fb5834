//! Where the student is quantized. Layers: every Conv, Gemm and MatMul with a constant weight
//! (weights per output channel). Activations:
//! - the data input of every layer, at the activation width (the reference's placement: after
//!   ReLU, at compute inputs);
//! - the network input at 8 bits (the reference keeps it float; 8 bits is what ONNX Runtime's
//!   QLinearConv fusion needs);
//! - with BN folded, layer outputs that do not go straight into a ReLU (e.g. into a residual Add)
//!   at 8 bits, so ORT can fuse Conv and Add (the reference keeps these float).
//!
//! `--first-last-bits` overrides the widths of the first and last layer (weights and input).

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
use serde::Serialize;

use super::{BitSpec, QParams, Scales};
use crate::onnx::graph::{GraphIndex, attr_float, attr_int, display_name};
use crate::onnx::pb::ModelProto;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The graph's input feeding the first layer.
    NetworkInput,
    /// The data input of a quantized layer.
    LayerInput,
    /// A layer output kept at 8 bits so ONNX Runtime can fuse the layer.
    FusionOutput,
}

/// The grid of an activation point over `range`: the network input's range is known exactly
/// (its domain), so its grid covers it; other ranges are estimates, rounded to the nearest
/// short significand.
pub fn point_params(role: Role, (lo, hi): (f32, f32), bits: u8, scales: Scales) -> QParams {
    match role {
        Role::NetworkInput => QParams::activation_covering(lo, hi, bits, scales),
        _ => QParams::activation(lo, hi, bits, scales),
    }
}

/// An activation tensor that gets QuantizeLinear -> DequantizeLinear.
#[derive(Debug, Clone, Serialize)]
pub struct QPoint {
    pub tensor: String,
    pub bits: u8,
    pub role: Role,
}

/// A quantized layer.
#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    pub node: String,
    pub op: String,
    pub input: String,
    pub output: String,
    pub weight: String,
    pub bias: Option<String>,
    /// The weight axis of output channels.
    pub weight_axis: usize,
    pub weight_bits: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub layers: Vec<Layer>,
    pub points: Vec<QPoint>,
}

#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    pub bits: BitSpec,
    pub first_last_bits: Option<u8>,
    /// Add 8-bit points on layer outputs for ORT fusion (only meaningful with BN folded).
    pub fusion_outputs: bool,
    /// Quantize 8-bit weights on a 7-bit range (+-63): ONNX Runtime's U8S8 kernels on x86
    /// without VNNI add pairs of u8 x s8 products in saturating int16 (vpmaddubsw), which
    /// full-range int8 weights overflow.
    pub reduce_range: bool,
}

/// Plans the quantization of `model` (normally the BN-folded teacher).
pub fn plan(model: &ModelProto, opts: PlanOptions) -> Result<Plan> {
    let graph = model.graph.as_ref().expect("validated model has a graph");
    let g = GraphIndex::new(graph);
    let mut layers = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        let Some(w) = n.input.get(1).filter(|w| g.is_initializer(w)) else {
            continue;
        };
        let dims = &g.initializer(w).expect("checked").dims;
        let axis = match n.op_type.as_str() {
            "Conv" if dims.len() >= 3 => 0,
            // Gemm: B is K x N, or N x K with transB; plain alpha only.
            "Gemm"
                if dims.len() == 2
                    && attr_int(n, "transA", 0) == 0
                    && attr_float(n, "alpha", 1.0) == 1.0 =>
            {
                if attr_int(n, "transB", 0) != 0 {
                    0
                } else {
                    1
                }
            }
            "MatMul" if dims.len() == 2 => 1,
            _ => continue,
        };
        let bias = match n.op_type.as_str() {
            "Conv" => n.input.get(2),
            "Gemm" if attr_float(n, "beta", 1.0) == 1.0 => n.input.get(2),
            _ => None,
        }
        .filter(|b| !b.is_empty() && g.is_initializer(b))
        .cloned();
        layers.push(Layer {
            node: display_name(n, i),
            op: n.op_type.clone(),
            input: n.input[0].clone(),
            output: n.output[0].clone(),
            weight: w.clone(),
            bias,
            weight_axis: axis,
            weight_bits: opts.bits.weights,
        });
    }
    ensure!(
        !layers.is_empty(),
        "the model has no Conv, Gemm or MatMul with a constant weight to quantize"
    );
    let last = layers.len() - 1;
    let mut points: BTreeMap<String, QPoint> = BTreeMap::new();
    let mut add = |tensor: &str, bits: u8, role: Role| {
        let p = points.entry(tensor.to_string()).or_insert(QPoint {
            tensor: tensor.to_string(),
            bits,
            role,
        });
        // A tensor read by several layers gets the widest width asked of it.
        if bits > p.bits {
            p.bits = bits;
            p.role = role;
        }
    };
    for (k, l) in layers.iter_mut().enumerate() {
        let edge = k == 0 || k == last;
        if edge && let Some(b) = opts.first_last_bits {
            l.weight_bits = b;
        }
        if opts.reduce_range && l.weight_bits == 8 {
            l.weight_bits = 7;
        }
        if g.is_graph_input(&l.input) {
            add(
                &l.input,
                opts.first_last_bits.unwrap_or(8),
                Role::NetworkInput,
            );
        } else {
            let bits = if edge {
                opts.first_last_bits.unwrap_or(opts.bits.activations)
            } else {
                opts.bits.activations
            };
            add(&l.input, bits, Role::LayerInput);
        }
    }
    if opts.fusion_outputs {
        let extra: Vec<String> = layers
            .iter()
            .filter(|l| {
                let cons = g.consumers(&l.output);
                let into_relu = cons.iter().all(|&c| g.node(c).op_type == "Relu");
                !g.is_graph_output(&l.output) && !cons.is_empty() && !into_relu
            })
            .map(|l| l.output.clone())
            .collect();
        for t in extra {
            // A tensor that is already a layer input keeps its width.
            points.entry(t.clone()).or_insert(QPoint {
                tensor: t,
                bits: 8,
                role: Role::FusionOutput,
            });
        }
    }
    Ok(Plan {
        layers,
        points: points.into_values().collect(),
    })
}
