//! The command-line interface: argument parsing (clap, the flag structs in `args`) and dispatch
//! to the library. Exit codes: 0 success, 1 a check did not pass, 2 bad input or usage.

pub mod args;
mod distil;
mod student;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::data::{self, Preprocess};
use crate::onnx;
use crate::teacher::Teacher;
use crate::verify::engine::EngineKind;
use crate::verify::{eval, ort_runtime};
pub use args::{CompressArgs, DataArgs, PreprocessArgs};

#[derive(Parser, Debug)]
#[command(
    name = "datafree",
    version,
    about = "Compress an ONNX image classifier to a low-bit QDQ ONNX model without its training data",
    long_about = "datafree reads a teacher classifier (ONNX), uses only what the model itself carries \
                  (BatchNormalization running statistics) to reconstruct training signal, and produces \
                  a quantized ONNX model verified in ONNX Runtime.",
    after_help = "Exit codes: 0 success, 1 a check did not pass, 2 bad input or usage."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report what a teacher model carries: signature, ops, parameters, BatchNormalization
    /// statistics (the only data a data-free method has) and what later stages can lower.
    Inspect {
        /// The ONNX model file.
        model: PathBuf,
        #[command(flatten)]
        pre: PreprocessArgs,
        /// Print one JSON document (schema in README) instead of the human summary.
        #[arg(long)]
        json: bool,
    },
    /// Accuracy of a float model on labelled data (top-1, top-5, per class in JSON).
    Eval {
        /// The ONNX model file.
        model: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Engine that runs the model.
        #[arg(long, value_enum, default_value_t = EngineKind::Candle)]
        engine: EngineKind,
        /// Images per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Evaluate only the first N images.
        #[arg(long)]
        limit: Option<usize>,
        /// Intra-op threads for ORT (0 = its default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print one JSON document instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Run candle, ONNX Runtime and tract side by side on the same inputs and report max absolute
    /// and relative logit differences and prediction disagreements (exit 1 when candle vs ORT
    /// exceeds --tolerance or any prediction differs).
    Check {
        /// The ONNX model file.
        model: PathBuf,
        /// Labelled data to run on (same forms as `eval --data`); without it, seeded N(0,1) noise.
        #[arg(long)]
        data: Option<String>,
        #[command(flatten)]
        pre: PreprocessArgs,
        /// Number of images (noise inputs, or the first N of --data).
        #[arg(long, default_value_t = 256)]
        limit: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Seed of the noise inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest acceptable |candle - ORT| logit difference.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
        #[arg(long)]
        json: bool,
    },
    /// Compress a teacher into a quantized QDQ ONNX student without data, verify it in ONNX
    /// Runtime, and write DIR/student.onnx and DIR/report.json.
    Compress {
        /// The teacher ONNX model.
        teacher: PathBuf,
        /// Output folder (refused when not empty, unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite student.onnx and report.json in a non-empty --out.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        opts: Box<CompressArgs>,
        /// Labelled data to MEASURE the student on (never used to compress).
        #[arg(long)]
        data: Option<String>,
        #[command(flatten)]
        pre: PreprocessArgs,
        /// Print the report as JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Search a generator architecture for a teacher (AutoReCon): a supernet trained on the
    /// teacher's BN statistics and predictions; writes DIR/genotype.json (for `compress --method
    /// autorecon --genotype`), DIR/genotype.svg, DIR/alpha.jsonl + alpha.svg (architecture
    /// weights over time) and DIR/search.json.
    Search {
        /// The teacher ONNX model (with BatchNormalization kept).
        teacher: PathBuf,
        /// Output folder (refused when not empty, unless --force or --resume DIR).
        #[arg(long)]
        out: PathBuf,
        /// Search into a non-empty --out (its files are replaced).
        #[arg(long)]
        force: bool,
        /// Budget: `quick` (width 16, batch 32, 10 x 100 iterations, hard sampling: about 30
        /// min on 2 CPU cores for a CIFAR ResNet-20) or `paper` (width 64, batch 64, 100 x 100).
        #[arg(long, value_enum, default_value_t = crate::search::SearchPreset::Quick)]
        preset: crate::search::SearchPreset,
        /// Seed of the supernet's initialisation, alpha, latents, labels and Gumbel noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        search: args::SearchArgs,
        /// Where the search runs: cpu, or cuda[:N] (needs a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
        #[command(flatten)]
        pre: PreprocessArgs,
        /// Continue the search whose output folder (with its checkpoint/) is DIR.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// alpha.jsonl gets a line every N iterations.
        #[arg(long, default_value_t = 10)]
        log_every: usize,
        /// Stop with an error after N iterations, as if killed (tests resume).
        #[arg(long, hide = true)]
        stop_after: Option<usize>,
        /// Print search.json instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Run a pipeline file (pipelines/*.toml): every hyper-parameter of a recipe in one file,
    /// run as the `compress` command line it stands for.
    #[command(
        after_help = "Example: datafree run pipelines/gdfq-cifar.toml --teacher T.onnx --set compress.bits=w6a6 -- --data test_batch.bin"
    )]
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Teacher model (overrides the file's `teacher`).
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// Output folder [default: out/<pipeline name>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a value of the file: KEY=VALUE, e.g. compress.epochs=20 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the compress command line and stop.
        #[arg(long)]
        dry_run: bool,
        /// More `compress` flags after `--` (--data, --force, --resume, ...).
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// CI gate for a quantized ONNX model (any tool's) against its reference: exit 0 when the
    /// thresholds hold, 1 when not, 2 on bad input; JSON and JUnit XML reports.
    Verify {
        /// The quantized model.
        student: PathBuf,
        /// The float reference (the teacher).
        #[arg(long)]
        reference: PathBuf,
        /// Labelled data; without it the inputs are synthesized from the reference alone
        /// (class-balanced images it classifies with confidence), and agreement is counted
        /// where it is confident.
        #[arg(long)]
        data: Option<String>,
        #[command(flatten)]
        pre: PreprocessArgs,
        /// Use only the first N images of --data.
        #[arg(long)]
        limit: Option<usize>,
        /// Images to synthesize when there is no --data.
        #[arg(long, default_value_t = 128)]
        images: usize,
        /// Optimisation steps of the synthesized images.
        #[arg(long, default_value_t = 100)]
        synth_steps: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Minimum fraction of images where student and reference agree (without --data: of
        /// the synthesized images the reference classifies with confidence).
        #[arg(long, default_value_t = 0.99)]
        min_agreement: f64,
        /// Maximum top-1 drop in points (with --data).
        #[arg(long, default_value_t = 1.0)]
        max_top1_drop: f64,
        /// Maximum mean relative logit error (centered logits) without --data: 1 means logits
        /// as far off as they are spread. Good w8a8 students measured 0.02 to 0.41, broken or
        /// poor w4a4 ones up to 1.8; 0 turns the check off.
        #[arg(long, default_value_t = 1.0)]
        max_logit_error: f64,
        /// Also require datafree's simulation to match ORT within this max |logit diff|.
        #[arg(long)]
        max_sim_diff: Option<f64>,
        #[arg(long)]
        json: bool,
        /// Write a JUnit XML report here.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Write a freshly initialised student architecture as ONNX (BN kept, NCHW, dynamic
    /// batch), to distil a teacher into with `compress --method cpsc --student`.
    Student {
        #[arg(long, value_enum)]
        arch: crate::arch::Arch,
        /// Number of classes (the teacher's).
        #[arg(long)]
        classes: usize,
        /// Input shape CxHxW (the teacher's).
        #[arg(long, default_value = "3x32x32", value_parser = student::parse_chw)]
        input: (usize, usize, usize),
        /// The ONNX file to write.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the initial weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Overwrite --out.
        #[arg(long)]
        force: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the environment: ONNX Runtime library location and version.
    Doctor {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The preprocessing of a model's inputs: the flags, else its metadata, else its BN statistics.
fn preprocess(a: &PreprocessArgs, model: &onnx::LoadedModel) -> anyhow::Result<Preprocess> {
    // The teacher's own resolution (flags, metadata, or inferred on its core).
    Ok(crate::teacher::Teacher::new(model.clone(), a.given()?)?
        .domain
        .preprocess)
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> ExitCode {
    main_with(std::env::args_os())
}

/// Runs the CLI on `args` (the program name first), as `main` does on the process's own: for
/// tools that drive the CLI inside their own process (examples/iteration_bench.rs).
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, no backtrace: the chain of contexts joined by ": ".
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

/// The exit code of a run whose student failed (student file, why) or passed its self-check;
/// the reason goes to stderr as the run's last line.
fn self_check_exit(failed: Option<(&str, &str)>) -> ExitCode {
    match failed {
        Some((student, why)) => {
            eprintln!("error: {student}: {why}");
            ExitCode::from(1)
        }
        None => ExitCode::SUCCESS,
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            pipeline,
            teacher,
            out,
            set,
            dry_run,
            extra,
        } => {
            let p = crate::pipeline::recipe::load(&pipeline, &set)?;
            let teacher = teacher.or(p.teacher.clone()).with_context(|| {
                format!(
                    "{}: no teacher in the file; pass --teacher",
                    pipeline.display()
                )
            })?;
            let out = out.unwrap_or_else(|| PathBuf::from("out").join(&p.name));
            let mut args = p.compress_args(&teacher, &out)?;
            args.extend(extra);
            eprintln!("pipeline {}: datafree {}", p.name, args.join(" "));
            if dry_run {
                return Ok(ExitCode::SUCCESS);
            }
            let cli = Cli::try_parse_from(std::iter::once("datafree".to_string()).chain(args))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}: {}",
                        pipeline.display(),
                        e.to_string()
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .trim_start_matches("error: ")
                    )
                })?;
            run(cli)
        }
        Command::Student {
            arch,
            classes,
            input,
            out,
            seed,
            force,
            json,
        } => student::run(arch, classes, input, &out, seed, force, json),
        Command::Inspect { model, pre, json } => {
            let loaded = onnx::load_model(&model)?;
            onnx::check::parameters(&loaded)?;
            let given = pre.given()?;
            // A model without an NCHW image input is still described; only the domain is left out.
            let (report, domain) = match crate::teacher::Teacher::new(loaded.clone(), given) {
                Ok(t) => (t.info, Some(t.domain)),
                Err(_) => (crate::teacher::inspect::inspect(&loaded), None),
            };
            if json {
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    #[serde(flatten)]
                    report: &'a crate::teacher::inspect::InspectReport,
                    input_domain: Option<&'a crate::teacher::InputDomain>,
                }
                let out = Out {
                    report: &report,
                    input_domain: domain.as_ref(),
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!(
                    "{}",
                    crate::report::render_inspect(&report, domain.as_ref())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            model,
            data: d,
            engine,
            batch,
            limit,
            threads,
            json,
        } => {
            let loaded = onnx::load_model(&model)?;
            let (_, _, h, w) = eval::input_geometry(&loaded)?;
            let pre = preprocess(&d.pre, &loaded)?;
            let mut ds = data::open(&d.data, h, w)?;
            if let Some(n) = limit {
                ds.truncate(n);
            }
            let r = eval::evaluate(&loaded, &ds, engine, &pre, batch, threads)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: top-1 {:.2}%  top-5 {:.2}%  on {} images of {} ({}), engine {}, {:.1} s ({:.0} images/s)",
                    r.model,
                    r.top1,
                    r.top5,
                    r.images,
                    r.data,
                    r.data_format,
                    r.engine,
                    r.wall_seconds,
                    r.images_per_second
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            model,
            data: d,
            pre,
            limit,
            batch,
            seed,
            tolerance,
            json,
        } => {
            let loaded = onnx::load_model(&model)?;
            let (_, _, h, w) = eval::input_geometry(&loaded)?;
            let pre = preprocess(&pre, &loaded)?;
            let ds = d.map(|s| data::open(&s, h, w)).transpose()?;
            let r = eval::check(&loaded, ds.as_ref(), &pre, limit, batch, seed, tolerance)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{} on {} images ({})", r.model, r.images, r.inputs);
                println!(
                    "  {:<16} {:>12} {:>12} {:>14}",
                    "engines", "max |diff|", "max rel", "argmax differ"
                );
                for p in &r.pairs {
                    println!(
                        "  {:<16} {:>12.3e} {:>12.3e} {:>14}",
                        format!("{} vs {}", p.a, p.b),
                        p.max_abs,
                        p.max_rel,
                        p.argmax_disagreements
                    );
                }
                for e in &r.engines {
                    let top1 = e.top1.map_or(String::new(), |t| format!(", top-1 {t:.2}%"));
                    println!(
                        "  {:<7} {:.2} s{top1}",
                        e.engine.to_string(),
                        e.wall_seconds
                    );
                }
                println!(
                    "{}: candle vs ort within {:.0e} with identical predictions",
                    if r.pass { "PASS" } else { "FAIL" },
                    r.tolerance
                );
            }
            Ok(if r.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Compress {
            teacher,
            out,
            force,
            opts,
            data: d,
            pre,
            json,
        } => {
            let teacher = Teacher::open(&teacher, pre.given()?)?;
            let ds = d
                .map(|s| data::open(&s, teacher.height, teacher.width))
                .transpose()?;
            if opts.method == crate::methods::Method::Cpsc {
                return distil::run(&teacher, &out, force, &opts, ds.as_ref(), json);
            }
            // Bad settings are refused before anything is written.
            let cfg = opts.config()?;
            cfg.check(&teacher)?;
            // Resuming into the run's own folder is the normal case.
            let same = opts.gdfq.resume.as_deref() == Some(out.as_path());
            crate::pipeline::prepare_out_dir(&out, force || same)?;
            let quiet = json;
            let mut log = |m: &str| {
                if !quiet {
                    eprintln!("{m}");
                }
            };
            let r = crate::pipeline::compress(&teacher, &out, &cfg, ds.as_ref(), &mut log)?;
            let path = crate::pipeline::write_report(&out, &r)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", crate::report::render_compress(&r));
                println!("report: {}", path.display());
            }
            Ok(self_check_exit(
                r.self_check.as_deref().map(|why| (r.student.as_str(), why)),
            ))
        }
        Command::Search {
            teacher,
            out,
            force,
            preset,
            seed,
            search,
            device,
            pre,
            resume,
            log_every,
            stop_after,
            json,
        } => {
            let teacher = Teacher::open(&teacher, pre.given()?)?;
            let cfg = search.config(preset, seed)?;
            anyhow::ensure!(
                teacher.has_bn_statistics(),
                "{}: the AutoReCon search needs the teacher's BatchNormalization statistics and this teacher has none (BN was folded at export); re-export it with BN kept",
                teacher.name()
            );
            let device = device.open()?;
            let same = resume.as_deref() == Some(out.as_path());
            crate::pipeline::prepare_out_dir(&out, force || same)?;
            let io = crate::search::SearchIo {
                out: &out,
                resume: resume.as_deref(),
                checkpoint_every: search.search_checkpoint_every,
                log_every,
                stop_after,
            };
            let quiet = json;
            let (_, report) =
                crate::methods::autorecon::search(&teacher, cfg, &io, &device, &mut |m| {
                    if !quiet {
                        eprintln!("{m}");
                    }
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::report::render_search(&report));
                println!("genotype: {}", out.join("genotype.json").display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            student,
            reference,
            data: d,
            pre,
            limit,
            images,
            synth_steps,
            seed,
            min_agreement,
            max_top1_drop,
            max_logit_error,
            max_sim_diff,
            json,
            junit,
        } => {
            let s = onnx::load_model(&student)?;
            let teacher = Teacher::open(&reference, pre.given()?)?;
            let r = &teacher.model;
            let mut ds = d
                .map(|x| data::open(&x, teacher.height, teacher.width))
                .transpose()?;
            if let (Some(d), Some(n)) = (ds.as_mut(), limit) {
                d.truncate(n);
            }
            let synthesized = match &ds {
                Some(_) => None,
                None => Some(crate::verify::synth::synthesize(
                    &teacher,
                    crate::verify::synth::SynthConfig {
                        steps: synth_steps,
                        ..crate::verify::synth::SynthConfig::verification(
                            images,
                            seed,
                            teacher.classes,
                        )
                    },
                )?),
            };
            let inputs = match (&ds, &synthesized) {
                (Some(d), _) => crate::verify::compare::Inputs::Data(d),
                (None, Some(s)) => crate::verify::compare::Inputs::Synthesized(s),
                (None, None) => unreachable!("synthesized without data"),
            };
            let c = crate::verify::compare::compare(
                &s,
                &teacher,
                &inputs,
                100,
                max_sim_diff.is_some(),
            )?;
            let checks = crate::verify::gate::checks(
                &c,
                &crate::verify::gate::Thresholds {
                    min_agreement,
                    max_top1_drop,
                    max_logit_error: (max_logit_error > 0.0).then_some(max_logit_error),
                    max_sim_diff,
                },
            );
            let g = crate::verify::gate::GateReport {
                student: s.path.display().to_string(),
                reference: r.path.display().to_string(),
                pass: checks.iter().all(|c| c.pass),
                checks,
                comparison: c,
            };
            if let Some(j) = junit {
                crate::io::write_atomic(&j, crate::verify::gate::junit(&g).as_bytes())
                    .with_context(|| format!("{}: cannot write JUnit report", j.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                print!("{}", crate::report::render_gate(&g));
            }
            Ok(if g.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Doctor { json } => {
            let loc = ort_runtime::library_location();
            let version = ort_runtime::version();
            if json {
                let v = serde_json::json!({
                    "datafree_version": env!("CARGO_PKG_VERSION"),
                    "ort_library": loc.path,
                    "ort_library_from": loc.from,
                    "ort_version": version.as_ref().ok(),
                    "ort_error": version.as_ref().err().map(|e| format!("{e:#}")),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("datafree {}", env!("CARGO_PKG_VERSION"));
                println!(
                    "ONNX Runtime library: {} (from {})",
                    loc.path.display(),
                    loc.from
                );
                if let Ok(v) = &version {
                    println!("ONNX Runtime version: {v} (loaded)");
                }
            }
            version.map(|_| ExitCode::SUCCESS)
        }
    }
}
