//! Helpers the benchmark examples share (kernels_bench, iteration_bench).

use std::path::{Path, PathBuf};

/// The median of `v`, None when it is empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The Python with torch for the PyTorch column: DATAFREE_TORCH_PYTHON, else the .venv-bench
/// that scripts/setup-bench.sh makes, else none.
pub fn torch_python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DATAFREE_TORCH_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-bench/bin/python");
    p.exists().then_some(p)
}
