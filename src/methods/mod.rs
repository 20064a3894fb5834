//! Data-free methods, one module each, behind one entry point ([`run`]): given the teacher, the
//! student's float graph and its quantization plan, a method finds the activation ranges and,
//! when it trains, fine-tuned student weights, and says what it did in a [`MethodReport`].
//! `ptq` holds the calibration-only methods (BN-analytic, noise, ZeroQ); `gdfq` trains a
//! generator and distils the student; `autorecon` searches the generator's architecture first.

pub mod autorecon;
pub mod gdfq;
pub mod ptq;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;

use crate::data::Dataset;
use crate::onnx::LoadedModel;
use crate::onnx::pb::ModelProto;
use crate::quant::calibrate::Ranges;
use crate::quant::moments::LayerInput;
use crate::quant::placement::Plan;
use crate::quant::{BitSpec, Scales, WeightClip, WeightScheme};
use crate::search::SearchReport;
use crate::teacher::Teacher;
use crate::teacher::domain::DomainSource;
use crate::train::gdfq::Config as TrainConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Analytic ranges from BN statistics (no inputs at all).
    PtqBn,
    /// Ranges observed on Gaussian-noise inputs.
    PtqNoise,
    /// Ranges observed on ZeroQ-style distilled inputs (BN statistics matched by optimisation).
    Zeroq,
    /// GDFQ: a class-conditional generator trained on the teacher's BN statistics; ranges from
    /// its images, and the student fine-tuned on them by distillation.
    Gdfq,
    /// AutoReCon: GDFQ with a generator whose architecture was searched for this teacher
    /// (`datafree search`; runs the search first unless --genotype is given).
    Autorecon,
    /// CPSC-DFKD: distil into another architecture (--student), trained from scratch by a
    /// class-conditional generator in adversarial rounds; float (--bits fp32) or then quantized.
    Cpsc,
}

impl Method {
    /// Whether the method fine-tunes the student (and needs BN statistics to do so).
    pub fn trains(self) -> bool {
        matches!(self, Method::Gdfq | Method::Autorecon)
    }

    /// The name on the command line (`ptq-bn`).
    pub fn name(self) -> &'static str {
        match self {
            Method::PtqBn => "ptq-bn",
            Method::PtqNoise => "ptq-noise",
            Method::Zeroq => "zeroq",
            Method::Gdfq => "gdfq",
            Method::Autorecon => "autorecon",
            Method::Cpsc => "cpsc",
        }
    }
}

/// Where one activation range came from (rendered into the report).
#[derive(Debug, Clone, PartialEq)]
pub enum RangeOrigin {
    /// mean +- k std of the Gaussian the BN statistics describe.
    BnStatistics { k: f64 },
    /// Noise, because no BN statistics reach the tensor and the teacher has none (ptq-bn's
    /// fallback).
    NoiseFallback,
    /// Inputs synthesized to match the teacher's BN statistics, because they do not reach the
    /// tensor analytically (ptq-bn's fallback).
    SynthesizedFallback { images: usize, steps: usize },
    /// Gaussian-noise inputs.
    Noise { images: usize },
    /// ZeroQ-distilled inputs.
    Zeroq {
        images: usize,
        steps: usize,
        bns: f32,
    },
    /// EMA of batch min/max of generated images during the generator warm-up.
    Generated { method: Method },
    /// The network input: its domain's range (pixels 0..255 mapped through the preprocessing).
    InputDomain { summary: String },
    /// Any of the above, then learned with the student.
    Learned {
        from: Box<RangeOrigin>,
        range_lr: f64,
    },
}

impl std::fmt::Display for RangeOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RangeOrigin::BnStatistics { k } => write!(f, "BN statistics, mean +- {k} std"),
            RangeOrigin::NoiseFallback => f.write_str("noise (no BN statistics reach it)"),
            RangeOrigin::SynthesizedFallback { images, steps } => write!(
                f,
                "observed on {images} inputs synthesized from the BN statistics ({steps} steps; no BN statistics reach it analytically)"
            ),
            RangeOrigin::Noise { images } => write!(f, "N(0,1) noise, {images} images"),
            RangeOrigin::Zeroq { images, steps, bns } => {
                write!(
                    f,
                    "ZeroQ inputs ({images} images, {steps} steps, BNS {bns:.4})"
                )
            }
            RangeOrigin::Generated { method } => write!(
                f,
                "{} generator images (EMA of batch min/max during warm-up)",
                if *method == Method::Autorecon {
                    "AutoReCon"
                } else {
                    "GDFQ"
                }
            ),
            RangeOrigin::InputDomain { summary } => write!(f, "the input domain ({summary})"),
            RangeOrigin::Learned { from, range_lr } => {
                write!(
                    f,
                    "{from}; then learned with the student (--range-lr {range_lr})"
                )
            }
        }
    }
}

/// The settings of the calibration-only methods.
#[derive(Debug, Clone)]
pub struct PtqSettings {
    /// Calibration images (noise, zeroq).
    pub calib_images: usize,
    pub zeroq_iters: usize,
    pub zeroq_lr: f64,
    /// Clip observed ranges at this percentile instead of min/max.
    pub percentile: Option<f64>,
    /// k in mean +- k std for ptq-bn ranges (None: by bit width).
    pub bn_k: Option<f64>,
}

/// The AutoReCon-specific settings (the generator stage is GDFQ's).
#[derive(Debug, Clone)]
pub struct AutoreconSettings {
    /// A genotype from `datafree search`; without it the search runs first into OUT/search.
    pub genotype: Option<std::path::PathBuf>,
    pub generator_width: Option<usize>,
    pub inherit_weights: bool,
    pub search: crate::search::SearchConfig,
    pub search_checkpoint_every: usize,
    pub search_stop_after: Option<usize>,
}

/// Where a training method reads and writes, and what it measures on the way.
#[derive(Debug, Clone, Default)]
pub struct RunSettings {
    pub checkpoint_every: usize,
    /// Continue the run whose output folder is this.
    pub resume: Option<std::path::PathBuf>,
    pub grid_every: usize,
    /// Evaluate the fake-quantized student on the measuring data every N iterations.
    pub eval_every: Option<usize>,
    pub eval_images: usize,
    /// Fail after N iterations, as if killed (tests resume).
    pub stop_after: Option<usize>,
}

/// Top-1 (%) of a lowered program on up to `images` evenly spaced images of `d`, preprocessed
/// as the teacher's inputs (the training runs' evaluation hook).
pub fn program_top1(
    p: &crate::lower::Program,
    teacher: &Teacher,
    d: &Dataset,
    images: usize,
) -> Result<f64> {
    let pre = teacher.preprocess();
    let (channels, height, width) = teacher.image();
    let n = d.len().min(images).max(1);
    // Evenly spaced images: folders list one class after another, so the first N would cover
    // only the first classes.
    let picks: Vec<usize> = (0..n).map(|i| i * d.len() / n).collect();
    let mut correct = 0usize;
    for chunk in picks.chunks(200) {
        let px: Vec<f32> = chunk.iter().flat_map(|&i| pre.batch(d, i..i + 1)).collect();
        let x =
            candle_core::Tensor::from_vec(px, (chunk.len(), channels, height, width), p.device())?;
        let pred: Vec<u32> = p.forward(&x)?.argmax(1)?.to_vec1()?;
        correct += pred
            .iter()
            .zip(chunk)
            .filter(|(a, i)| **a as usize == d.labels[**i])
            .count();
    }
    Ok(100.0 * correct as f64 / n as f64)
}

/// Everything a method may need.
pub struct Context<'a> {
    pub teacher: &'a Teacher,
    /// The float graph the plan quantizes (the teacher with BN folded, or kept).
    pub float: &'a LoadedModel,
    pub plan: &'a Plan,
    pub bits: BitSpec,
    pub weight_scheme: WeightScheme,
    pub scales: Scales,
    pub weight_clip: WeightClip,
    /// Whether the student's BN is folded into its convs.
    pub bn_folded: bool,
    pub seed: u64,
    pub ptq: &'a PtqSettings,
    pub train: &'a TrainConfig,
    pub autorecon: &'a AutoreconSettings,
    pub run: &'a RunSettings,
    pub out: &'a Path,
    /// Labelled data, only to MEASURE the student while it trains.
    pub data: Option<&'a Dataset>,
    pub device: &'a Device,
}

impl Context<'_> {
    /// The per-channel (mean, variance) natural images have in the teacher's input domain.
    pub fn domain_moments(&self) -> (Vec<f64>, Vec<f64>) {
        let (m, sd) = self.teacher.domain.stats();
        (
            m.iter().map(|&v| v as f64).collect(),
            sd.iter().map(|&v| (v as f64).powi(2)).collect(),
        )
    }

    /// For `--weight-clip output`, what the BN statistics and the input domain say about the
    /// planned layers' inputs, which a weight's error is weighed by; None for `mse`.
    pub fn clip_inputs(&self) -> Option<HashMap<String, LayerInput>> {
        if self.weight_clip != WeightClip::Output {
            return None;
        }
        let (mean, var) = self.domain_moments();
        let inputs: Vec<String> = self.plan.layers.iter().map(|l| l.input.clone()).collect();
        Some(crate::quant::moments::layer_inputs(
            &self.teacher.model.proto,
            self.teacher.bn(),
            (&mean, &var),
            &inputs,
        ))
    }
}

/// What a training method reports (report.json's `training`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodReport {
    Gdfq(gdfq::GdfqReport),
    Autorecon {
        /// The search that produced the generator, when it ran in this command.
        #[serde(skip_serializing_if = "Option::is_none")]
        search: Option<Box<SearchReport>>,
        #[serde(flatten)]
        stage: gdfq::GdfqReport,
    },
}

impl MethodReport {
    /// The generator-and-student stage (both methods have one).
    pub fn stage(&self) -> &gdfq::GdfqReport {
        match self {
            MethodReport::Gdfq(g) | MethodReport::Autorecon { stage: g, .. } => g,
        }
    }

    pub fn search(&self) -> Option<&SearchReport> {
        match self {
            MethodReport::Autorecon { search, .. } => search.as_deref(),
            MethodReport::Gdfq(_) => None,
        }
    }
}

/// What a method hands back.
pub struct MethodOutput {
    pub ranges: Ranges,
    pub origins: HashMap<String, RangeOrigin>,
    /// The fine-tuned float student in the plan's graph, when the method trains.
    pub trained: Option<ModelProto>,
    pub report: Option<MethodReport>,
}

/// The network input's range: its domain's, the same for every method.
pub fn input_ranges(ctx: &Context) -> (Ranges, HashMap<String, RangeOrigin>) {
    let d = &ctx.teacher.domain;
    let summary = format!(
        "{}, {}",
        d.kind.describe(),
        match &d.source {
            DomainSource::Flags => "from the flags".to_string(),
            DomainSource::Metadata(k) => format!("from metadata {k}"),
            DomainSource::Inferred => "inferred from BN statistics".to_string(),
            DomainSource::Assumed => "assumed".to_string(),
        } + if d.is_estimate() {
            ", widened by a quarter each side"
        } else {
            ""
        }
    );
    ctx.plan
        .points
        .iter()
        .filter(|p| p.role == crate::quant::placement::Role::NetworkInput)
        .map(|p| {
            (
                (p.tensor.clone(), d.quant_range()),
                (
                    p.tensor.clone(),
                    RangeOrigin::InputDomain {
                        summary: summary.clone(),
                    },
                ),
            )
        })
        .unzip()
}

/// Runs `method`.
pub fn run(method: Method, ctx: &Context, log: &mut dyn FnMut(&str)) -> Result<MethodOutput> {
    match method {
        Method::PtqBn => ptq::bn(ctx),
        Method::PtqNoise => ptq::noise(ctx),
        Method::Zeroq => ptq::zeroq(ctx, log),
        Method::Gdfq => gdfq::run(ctx, None, log),
        Method::Autorecon => autorecon::run(ctx, log),
        Method::Cpsc => anyhow::bail!(
            "--method cpsc trains another architecture: it runs through `compress --student`, not as a quantization method"
        ),
    }
}
