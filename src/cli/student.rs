//! `datafree student`: writes a fresh student architecture and says what it costs.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, ensure};

use crate::arch::{self, Arch};

/// "CxHxW" (e.g. 3x32x32).
pub fn parse_chw(s: &str) -> Result<(usize, usize, usize), String> {
    let v: Vec<usize> = s
        .split(['x', 'X'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{s}' is not CxHxW, e.g. 3x32x32"))?;
    match v[..] {
        [c, h, w] if c > 0 && h > 0 && w > 0 => Ok((c, h, w)),
        _ => Err(format!(
            "'{s}' is not CxHxW with three positive sizes, e.g. 3x32x32"
        )),
    }
}

pub fn run(
    arch: Arch,
    classes: usize,
    input: (usize, usize, usize),
    out: &Path,
    seed: u64,
    force: bool,
    json: bool,
) -> Result<ExitCode> {
    ensure!(
        force || !out.exists(),
        "{}: exists; pass --force to overwrite it",
        out.display()
    );
    let model = arch::build(arch, classes, input, seed)?;
    crate::onnx::builder::write_model(out, &model)
        .with_context(|| format!("{}: cannot write", out.display()))?;
    let loaded = crate::onnx::load_model(out)?;
    let info = crate::teacher::inspect::inspect(&loaded);
    let summary = serde_json::json!({
        "file": out.display().to_string(),
        "arch": arch,
        "classes": classes,
        "input": [input.0, input.1, input.2],
        "seed": seed,
        "parameters": info.parameters.count,
        "macs_per_image": info.macs_per_image,
        "batch_norm_layers": info.batch_norm.bn_count,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "wrote {} ({}, {classes} classes, input {}x{}x{}): {} parameters, {:.2} M MACs per image, {} BatchNormalization layers",
            out.display(),
            arch.name(),
            input.0,
            input.1,
            input.2,
            info.parameters.count,
            info.macs_per_image.unwrap_or(0) as f64 / 1e6,
            info.batch_norm.bn_count
        );
    }
    Ok(ExitCode::SUCCESS)
}
