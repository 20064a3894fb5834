//! The command-line interface: argument parsing (clap) and dispatch to the library. Exit codes:
//! 0 success, 1 a check did not pass, 2 bad input or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::onnx;
use crate::verify::ort_runtime;

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
        /// Print one JSON document (schema in README) instead of the human summary.
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

/// Runs the CLI; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, no backtrace: the chain of contexts joined by ": ".
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inspect { model, json } => {
            let loaded = onnx::load_model(&model)?;
            let report = onnx::inspect::inspect(&loaded);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::report::render_inspect(&report));
            }
            Ok(ExitCode::SUCCESS)
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
