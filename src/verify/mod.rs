//! Verification: running models in the reference engines, ONNX Runtime (through `ort`, loaded
//! dynamically from the library `scripts/setup.sh` installs) and tract, to check our own numbers.

pub mod ort_runtime;
pub mod tract_runtime;
