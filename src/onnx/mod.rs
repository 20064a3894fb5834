//! ONNX I/O: reading and validating model files, decoding tensors (inline and external data),
//! indexing graphs, extracting BatchNormalization statistics, building and writing models.
//! The ONNX protobuf (tract's prost `pb` types) stays the one graph representation from ingest to export.

pub mod bn;
pub mod builder;
pub mod check;
pub mod graph;
pub mod interface;
pub mod load;
pub mod padding;
pub mod tensor;

pub use load::{LoadedModel, from_bytes, load_model};

pub use tract_onnx::pb;

use std::path::PathBuf;

/// Opset range of the default (`ai.onnx`) domain that datafree accepts.
pub const MIN_OPSET: i64 = 7;
pub const MAX_OPSET: i64 = 23;

/// Everything that can be wrong with an ONNX file; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    // The causes are named `cause`, not `source`: the message already includes them, and a
    // thiserror source would be printed a second time by anyhow's `{:#}` chain.
    #[error("{}: cannot read file: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: file is empty (0 bytes), expected an ONNX model", path.display())]
    Empty { path: PathBuf },
    #[error("{}: not an ONNX model: protobuf decoding failed ({cause}); the file may be truncated or of another format", path.display())]
    Decode {
        path: PathBuf,
        cause: prost::DecodeError,
    },
    #[error("{}: not an ONNX model: {reason}", path.display())]
    NotAModel { path: PathBuf, reason: String },
    #[error("{}: unsupported opset: {reason}", path.display())]
    Opset { path: PathBuf, reason: String },
    #[error("{}: tensor '{tensor}': {reason}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
}
