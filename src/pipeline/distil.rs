//! `datafree compress --method cpsc --student S.onnx`: data-free distillation into another
//! architecture. Teacher and student are checked against each other (input shape, classes),
//! the student is trained from scratch by CPSC-DFKD (or a baseline of the same loop), written
//! as float ONNX (DIR/student.onnx, BN folded or kept), verified against the teacher in ONNX
//! Runtime, and, with `--bits wNaM`, quantized through the `compress` pipeline into DIR/quantized/.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device};
use serde::Serialize;

use super::{BnMode, CompressConfig, Report};
use crate::data::Dataset;
use crate::methods::RunSettings;
use crate::teacher::Teacher;
use crate::train::cpsc::{self, Metrics};
use crate::verify::compare::{self, Comparison, Inputs};

/// Where the student's starting weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StudentInit {
    /// The file's weights (a `datafree student` file is freshly initialised already).
    Keep,
    /// Fresh weights: Kaiming-normal convs, uniform Gemm/MatMul, BN 1/0 with statistics 0/1.
    Random,
}

#[derive(Debug, Clone)]
pub struct DistilConfig {
    pub student: PathBuf,
    pub student_init: StudentInit,
    pub train: cpsc::Config,
    pub bn: BnMode,
    /// Quantize the distilled student with these settings (`--bits wNaM`); None = float only.
    pub quantize: Option<CompressConfig>,
    pub run: RunSettings,
    pub device: Device,
    pub verify_images: usize,
}

/// report.json of a distillation.
#[derive(Debug, Serialize)]
pub struct DistilReport {
    pub tool: String,
    pub teacher: String,
    pub teacher_sha256: String,
    pub teacher_params: usize,
    pub teacher_macs: Option<u64>,
    /// The architecture file the student started from.
    pub student_start: String,
    pub student_init: StudentInit,
    pub student: String,
    pub student_sha256: String,
    pub student_params: usize,
    pub student_macs: Option<u64>,
    pub config: cpsc::Config,
    pub bn: BnMode,
    pub bn_folded: usize,
    pub generator_params: usize,
    pub generator_macs: u64,
    pub train_seconds: f64,
    pub resumed_from_iter: Option<usize>,
    /// (round, top-1 %) of the student on the measuring data.
    pub eval_curve: Vec<(usize, f64)>,
    pub final_losses: Option<Metrics>,
    pub verification_synthetic: Comparison,
    pub verification_data: Option<Comparison>,
    /// Why the distilled student cannot be right ([`super::report::distil_check`]); None when
    /// it passed.
    pub self_check: Option<String>,
    /// The quantized student's report (DIR/quantized/report.json), with `--bits wNaM`.
    pub quantized: Option<Report>,
    pub wall_seconds: f64,
}

/// Opens the student and refuses one that cannot stand in for the teacher, a teacher the
/// variant cannot learn from, or settings that cannot run (before anything is written, so a
/// refusal leaves no folder behind).
pub fn open_student(teacher: &Teacher, cfg: &DistilConfig) -> Result<Teacher> {
    cfg.train.validate()?;
    cfg.train
        .check_teacher(&teacher.name(), teacher.bn().bn_count)?;
    let file = crate::onnx::load_model(&cfg.student)?;
    let file = match cfg.student_init {
        StudentInit::Keep => file,
        StudentInit::Random => crate::onnx::LoadedModel {
            proto: reinitialise(&file.proto, cfg.train.seed)?,
            ..file
        },
    };
    let s = Teacher::new(file, Some(teacher.preprocess().clone()))?;
    let (t_shape, s_shape) = (teacher.input_shape(1), s.input_shape(1));
    ensure!(
        t_shape[1..] == s_shape[1..] && teacher.classes == s.classes,
        "student {} (input {}x{}x{}, {} classes) does not fit teacher {} (input {}x{}x{}, {} classes)",
        s.name(),
        s_shape[1],
        s_shape[2],
        s_shape[3],
        s.classes,
        teacher.name(),
        t_shape[1],
        t_shape[2],
        t_shape[3],
        teacher.classes
    );
    ensure!(
        s.interface.is_plain(),
        "student {}: give the student as NCHW logits (no input Transpose, no final Softmax)",
        s.name()
    );
    if cfg.train.variant == cpsc::Variant::Cpsc && cfg.train.contrastive_weight > 0.0 {
        for (role, m) in [("teacher", teacher), ("student", &s)] {
            ensure!(
                crate::lower::penultimate_of(&m.model).is_some(),
                "{role} {}: the contrastive loss takes the features its final classifier layer (Gemm, MatMul or Conv) reads, and none was found walking back from the output; use --contrastive-weight 0",
                m.name()
            );
        }
    }
    ensure!(
        s.bn().bn_count > 0 || cfg.train.variant == cpsc::Variant::Dfad,
        "student {}: has no BatchNormalization layers; CPSC trains students with BN (use an architecture from `datafree student`)",
        s.name()
    );
    Ok(s)
}

/// Runs the distillation from `start` (from [`open_student`]); `data` only MEASURES the student.
pub fn distil(
    teacher: &Teacher,
    start: Teacher,
    out: &Path,
    cfg: &DistilConfig,
    data: Option<&Dataset>,
    log: &mut dyn FnMut(&str),
) -> Result<DistilReport> {
    let t0 = Instant::now();
    let tp = teacher.program(&cfg.device)?;
    let mut sp = crate::lower::lower_with(&start.model, &cfg.device, DType::F32, true)?;
    log(&format!(
        "{}: {} -> {} ({} parameters, {} BN layers), {} x {} rounds of {}+{} steps at batch {}",
        crate::cli_name(&cfg.train.variant),
        teacher.name(),
        start.name(),
        start.info.parameters.count,
        start.bn().bn_count,
        cfg.train.epochs,
        cfg.train.rounds_per_epoch,
        cfg.train.generator_steps,
        cfg.train.student_steps,
        cfg.train.batch
    ));
    let eval_fn = |p: &crate::lower::Program| -> Result<f64> {
        crate::methods::program_top1(
            p,
            teacher,
            data.expect("eval only with data"),
            cfg.run.eval_images,
        )
    };
    let eval_ref: &cpsc::EvalFn = &eval_fn;
    let io = cpsc::Io {
        out,
        resume: cfg.run.resume.as_deref(),
        checkpoint_every: cfg.run.checkpoint_every,
        grid_every: cfg.run.grid_every,
        domain: &teacher.domain,
        stop_after: cfg.run.stop_after,
        eval: match (data, cfg.run.eval_every) {
            (Some(_), Some(every)) => Some((every, eval_ref)),
            _ => None,
        },
    };
    let outcome = cpsc::train(
        &tp,
        &teacher.name(),
        &mut sp,
        &start.model,
        teacher.classes,
        teacher.image(),
        cfg.train.clone(),
        &io,
    )?;
    let trained = crate::export::with_initializers(&start.model.proto, &outcome.values)?;
    let trained = crate::onnx::LoadedModel {
        proto: trained,
        ..start.model.clone()
    };
    let mut trained = trained;
    trained.proto.metadata_props = metadata(teacher, cfg)
        .into_iter()
        .map(|(key, value)| crate::onnx::pb::StringStringEntryProto { key, value })
        .collect();
    let (proto, bn_folded) = match cfg.bn {
        BnMode::Fold => crate::export::fold_bn(&trained)?,
        BnMode::Keep => (trained.proto.clone(), 0),
    };
    let student_path = out.join("student.onnx");
    crate::onnx::builder::write_model(&student_path, &proto)?;
    let student = crate::onnx::load_model(&student_path)?;
    crate::onnx::check::parameters(&student)
        .with_context(|| format!("{}: the trained student", student_path.display()))?;
    log(&format!(
        "wrote {} ({} bytes, BN folded: {bn_folded})",
        student_path.display(),
        student.size_bytes
    ));
    let synthesized = crate::verify::synth::synthesize(
        teacher,
        crate::verify::synth::SynthConfig {
            images: cfg.verify_images,
            seed: cfg.train.seed.wrapping_add(1000),
            ..Default::default()
        },
    )?;
    let verification_synthetic = compare::compare(
        &student,
        teacher,
        &Inputs::Synthesized(&synthesized),
        64,
        false,
    )?;
    let verification_data = data
        .map(|d| compare::compare(&student, teacher, &Inputs::Data(d), 100, false))
        .transpose()?;
    let self_check =
        super::report::distil_check(&verification_synthetic, verification_data.as_ref());
    if let Some(why) = &self_check {
        log(&format!("CHECK FAILED: {why}"));
    }
    let student_info = crate::teacher::inspect::inspect(&student);
    let quantized = match &cfg.quantize {
        Some(q) => {
            let dir = out.join("quantized");
            super::prepare_out_dir(&dir, true)?;
            // Quantized from the student with its BN layers and running statistics: the
            // ranges of ptq-bn and the BN targets of GDFQ come from them.
            let reference = if bn_folded > 0 {
                let path = dir.join("distilled-bn.onnx");
                crate::onnx::builder::write_model(&path, &trained.proto)?;
                crate::onnx::load_model(&path)?
            } else {
                student.clone()
            };
            let distilled = Teacher::new(reference, Some(teacher.preprocess().clone()))?;
            log(&format!(
                "quantizing the distilled student: {} {}",
                q.bits,
                q.method.name()
            ));
            let r = super::compress(&distilled, &dir, q, data, log)?;
            super::write_report(&dir, &r)?;
            Some(r)
        }
        None => None,
    };
    Ok(DistilReport {
        tool: format!("datafree {}", env!("CARGO_PKG_VERSION")),
        teacher: teacher.name(),
        teacher_sha256: teacher.model.sha256.clone(),
        teacher_params: teacher.info.parameters.count,
        teacher_macs: teacher.info.macs_per_image,
        student_start: cfg.student.display().to_string(),
        student_init: cfg.student_init,
        student: student_path.display().to_string(),
        student_sha256: student.sha256.clone(),
        student_params: student_info.parameters.count,
        student_macs: student_info.macs_per_image,
        config: cfg.train.clone(),
        bn: cfg.bn,
        bn_folded,
        generator_params: outcome.generator_params,
        generator_macs: outcome.generator_macs,
        train_seconds: outcome.train_seconds,
        resumed_from_iter: outcome.resumed_from,
        eval_curve: crate::train::engine::eval_curve(&outcome.history),
        final_losses: outcome.history.last().cloned(),
        verification_synthetic,
        verification_data,
        self_check,
        quantized,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The distilled student's metadata: what made it, and the teacher's preprocessing.
fn metadata(teacher: &Teacher, cfg: &DistilConfig) -> Vec<(String, String)> {
    super::report::provenance(
        teacher,
        &[
            ("datafree.method", crate::cli_name(&cfg.train.variant)),
            ("datafree.bits", "fp32".to_string()),
            ("datafree.seed", cfg.train.seed.to_string()),
        ],
    )
}

/// `model` with fresh weights drawn from `seed`: Kaiming-normal Conv weights, PyTorch's uniform
/// Gemm/MatMul weights, zero biases, BN scale 1 and shift 0 with statistics 0/1. Any
/// classifier can so be trained from scratch as a student.
fn reinitialise(
    model: &crate::onnx::pb::ModelProto,
    seed: u64,
) -> Result<crate::onnx::pb::ModelProto> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal, Uniform};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let mut values: std::collections::HashMap<String, Vec<f32>> = Default::default();
    let dims: std::collections::HashMap<&str, Vec<usize>> = graph
        .initializer
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dims.iter().map(|&d| d as usize).collect(),
            )
        })
        .collect();
    for n in &graph.node {
        let shape = |i: usize| {
            n.input
                .get(i)
                .and_then(|x| dims.get(x.as_str()).map(|d| (x, d)))
        };
        match n.op_type.as_str() {
            "Conv" | "Gemm" | "MatMul" => {
                let Some((w, d)) = shape(1) else { continue };
                let count: usize = d.iter().product();
                let v: Vec<f32> = if n.op_type == "Conv" {
                    let fan_in = (count / d[0].max(1)).max(1) as f32;
                    let dist = Normal::new(0.0, (2.0 / fan_in).sqrt()).expect("positive std");
                    (0..count).map(|_| dist.sample(&mut r)).collect()
                } else {
                    // MatMul weights are [in, out]; Gemm's [out, in] (transB, as exporters
                    // write them). PyTorch's Linear: U(-1/sqrt(in), 1/sqrt(in)).
                    let fan_in = if n.op_type == "MatMul" {
                        d[0]
                    } else {
                        d[d.len() - 1]
                    };
                    let b = 1.0 / (fan_in.max(1) as f32).sqrt();
                    let dist = Uniform::new_inclusive(-b, b).expect("b > 0");
                    (0..count).map(|_| dist.sample(&mut r)).collect()
                };
                values.insert(w.clone(), v);
                if let Some((b, d)) = shape(2) {
                    values.insert(b.clone(), vec![0.0; d.iter().product()]);
                }
            }
            "BatchNormalization" => {
                for (i, v) in [(1, 1.0), (2, 0.0), (3, 0.0), (4, 1.0)] {
                    if let Some((name, d)) = shape(i) {
                        values.insert(name.clone(), vec![v; d.iter().product()]);
                    }
                }
            }
            _ => {}
        }
    }
    crate::export::with_initializers(model, &values)
}
