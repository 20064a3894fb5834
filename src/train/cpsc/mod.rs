//! CPSC-DFKD (../shared/papers/003_*.txt; recipe in ../shared/notes/reference-recipes.md) as a
//! training step: a class-conditional generator (categorical feature embeddings) and a student
//! of another architecture, trained from scratch, in adversarial rounds. Generator steps
//! maximise the teacher/student discrepancy (KL + alpha L2 of the logits) under a BN prior, a
//! teacher/student supervised contrastive loss and CE with the sampled labels; student steps
//! minimise KL + alpha L2 + eta CE. The student's BN runs on batch statistics, its running
//! statistics follow as an EMA. Two baselines share the loop at the same budget: DFAD
//! (adversarial L1 only) and a non-adversarial BN-prior generator (DeepInversion/CMI-style).

mod step;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, ensure};
use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::engine::{self, LogLine};
use super::optim::{Adam, Sgd};
use crate::generator::{GdfqConfig, GdfqGenerator};
use crate::lower::Program;

/// Budget presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The paper's settings at its batch (512) and length (600 epochs of 50 rounds): GPU
    /// scale.
    Paper,
    /// About an hour on 2 CPU cores for a ResNet-32 teacher and a ResNetSmall-8 student (9.4 s
    /// per round measured): 16 epochs x 25 rounds at batch 64, one epoch of warm-up.
    Quick,
    /// Seconds, for tests and demonstrations: 2 x 4 rounds at batch 16, 2/2 steps per round,
    /// one epoch of warm-up.
    Tiny,
}

/// Which data-free distillation the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// CPSC-DFKD.
    Cpsc,
    /// DFAD (Fang et al.): adversarial L1 between logits only; no BN prior, no labels.
    Dfad,
    /// A generator trained only on the teacher (BN prior + CE with the sampled labels), not
    /// against the student; the student distils on its images with CPSC's student loss.
    BnPrior,
}

/// Normalisation of the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GeneratorNorm {
    /// Categorical feature embeddings: BN without affine, then per-class gamma/beta.
    Cfe,
    /// Plain BN after a label embedding (the paper's ablation).
    Bn,
}

/// The form of the L2 term between logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L2Form {
    /// `log` for up to 10 classes, else `mse` (the reference's CIFAR-10 / CIFAR-100 choice).
    Auto,
    /// Generator: -log MSE; student: log of the L2 norm of the difference (scale-free).
    Log,
    /// MSE for both.
    Mse,
}

impl L2Form {
    pub fn resolve(self, classes: usize) -> L2Form {
        match self {
            L2Form::Auto if classes <= 10 => L2Form::Log,
            L2Form::Auto => L2Form::Mse,
            f => f,
        }
    }
}

/// What the CE with the sampled labels is taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CeForm {
    /// The reference code's: PyTorch's `cross_entropy` applied to softmax probabilities (a
    /// second softmax), bounded and with a vanishing gradient once the network is confident.
    Probabilities,
    /// The paper's formula, `CE(softmax(logits), y)` = `-log softmax(logits)_y` (the default:
    /// docs/results.md, "CPSC: the cross-entropy's form").
    Logits,
}

impl CeForm {
    /// What checkpoints written before `ce_form` existed ran.
    fn before_the_switch() -> Self {
        CeForm::Probabilities
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub preset: Preset,
    pub variant: Variant,
    pub generator_norm: GeneratorNorm,
    pub epochs: usize,
    /// Rounds per epoch; one round = `generator_steps` then `student_steps`.
    pub rounds_per_epoch: usize,
    pub generator_steps: usize,
    pub student_steps: usize,
    pub batch: usize,
    /// alpha: weight of the L2 term between logits, beside KL.
    pub l2_weight: f64,
    pub l2_form: L2Form,
    /// beta: weight of the BN prior in the generator's loss.
    pub bn_weight: f64,
    /// gamma: weight of the contrastive loss in the generator's loss.
    pub contrastive_weight: f64,
    /// eta: weight of CE with the sampled labels (teacher in the generator's loss, student in
    /// the student's).
    pub ce_weight: f64,
    /// eta on the student's side (the ablation switch); normally `ce_weight`.
    pub student_ce_weight: f64,
    /// What both CE terms are taken on (absent in checkpoints of earlier versions: the
    /// reference's form, which they ran).
    #[serde(default = "CeForm::before_the_switch")]
    pub ce_form: CeForm,
    pub contrastive_temperature: f64,
    pub student_lr: f64,
    pub student_momentum: f64,
    pub student_weight_decay: f64,
    /// Epochs of linear learning-rate warm-up before the cosine decay.
    pub warmup_epochs: usize,
    pub generator_lr: f64,
    pub generator_betas: (f64, f64),
    /// A fresh Adam at every generator step, as the reference builds it (its learning-rate
    /// schedule then never reaches the optimiser that steps).
    pub generator_adam_reset: bool,
    /// Fractions of the run after which the generator's learning rate is divided by 10 (the
    /// paper's text: epochs 50 and 150 of 600; none in the reference's effect).
    pub generator_lr_drops: Vec<f64>,
    /// The student's gradients are scaled to this global L2 norm when larger (0 = never, as
    /// the reference): the L2 term grows with the square of the teacher's logit scale, and
    /// teachers with large logits otherwise throw a fresh student off at lr 0.1.
    pub student_grad_clip: f64,
    /// Momentum of the student's BN running statistics (PyTorch's 0.1).
    pub bn_momentum: f64,
    pub seed: u64,
}

impl Config {
    pub fn preset(p: Preset, seed: u64) -> Self {
        let (epochs, rounds, batch, g, s) = match p {
            Preset::Paper => (600, 50, 512, 6, 5),
            Preset::Quick => (16, 25, 64, 6, 5),
            Preset::Tiny => (2, 4, 16, 2, 2),
        };
        Config {
            preset: p,
            variant: Variant::Cpsc,
            generator_norm: GeneratorNorm::Cfe,
            epochs,
            rounds_per_epoch: rounds,
            generator_steps: g,
            student_steps: s,
            batch,
            l2_weight: 5.0,
            // The reference's MSE above 10 classes grows with the teacher's logit scale; at CPU
            // budgets it kept a 100-class student at chance where the log form learned
            // (docs/results.md, "CPSC: the L2 term's form"). `paper` keeps the reference's.
            l2_form: match p {
                Preset::Paper => L2Form::Auto,
                Preset::Quick | Preset::Tiny => L2Form::Log,
            },
            bn_weight: 1.0,
            contrastive_weight: 0.7,
            ce_weight: 0.7,
            student_ce_weight: 0.7,
            ce_form: CeForm::Logits,
            contrastive_temperature: 0.07,
            student_lr: 0.1,
            student_momentum: 0.9,
            student_weight_decay: 5e-4,
            warmup_epochs: 1,
            generator_lr: 1e-3,
            generator_betas: (0.5, 0.999),
            generator_adam_reset: true,
            generator_lr_drops: vec![],
            student_grad_clip: 5.0,
            bn_momentum: 0.1,
            seed,
        }
    }

    pub fn total_rounds(&self) -> usize {
        self.epochs * self.rounds_per_epoch
    }

    /// Refuses a teacher without BatchNormalization statistics unless the variant needs none
    /// (DFAD).
    pub fn check_teacher(&self, teacher_name: &str, bn_layers: usize) -> Result<()> {
        ensure!(
            self.variant == Variant::Dfad || bn_layers > 0,
            "{teacher_name}: {} needs the teacher's BatchNormalization statistics and this teacher has none (BN was folded at export); re-export it with BN kept, or use --variant dfad",
            crate::cli_name(&self.variant)
        );
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.epochs > 0 && self.rounds_per_epoch > 0,
            "--epochs and --iters-per-epoch must be positive"
        );
        ensure!(
            self.batch >= 2,
            "--batch must be at least 2 (batch statistics)"
        );
        ensure!(self.student_steps > 0, "--student-steps must be positive");
        ensure!(
            self.warmup_epochs < self.epochs,
            "the learning-rate warm-up ({} epochs) must be shorter than the run ({} epochs)",
            self.warmup_epochs,
            self.epochs
        );
        for (name, v) in [
            ("--l2-weight", self.l2_weight),
            ("--bn-weight", self.bn_weight),
            ("--contrastive-weight", self.contrastive_weight),
            ("--ce-weight", self.ce_weight),
            ("--student-ce-weight", self.student_ce_weight),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "{name} must be a finite number >= 0, got {v}"
            );
        }
        ensure!(
            self.student_grad_clip.is_finite() && self.student_grad_clip >= 0.0,
            "--student-grad-clip must be a finite number >= 0, got {}",
            self.student_grad_clip
        );
        ensure!(
            self.student_lr > 0.0 && self.generator_lr > 0.0,
            "learning rates must be positive"
        );
        Ok(())
    }

    /// The student's learning rate at round `r`: linear warm-up, then cosine decay to 0.
    pub fn student_lr_at(&self, r: usize) -> f64 {
        let warm = self.warmup_epochs * self.rounds_per_epoch;
        let total = self.total_rounds();
        if r < warm {
            return self.student_lr * (r + 1) as f64 / warm as f64;
        }
        let t = (r - warm) as f64 / (total - warm).max(1) as f64;
        0.5 * self.student_lr * (1.0 + (std::f64::consts::PI * t).cos())
    }

    pub fn generator_lr_at(&self, r: usize) -> f64 {
        let f = r as f64 / self.total_rounds() as f64;
        let drops = self.generator_lr_drops.iter().filter(|&&d| f >= d).count();
        self.generator_lr * 0.1f64.powi(drops as i32)
    }
}

/// One line of the metrics log (one round).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub iter: usize,
    pub epoch: usize,
    /// The generator's objective (last step of the round).
    pub generator_loss: f64,
    /// Teacher/student discrepancy the generator maximises (KL + alpha L2, or L1 for DFAD).
    pub adversarial: f64,
    pub bn_prior: f64,
    pub contrastive: f64,
    pub generator_ce: f64,
    pub student_kd: f64,
    pub student_l2: f64,
    pub student_ce: f64,
    pub student_lr: f64,
    /// Top-1 of the student (running statistics) on the measuring data, when evaluated.
    pub eval_top1: Option<f64>,
    pub seconds: f64,
}

impl LogLine for Metrics {
    fn iter(&self) -> usize {
        self.iter
    }
    fn set_seconds(&mut self, s: f64) {
        self.seconds = s;
    }
    fn summary(&self) -> String {
        let eval = self
            .eval_top1
            .map_or(String::new(), |a| format!(" top-1 {a:.2}"));
        format!(
            "ep {} G: adv {:.3} BN {:.2} con {:.3} CE {:.3} | S: KD {:.3} L2 {:.3} CE {:.3}{eval}",
            self.epoch,
            self.adversarial,
            self.bn_prior,
            self.contrastive,
            self.generator_ce,
            self.student_kd,
            self.student_l2,
            self.student_ce
        )
    }
    fn eval_top1(&self) -> Option<f64> {
        self.eval_top1
    }
    fn curves(&self) -> Vec<crate::plot::CurvePoint> {
        let mut v = vec![
            ("generator", "adversarial", self.adversarial),
            ("generator", "BN prior", self.bn_prior),
            ("generator", "contrastive", self.contrastive),
            ("generator", "CE", self.generator_ce),
            ("student", "KD", self.student_kd),
            ("student", "L2", self.student_l2),
            ("student", "CE", self.student_ce),
            ("student learning rate", "lr", self.student_lr),
        ];
        if let Some(a) = self.eval_top1 {
            v.push(("student top-1 on the measuring data (%)", "top-1", a));
        }
        v
    }
}

/// Top-1 (%) of a student program (eval mode) on the measuring data.
pub type EvalFn<'a> = dyn Fn(&Program) -> Result<f64> + 'a;

/// Where the run reads and writes.
pub struct Io<'a> {
    pub out: &'a Path,
    pub resume: Option<&'a Path>,
    pub checkpoint_every: usize,
    pub grid_every: usize,
    pub domain: &'a crate::teacher::InputDomain,
    pub stop_after: Option<usize>,
    pub eval: Option<(usize, &'a EvalFn<'a>)>,
}

/// What the run hands back: every trained value of the student (parameters and BN running
/// statistics) by initializer name.
pub struct Outcome {
    pub values: HashMap<String, Vec<f32>>,
    pub history: Vec<Metrics>,
    pub generator_params: usize,
    pub generator_macs: u64,
    pub train_seconds: f64,
    pub resumed_from: Option<usize>,
}

/// Distils `teacher` (frozen, BN taps needed unless DFAD) into `student` (lowered trainable
/// from `student_model`, whose BatchNormalization running statistics it keeps up to date).
#[allow(clippy::too_many_arguments)]
pub fn train(
    teacher: &Program,
    teacher_name: &str,
    student: &mut Program,
    student_model: &crate::onnx::LoadedModel,
    classes: usize,
    (channels, height, width): (usize, usize, usize),
    cfg: Config,
    io: &Io,
) -> Result<Outcome> {
    cfg.validate()?;
    cfg.check_teacher(teacher_name, teacher.bn_taps().len())?;
    let device: Device = teacher.device().clone();
    student.set_bn_batch_stats(true);
    let generator = GdfqGenerator::new(
        GdfqConfig::cpsc(
            classes,
            channels,
            (height, width),
            cfg.generator_norm == GeneratorNorm::Cfe,
        ),
        &device,
        cfg.seed,
    )?;
    let mut run = step::Run::new(
        teacher,
        student,
        student_model,
        Box::new(generator),
        classes,
        cfg.clone(),
        io,
        device,
    )?;
    let label = crate::cli_name(&cfg.variant);
    let outcome = engine::run(
        &mut run,
        cfg.total_rounds(),
        &engine::RunIo {
            out: io.out,
            resume: io.resume,
            log_name: "metrics.jsonl",
            log_every: 1,
            checkpoint_every: io.checkpoint_every,
            stop_after: io.stop_after,
            label: &label,
        },
    )?;
    let values = run.values()?;
    let (generator_params, generator_macs) = run.generator_size();
    Ok(Outcome {
        values,
        history: outcome.history,
        generator_params,
        generator_macs,
        train_seconds: outcome.seconds,
        resumed_from: outcome.resumed_from,
    })
}

/// Fresh optimisers of a run (kept here so `step` holds only the loop).
pub(crate) fn optimisers(
    cfg: &Config,
    generator: Vec<candle_core::Var>,
    student: Vec<candle_core::Var>,
) -> (Adam, Sgd) {
    (
        Adam::new(generator, cfg.generator_lr, cfg.generator_betas),
        Sgd::new(
            student,
            cfg.student_lr,
            cfg.student_momentum,
            cfg.student_weight_decay,
            false,
        ),
    )
}

pub(crate) fn rng(cfg: &Config) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1))
}
