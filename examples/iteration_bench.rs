//! Whole-iteration benchmark of training on the CPU: GDFQ's warm-up iteration (generator step and
//! the student's range observation) and student iteration (generator step and a w4a4 student
//! step), AutoReCon's supernet search step and a CPSC round, each as `datafree compress` runs it
//! (`--preset quick` where there is one), on the CIFAR ResNet-20 of the kernels benchmark (random
//! weights and BN statistics) or on `--teacher FILE`. PyTorch's same GDFQ iterations
//! (scripts/gdfq_iteration.py) are measured in the same run when `scripts/setup-bench.sh` has
//! made .venv-bench (or DATAFREE_TORCH_PYTHON names a Python with torch).
//!
//!     cargo run --release --example iteration_bench [-- --json] [--iters N] [--threads T]
//!         [--batch B] [--teacher FILE] [--no-pytorch] [--cases gdfq,autorecon,cpsc]
//!
//! Times are medians of the per-iteration wall times the run logs (metrics.jsonl, the search's
//! alpha.jsonl), the first two iterations of each phase left out. Every run is its own process,
//! so the peak resident memory it reports is its alone.

mod common;

#[path = "../tests/it/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use prost::Message;

const CASES: [&str; 3] = ["gdfq", "autorecon", "cpsc"];
/// No checkpoints or sample grids inside the timed iterations.
const QUIET: &str = "--checkpoint-every 0 --grid-every 1000000";

/// One measured row.
struct Row {
    what: String,
    ours_ms: Option<f64>,
    ours_peak_mb: Option<f64>,
    torch_ms: Option<f64>,
    torch_peak_mb: Option<f64>,
}

/// (iteration, cumulative seconds, the line) of a JSONL training log.
fn log_lines(path: &Path) -> Result<Vec<(usize, f64, serde_json::Value)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{}: no log", path.display()))?;
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let iter = v["iter"].as_u64().context("a log line without iter")? as usize;
            let s = v["seconds"]
                .as_f64()
                .context("a log line without seconds")?;
            Ok((iter, s, v))
        })
        .collect()
}

/// Median milliseconds per iteration over the logged lines that `keep` accepts, from the
/// seconds between each line and the one before it (lines may be several iterations apart).
fn per_iter_ms(
    lines: &[(usize, f64, serde_json::Value)],
    keep: impl Fn(usize, &serde_json::Value) -> bool,
) -> Option<f64> {
    let v = lines
        .windows(2)
        .filter(|w| keep(w[1].0, &w[1].2))
        .map(|w| (w[1].1 - w[0].1) * 1e3 / (w[1].0 - w[0].0) as f64)
        .collect();
    common::median(v)
}

/// Runs the datafree CLI with `args` in a child process (this executable with `--child-cli`),
/// `threads` worker threads; returns the child's peak resident memory in MB. A run stopped by
/// `--stop-after` ends with its "stopped after iteration" error: that is its expected end.
fn run_cli(args: &[String], threads: usize) -> Result<Option<f64>> {
    let out = Command::new(std::env::current_exe()?)
        .arg("--child-cli")
        .args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let peak = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("peak_mb "))
        .next_back()
        .and_then(|v| v.parse().ok());
    if !out.status.success() && !stderr.contains("stopped after") {
        bail!("datafree {} failed: {}", args.join(" "), stderr.trim());
    }
    Ok(peak)
}

/// The words of `s` as arguments (flags and numbers only: paths go in as arguments of their own).
fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// PyTorch's GDFQ warm-up and student iterations: (warm-up ms, student ms, peak MB).
fn torch_gdfq(py: &Path, batch: usize, threads: usize, reps: usize) -> Result<[Option<f64>; 3]> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gdfq_iteration.py");
    let out = Command::new(py)
        .arg(&script)
        .args(["--device", "cpu", "--batch", &batch.to_string()])
        .args([
            "--threads",
            &threads.to_string(),
            "--reps",
            &reps.to_string(),
        ])
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("{}: unexpected output {text}", script.display()))?;
    Ok([
        v["warmup_ms"].as_f64(),
        v["full_ms"].as_f64(),
        v["peak_mb"].as_f64(),
    ])
}

/// The x86 features that decide which kernels run, as the processor reports them.
fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let names = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
            (
                "avx512bf16",
                std::arch::is_x86_feature_detected!("avx512bf16"),
            ),
        ];
        let on: Vec<&str> = names.iter().filter(|n| n.1).map(|n| n.0).collect();
        on.join(" ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() -> Result<()> {
    datafree::kernels::tune_process();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child-cli") {
        let code = datafree::cli::main_with(
            std::iter::once("datafree".to_string()).chain(args[1..].iter().cloned()),
        );
        if let Some(p) = datafree::io::peak_rss_mb() {
            println!("peak_mb {p}");
        }
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            2
        });
    }
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let iters: usize = value("--iters").map_or(Ok(12), |v| v.parse())?;
    let threads: usize = value("--threads").map_or(Ok(2), |v| v.parse())?;
    let batch: usize = value("--batch").map_or(Ok(64), |v| v.parse())?;
    anyhow::ensure!(
        iters >= 4,
        "--iters must be at least 4 (two are left out per phase)"
    );
    let cases: Vec<String> = match value("--cases") {
        Some(c) => c.split(',').map(str::to_string).collect(),
        None => CASES.iter().map(|c| c.to_string()).collect(),
    };
    let json = flag("--json");
    let dir = tempfile::tempdir()?;
    let teacher = match value("--teacher") {
        Some(t) => PathBuf::from(t),
        None => {
            let p = dir.path().join("resnet20.onnx");
            std::fs::write(&p, fixtures::resnet20(10, 20).encode_to_vec())?;
            p
        }
    };
    let python = (!flag("--no-pytorch")).then(common::torch_python).flatten();
    let t = teacher.display().to_string();
    let common = |out: &str, bits: &str| {
        let mut a = vec![
            "compress".to_string(),
            t.clone(),
            "--out".into(),
            out.into(),
        ];
        a.extend(words(&format!("--bits {bits} --seed 0 --force")));
        a
    };
    let mut rows = Vec::new();
    for case in &cases {
        if !json {
            eprintln!("measuring {case}");
        }
        let out = dir.path().join(case);
        let o = out.display().to_string();
        match case.as_str() {
            "gdfq" => {
                let mut a = common(&o, "w4a4");
                a.extend(words(&format!(
                    "--method gdfq --preset quick --epochs 2 --warmup-epochs 1 --iters-per-epoch {iters} --batch {batch} {QUIET}"
                )));
                let peak = run_cli(&a, threads)?;
                let lines = log_lines(&out.join("metrics.jsonl"))?;
                // The last warm-up iteration also sets the activation grids: left out.
                let warm = per_iter_ms(&lines, |i, _| i >= 2 && i + 1 < iters);
                let student = per_iter_ms(&lines, |i, _| i >= iters + 2);
                let torch = match &python {
                    Some(py) => torch_gdfq(py, batch, threads, iters)?,
                    None => [None; 3],
                };
                rows.push(Row {
                    what: "GDFQ warm-up iteration (generator step + range observation)".into(),
                    ours_ms: warm,
                    ours_peak_mb: peak,
                    torch_ms: torch[0],
                    torch_peak_mb: torch[2],
                });
                rows.push(Row {
                    what: "GDFQ student iteration (generator step + w4a4 student step)".into(),
                    ours_ms: student,
                    ours_peak_mb: peak,
                    torch_ms: torch[1],
                    torch_peak_mb: torch[2],
                });
            }
            "autorecon" => {
                // The search logs every 10 iterations: 3 logged spans after the first.
                let total = 40;
                let mut a = common(&o, "w4a4");
                a.extend(words(&format!(
                    "--method autorecon --search-epochs 1 --search-iters-per-epoch {total} --search-batch {batch} --search-checkpoint-every 0 --search-stop-after {total}"
                )));
                let peak = run_cli(&a, threads)?;
                let lines = log_lines(&out.join("search/alpha.jsonl"))?;
                rows.push(Row {
                    what: "AutoReCon supernet search iteration".into(),
                    ours_ms: per_iter_ms(&lines, |i, _| i >= 10),
                    ours_peak_mb: peak,
                    torch_ms: None,
                    torch_peak_mb: None,
                });
            }
            "cpsc" => {
                let student = dir.path().join("resnet8.onnx").display().to_string();
                run_cli(
                    &[
                        words("student --arch resnet8 --classes 10 --input 3x32x32 --seed 0 --out"),
                        vec![student.clone()],
                    ]
                    .concat(),
                    threads,
                )?;
                let mut a = common(&o, "fp32");
                a.extend(words(&format!(
                    "--method cpsc --batch {batch} --epochs 2 --warmup-epochs 1 --iters-per-epoch {iters} --stop-after {iters} {QUIET}"
                )));
                a.extend(["--student".to_string(), student]);
                let peak = run_cli(&a, threads)?;
                let lines = log_lines(&out.join("metrics.jsonl"))?;
                rows.push(Row {
                    what: "CPSC round (generator steps + student steps), ResNet-20 -> ResNet-8"
                        .into(),
                    ours_ms: per_iter_ms(&lines, |i, _| i >= 2),
                    ours_peak_mb: peak,
                    torch_ms: None,
                    torch_peak_mb: None,
                });
            }
            other => bail!("unknown case {other}; cases: {}", CASES.join(", ")),
        }
    }
    let cpu = format!("{} ({})", cpu_model(), cpu_features());
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "case": r.what, "ours_ms": r.ours_ms, "pytorch_ms": r.torch_ms,
                    "ours_peak_mb": r.ours_peak_mb, "pytorch_peak_mb": r.torch_peak_mb,
                })
            })
            .collect();
        let all = serde_json::json!({"cpu": cpu, "threads": threads, "batch": batch,
            "teacher": t, "rows": v});
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
    println!("{cpu}; batch {batch}, f32, {threads} threads; teacher {t}");
    println!(
        "| iteration | datafree ms | PyTorch ms | datafree/PyTorch | peak MB datafree / PyTorch |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        let ratio = match (r.ours_ms, r.torch_ms) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {ratio} | {} / {} |",
            r.what,
            f(r.ours_ms),
            f(r.torch_ms),
            f(r.ours_peak_mb),
            f(r.torch_peak_mb)
        );
    }
    if python.is_none() && !flag("--no-pytorch") {
        println!(
            "PyTorch column skipped: no .venv-bench (run scripts/setup-bench.sh) and DATAFREE_TORCH_PYTHON is unset"
        );
    }
    Ok(())
}
