//! Reading an ONNX file into its protobuf, with the checks that turn every kind of bad file into one
//! clear error naming the file: unreadable, empty, not protobuf, protobuf but not a model, missing
//! external data, opset outside what datafree supports.

use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use super::pb::ModelProto;
use super::tensor;
use super::{MAX_OPSET, MIN_OPSET, OnnxError};

/// A model file read and validated.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub sha256: String,
    pub proto: ModelProto,
    /// The default-domain opset version.
    pub opset: i64,
}

impl LoadedModel {
    /// The folder that external data paths are relative to.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// A model built in memory, named `path` for messages (and external data, relative to its
    /// folder); size and hash are those of its encoding.
    pub fn from_proto(path: &Path, proto: ModelProto) -> LoadedModel {
        let bytes = proto.encode_to_vec();
        let opset = default_opset(path, &proto).unwrap_or(0);
        LoadedModel {
            path: path.into(),
            size_bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            proto,
            opset,
        }
    }

    pub fn graph(&self) -> &super::pb::GraphProto {
        self.proto
            .graph
            .as_ref()
            .expect("validated at load: the model has a graph")
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads, decodes and validates `path`.
pub fn load_model(path: &Path) -> Result<LoadedModel, OnnxError> {
    let bytes = std::fs::read(path).map_err(|cause| OnnxError::Io {
        path: path.into(),
        cause,
    })?;
    from_bytes(path, &bytes)
}

/// Decodes and validates model bytes that came from `path` (used for messages and external data).
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<LoadedModel, OnnxError> {
    if bytes.is_empty() {
        return Err(OnnxError::Empty { path: path.into() });
    }
    let proto = ModelProto::decode(bytes).map_err(|cause| OnnxError::Decode {
        path: path.into(),
        cause,
    })?;
    let not_a_model = |reason: &str| OnnxError::NotAModel {
        path: path.into(),
        reason: reason.into(),
    };
    if proto.ir_version <= 0 {
        return Err(not_a_model("it parses as protobuf but has no ir_version"));
    }
    let Some(graph) = proto.graph.as_ref() else {
        return Err(not_a_model("it has no graph"));
    };
    if graph.node.is_empty() {
        return Err(not_a_model("its graph has no nodes"));
    }
    if graph.output.is_empty() {
        return Err(not_a_model("its graph declares no outputs"));
    }
    let opset = default_opset(path, &proto)?;
    let model = LoadedModel {
        path: path.into(),
        size_bytes: bytes.len() as u64,
        sha256: sha256_hex(bytes),
        proto,
        opset,
    };
    check_external_data(&model)?;
    Ok(model)
}

fn default_opset(path: &Path, proto: &ModelProto) -> Result<i64, OnnxError> {
    let err = |reason: String| OnnxError::Opset {
        path: path.into(),
        reason,
    };
    let Some(op) = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
    else {
        return Err(err("the model imports no ai.onnx opset".into()));
    };
    if !(MIN_OPSET..=MAX_OPSET).contains(&op.version) {
        return Err(err(format!(
            "ai.onnx opset {} is outside the supported range {MIN_OPSET}..={MAX_OPSET}; re-export with an opset in that range (e.g. torch.onnx.export(..., opset_version=17))",
            op.version
        )));
    }
    Ok(op.version)
}

/// Every initializer (and Constant-node tensor) stored externally must have its file present and
/// large enough, so that later stages never fail half-way on missing weights.
fn check_external_data(model: &LoadedModel) -> Result<(), OnnxError> {
    let graph = model.graph();
    let constant_tensors = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Constant")
        .flat_map(|n| n.attribute.iter().filter_map(|a| a.t.as_ref()));
    for t in graph.initializer.iter().chain(constant_tensors) {
        if tensor::is_external(t) {
            tensor::read_external(t, model.dir()).map_err(|reason| OnnxError::Tensor {
                path: model.path.clone(),
                tensor: t.name.clone(),
                reason,
            })?;
        }
    }
    Ok(())
}
