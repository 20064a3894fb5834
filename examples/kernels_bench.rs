//! Training-speed benchmark of the CPU kernels: CIFAR ResNet-20 (batch 64, f32) forward,
//! forward + backward to the input with frozen weights (a teacher), forward + backward to the
//! weights (a student), a depthwise 3x3 96-channel 16x16 layer, and the GDFQ generator's
//! forward + backward. Columns: candle's built-in ops, our kernels, and PyTorch CPU on the same
//! machine in the same run (when `scripts/setup-bench.sh` has made .venv-bench, or
//! DATAFREE_TORCH_PYTHON names a Python with torch).
//!
//!     cargo run --release --example kernels_bench [-- --json] [--reps N] [--threads T]
//!         [--no-candle] [--no-pytorch] [--cases a,b,...]
//!
//! Every (case, implementation) runs in its own process, so the peak resident memory it reports
//! is that case's alone.

mod common;

#[path = "../tests/it/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use datafree::generator::{GdfqConfig, GdfqGenerator};
use datafree::kernels::{self, Conv2dSpec};
use datafree::onnx::from_bytes;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CASES: [&str; 6] = [
    "resnet20_forward",
    "resnet20_fwd_bwd_input",
    "resnet20_fwd_bwd_weights",
    "depthwise3x3_forward",
    "depthwise3x3_fwd_bwd",
    "gdfq_generator_fwd_bwd",
];
const BATCH: usize = 64;

fn random(r: &mut ChaCha8Rng, shape: &[usize]) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// A closure that runs the case once.
fn build(case: &str) -> Result<Box<dyn Fn() -> Result<()>>> {
    let dev = Device::Cpu;
    let mut r = ChaCha8Rng::seed_from_u64(0);
    if let Some(kind) = case.strip_prefix("resnet20_") {
        let bytes = fixtures::resnet20(10, 20).encode_to_vec();
        let model = from_bytes(Path::new("resnet20.onnx"), &bytes)?;
        let to_weights = kind == "fwd_bwd_weights";
        let net = datafree::lower::lower_with(&model, &dev, DType::F32, to_weights)?;
        let x = random(&mut r, &[BATCH, 3, 32, 32])?;
        return Ok(match kind {
            "forward" => Box::new(move || {
                net.forward(&x)?;
                Ok(())
            }),
            "fwd_bwd_input" => {
                let x = Var::from_tensor(&x)?;
                Box::new(move || {
                    let g = net.forward(x.as_tensor())?.sum_all()?.backward()?;
                    g.get(&x).context("no input gradient")?;
                    Ok(())
                })
            }
            _ => Box::new(move || {
                let g = net.forward(&x)?.sum_all()?.backward()?;
                for (_, v) in net.vars() {
                    g.get(v).context("a weight got no gradient")?;
                }
                Ok(())
            }),
        });
    }
    if let Some(kind) = case.strip_prefix("depthwise3x3_") {
        let x = Var::from_tensor(&random(&mut r, &[BATCH, 96, 16, 16])?)?;
        let w = Var::from_tensor(&(random(&mut r, &[96, 1, 3, 3])? * 0.3)?)?;
        let spec = Conv2dSpec::uniform(1, 1, 1, 96);
        return Ok(if kind == "forward" {
            let (x, w) = (x.as_tensor().detach(), w.as_tensor().detach());
            Box::new(move || {
                kernels::conv2d(&x, &w, spec)?;
                Ok(())
            })
        } else {
            Box::new(move || {
                let y = kernels::conv2d(x.as_tensor(), w.as_tensor(), spec)?;
                let g = y.sum_all()?.backward()?;
                g.get(&x).context("no input gradient")?;
                g.get(&w).context("no weight gradient")?;
                Ok(())
            })
        });
    }
    if case == "gdfq_generator_fwd_bwd" {
        let g = GdfqGenerator::new(GdfqConfig::cifar(10, 3, (32, 32)), &dev, 0)?;
        let z = random(&mut r, &[BATCH, 100])?;
        let y: Vec<u32> = (0..BATCH).map(|_| r.random_range(0..10u32)).collect();
        let y = Tensor::from_vec(y, BATCH, &dev)?;
        return Ok(Box::new(move || {
            let grads = g.forward(&z, &y)?.sum_all()?.backward()?;
            for v in g.params.vars() {
                grads
                    .get(&v)
                    .context("a generator parameter got no gradient")?;
            }
            Ok(())
        }));
    }
    bail!("unknown case {case}; cases: {}", CASES.join(", "))
}

/// Child process: times one case with one implementation, prints {"ms", "peak_mb"}.
fn child(case: &str, imp: &str, reps: usize) -> Result<()> {
    kernels::set_builtin(imp == "candle");
    let run = build(case)?;
    for _ in 0..2 {
        run()?;
    }
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{}",
        serde_json::json!({"ms": common::median(times), "peak_mb": datafree::io::peak_rss_mb()})
    );
    Ok(())
}

#[derive(Default, Clone, Copy)]
struct Measure {
    ms: Option<f64>,
    peak_mb: Option<f64>,
}

fn parse_measure(out: std::process::Output, what: &str) -> Result<Measure> {
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("{what}: unexpected output {text}"))?;
    Ok(Measure {
        ms: v["ms"].as_f64(),
        peak_mb: v["peak_mb"].as_f64(),
    })
}

fn main() -> Result<()> {
    kernels::tune_process();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let reps: usize = value("--reps").map_or(Ok(10), |v| v.parse())?;
    let threads: usize = value("--threads").map_or(Ok(2), |v| v.parse())?;
    if let Some(case) = value("--child") {
        return child(&case, &value("--impl").unwrap_or_default(), reps);
    }
    let cases: Vec<String> = match value("--cases") {
        Some(c) => c.split(',').map(str::to_string).collect(),
        None => CASES.iter().map(|c| c.to_string()).collect(),
    };
    let json = flag("--json");
    let exe = std::env::current_exe()?;
    let python = (!flag("--no-pytorch")).then(common::torch_python).flatten();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kernels_bench.py");
    let mut rows = Vec::new();
    for case in &cases {
        let ours_or_candle = |imp: &str, reps: usize| -> Result<Measure> {
            let out = Command::new(&exe)
                .args(["--child", case, "--impl", imp, "--reps", &reps.to_string()])
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()?;
            parse_measure(out, &format!("{case} ({imp})"))
        };
        let ours = ours_or_candle("ours", reps)?;
        // candle's built-in path is 10-50x slower: fewer repetitions.
        let candle = if flag("--no-candle") {
            Measure::default()
        } else {
            ours_or_candle("candle", reps.div_ceil(3))?
        };
        let torch = match &python {
            Some(py) => {
                let out = Command::new(py)
                    .arg(&script)
                    .args(["--case", case, "--threads", &threads.to_string()])
                    .args(["--reps", &reps.to_string(), "--batch", &BATCH.to_string()])
                    .output()
                    .with_context(|| format!("running {}", py.display()))?;
                parse_measure(out, &format!("{case} (pytorch)"))?
            }
            None => Measure::default(),
        };
        if !json {
            eprintln!("measured {case}");
        }
        rows.push((case.clone(), ours, candle, torch));
    }
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(case, o, c, t)| {
                serde_json::json!({
                    "case": case, "ours_ms": o.ms, "candle_ms": c.ms, "pytorch_ms": t.ms,
                    "ours_peak_mb": o.peak_mb, "candle_peak_mb": c.peak_mb,
                    "pytorch_peak_mb": t.peak_mb,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
    println!(
        "batch {BATCH}, f32, {threads} threads, median of {reps} runs (candle built-in: {})",
        reps.div_ceil(3)
    );
    println!(
        "| case | candle built-in ms | ours ms | PyTorch ms | ours/PyTorch | candle/ours | peak MB candle / ours / PyTorch |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (case, o, c, t) in &rows {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "| {case} | {} | {} | {} | {} | {} | {} / {} / {} |",
            f(c.ms),
            f(o.ms),
            f(t.ms),
            ratio(o.ms, t.ms),
            ratio(c.ms, o.ms),
            f(c.peak_mb),
            f(o.peak_mb),
            f(t.peak_mb)
        );
    }
    if python.is_none() && !flag("--no-pytorch") {
        println!(
            "PyTorch column skipped: no .venv-bench (run scripts/setup-bench.sh) and DATAFREE_TORCH_PYTHON is unset"
        );
    }
    Ok(())
}
