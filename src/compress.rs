//! `datafree compress`: the data-free post-training pipeline. Teacher -> BN folded (or kept) ->
//! quantization plan -> activation ranges (BN-analytic, noise or ZeroQ) -> QDQ student written
//! atomically as DIR/student.onnx -> verified in ONNX Runtime against our simulation and the
//! teacher -> DIR/report.json.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device};
use serde::Serialize;

use crate::data::{Dataset, Preprocess};
use crate::export::{self, PointParams};
use crate::lower::lower;
use crate::onnx::{self, LoadedModel};
use crate::quant::calibrate::{self, Method, Ranges};
use crate::quant::placement::{self, PlanOptions};
use crate::quant::{BitSpec, QParams, Scales, WeightClip, WeightScheme};
use crate::search::{Sampling, SearchConfig, SearchPreset, SearchReport};
use crate::train::gdfq::{
    self, Config as GdfqTrainConfig, GeneratorFamily, Metrics, Preset, RangeSource,
};
use crate::verify::compare::{self, Comparison, Inputs};
use crate::verify::eval::input_geometry;

/// What happens to BatchNormalization in the student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BnMode {
    /// Folded into the preceding conv: the deployable student (ORT fuses it).
    Fold,
    /// Kept as float BatchNormalization (the GDFQ reference's student).
    Keep,
}

/// Everything `compress` can be told; also the `datafree compress` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Bit widths: wNaM (N-bit weights, M-bit activations), N and M in 2..=8.
    #[arg(long, default_value = "w8a8")]
    pub bits: BitSpec,
    /// How activation ranges are found without data.
    #[arg(long, value_enum, default_value_t = Method::PtqBn)]
    pub method: Method,
    /// Bit width of the first and last layer (weights and input).
    #[arg(long, value_parser = clap::value_parser!(u8).range(2..=8))]
    pub first_last_bits: Option<u8>,
    /// Weight quantization (per output channel).
    #[arg(long, value_enum, default_value_t = WeightScheme::Symmetric)]
    pub weight_scheme: WeightScheme,
    /// Scales: `exact` = short significands (8-bit activation scales powers of two, even zero
    /// points, weight scales sized so every sum fits f32), so every engine computes
    /// bit-identical codes (no float rounding between DequantizeLinear and QuantizeLinear);
    /// `free` = range / levels.
    #[arg(long, value_enum, default_value_t = Scales::Exact)]
    pub scales: Scales,
    /// Weight ranges: `none` (each channel's min/max) or `mse` (each channel clipped where its
    /// squared quantization error is least; symmetric weights only). With gdfq the clip is found
    /// once on the teacher's weights and kept during fine-tuning. [default: none; gdfq and
    /// autorecon with symmetric weights: the preset's, quick mse, paper none]
    #[arg(long, value_enum)]
    pub weight_clip: Option<WeightClip>,
    /// Keep 8-bit weights on the full int8 range; by default they use +-63, because ONNX
    /// Runtime's x86 U8S8 kernels without VNNI saturate with full-range weights.
    #[arg(long)]
    pub full_range_weights: bool,
    /// Store weights of 4 bits or fewer as ONNX INT4 (raises the opset to 21): a smaller file,
    /// but ONNX Runtime does not fuse INT4 layers and tract cannot read them.
    #[arg(long)]
    pub int4_weights: bool,
    /// BatchNormalization in the student: folded into conv (deployable) or kept (GDFQ-exact).
    #[arg(long, value_enum, default_value_t = BnMode::Fold)]
    pub bn: BnMode,
    /// Calibration images (noise, zeroq).
    #[arg(long, default_value_t = 64)]
    pub calib_images: usize,
    /// ZeroQ optimisation steps.
    #[arg(long, default_value_t = 200)]
    pub zeroq_iters: usize,
    /// ZeroQ Adam learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub zeroq_lr: f64,
    /// Clip observed ranges at this percentile (e.g. 99.99) instead of min/max.
    #[arg(long)]
    pub percentile: Option<f64>,
    /// k in mean +- k std for ptq-bn ranges [default: by bit width, 4.5 at 4 bits to 9 at 8]
    #[arg(long)]
    pub bn_k: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Noise images for verification.
    #[arg(long, default_value_t = 256)]
    pub verify_images: usize,
    /// Also run the data-free PTQ methods (ptq-bn, ptq-noise, zeroq) at the same bits and list
    /// their numbers in the report for comparison.
    #[arg(long)]
    pub baselines: bool,
    #[command(flatten)]
    pub gdfq: GdfqArgs,
    #[command(flatten)]
    pub autorecon: AutoreconArgs,
}

/// Flags of `--method autorecon`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "AutoReCon (--method autorecon; also the GDFQ flags)")]
pub struct AutoreconArgs {
    /// A genotype from `datafree search` (genotype.json); without it the search runs first
    /// (into OUT/search, with the --preset's search budget and the search flags below).
    #[arg(long, value_name = "FILE")]
    pub genotype: Option<PathBuf>,
    /// Channels of the derived generator's cells [default: the genotype's, i.e. the search
    /// width]; the paper scales them by 0.5..4 x 64.
    #[arg(long)]
    pub generator_width: Option<usize>,
    /// Start the derived generator from the search's supernet weights (same width only)
    /// instead of training it from scratch.
    #[arg(long)]
    pub inherit_weights: bool,
    /// Stop with an error after N search iterations, as if killed (tests resume).
    #[arg(long, hide = true)]
    pub search_stop_after: Option<usize>,
    #[command(flatten)]
    pub search: SearchArgs,
}

/// Budget and settings of the AutoReCon search (unset values take the preset's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SearchArgs {
    /// Search epochs (the temperature decays over all of them).
    #[arg(long)]
    pub search_epochs: Option<usize>,
    /// Iterations per search epoch; each is one weight step and one architecture step.
    #[arg(long)]
    pub search_iters_per_epoch: Option<usize>,
    /// Generated images per search step.
    #[arg(long)]
    pub search_batch: Option<usize>,
    /// Channels of every supernet cell (64 x the paper's scale factor s).
    #[arg(long)]
    pub width: Option<usize>,
    /// Gumbel-softmax samples: `soft` (every op weighted) or `hard` (one op, straight-through).
    #[arg(long, value_enum)]
    pub sampling: Option<Sampling>,
    /// Temperature schedule "start,end" (exponential decay over the search).
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub tau: Option<Vec<f64>>,
    /// Adam learning rate of the supernet's weights.
    #[arg(long)]
    pub search_lr: Option<f64>,
    /// Adam learning rate of the architecture weights alpha.
    #[arg(long)]
    pub arch_lr: Option<f64>,
    /// L2 weight decay of the architecture weights (Adam).
    #[arg(long)]
    pub arch_weight_decay: Option<f64>,
    /// Write a resumable search checkpoint every N iterations.
    #[arg(long, default_value_t = 50)]
    pub search_checkpoint_every: usize,
}

impl SearchArgs {
    pub fn config(&self, preset: SearchPreset, seed: u64) -> Result<SearchConfig> {
        let mut c = SearchConfig::preset(preset, seed);
        let set = |dst: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut c.epochs, self.search_epochs);
        set(&mut c.iters_per_epoch, self.search_iters_per_epoch);
        set(&mut c.batch, self.search_batch);
        set(&mut c.width, self.width);
        if let Some(v) = self.sampling {
            c.sampling = v;
        }
        if let Some(t) = &self.tau {
            ensure!(t.len() == 2, "--tau takes two values, start,end; got {t:?}");
            c.tau = (t[0], t[1]);
        }
        if let Some(v) = self.search_lr {
            c.weight_lr = v;
        }
        if let Some(v) = self.arch_lr {
            c.arch_lr = v;
        }
        if let Some(v) = self.arch_weight_decay {
            c.arch_weight_decay = v;
        }
        ensure!(
            c.epochs > 0 && c.iters_per_epoch > 0 && c.width > 0 && c.batch >= 2,
            "the search needs epochs, iterations per epoch and width > 0 and a batch of at least 2"
        );
        Ok(c)
    }
}

/// One PTQ baseline's result (with `--baselines`).
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub method: Method,
    /// Student top-1 in ONNX Runtime on the measuring data (None without --data).
    pub top1: Option<f64>,
    /// Agreement with the teacher (on the data, else on noise).
    pub agreement: f64,
    pub seconds: f64,
}

impl Options {
    fn trains(&self) -> bool {
        matches!(self.method, Method::Gdfq | Method::Autorecon)
    }

    /// The weight clipping in force: the flag, else the GDFQ preset's (symmetric weights only),
    /// else none.
    pub fn weight_clip(&self) -> WeightClip {
        match self.weight_clip {
            Some(w) => w,
            None if self.trains() && self.weight_scheme == WeightScheme::Symmetric => {
                GdfqTrainConfig::preset(self.gdfq.preset, self.seed).weight_clip
            }
            None => WeightClip::None,
        }
    }

    /// The GDFQ training configuration: the preset, the flags over it.
    pub fn gdfq_config(&self) -> Result<GdfqTrainConfig> {
        let mut c = self.gdfq.config(self.seed)?;
        c.weight_clip = self.weight_clip();
        Ok(c)
    }

    /// Refuses contradictory or out-of-range settings and teachers the method cannot use;
    /// called before anything is written.
    pub fn check(&self, teacher: &LoadedModel) -> Result<()> {
        ensure!(
            self.weight_clip() == WeightClip::None || self.weight_scheme == WeightScheme::Symmetric,
            "--weight-clip mse clips each channel symmetrically: use it with --weight-scheme symmetric"
        );
        if self.trains() {
            self.gdfq_config()?;
            ensure!(
                crate::onnx::bn::analyse(teacher).bn_count > 0,
                "{}: --method {} needs the teacher's BatchNormalization statistics and this teacher has none (BN was folded at export); re-export it with BN kept, or use --method ptq-noise or zeroq",
                teacher.path.display(),
                cli_name(&self.method)
            );
        }
        Ok(())
    }
}

/// Flags of `--method gdfq` (unset budget flags take the preset's values).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "GDFQ (--method gdfq)")]
pub struct GdfqArgs {
    /// Budget and defaults: `quick` (12 x 100 iterations, batch 64: about 35-50 min on 2 CPU
    /// cores for a CIFAR ResNet-20; distillation only at student lr 1e-3, ranges from BN
    /// statistics then learned, weights MSE-clipped) or `paper` (the reference: 400 x 200,
    /// batch 200, KD + CE at lr 1e-4, EMA ranges, frozen after warm-up).
    #[arg(long, value_enum, default_value_t = Preset::Quick)]
    pub preset: Preset,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub iters_per_epoch: Option<usize>,
    #[arg(long)]
    pub batch: Option<usize>,
    /// Epochs in which only the generator trains (the student observes activation ranges).
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Student SGD learning rate [default: the preset's, 1e-3 quick, 1e-4 paper].
    #[arg(long)]
    pub student_lr: Option<f64>,
    #[arg(long)]
    pub student_momentum: Option<f64>,
    #[arg(long)]
    pub student_weight_decay: Option<f64>,
    /// Epochs at which the student's learning rate is multiplied by --lr-gamma, e.g. 100,200,300.
    #[arg(long, value_delimiter = ',')]
    pub lr_milestones: Option<Vec<usize>>,
    #[arg(long)]
    pub lr_gamma: Option<f64>,
    #[arg(long, value_enum)]
    pub generator: Option<GeneratorFamily>,
    #[arg(long)]
    pub generator_lr: Option<f64>,
    /// Adam betas of the generator, "b1,b2".
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub generator_betas: Option<Vec<f64>>,
    /// Weight of the BNS loss in the generator's objective.
    #[arg(long)]
    pub bns_weight: Option<f64>,
    /// Weight of the student's cross-entropy with the sampled labels [default: 0 quick, 1 paper
    /// (the reference)].
    #[arg(long)]
    pub student_ce_weight: Option<f64>,
    /// Weight of intermediate-feature distillation: MSE between the student's and the teacher's
    /// activations at every activation quantization point, each divided by the teacher's mean
    /// square [default: 0, as the reference].
    #[arg(long)]
    pub feature_weight: Option<f64>,
    /// Distillation temperature.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// EMA factor of the activation ranges observed during warm-up.
    #[arg(long)]
    pub range_ema: Option<f64>,
    /// Activation ranges: `ema` of generated batches during warm-up (the reference; default of
    /// `paper`) or `bn` (the ptq-bn ranges, EMA only where BN statistics do not reach; default of
    /// `quick`).
    #[arg(long, value_enum)]
    pub range_source: Option<RangeSource>,
    /// Learn the activation ranges with the student (LSQ-style gradients; the exported grids are
    /// the learned ones): Adam learning rate relative to each range's starting width, decayed
    /// with the student [default: quick 1e-3; paper 0, ranges frozen after warm-up as the
    /// reference].
    #[arg(long)]
    pub range_lr: Option<f64>,
    /// Write a resumable checkpoint every N iterations.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Continue the run whose output folder (with its checkpoint/) is DIR.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Write a PNG grid of generated images per class every N iterations.
    #[arg(long, default_value_t = 200)]
    pub grid_every: usize,
    /// With --data: top-1 of the fake-quantized student on --eval-images images every N
    /// iterations (the accuracy-vs-iterations curve in metrics.jsonl).
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    pub eval_images: usize,
    /// Stop with an error after N iterations, as if the process had been killed (tests resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

impl GdfqArgs {
    pub fn config(&self, seed: u64) -> Result<GdfqTrainConfig> {
        let mut c = GdfqTrainConfig::preset(self.preset, seed);
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        set(&mut c.epochs, &self.epochs);
        set(&mut c.iters_per_epoch, &self.iters_per_epoch);
        set(&mut c.batch, &self.batch);
        set(&mut c.warmup_epochs, &self.warmup_epochs);
        set(&mut c.student_lr, &self.student_lr);
        set(&mut c.student_momentum, &self.student_momentum);
        set(&mut c.student_weight_decay, &self.student_weight_decay);
        set(&mut c.lr_milestones, &self.lr_milestones);
        set(&mut c.lr_gamma, &self.lr_gamma);
        set(&mut c.generator, &self.generator);
        set(&mut c.generator_lr, &self.generator_lr);
        set(&mut c.bns_weight, &self.bns_weight);
        set(&mut c.temperature, &self.temperature);
        set(&mut c.student_ce_weight, &self.student_ce_weight);
        set(&mut c.feature_weight, &self.feature_weight);
        set(&mut c.range_ema, &self.range_ema);
        set(&mut c.range_source, &self.range_source);
        set(&mut c.range_lr, &self.range_lr);
        if let Some(b) = &self.generator_betas {
            ensure!(
                b.len() == 2,
                "--generator-betas takes two values, got {b:?}"
            );
            c.generator_betas = (b[0], b[1]);
        }
        ensure!(
            c.epochs > 0 && c.iters_per_epoch > 0 && c.warmup_epochs < c.epochs,
            "GDFQ needs epochs > warm-up epochs and iterations per epoch > 0 (got {} epochs, {} warm-up, {} iterations)",
            c.epochs,
            c.warmup_epochs,
            c.iters_per_epoch
        );
        // A negative weight or rate would train silently in the wrong direction.
        for (flag, v) in [
            ("--bns-weight", c.bns_weight),
            ("--student-ce-weight", c.student_ce_weight),
            ("--feature-weight", c.feature_weight),
            ("--range-lr", c.range_lr),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "{flag} must be a finite number >= 0 (got {v})"
            );
        }
        for (flag, v) in [
            ("--student-lr", c.student_lr),
            ("--generator-lr", c.generator_lr),
            ("--temperature", c.temperature),
        ] {
            ensure!(
                v.is_finite() && v > 0.0,
                "{flag} must be a finite number > 0 (got {v})"
            );
        }
        Ok(c)
    }
}

/// What the GDFQ stage did (in report.json).
#[derive(Debug, Clone, Serialize)]
pub struct GdfqReport {
    pub config: GdfqTrainConfig,
    pub generator_params: usize,
    /// Multiply-accumulates of the generator per image.
    pub generator_macs: u64,
    /// The AutoReCon search that produced the generator (when it ran in this command).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchReport>,
    pub train_seconds: f64,
    pub resumed_from_iter: Option<usize>,
    /// (iteration, top-1 %) of the fake-quantized student on the measuring data.
    pub eval_curve: Vec<(usize, f64)>,
    pub final_losses: Option<Metrics>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointReport {
    pub tensor: String,
    pub bits: u8,
    pub role: placement::Role,
    pub range: (f32, f32),
    pub scale: f32,
    pub zero_point: i32,
    /// How the range was found.
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub teacher: String,
    pub teacher_sha256: String,
    pub student: String,
    pub student_sha256: String,
    pub method: Method,
    pub bits: String,
    pub first_last_bits: Option<u8>,
    pub weight_scheme: WeightScheme,
    pub weight_clip: WeightClip,
    pub scales: Scales,
    /// Layers whose f32 arithmetic is not provably exact (see `Scales::Exact`).
    pub inexact_layers: Vec<String>,
    pub bn: BnMode,
    pub bn_folded: usize,
    pub seed: u64,
    pub placement: String,
    pub notes: Vec<String>,
    pub layers: Vec<placement::Layer>,
    pub activations: Vec<PointReport>,
    pub calibration_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gdfq: Option<GdfqReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baselines: Vec<Baseline>,
    /// On seeded noise inputs.
    pub verification_noise: Comparison,
    /// On the labelled data given with --data.
    pub verification_data: Option<Comparison>,
    pub wall_seconds: f64,
}

pub const PLACEMENT: &str = "weights per output channel (int8 container); activations at the data input of every Conv/Gemm/MatMul (M bits, uint8 container, Clip for M < 8); the network input at 8 bits; with BN folded, layer outputs feeding anything but a ReLU at 8 bits (where the GDFQ reference keeps float), so ONNX Runtime can fuse Conv/Add";

/// The name a value has on the command line (`ptq-bn`, `symmetric`, `fold`).
pub fn cli_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
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
            bail!(
                "{}: folder is not empty; pass --force to let datafree overwrite its own files there",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))
}

/// Runs the pipeline; `data` (with its preprocessing) is used only to MEASURE the result.
pub fn compress(
    teacher: &LoadedModel,
    out: &Path,
    opts: &Options,
    data: Option<(&Dataset, &Preprocess)>,
    log: &mut dyn FnMut(&str),
) -> Result<Report> {
    let t0 = Instant::now();
    opts.check(teacher)?;
    let (_, c, h, w) = input_geometry(teacher)?;
    let mut gdfq_report = None;
    let (mut folded, bn_folded) = match opts.bn {
        BnMode::Fold => export::fold_bn(&teacher.proto)?,
        BnMode::Keep => (teacher.proto.clone(), 0),
    };
    let plan = placement::plan(
        &folded,
        PlanOptions {
            bits: opts.bits,
            first_last_bits: opts.first_last_bits,
            fusion_outputs: opts.bn == BnMode::Fold,
            reduce_range: !opts.full_range_weights,
        },
    )?;
    log(&format!(
        "plan: {} layers, {} activation points; BN folded: {bn_folded}",
        plan.layers.len(),
        plan.points.len()
    ));

    // The float graph the points live in, for observed ranges.
    let float_dir = tempfile::tempdir()?;
    let float_path = float_dir.path().join("float-student.onnx");
    crate::onnx::builder::write_model(&float_path, &folded)?;
    let mut float_model = onnx::load_model(&float_path)?;
    // It is the teacher's graph (BN folded, node names kept): errors name the teacher's file,
    // and external data stays relative to the teacher's folder.
    float_model.path = teacher.path.clone();
    let tc = Instant::now();
    let tensors: Vec<String> = plan.points.iter().map(|p| p.tensor.clone()).collect();
    let mut sources = std::collections::HashMap::new();
    let ranges: Ranges = match opts.method {
        Method::PtqBn => {
            let mut r = ptq_bn_ranges(teacher, &plan, opts, c, &mut sources);
            let missing: Vec<String> = tensors
                .iter()
                .filter(|t| !r.contains_key(*t))
                .cloned()
                .collect();
            if !missing.is_empty() {
                // Points the BN statistics do not reach (e.g. outputs of convs without BN) fall back to noise.
                let p = lower(&float_model, &Device::Cpu, DType::F32)?;
                let x = calibrate::noise(&[opts.calib_images, c, h, w], opts.seed, &Device::Cpu)?;
                for (t, v) in calibrate::observe(&p, &x, &missing, opts.percentile)? {
                    sources.insert(t.clone(), "noise (no BN statistics reach it)".into());
                    r.insert(t, v);
                }
            }
            r
        }
        Method::PtqNoise => {
            let p = lower(&float_model, &Device::Cpu, DType::F32)?;
            let x = calibrate::noise(&[opts.calib_images, c, h, w], opts.seed, &Device::Cpu)?;
            let r = calibrate::observe(&p, &x, &tensors, opts.percentile)?;
            sources.extend(r.keys().map(|t| {
                (
                    t.clone(),
                    format!("N(0,1) noise, {} images", opts.calib_images),
                )
            }));
            r
        }
        Method::Zeroq => {
            let tp = lower(teacher, &Device::Cpu, DType::F32)?;
            let pb = crate::verify::eval::progress(opts.zeroq_iters, "zeroq distillation");
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} steps, eta {eta}",
                )
                .expect("valid template"),
            );
            let (x, loss) = calibrate::distill_inputs(
                &tp,
                &[opts.calib_images, c, h, w],
                opts.zeroq_iters,
                opts.zeroq_lr,
                opts.seed,
                |i, l| {
                    pb.set_position(i as u64 + 1);
                    pb.set_message(format!("zeroq distillation, BNS {l:.4}"));
                },
            )?;
            pb.finish_and_clear();
            log(&format!(
                "zeroq: {} inputs distilled in {} steps, final BNS loss {loss:.4}",
                opts.calib_images, opts.zeroq_iters
            ));
            let p = lower(&float_model, &Device::Cpu, DType::F32)?;
            let r = calibrate::observe(&p, &x, &tensors, opts.percentile)?;
            sources.extend(r.keys().map(|t| {
                (
                    t.clone(),
                    format!(
                        "ZeroQ inputs ({} images, {} steps, BNS {loss:.4})",
                        opts.calib_images, opts.zeroq_iters
                    ),
                )
            }));
            r
        }
        Method::Gdfq | Method::Autorecon => {
            let cfg = opts.gdfq_config()?;
            let fixed = match cfg.range_source {
                RangeSource::Bn => ptq_bn_ranges(teacher, &plan, opts, c, &mut sources),
                RangeSource::Ema => Ranges::new(),
            };
            let (r, trained, rep) = run_gdfq(
                teacher,
                &float_model,
                &plan,
                opts,
                cfg.clone(),
                out,
                data,
                (c, h),
                &fixed,
                log,
            )?;
            folded = trained;
            gdfq_report = Some(rep);
            let what = if opts.method == Method::Autorecon {
                "AutoReCon generator images (EMA of batch min/max during warm-up)"
            } else {
                "GDFQ generator images (EMA of batch min/max during warm-up)"
            };
            for t in r.keys().filter(|t| !fixed.contains_key(*t)) {
                sources.insert(t.clone(), what.into());
            }
            if cfg.range_lr > 0.0 {
                for t in r.keys() {
                    let s = sources.entry(t.clone()).or_default();
                    s.push_str(&format!(
                        "; then learned with the student (--range-lr {})",
                        cfg.range_lr
                    ));
                }
            }
            r
        }
    };
    let calibration_seconds = tc.elapsed().as_secs_f64();
    let params: PointParams = plan
        .points
        .iter()
        .map(|p| {
            let (lo, hi) = ranges[&p.tensor];
            (
                p.tensor.clone(),
                QParams::activation(lo, hi, p.bits, opts.scales),
            )
        })
        .collect();

    let metadata = vec![
        (
            "datafree.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("datafree.method".to_string(), cli_name(&opts.method)),
        ("datafree.bits".to_string(), opts.bits.to_string()),
        (
            "datafree.first_last_bits".to_string(),
            opts.first_last_bits
                .map_or("none".into(), |b| b.to_string()),
        ),
        ("datafree.seed".to_string(), opts.seed.to_string()),
        ("datafree.scales".to_string(), cli_name(&opts.scales)),
        (
            "datafree.teacher_sha256".to_string(),
            teacher.sha256.clone(),
        ),
    ];
    // A GDFQ student was clipped while it trained; a PTQ one is clipped here.
    if opts.weight_clip() == WeightClip::Mse && !opts.trains() {
        folded = export::clip_weights(&folded, &plan)?;
    }
    let export::Student {
        model: student,
        inexact_layers,
    } = export::build_student(
        &folded,
        &plan,
        &params,
        export::WeightOptions {
            scheme: opts.weight_scheme,
            scales: opts.scales,
            int4: opts.int4_weights,
        },
        &metadata,
    )?;
    let student_path = out.join("student.onnx");
    crate::onnx::builder::write_model(&student_path, &student)?;
    let student_model = onnx::load_model(&student_path)?;
    log(&format!(
        "wrote {} ({} bytes)",
        student_path.display(),
        student_model.size_bytes
    ));

    let verification_noise = compare::compare(
        &student_model,
        teacher,
        &Inputs::Noise {
            images: opts.verify_images,
            seed: opts.seed.wrapping_add(1000),
        },
        64,
        true,
    )?;
    let verification_data = data
        .map(|(d, pre)| compare::compare(&student_model, teacher, &Inputs::Data(d, pre), 100, true))
        .transpose()?;
    let mut notes = Vec::new();
    let fallback = sources
        .values()
        .filter(|s| s.starts_with("noise (no BN"))
        .count();
    if opts.method == Method::PtqBn && fallback > 0 {
        notes.push(format!(
            "ptq-bn: {fallback} of {} activation points are not reached by BN statistics and were calibrated on noise instead{}",
            plan.points.len(),
            if crate::onnx::bn::analyse(teacher).bn_count == 0 { " (the teacher has no BatchNormalization: BN was folded at export)" } else { "" }
        ));
    }
    if !opts.full_range_weights
        && plan.layers.iter().any(|l| l.weight_bits == 7)
        && opts.bits.weights == 8
    {
        notes.push("8-bit weights use a 7-bit range (+-63): ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI saturate int16 pair sums with full-range int8 weights (measured on cifar10_resnet20: simulation-vs-ORT agreement 97.3% -> 99.95%); pass --full-range-weights for VNNI/ARM targets".into());
    }
    if opts.bits.activations < 8 {
        notes.push(format!("{}-bit activations need Clip before QuantizeLinear: ONNX Runtime runs those layers through float kernels (no QLinearConv), so this model is smaller but not faster on ORT CPU", opts.bits.activations));
    }
    if opts.int4_weights {
        notes.push("weights of 4 bits or fewer are stored as INT4 (opset 21): the file is smaller, but ONNX Runtime does not fuse INT4 layers and tract cannot read INT4".into());
    }
    if opts.bn == BnMode::Keep {
        notes.push(
            "BatchNormalization kept in float between Conv and ReLU: ORT cannot fuse those convs"
                .into(),
        );
    }
    Ok(Report {
        tool: format!("datafree {}", env!("CARGO_PKG_VERSION")),
        teacher: teacher.path.display().to_string(),
        teacher_sha256: teacher.sha256.clone(),
        student: student_path.display().to_string(),
        student_sha256: student_model.sha256.clone(),
        method: opts.method,
        bits: opts.bits.to_string(),
        first_last_bits: opts.first_last_bits,
        weight_scheme: opts.weight_scheme,
        weight_clip: opts.weight_clip(),
        scales: opts.scales,
        inexact_layers,
        bn: opts.bn,
        bn_folded,
        seed: opts.seed,
        placement: PLACEMENT.into(),
        notes,
        activations: plan
            .points
            .iter()
            .map(|p| {
                let q = params[&p.tensor];
                PointReport {
                    tensor: p.tensor.clone(),
                    bits: p.bits,
                    role: p.role,
                    range: ranges[&p.tensor],
                    scale: q.scale,
                    zero_point: q.zero_point,
                    source: sources.get(&p.tensor).cloned().unwrap_or_default(),
                }
            })
            .collect(),
        layers: plan.layers,
        calibration_seconds,
        gdfq: gdfq_report,
        baselines: run_baselines(teacher, opts, data, log)?,
        verification_noise,
        verification_data,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Writes the report atomically next to the student.
pub fn write_report(out: &Path, r: &Report) -> Result<PathBuf> {
    let p = out.join("report.json");
    crate::io::write_atomic(&p, serde_json::to_string_pretty(r)?.as_bytes())?;
    Ok(p)
}

/// Trains the GDFQ generator and fine-tunes the student; returns the activation ranges, the
/// fine-tuned float graph (BN folded when `--bn fold`) and what happened.
#[allow(clippy::too_many_arguments)]
fn run_gdfq(
    teacher: &LoadedModel,
    float_model: &LoadedModel,
    plan: &placement::Plan,
    opts: &Options,
    mut cfg: GdfqTrainConfig,
    out: &Path,
    data: Option<(&Dataset, &Preprocess)>,
    (channels, size): (usize, usize),
    fixed: &Ranges,
    log: &mut dyn FnMut(&str),
) -> Result<(Ranges, crate::onnx::pb::ModelProto, GdfqReport)> {
    let tp = lower(teacher, &Device::Cpu, DType::F32)?;
    let classes = classes(teacher, &tp, (channels, size))?;
    let mut search_report = None;
    if opts.method == Method::Autorecon {
        let genotype = match &opts.autorecon.genotype {
            Some(f) => {
                let g = crate::generator::Genotype::load(f)?;
                log(&format!("autorecon: genotype from {}", f.display()));
                g
            }
            None => {
                let preset = match opts.gdfq.preset {
                    Preset::Paper => SearchPreset::Paper,
                    Preset::Quick => SearchPreset::Quick,
                };
                let scfg = opts.autorecon.search.config(preset, opts.seed)?;
                let dir = out.join("search");
                std::fs::create_dir_all(&dir)?;
                let resume = opts
                    .gdfq
                    .resume
                    .as_ref()
                    .map(|r| r.join("search"))
                    .filter(|d| crate::io::find_checkpoint(d).is_some());
                let io = crate::search::SearchIo {
                    out: &dir,
                    resume: resume.as_deref(),
                    checkpoint_every: opts.autorecon.search.search_checkpoint_every,
                    log_every: 10,
                    stop_after: opts.autorecon.search_stop_after,
                };
                let (g, rep) = run_search(
                    &tp,
                    &teacher.path.display().to_string(),
                    classes,
                    (channels, size),
                    scfg,
                    &io,
                    log,
                )?;
                search_report = Some(rep);
                g
            }
        };
        let mut genotype = genotype;
        if opts.autorecon.inherit_weights {
            let dir = match &opts.autorecon.genotype {
                Some(f) => f.parent().map(Path::to_path_buf).unwrap_or_default(),
                None => out.join("search"),
            };
            let ckpt = crate::io::find_checkpoint(&dir).with_context(|| {
                format!(
                    "--inherit-weights: no search checkpoint next to the genotype (expected {}/checkpoint/supernet.safetensors)",
                    dir.display()
                )
            })?;
            ensure!(
                opts.autorecon
                    .generator_width
                    .is_none_or(|w| w == genotype.width),
                "--inherit-weights needs the search width ({}); drop --generator-width",
                genotype.width
            );
            cfg.generator_init = Some(ckpt.join("supernet.safetensors"));
        }
        if let Some(w) = opts.autorecon.generator_width {
            genotype.width = w;
        }
        cfg.generator = GeneratorFamily::Autorecon;
        cfg.genotype = Some(genotype);
    }
    // The student trains in the teacher's own parametrization (conv weights, BN scale and shift
    // in inference mode, as the reference does) and is folded afterwards: per-channel symmetric
    // quantization commutes with the per-channel BN scale. Training the folded weights directly
    // rescales each channel's effective learning rate by 1/s^2 (s = gamma/sigma) and was measured
    // to lose accuracy (cifar10_resnet20 w4a4: 87.0 -> 83.2 within 200 iterations).
    let unfolded = if opts.bn == BnMode::Fold {
        teacher_weights(&teacher.proto, plan)
    } else {
        None
    };
    let (mut sp, weight_names) = match &unfolded {
        Some(names) => (
            crate::lower::lower_with(teacher, &Device::Cpu, DType::F32, true)?,
            names.clone(),
        ),
        None => (
            crate::lower::lower_with(float_model, &Device::Cpu, DType::F32, true)?,
            plan.layers
                .iter()
                .map(|l| (l.weight.clone(), l.weight.clone()))
                .collect(),
        ),
    };
    log(&format!(
        "gdfq: {} epochs x {} iterations, batch {}, warm-up {} epochs, student lr {}, {} student tensors trainable",
        cfg.epochs,
        cfg.iters_per_epoch,
        cfg.batch,
        cfg.warmup_epochs,
        cfg.student_lr,
        sp.vars().len()
    ));
    let eval_fn = |p: &crate::lower::Program| -> Result<f64> {
        let (d, pre) = data.expect("eval only with data");
        let n = d.len().min(opts.gdfq.eval_images).max(1);
        // Evenly spaced images: folders list one class after another, so the first N would
        // cover only the first classes.
        let picks: Vec<usize> = (0..n).map(|i| i * d.len() / n).collect();
        let mut correct = 0usize;
        for chunk in picks.chunks(200) {
            let px: Vec<f32> = chunk.iter().flat_map(|&i| pre.batch(d, i..i + 1)).collect();
            let x = candle_core::Tensor::from_vec(
                px,
                (chunk.len(), channels, size, size),
                &Device::Cpu,
            )?;
            let pred: Vec<u32> = p.forward(&x)?.argmax(1)?.to_vec1()?;
            correct += pred
                .iter()
                .zip(chunk)
                .filter(|(a, i)| **a as usize == d.labels[**i])
                .count();
        }
        Ok(100.0 * correct as f64 / n as f64)
    };
    let eval_ref: &gdfq::EvalFn = &eval_fn;
    let io = gdfq::Io {
        out,
        // An AutoReCon run killed during its search has no GDFQ checkpoint yet: its stage
        // starts fresh after the resumed search.
        resume: opts.gdfq.resume.as_deref().filter(|r| {
            opts.method != Method::Autorecon || crate::io::find_checkpoint(r).is_some()
        }),
        checkpoint_every: opts.gdfq.checkpoint_every,
        grid_every: opts.gdfq.grid_every,
        denorm: data.map(|(_, p)| (p.mean.to_vec(), p.std.to_vec())),
        stop_after: opts.gdfq.stop_after,
        eval: match (data, opts.gdfq.eval_every) {
            (Some(_), Some(every)) => Some((every, eval_ref)),
            _ => None,
        },
    };
    let total = cfg.total_iters();
    let pb = crate::verify::eval::progress_iters(total, "gdfq");
    let outcome = gdfq::train(
        &tp,
        &teacher.path.display().to_string(),
        &mut sp,
        plan,
        &weight_names,
        (opts.weight_scheme, opts.scales),
        classes,
        (channels, size),
        cfg.clone(),
        fixed,
        &io,
        &mut |m, _| {
            pb.set_position(m.iter as u64 + 1);
            let student = match (m.student_kd, m.student_ce) {
                (Some(kd), Some(ce)) => format!(" student KD {kd:.3} CE {ce:.3}"),
                _ => " (warm-up)".into(),
            };
            let feature = m
                .student_feature
                .map_or(String::new(), |f| format!(" feat {f:.3}"));
            let eval = m
                .eval_top1
                .map_or(String::new(), |a| format!(" top-1 {a:.2}"));
            pb.set_message(format!(
                "gdfq ep {} G: CE {:.3} BNS {:.3}{student}{feature}{eval}",
                m.epoch, m.generator_ce, m.bns
            ));
        },
    )?;
    pb.finish_and_clear();
    log(&format!(
        "gdfq: trained in {:.0} s{}",
        outcome.train_seconds,
        outcome
            .resumed_from
            .map_or(String::new(), |i| format!(" (resumed at iteration {i})"))
    ));
    let report = GdfqReport {
        config: cfg,
        generator_params: outcome.generator_params,
        generator_macs: outcome.generator_macs,
        search: search_report,
        train_seconds: outcome.train_seconds,
        resumed_from_iter: outcome.resumed_from,
        eval_curve: outcome
            .history
            .iter()
            .filter_map(|m| m.eval_top1.map(|a| (m.iter + 1, a)))
            .collect(),
        final_losses: outcome.history.last().cloned(),
    };
    let trained = match unfolded {
        Some(_) => export::fold_bn(&export::with_initializers(&teacher.proto, &outcome.values)?)?.0,
        None => export::with_initializers(&float_model.proto, &outcome.values)?,
    };
    Ok((outcome.ranges, trained, report))
}

/// Number of classes of a classifier: its declared output shape, else one forward pass.
pub fn classes(
    teacher: &LoadedModel,
    program: &crate::lower::Program,
    (channels, size): (usize, usize),
) -> Result<usize> {
    Ok(match crate::onnx::inspect::inspect(teacher).classes {
        Some(c) => c,
        None => program
            .forward(&calibrate::noise(
                &[2, channels, size, size],
                0,
                &Device::Cpu,
            )?)?
            .dim(1)?,
    })
}

/// Runs an AutoReCon search into `io.out` with a progress bar; returns the genotype.
pub fn run_search(
    teacher: &crate::lower::Program,
    teacher_name: &str,
    classes: usize,
    image: (usize, usize),
    cfg: SearchConfig,
    io: &crate::search::SearchIo,
    log: &mut dyn FnMut(&str),
) -> Result<(crate::generator::Genotype, SearchReport)> {
    log(&format!(
        "search: {} epochs x {} iterations, batch {}, width {}, {:?} sampling, tau {} -> {}{}",
        cfg.epochs,
        cfg.iters_per_epoch,
        cfg.batch,
        cfg.width,
        cfg.sampling,
        cfg.tau.0,
        cfg.tau.1,
        io.resume
            .map_or(String::new(), |r| format!(" (resuming {})", r.display()))
    ));
    let pb = crate::verify::eval::progress_iters(cfg.total_iters(), "search");
    let r = crate::search::search(
        teacher,
        teacher_name,
        classes,
        image,
        cfg,
        io,
        &mut |l, _| {
            pb.set_position(l.iter as u64 + 1);
            pb.set_message(format!(
                "search ep {} tau {:.2} w: CE {:.3} BNS {:.3} alpha: CE {:.3} BNS {:.3}",
                l.epoch, l.tau, l.weight_ce, l.weight_bns, l.arch_ce, l.arch_bns
            ));
        },
    )?;
    pb.finish_and_clear();
    log(&format!(
        "search: genotype in {} ({:.0} s, peak {} MB)",
        io.out.join("genotype.json").display(),
        r.1.seconds,
        r.1.peak_rss_mb.map_or("?".into(), |m| format!("{m:.0}"))
    ));
    Ok(r)
}

/// The PTQ methods other than `opts.method`, at the same settings, each into a scratch folder.
fn run_baselines(
    teacher: &LoadedModel,
    opts: &Options,
    data: Option<(&Dataset, &Preprocess)>,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Baseline>> {
    if !opts.baselines {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for m in [Method::PtqBn, Method::PtqNoise, Method::Zeroq] {
        if m == opts.method {
            continue;
        }
        let t = Instant::now();
        let dir = tempfile::tempdir()?;
        let mut o = opts.clone();
        o.method = m;
        o.baselines = false;
        let r = compress(teacher, dir.path(), &o, data, &mut |_| {})
            .with_context(|| format!("baseline {}", cli_name(&m)))?;
        let v = r
            .verification_data
            .as_ref()
            .unwrap_or(&r.verification_noise);
        log(&format!(
            "baseline {}: top-1 {} agreement {:.2}%",
            cli_name(&m),
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

/// BN-analytic ranges (mean +- k std of the BN output) of the points BN statistics reach.
fn ptq_bn_ranges(
    teacher: &LoadedModel,
    plan: &placement::Plan,
    opts: &Options,
    channels: usize,
    sources: &mut std::collections::HashMap<String, String>,
) -> Ranges {
    let with_k: Vec<(String, f64)> = plan
        .points
        .iter()
        .map(|p| {
            (
                p.tensor.clone(),
                opts.bn_k.unwrap_or_else(|| calibrate::default_bn_k(p.bits)),
            )
        })
        .collect();
    let r = calibrate::bn_ranges(
        &teacher.proto,
        &calibrate::bn_affine(teacher),
        channels,
        &with_k,
    );
    for (t, k) in &with_k {
        if r.contains_key(t) {
            sources.insert(t.clone(), format!("BN statistics, mean +- {k} std"));
        }
    }
    r
}

/// The teacher initializer behind each planned layer weight: BN-folded weights are named
/// "<conv>.folded_weight" after the teacher's conv node; other weights keep their names. None
/// when some layer cannot be traced.
fn teacher_weights(
    teacher: &crate::onnx::pb::ModelProto,
    plan: &placement::Plan,
) -> Option<std::collections::HashMap<String, String>> {
    let graph = teacher.graph.as_ref()?;
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    plan.layers
        .iter()
        .map(|l| {
            let name = match l.weight.strip_suffix(".folded_weight") {
                Some(node) => graph
                    .node
                    .iter()
                    .enumerate()
                    .find(|(i, n)| crate::onnx::graph::display_name(n, *i) == node)?
                    .1
                    .input
                    .get(1)?
                    .clone(),
                None => l.weight.clone(),
            };
            inits
                .contains(name.as_str())
                .then(|| (l.weight.clone(), name))
        })
        .collect()
}
