//! The flags of `compress`, `search` and the preprocessing, and their conversion into the
//! library's configurations (validated there, before anything is written).

use std::path::PathBuf;

use anyhow::{Result, ensure};

use crate::data::{self, Preprocess};
use crate::device::DeviceArg;
use crate::methods::{AutoreconSettings, Method, PtqSettings, RunSettings};
use crate::pipeline::{BnMode, CompressConfig};
use crate::quant::{BitSpec, Scales, WeightClip, WeightScheme};
use crate::search::{Sampling, SearchConfig, SearchPreset};
use crate::train::gdfq::{Config as TrainConfig, GeneratorFamily, Preset, RangeSource};

/// The `datafree compress` flags (also what pipeline files set).
#[derive(Debug, Clone, clap::Args)]
pub struct CompressArgs {
    /// Bit widths: wNaM (N-bit weights, M-bit activations), N and M in 2..=8; or fp32 (a
    /// float student, with --method cpsc).
    #[arg(long, default_value = "w8a8")]
    pub bits: super::distil::Bits,
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
    /// Weight ranges: `none` (each channel's min/max), `mse` (each channel clipped where its
    /// squared quantization error is least) or `output` (clipped where the layer's expected
    /// output error is least, under the moments of its input that the BN statistics or the input
    /// domain give; `mse` where none reach it). Symmetric weights only. With gdfq the clip is found
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
    /// Images synthesized from the teacher to check the student on (class-balanced, clearly
    /// classified by the teacher); a student far below what its bit widths give exits 1.
    #[arg(long, default_value_t = 128)]
    pub verify_images: usize,
    /// Also run the data-free PTQ methods (ptq-bn, ptq-noise, zeroq) at the same bits and list
    /// their numbers in the report for comparison.
    #[arg(long)]
    pub baselines: bool,
    /// Where training runs: cpu, or cuda[:N] (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    #[command(flatten)]
    pub gdfq: GdfqArgs,
    #[command(flatten)]
    pub autorecon: AutoreconArgs,
    #[command(flatten)]
    pub cpsc: super::distil::CpscArgs,
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

impl CompressArgs {
    /// The library configuration these flags stand for.
    pub fn config(&self) -> Result<CompressConfig> {
        match self.bits {
            super::distil::Bits::Quant(b) => self.config_with_bits(b),
            super::distil::Bits::Float => anyhow::bail!(
                "--bits fp32 makes a float student of another architecture: use it with --method cpsc --student S.onnx; --method {} quantizes (wNaM)",
                self.method.name()
            ),
        }
    }

    /// [`Self::config`] at bit widths `bits`.
    pub fn config_with_bits(&self, bits: BitSpec) -> Result<CompressConfig> {
        // GDFQ's flags are checked only where they are used.
        let train = self.gdfq.config(self.seed, self.method.trains())?;
        let search_preset = match self.gdfq.preset {
            Preset::Paper => SearchPreset::Paper,
            Preset::Quick | Preset::Tiny => SearchPreset::Quick,
        };
        let search = if self.method == Method::Autorecon && self.autorecon.genotype.is_none() {
            self.autorecon.search.config(search_preset, self.seed)?
        } else {
            SearchConfig::preset(search_preset, self.seed)
        };
        let c = CompressConfig {
            method: self.method,
            bits,
            first_last_bits: self.first_last_bits,
            weight_scheme: self.weight_scheme,
            scales: self.scales,
            weight_clip: self.weight_clip,
            full_range_weights: self.full_range_weights,
            int4_weights: self.int4_weights,
            bn: self.bn,
            seed: self.seed,
            verify_images: self.verify_images,
            baselines: self.baselines,
            ptq: PtqSettings {
                calib_images: self.calib_images,
                zeroq_iters: self.zeroq_iters,
                zeroq_lr: self.zeroq_lr,
                percentile: self.percentile,
                bn_k: self.bn_k,
            },
            train,
            autorecon: AutoreconSettings {
                genotype: self.autorecon.genotype.clone(),
                generator_width: self.autorecon.generator_width,
                inherit_weights: self.autorecon.inherit_weights,
                search,
                search_checkpoint_every: self.autorecon.search.search_checkpoint_every,
                search_stop_after: self.autorecon.search_stop_after,
            },
            run: RunSettings {
                checkpoint_every: self.gdfq.checkpoint_every,
                resume: self.gdfq.resume.clone(),
                grid_every: self.gdfq.grid_every,
                eval_every: self.gdfq.eval_every,
                eval_images: self.gdfq.eval_images,
                stop_after: self.gdfq.stop_after,
            },
            device: self.device.open()?,
        };
        ensure!(
            c.weight_clip() == WeightClip::None || c.weight_scheme == WeightScheme::Symmetric,
            "--weight-clip mse clips each channel symmetrically: use it with --weight-scheme symmetric"
        );
        Ok(c)
    }
}

/// Flags of `--method gdfq` (unset budget flags take the preset's values).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "GDFQ (--method gdfq)")]
pub struct GdfqArgs {
    /// Budget and defaults: `quick` (12 x 100 iterations, batch 64: about 17 min on 2 CPU
    /// cores for a CIFAR ResNet-20; distillation only at student lr 1e-3, ranges from BN
    /// statistics then learned, weights MSE-clipped), `tiny` (6 x 50 at batch 32, lr 1e-4: a
    /// minute for the quick-start teacher) or `paper` (the reference: 400 x 200, batch 200,
    /// KD + CE at lr 1e-4, EMA ranges, frozen after warm-up). With --method cpsc: quick 16 x 25
    /// rounds at batch 64 (about an hour on 2 cores for a ResNet-32 teacher), tiny 2 x 4 at
    /// batch 16, paper 600 x 50 at batch 512.
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
    /// Student SGD learning rate [default: the preset's, 1e-3 quick, 1e-4 paper; cpsc 0.1].
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
    /// GDFQ's generator [default: gdfq-imagenet (class-conditional BN) with --preset quick|tiny,
    /// gdfq-cifar (the reference's) with --preset paper; measured in docs/results.md, "GDFQ's
    /// generator"].
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
    /// Units of the BNS loss: `plain` (the references': raw means and variances), `relative`
    /// (each BN layer in its own units) or `auto` (relative for teachers whose inputs are in
    /// pixel units, where the plain loss is all first layer) [default: auto].
    #[arg(long, value_enum)]
    pub bns_units: Option<crate::train::losses::BnsUnits>,
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
    /// The preset and run settings of `self` with GDFQ's own budget and defaults: for a GDFQ
    /// run after another method (`--finetune`), whose budget flags size that other run.
    pub fn preset_only(&self) -> Self {
        Self {
            preset: self.preset,
            epochs: None,
            iters_per_epoch: None,
            batch: None,
            warmup_epochs: None,
            student_lr: None,
            student_momentum: None,
            student_weight_decay: None,
            lr_milestones: None,
            lr_gamma: None,
            generator: None,
            generator_lr: None,
            generator_betas: None,
            bns_weight: None,
            bns_units: self.bns_units,
            student_ce_weight: None,
            feature_weight: None,
            temperature: None,
            range_ema: None,
            range_source: None,
            range_lr: None,
            checkpoint_every: self.checkpoint_every,
            resume: None,
            grid_every: self.grid_every,
            eval_every: self.eval_every,
            eval_images: self.eval_images,
            stop_after: None,
        }
    }

    /// The preset with the flags over it; `validate` refuses settings that would train wrongly.
    pub fn config(&self, seed: u64, validate: bool) -> Result<TrainConfig> {
        let mut c = TrainConfig::preset(self.preset, seed);
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
        set(&mut c.bns_units, &self.bns_units);
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
        if validate {
            c.validate()?;
        }
        Ok(c)
    }
}

/// How images become model inputs: x = (pixel / scale - mean) / std. Without these flags the
/// preprocessing comes from the model's metadata, else from its BatchNormalization statistics.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PreprocessArgs {
    /// Per-channel mean, "r,g,b" [default: 0,0,0 when another preprocessing flag is given].
    #[arg(long, value_parser = data::parse_triple)]
    pub mean: Option<[f32; 3]>,
    /// Per-channel std, "r,g,b" [default: 1,1,1 when another preprocessing flag is given].
    #[arg(long, value_parser = data::parse_triple)]
    pub std: Option<[f32; 3]>,
    /// Pixel scale (1 = raw 0..255 pixels) [default: 255 when another preprocessing flag is
    /// given].
    #[arg(long)]
    pub scale: Option<f32>,
    /// The input range pixels 0..255 map to linearly, "LO,HI" (e.g. 0,255, 0,1 or -1,1);
    /// instead of --scale/--mean/--std.
    #[arg(long, value_delimiter = ',', num_args = 1, allow_hyphen_values = true, conflicts_with_all = ["mean", "std", "scale"])]
    pub input_range: Option<Vec<f32>>,
}

impl PreprocessArgs {
    /// The preprocessing the flags give, if any.
    pub fn given(&self) -> Result<Option<Preprocess>> {
        if let Some(r) = &self.input_range {
            ensure!(
                r.len() == 2 && r[0].is_finite() && r[1].is_finite() && r[0] != r[1],
                "--input-range takes two different numbers LO,HI, got {r:?}"
            );
            // x = lo + (hi - lo) * pixel / 255 = (pixel/255 - mean) / std.
            let std = 1.0 / (r[1] - r[0]);
            return Ok(Some(Preprocess {
                mean: [-r[0] * std; 3],
                std: [std; 3],
                scale: 255.0,
            }));
        }
        if self.mean.is_none() && self.std.is_none() && self.scale.is_none() {
            return Ok(None);
        }
        let d = Preprocess::default();
        let p = Preprocess {
            mean: self.mean.unwrap_or(d.mean),
            std: self.std.unwrap_or(d.std),
            scale: self.scale.unwrap_or(d.scale),
        };
        ensure!(
            p.std.iter().all(|&s| s != 0.0 && s.is_finite())
                && p.scale != 0.0
                && p.scale.is_finite()
                && p.mean.iter().all(|m| m.is_finite()),
            "--mean, --std and --scale must be finite, and --std and --scale not 0"
        );
        Ok(Some(p))
    }
}

/// Labelled data and its preprocessing.
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    /// Labelled data: a CIFAR-10/100 binary file (or `cifar10:FILE` / `cifar100:FILE`), or a folder
    /// of class sub-folders of PNG/JPEG images (class = sub-folder index in sorted order).
    #[arg(long)]
    pub data: String,
    #[command(flatten)]
    pub pre: PreprocessArgs,
}
