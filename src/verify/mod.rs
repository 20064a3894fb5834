//! Verification: running models in the reference engines (ONNX Runtime through `ort`, loaded
//! dynamically from the library `scripts/setup.sh` installs, and tract) and in our own candle
//! lowering, measuring accuracy on labelled data and comparing engines side by side.

pub mod compare;
pub mod engine;
pub mod eval;
pub mod gate;
pub mod ort_runtime;
pub mod synth;
pub mod tract_runtime;
