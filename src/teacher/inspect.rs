//! `datafree inspect`: everything a user needs to know about a teacher before compressing it —
//! file identity, signature, op histogram, parameters, BatchNormalization statistics and their
//! verdict, classes and input resolution, and which ops the lowering cannot handle.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::onnx::LoadedModel;
use crate::onnx::bn::{self, BnReport};
use crate::onnx::graph::display_name;
use crate::onnx::pb::{
    ValueInfoProto, tensor_proto::DataType, tensor_shape_proto::dimension, type_proto,
};
use crate::onnx::tensor;

/// JSON schema version of [`InspectReport`]; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub schema_version: u32,
    pub file: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub ir_version: i64,
    pub opset_imports: Vec<OpsetImport>,
    pub producer_name: String,
    pub producer_version: String,
    pub graph_name: String,
    pub inputs: Vec<ValueDesc>,
    pub outputs: Vec<ValueDesc>,
    pub node_count: usize,
    /// op type -> number of nodes (domain-qualified for non-default domains).
    pub op_histogram: BTreeMap<String, usize>,
    pub parameters: Parameters,
    /// Multiply-accumulates per image (Conv, Gemm, MatMul), from one forward pass; absent when
    /// the input has no fixed image shape or the graph cannot be lowered.
    pub macs_per_image: Option<u64>,
    pub classes: Option<usize>,
    /// What the outputs are (logits, or probabilities from a final Softmax); absent when the
    /// interface cannot be read (the reason is the error `compress` gives).
    pub output_kind: Option<crate::onnx::interface::OutputKind>,
    pub input_resolution: Option<InputResolution>,
    pub batch_norm: BnReport,
    pub lowering: Lowering,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpsetImport {
    pub domain: String,
    pub version: i64,
}

/// A dimension: a number, a symbolic name, or null when unknown.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DimDesc {
    Fixed(i64),
    Symbolic(String),
    Unknown,
}

impl std::fmt::Display for DimDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DimDesc::Fixed(v) => write!(f, "{v}"),
            DimDesc::Symbolic(s) => f.write_str(s),
            DimDesc::Unknown => f.write_str("?"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ValueDesc {
    pub name: String,
    pub elem_type: String,
    /// None when the model declares no shape.
    pub shape: Option<Vec<DimDesc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Parameters {
    /// Elements in initializers and Constant-node tensors.
    pub count: usize,
    pub bytes: usize,
    pub initializers: usize,
    pub constant_nodes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputResolution {
    /// "NCHW" or "NHWC" (guessed from where a 1- or 3-sized channel axis sits).
    pub layout: String,
    pub channels: i64,
    pub height: i64,
    pub width: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lowering {
    pub all_supported: bool,
    /// Op types the lowering handles, present in this model.
    pub supported: Vec<String>,
    /// Op types it does not, each with (up to 10 of) the nodes that use it.
    pub unsupported: Vec<UnsupportedOp>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnsupportedOp {
    pub op: String,
    pub count: usize,
    pub nodes: Vec<String>,
}

fn describe(v: &ValueInfoProto) -> ValueDesc {
    let tensor = v
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .map(|type_proto::Value::TensorType(t)| t);
    let shape = tensor.and_then(|t| t.shape.as_ref()).map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(dimension::Value::DimValue(v)) => DimDesc::Fixed(*v),
                Some(dimension::Value::DimParam(p)) if !p.is_empty() => {
                    DimDesc::Symbolic(p.clone())
                }
                _ => DimDesc::Unknown,
            })
            .collect()
    });
    ValueDesc {
        name: v.name.clone(),
        elem_type: tensor.map_or("unknown".into(), |t| tensor::type_name(t.elem_type)),
        shape,
    }
}

fn qualified(op: &str, domain: &str) -> String {
    if domain.is_empty() || domain == "ai.onnx" {
        op.to_string()
    } else {
        format!("{domain}::{op}")
    }
}

fn parameters(model: &LoadedModel) -> Parameters {
    let g = model.graph();
    let constants: Vec<_> = g
        .node
        .iter()
        .filter(|n| n.op_type == "Constant")
        .filter_map(|n| n.attribute.iter().find_map(|a| a.t.as_ref()))
        .collect();
    let (mut count, mut bits) = (0usize, 0usize);
    for t in g.initializer.iter().chain(constants.iter().copied()) {
        let n = tensor::numel(t);
        count += n;
        bits += n * DataType::try_from(t.data_type)
            .ok()
            .and_then(tensor::element_bits)
            .unwrap_or(0);
    }
    Parameters {
        count,
        bytes: bits.div_ceil(8),
        initializers: g.initializer.len(),
        constant_nodes: constants.len(),
    }
}

fn input_resolution(inputs: &[ValueDesc]) -> Option<InputResolution> {
    let shape = inputs.first()?.shape.as_ref()?;
    let fixed: Vec<Option<i64>> = shape
        .iter()
        .map(|d| match d {
            DimDesc::Fixed(v) => Some(*v),
            _ => None,
        })
        .collect();
    if fixed.len() != 4 {
        return None;
    }
    let is_ch = |d: Option<i64>| matches!(d, Some(1 | 3 | 4));
    let (layout, c, h, w) = if is_ch(fixed[1]) || !is_ch(fixed[3]) {
        ("NCHW", fixed[1], fixed[2], fixed[3])
    } else {
        ("NHWC", fixed[3], fixed[1], fixed[2])
    };
    Some(InputResolution {
        layout: layout.into(),
        channels: c?,
        height: h?,
        width: w?,
    })
}

/// Builds the inspect report of a loaded model.
pub fn inspect(model: &LoadedModel) -> InspectReport {
    let p = &model.proto;
    let g = model.graph();
    let init_names: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<ValueDesc> = g
        .input
        .iter()
        .filter(|v| !init_names.contains(v.name.as_str()))
        .map(describe)
        .collect();
    let outputs: Vec<ValueDesc> = g.output.iter().map(describe).collect();
    let mut op_histogram = BTreeMap::new();
    let mut unsupported: BTreeMap<String, UnsupportedOp> = BTreeMap::new();
    for (i, n) in g.node.iter().enumerate() {
        let op = qualified(&n.op_type, &n.domain);
        *op_histogram.entry(op.clone()).or_insert(0) += 1;
        if !crate::lower::is_supported(&n.op_type, &n.domain) {
            let u = unsupported.entry(op.clone()).or_insert(UnsupportedOp {
                op,
                count: 0,
                nodes: vec![],
            });
            u.count += 1;
            if u.nodes.len() < 10 {
                u.nodes.push(display_name(n, i));
            }
        }
    }
    let supported = op_histogram
        .keys()
        .filter(|k| !unsupported.contains_key(*k))
        .cloned()
        .collect();
    let classes = outputs
        .first()
        .and_then(|o| o.shape.as_ref())
        .and_then(|s| match s.last() {
            Some(DimDesc::Fixed(v)) if *v > 0 && s.len() >= 2 => Some(*v as usize),
            _ => None,
        });
    InspectReport {
        schema_version: SCHEMA_VERSION,
        file: model.path.display().to_string(),
        size_bytes: model.size_bytes,
        sha256: model.sha256.clone(),
        ir_version: p.ir_version,
        opset_imports: p
            .opset_import
            .iter()
            .map(|o| OpsetImport {
                domain: if o.domain.is_empty() {
                    "ai.onnx".into()
                } else {
                    o.domain.clone()
                },
                version: o.version,
            })
            .collect(),
        producer_name: p.producer_name.clone(),
        producer_version: p.producer_version.clone(),
        graph_name: g.name.clone(),
        macs_per_image: input_resolution(&inputs)
            .filter(|_| unsupported.is_empty())
            .and_then(|r| {
                let (c, h, w) = (r.channels as usize, r.height as usize, r.width as usize);
                let shape = if r.layout == "NHWC" {
                    [1, h, w, c]
                } else {
                    [1, c, h, w]
                };
                crate::lower::cost::macs(model, &shape).ok()
            }),
        input_resolution: input_resolution(&inputs),
        output_kind: crate::onnx::interface::Interface::of(model)
            .ok()
            .map(|i| i.output),
        inputs,
        outputs,
        node_count: g.node.len(),
        op_histogram,
        parameters: parameters(model),
        classes,
        batch_norm: bn::analyse(model),
        lowering: Lowering {
            all_supported: unsupported.is_empty(),
            supported,
            unsupported: unsupported.into_values().collect(),
        },
    }
}
