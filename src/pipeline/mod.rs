//! `datafree compress`, top to bottom: teacher -> student graph (BN folded or kept) ->
//! quantization plan -> method (ranges, and trained weights for the generator methods) -> QDQ
//! export (DIR/student.onnx, atomically) -> verification in ONNX Runtime against our simulation
//! and the teacher -> report (DIR/report.json). `recipe` reads the declarative pipeline files.

pub mod distil;
pub mod recipe;
pub mod report;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use candle_core::Device;
use serde::Serialize;

use crate::data::Dataset;
use crate::export::{self, PointParams};
use crate::methods::{self, AutoreconSettings, Method, PtqSettings, RunSettings};
use crate::quant::placement::{self, PlanOptions};
use crate::quant::{BitSpec, Scales, WeightClip, WeightScheme};
use crate::teacher::Teacher;
use crate::train::gdfq::Config as TrainConfig;
use crate::verify::compare::{self, Inputs};
pub use report::{Baseline, PLACEMENT, PointReport, Report, write_report};

/// What happens to BatchNormalization in the student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BnMode {
    /// Folded into the preceding conv: the deployable student (ORT fuses it).
    Fold,
    /// Kept as float BatchNormalization (the GDFQ reference's student).
    Keep,
}

/// Every setting of one compression.
#[derive(Debug, Clone)]
pub struct CompressConfig {
    pub method: Method,
    pub bits: BitSpec,
    pub first_last_bits: Option<u8>,
    pub weight_scheme: WeightScheme,
    pub scales: Scales,
    /// `--weight-clip`; unset: the training preset's for the training methods with symmetric
    /// weights, else none.
    pub weight_clip: Option<WeightClip>,
    pub full_range_weights: bool,
    pub int4_weights: bool,
    pub bn: BnMode,
    pub seed: u64,
    /// Noise images for verification.
    pub verify_images: usize,
    /// Also run the other PTQ methods at the same settings, for comparison.
    pub baselines: bool,
    pub ptq: PtqSettings,
    pub train: TrainConfig,
    pub autorecon: AutoreconSettings,
    pub run: RunSettings,
    pub device: Device,
}

impl CompressConfig {
    /// The weight clipping in force: the flag, else the training preset's (symmetric weights
    /// only), else none.
    pub fn weight_clip(&self) -> WeightClip {
        match self.weight_clip {
            Some(w) => w,
            None if self.method.trains() && self.weight_scheme == WeightScheme::Symmetric => {
                self.train.weight_clip
            }
            None => WeightClip::None,
        }
    }

    /// Refuses teachers the method cannot use; called before anything is written.
    pub fn check(&self, teacher: &Teacher) -> Result<()> {
        ensure!(
            self.weight_clip() == WeightClip::None || self.weight_scheme == WeightScheme::Symmetric,
            "--weight-clip mse clips each channel symmetrically: use it with --weight-scheme symmetric"
        );
        if self.method.trains() {
            self.train.validate()?;
            ensure!(
                teacher.bn().bn_count > 0,
                "{}: --method {} needs the teacher's BatchNormalization statistics and this teacher has none (BN was folded at export); re-export it with BN kept, or use --method ptq-noise or zeroq",
                teacher.name(),
                self.method.name()
            );
        }
        Ok(())
    }
}

/// Runs the pipeline; `data` is used only to MEASURE the result.
pub fn compress(
    teacher: &Teacher,
    out: &Path,
    cfg: &CompressConfig,
    data: Option<&Dataset>,
    log: &mut dyn FnMut(&str),
) -> Result<Report> {
    let t0 = Instant::now();
    cfg.check(teacher)?;
    let (folded, bn_folded) = match cfg.bn {
        BnMode::Fold => export::fold_bn(&teacher.model)?,
        BnMode::Keep => (teacher.model.proto.clone(), 0),
    };
    // Zero Pads go into the Convs they feed, so ORT fuses those Convs (exact).
    let (folded, pads_folded) = export::fold_pads(&teacher.derived(folded))?;
    // The student's float graph is the teacher's (node names kept): errors name the teacher's
    // file, and external data stays relative to the teacher's folder.
    let float = teacher.derived(folded);
    let plan = placement::plan(
        &float.proto,
        PlanOptions {
            bits: cfg.bits,
            first_last_bits: cfg.first_last_bits,
            fusion_outputs: cfg.bn == BnMode::Fold,
            reduce_range: !cfg.full_range_weights,
        },
    )?;
    log(&format!(
        "plan: {} layers, {} activation points; BN folded: {bn_folded}, zero Pads folded into Convs: {pads_folded}",
        plan.layers.len(),
        plan.points.len()
    ));
    let tc = Instant::now();
    let weight_clip = cfg.weight_clip();
    let train = TrainConfig {
        weight_clip,
        ..cfg.train.clone()
    };
    let ctx = methods::Context {
        teacher,
        float: &float,
        plan: &plan,
        bits: cfg.bits,
        weight_scheme: cfg.weight_scheme,
        scales: cfg.scales,
        weight_clip,
        bn_folded: cfg.bn == BnMode::Fold,
        seed: cfg.seed,
        ptq: &cfg.ptq,
        train: &train,
        autorecon: &cfg.autorecon,
        run: &cfg.run,
        out,
        data,
        device: &cfg.device,
    };
    let m = methods::run(cfg.method, &ctx, log)?;
    // A trained student was clipped while it trained; a PTQ one is clipped below.
    let clip_ptq = weight_clip.clips() && !cfg.method.trains();
    let clip_inputs = if clip_ptq { ctx.clip_inputs() } else { None };
    let calibration_seconds = tc.elapsed().as_secs_f64();
    let params: PointParams = plan
        .points
        .iter()
        .map(|p| {
            let (lo, hi) = m.ranges[&p.tensor];
            (
                p.tensor.clone(),
                placement::point_params(p.role, (lo, hi), p.bits, cfg.scales),
            )
        })
        .collect();
    let mut student_float = match m.trained {
        Some(t) => teacher.derived(t),
        None => float,
    };
    if clip_ptq {
        student_float = teacher.derived(export::clip_weights(
            &student_float,
            &plan,
            clip_inputs.as_ref(),
        )?);
    }
    let export::Student {
        model: student,
        mut inexact_layers,
    } = export::build_student(
        &student_float,
        &plan,
        &params,
        export::WeightOptions {
            scheme: cfg.weight_scheme,
            scales: cfg.scales,
            int4: cfg.int4_weights,
        },
        &report::metadata(teacher, cfg),
    )?;
    let areas = pooled_areas(&student_float, teacher)?;
    inexact_layers.extend(export::inexact_float_ops(&student, &|n| {
        areas.get(n).copied()
    }));
    // The student keeps the teacher file's signature (input layout, final Softmax).
    if let Some((node, op)) = teacher.interface.output_node() {
        inexact_layers.push(format!(
            "{node} ({op}): the teacher's final {op}, in float; engines may round it differently"
        ));
    }
    let student = teacher.interface.wrap(student);
    let student_path = out.join("student.onnx");
    crate::onnx::builder::write_model(&student_path, &student)?;
    let student_model = crate::onnx::load_model(&student_path)?;
    log(&format!(
        "wrote {} ({} bytes)",
        student_path.display(),
        student_model.size_bytes
    ));
    // Without data, the student is checked on inputs synthesized from the teacher alone,
    // where the teacher's predictions are clear (on noise they are near-ties). The self-check
    // looks for broken or collapsed students, so it takes the plain, fully confident images
    // its floors were set on; `verify` aims at a moderate confidence to tell good from poor.
    let synthesized = crate::verify::synth::synthesize(
        teacher,
        crate::verify::synth::SynthConfig {
            images: cfg.verify_images,
            seed: cfg.seed.wrapping_add(1000),
            ..Default::default()
        },
    )?;
    let verification_synthetic = compare::compare(
        &student_model,
        teacher,
        &Inputs::Synthesized(&synthesized),
        64,
        true,
    )?;
    let self_check = report::self_check(&student_model, cfg.bits, &verification_synthetic);
    if let Some(why) = &self_check {
        log(&format!("CHECK FAILED: {why}"));
    }
    let verification_data = data
        .map(|d| compare::compare(&student_model, teacher, &Inputs::Data(d), 100, true))
        .transpose()?;
    Ok(Report {
        tool: format!("datafree {}", env!("CARGO_PKG_VERSION")),
        teacher: teacher.name(),
        teacher_sha256: teacher.model.sha256.clone(),
        student: student_path.display().to_string(),
        student_sha256: student_model.sha256.clone(),
        method: cfg.method,
        bits: cfg.bits.to_string(),
        first_last_bits: cfg.first_last_bits,
        weight_scheme: cfg.weight_scheme,
        weight_clip,
        scales: cfg.scales,
        inexact_layers,
        bn: cfg.bn,
        bn_folded,
        seed: cfg.seed,
        input_domain: teacher.domain.clone(),
        placement: PLACEMENT.into(),
        notes: report::notes(teacher, cfg, &plan, &m.origins),
        activations: plan
            .points
            .iter()
            .map(|p| {
                let q = params[&p.tensor];
                PointReport {
                    tensor: p.tensor.clone(),
                    bits: p.bits,
                    role: p.role,
                    range: m.ranges[&p.tensor],
                    scale: q.scale,
                    zero_point: q.zero_point,
                    source: m
                        .origins
                        .get(&p.tensor)
                        .map_or(String::new(), |o| o.to_string()),
                }
            })
            .collect(),
        layers: plan.layers,
        calibration_seconds,
        training: m.report,
        baselines: baselines(teacher, cfg, data, log)?,
        self_check,
        verification_synthetic,
        verification_data,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The PTQ methods other than `cfg.method`, at the same settings, each into a scratch folder.
fn baselines(
    teacher: &Teacher,
    cfg: &CompressConfig,
    data: Option<&Dataset>,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Baseline>> {
    if !cfg.baselines {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for m in [Method::PtqBn, Method::PtqNoise, Method::Zeroq] {
        if m == cfg.method {
            continue;
        }
        let t = Instant::now();
        let dir = tempfile::tempdir()?;
        let mut c = cfg.clone();
        c.method = m;
        c.baselines = false;
        let r = compress(teacher, dir.path(), &c, data, &mut |_| {})
            .with_context(|| format!("baseline {}", m.name()))?;
        let v = r
            .verification_data
            .as_ref()
            .unwrap_or(&r.verification_synthetic);
        log(&format!(
            "baseline {}: top-1 {} agreement {:.2}%",
            m.name(),
            v.student_top1.map_or("-".into(), |x| format!("{x:.2}")),
            100.0 * v.agreement
        ));
        out.push(Baseline {
            method: m,
            top1: v.student_top1,
            agreement: v.agreement,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    Ok(out)
}

/// Refuses a non-empty output folder unless `force`.
pub fn prepare_out_dir(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() {
        ensure!(
            dir.is_dir(),
            "{}: exists and is not a folder",
            dir.display()
        );
        let non_empty = std::fs::read_dir(dir)?.next().is_some();
        if non_empty && !force {
            anyhow::bail!(
                "{}: folder is not empty; pass --force to let datafree overwrite its own files there",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))
}

/// The spatial area each GlobalAveragePool / ReduceMean of `model` averages over (by node
/// name), from one forward pass.
fn pooled_areas(
    model: &crate::onnx::LoadedModel,
    teacher: &Teacher,
) -> Result<std::collections::HashMap<String, usize>> {
    let graph = model.graph();
    let nodes: Vec<(String, String)> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op_type.as_str(), "GlobalAveragePool" | "ReduceMean"))
        .filter_map(|(i, n)| {
            Some((
                crate::onnx::graph::display_name(n, i),
                n.input.first()?.clone(),
            ))
        })
        .collect();
    if nodes.is_empty() {
        return Ok(Default::default());
    }
    let p = crate::lower::lower(model, &crate::device::HOST, candle_core::DType::F32)?;
    let shape = teacher.input_shape(1);
    let x = candle_core::Tensor::from_vec(
        teacher.domain.noise(&shape, 0),
        shape.to_vec(),
        &crate::device::HOST,
    )?;
    let names: Vec<String> = nodes.iter().map(|(_, t)| t.clone()).collect();
    let (_, ts) = p.forward_tensors(&x, &names)?;
    Ok(nodes
        .into_iter()
        .zip(ts)
        .map(|((n, _), t)| (n, t.dims().iter().skip(2).product()))
        .collect())
}
