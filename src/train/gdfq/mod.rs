//! GDFQ (Xu et al. 2020) as a training step: a class-conditional generator learns images whose
//! teacher BN statistics and predictions match (CE + 0.1 BNS); after a warm-up in which the
//! student only observes activation ranges (EMA of batch min/max, then frozen), the
//! fake-quantized student is fine-tuned by distillation (KL at temperature T, times T^2, + CE
//! with the sampled labels).
//!
//! The step's state (generator, student, optimiser moments, RNG position, ranges) goes into the
//! engine's checkpoints ([`super::engine`]), so resuming continues bit-for-bit on the CPU; the
//! engine writes metrics.jsonl and curves.png, the step sample grids.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use candle_core::{D, DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

mod config;
mod step;

pub use config::{Config, GeneratorFamily, Preset, RangeSource};
use step::{Run, clamp_var};

use super::engine::{self, LogLine};
use super::optim::{Adam, Sgd};
use crate::generator::{AutoReconGenerator, GdfqConfig, GdfqGenerator, Generator};
use crate::lower::Program;
use crate::quant::fake::{Fold, fake_quant_weight, fake_quant_weight_exact};
use crate::quant::moments::LayerInput;
use crate::quant::placement::Plan;
use crate::quant::{Scales, WeightScheme};

/// One line of the metrics log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub iter: usize,
    pub epoch: usize,
    pub generator_ce: f64,
    pub bns: f64,
    pub student_kd: Option<f64>,
    pub student_ce: Option<f64>,
    /// The feature-distillation loss (before its weight), when `feature_weight` > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_feature: Option<f64>,
    pub student_lr: f64,
    /// Top-1 of the fake-quantized student on the measuring data, when evaluated.
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
        let student = match (self.student_kd, self.student_ce) {
            (Some(kd), Some(ce)) => format!(" student KD {kd:.3} CE {ce:.3}"),
            _ => " (warm-up)".into(),
        };
        let feature = self
            .student_feature
            .map_or(String::new(), |f| format!(" feat {f:.3}"));
        let eval = self
            .eval_top1
            .map_or(String::new(), |a| format!(" top-1 {a:.2}"));
        format!(
            "gdfq ep {} G: CE {:.3} BNS {:.3}{student}{feature}{eval}",
            self.epoch, self.generator_ce, self.bns
        )
    }
    fn eval_top1(&self) -> Option<f64> {
        self.eval_top1
    }
    fn curves(&self) -> Vec<crate::plot::CurvePoint> {
        let mut v = vec![
            ("generator loss", "CE", self.generator_ce),
            ("generator loss", "BNS", self.bns),
            ("student learning rate", "lr", self.student_lr),
        ];
        let student = [
            ("KD", self.student_kd),
            ("CE", self.student_ce),
            ("feature", self.student_feature),
        ];
        v.extend(
            student
                .into_iter()
                .filter_map(|(n, x)| x.map(|x| ("student loss", n, x))),
        );
        if let Some(a) = self.eval_top1 {
            v.push(("student top-1 on the measuring data (%)", "top-1", a));
        }
        v
    }
}

/// What the run hands back for export.
pub struct Outcome {
    pub ranges: HashMap<String, (f32, f32)>,
    /// Fine-tuned float values of the student's parameters, by initializer name.
    pub values: HashMap<String, Vec<f32>>,
    pub history: Vec<Metrics>,
    pub generator_params: usize,
    /// Multiply-accumulates of the generator per image.
    pub generator_macs: u64,
    pub train_seconds: f64,
    pub resumed_from: Option<usize>,
}

/// The generator `cfg` names, initialised from its seed.
pub fn build_generator(
    cfg: &Config,
    classes: usize,
    (channels, height, width): (usize, usize, usize),
    device: &Device,
) -> Result<Box<dyn Generator>> {
    Ok(match cfg.generator {
        GeneratorFamily::GdfqCifar => Box::new(GdfqGenerator::new(
            GdfqConfig::cifar(classes, channels, (height, width)),
            device,
            cfg.seed,
        )?),
        GeneratorFamily::GdfqImagenet => Box::new(GdfqGenerator::new(
            GdfqConfig::imagenet(classes, channels, (height, width)),
            device,
            cfg.seed,
        )?),
        GeneratorFamily::Autorecon => {
            let g = cfg.genotype.as_ref().context(
                "the autorecon generator needs a genotype (--genotype FILE, from `datafree search`)",
            )?;
            ensure!(
                height == width,
                "the autorecon generator makes square images, the teacher takes {height}x{width}"
            );
            Box::new(AutoReconGenerator::derived(
                g,
                (100, classes, channels, height),
                device,
                cfg.seed,
            )?)
        }
    })
}

/// Where a planned layer's weight lives in the trainable student, and what the export does to
/// it: the BN it folds in (when the student trains unfolded) and the layer's own bias.
#[derive(Debug, Clone)]
pub struct StudentWeight {
    /// The trainable weight's name.
    pub var: String,
    pub fold: Option<FoldSource>,
    /// The layer's own bias parameter.
    pub bias: Option<String>,
}

/// A BatchNormalization the export folds into a layer: its trainable scale and shift and its
/// fixed statistics.
#[derive(Debug, Clone)]
pub struct FoldSource {
    pub gamma: String,
    pub beta: String,
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub eps: f32,
}

/// Top-1 (%) of a student program on the measuring data.
pub type EvalFn<'a> = dyn Fn(&Program) -> Result<f64> + 'a;

/// Where the run reads and writes.
pub struct Io<'a> {
    pub out: &'a Path,
    pub resume: Option<&'a Path>,
    pub checkpoint_every: usize,
    pub grid_every: usize,
    /// The teacher's input domain: where generated images live, and how grids show them.
    pub domain: &'a crate::teacher::InputDomain,
    /// Fails after this many iterations (simulates a crash for resume tests).
    pub stop_after: Option<usize>,
    /// Evaluates the fake-quantized student (top-1 %) at the given interval.
    pub eval: Option<(usize, &'a EvalFn<'a>)>,
}

/// The GDFQ distillation loss: KL(softmax(t/T) || softmax(s/T)) averaged over batch x classes
/// (PyTorch's KLDivLoss default, as the reference uses it) times T^2.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let ls = candle_nn::ops::log_softmax(&(student / t)?, D::Minus1)?;
    let lt = candle_nn::ops::log_softmax(&(teacher / t)?, D::Minus1)?;
    let kl = (lt.exp()? * (lt - ls)?)?.mean_all()?;
    Ok((kl * (t * t))?)
}

/// Trains generator and student. `teacher` is the frozen teacher (BN taps needed), `student`
/// the trainable float student graph that `plan` quantizes (`weight_names` maps the plan's
/// weight names to the student's, when it trains another parametrization); `fixed_ranges` are activation
/// ranges given in advance (the others are observed during warm-up); `clip_inputs` the moments of
/// the layers' inputs that `--weight-clip output` weighs by (see [`crate::export::clip_weights`]).
#[allow(clippy::too_many_arguments)]
pub fn train(
    teacher: &Program,
    teacher_name: &str,
    student: &mut Program,
    plan: &Plan,
    weight_names: &HashMap<String, StudentWeight>,
    (scheme, scales): (WeightScheme, Scales),
    classes: usize,
    image: (usize, usize, usize),
    cfg: Config,
    fixed_ranges: &HashMap<String, (f32, f32)>,
    clip_inputs: Option<&HashMap<String, LayerInput>>,
    io: &Io,
) -> Result<Outcome> {
    ensure!(
        !teacher.bn_taps().is_empty(),
        "{teacher_name}: GDFQ needs the teacher's BatchNormalization statistics and this teacher has none (BN was folded at export); re-export it with BN kept"
    );
    ensure!(
        cfg.batch >= 2,
        "--batch must be at least 2 (batch statistics)"
    );
    let device = teacher.device().clone();
    // Weights are fake-quantized on every forward pass, from their current values: on min/max
    // grids while the input grids are unknown (warm-up), then on exactly the grids the export
    // will give them (exact scales depend on the folded BN, the bias and the input's grid).
    let var_of = |name: &str| -> Result<candle_core::Var> {
        student
            .vars()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("{name} is not a trainable parameter of the student"))
    };
    let mut grids: HashMap<String, step::GridCell> = HashMap::new();
    let mut transforms = Vec::new();
    for l in &plan.layers {
        let (axis, bits) = (l.weight_axis, l.weight_bits);
        let sw = weight_names
            .get(&l.weight)
            .cloned()
            .unwrap_or(StudentWeight {
                var: l.weight.clone(),
                fold: None,
                bias: l.bias.clone(),
            });
        let cell = grids.entry(l.input.clone()).or_default().clone();
        let fold = sw
            .fold
            .as_ref()
            .map(|f| -> Result<_> { Ok((var_of(&f.gamma)?, var_of(&f.beta)?, f.clone())) })
            .transpose()?;
        let bias = sw.bias.as_deref().map(var_of).transpose()?;
        let t: crate::lower::program::Transform = Arc::new(move |w| {
            let grid = cell.read().expect("not poisoned").clone();
            match (scales, grid) {
                (Scales::Exact, Some(g)) => {
                    let values = |v: &candle_core::Var| -> Result<Vec<f32>> {
                        Ok(v.as_tensor()
                            .flatten_all()?
                            .to_dtype(DType::F32)?
                            .to_vec1()?)
                    };
                    let b = bias.as_ref().map(values).transpose()?;
                    let fold = match &fold {
                        Some((gamma, beta, f)) => Some(Fold::new(
                            &values(gamma)?,
                            &values(beta)?,
                            &f.mean,
                            &f.var,
                            f.eps,
                            b.as_deref().unwrap_or(&[]),
                        )),
                        None => None,
                    };
                    fake_quant_weight_exact(
                        w,
                        axis,
                        bits,
                        scheme,
                        fold.as_ref(),
                        b.as_deref(),
                        &g.qparams()?,
                    )
                }
                _ => fake_quant_weight(w, axis, bits, scheme),
            }
        });
        transforms.push((sw.var.clone(), t));
    }
    for (name, t) in transforms {
        student.set_transform(&name, t)?;
    }
    // Clipped weights are clamped to their starting clips after every step (projected SGD), so
    // the min/max grid of the trained weights is the clipped one.
    let mut clips = Vec::new();
    if cfg.weight_clip.clips() {
        for l in &plan.layers {
            let name = weight_names.get(&l.weight).map_or(&l.weight, |w| &w.var);
            let var = student
                .vars()
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .with_context(|| format!("layer {}: weight {name} is not trainable", l.node))?;
            let input = clip_inputs
                .and_then(|m| m.get(&l.input))
                .map(|m| m.as_input());
            let c = clamp_var(&var, l, None, input)?;
            clips.push((var, l.clone(), c));
        }
    }
    let student_vars: Vec<candle_core::Var> =
        student.vars().iter().map(|(_, v)| v.clone()).collect();
    let mut generator = build_generator(&cfg, classes, image, &device)?;
    if let Some(init) = &cfg.generator_init {
        generator.params_mut().load(init)?;
    }
    // The student is the BN-folded teacher, whose tensors keep the teacher's names.
    let features: Vec<String> = if cfg.feature_weight > 0.0 {
        plan.points
            .iter()
            .map(|p| p.tensor.clone())
            .filter(|t| t != teacher.input_name())
            .collect()
    } else {
        vec![]
    };
    let mut run = Run {
        gen_opt: Adam::new(
            generator.params().vars(),
            cfg.generator_lr,
            cfg.generator_betas,
        ),
        student_opt: Sgd::new(
            student_vars,
            cfg.student_lr,
            cfg.student_momentum,
            cfg.student_weight_decay,
            true,
        ),
        generator,
        rng: ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1)),
        ranges: fixed_ranges.clone(),
        fixed: fixed_ranges.keys().cloned().collect(),
        cfg: cfg.clone(),
        teacher,
        student,
        plan,
        classes,
        scales,
        learned: Vec::new(),
        range_opt: None,
        grids,
        clips,
        features,
        io,
        device,
    };
    let outcome = engine::run(
        &mut run,
        cfg.total_iters(),
        &engine::RunIo {
            out: io.out,
            resume: io.resume,
            log_name: "metrics.jsonl",
            log_every: 1,
            checkpoint_every: io.checkpoint_every,
            stop_after: io.stop_after,
            label: "gdfq",
        },
    )?;
    let values = run
        .student
        .vars()
        .iter()
        .map(|(n, v)| {
            Ok((
                n.clone(),
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    let ranges = run.current_ranges()?;
    run.student.clear_transforms();
    Ok(Outcome {
        ranges,
        values,
        history: outcome.history,
        generator_params: run.generator.params().count(),
        generator_macs: run.generator.macs_per_image(),
        train_seconds: outcome.seconds,
        resumed_from: outcome.resumed_from,
    })
}
