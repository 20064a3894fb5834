//! ONNX I/O: reading and validating model files, decoding tensors (inline and external data),
//! indexing graphs, extracting BatchNormalization statistics, building and writing models.
//! The ONNX protobuf (tract's prost `pb` types) stays the one graph representation from ingest to export.

pub mod bn;
pub mod builder;
pub mod fixtures;
pub mod graph;
pub mod inspect;
pub mod load;
pub mod tensor;

pub use load::{LoadedModel, from_bytes, load_model};

/// Decodes model bytes, panicking on error (tests only).
pub fn from_bytes_for_tests(path: &std::path::Path, bytes: &[u8]) -> LoadedModel {
    from_bytes(path, bytes).expect("valid test model")
}
pub use tract_onnx::pb;

use std::path::PathBuf;

/// Opset range of the default (`ai.onnx`) domain that datafree accepts.
pub const MIN_OPSET: i64 = 7;
pub const MAX_OPSET: i64 = 23;

/// Everything that can be wrong with an ONNX file; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{}: cannot read file: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: file is empty (0 bytes), expected an ONNX model", path.display())]
    Empty { path: PathBuf },
    #[error("{}: not an ONNX model: protobuf decoding failed ({source}); the file may be truncated or of another format", path.display())]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
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
