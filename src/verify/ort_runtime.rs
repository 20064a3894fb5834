//! Locating and loading ONNX Runtime's shared library, and running float models through it.
//! A missing or wrong library is an error that says how to fix it, never a panic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;

/// Where `scripts/setup.sh` puts the library in this checkout (used when ORT_DYLIB_PATH is unset).
pub const DEFAULT_LIBRARY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.ort/libonnxruntime.so");

/// Where the library is looked for, and why there.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LibraryLocation {
    pub path: PathBuf,
    /// "ORT_DYLIB_PATH" or "default".
    pub from: &'static str,
}

pub fn library_location() -> LibraryLocation {
    match std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        Some(p) => LibraryLocation {
            path: PathBuf::from(p),
            from: "ORT_DYLIB_PATH",
        },
        None => LibraryLocation {
            path: PathBuf::from(DEFAULT_LIBRARY),
            from: "default",
        },
    }
}

static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<&'static Environment> {
    ENV.get_or_init(|| {
        let loc = library_location();
        let fix = "run scripts/setup.sh in the datafree checkout, or set ORT_DYLIB_PATH to a libonnxruntime.so of version 1.31 or newer";
        if !loc.path.is_file() {
            return Err(format!(
                "ONNX Runtime library not found at {} (from {}); {fix}",
                loc.path.display(),
                loc.from
            ));
        }
        ort::init_from(&loc.path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}; {fix}", loc.path.display()))?
            .with_name("datafree")
            .build()
            .map_err(|e| format!("cannot create an ONNX Runtime environment: {e}"))
    })
    .as_ref()
    .map_err(|e| anyhow!("{e}"))
}

/// ONNX Runtime's version (e.g. "1.31.1"), loading the library if needed. ort's loader has already
/// refused libraries older than 1.31; the exact version is read from the versioned file name the
/// library resolves to (`libonnxruntime.so.1.31.1`), else the build-info string is returned.
pub fn version() -> Result<String> {
    environment()?;
    let resolved = std::fs::canonicalize(library_location().path).ok();
    let from_name = resolved
        .as_ref()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libonnxruntime.so."))
        .filter(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(str::to_string);
    Ok(from_name.unwrap_or_else(|| ort::info().to_string()))
}

/// Opens a model in ONNX Runtime (CPU, `threads` intra-op threads; 0 = ORT's default).
pub fn session(model: &Path, threads: usize) -> Result<Session> {
    let env = environment()?;
    let ctx = || format!("{}: ONNX Runtime cannot open the model", model.display());
    let mut b = Session::builder(env).with_context(ctx)?;
    if threads > 0 {
        b = b
            .with_intra_threads(threads)
            .map_err(ort::Error::<()>::from)
            .with_context(ctx)?;
    }
    b.commit_from_file(model).with_context(ctx)
}

/// Runs a single-input, float model on `input` (NCHW, `shape`), returning the first output.
pub fn run_f32(
    session: &mut Session,
    shape: &[usize],
    input: &[f32],
) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = TensorRef::from_array_view((shape.to_vec(), input))
        .context("building the ORT input tensor")?;
    let outputs = session
        .run(ort::inputs![t])
        .context("ONNX Runtime run failed")?;
    let (s, data) = outputs[0]
        .try_extract_tensor::<f32>()
        .context("ONNX Runtime output is not float32")?;
    Ok((s.iter().map(|&d| d as usize).collect(), data.to_vec()))
}

/// Op histogram of the graph ONNX Runtime actually runs after its level-2 optimisations (where
/// QDQ groups become QLinearConv, QGemm, QLinearAdd).
pub fn optimized_op_counts(model: &Path) -> Result<std::collections::BTreeMap<String, usize>> {
    use ort::session::builder::GraphOptimizationLevel;
    use prost::Message;
    let env = environment()?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("optimized.onnx");
    let ctx = || {
        format!(
            "{}: ONNX Runtime cannot optimise the model",
            model.display()
        )
    };
    let _s = Session::builder(env)
        .with_context(ctx)?
        .with_optimization_level(GraphOptimizationLevel::Level2)
        .map_err(ort::Error::<()>::from)
        .with_context(ctx)?
        .with_optimized_model_path(&out)
        .map_err(ort::Error::<()>::from)
        .with_context(ctx)?
        .commit_from_file(model)
        .with_context(ctx)?;
    let bytes = std::fs::read(&out).with_context(ctx)?;
    let m = crate::onnx::pb::ModelProto::decode(bytes.as_slice()).with_context(ctx)?;
    let mut h = std::collections::BTreeMap::new();
    for n in m.graph.map(|g| g.node).unwrap_or_default() {
        *h.entry(n.op_type).or_insert(0) += 1;
    }
    Ok(h)
}

/// Median wall time (ms) of `reps` runs on one batch, after two warm-up runs.
pub fn time_runs(
    session: &mut Session,
    shape: &[usize],
    input: &[f32],
    reps: usize,
) -> Result<f64> {
    for _ in 0..2 {
        run_f32(session, shape, input)?;
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = std::time::Instant::now();
            run_f32(session, shape, input).map(|_| t0.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}
