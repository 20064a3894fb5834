//! Inputs synthesized from the reference model alone, for verifying a student without data:
//! a class-balanced batch (image i targets class i mod classes) optimised, as DeepInversion and
//! ZeroQ do, until the reference classifies each image as its class with confidence and (when
//! the reference has BatchNormalization) the batch's statistics match the running ones, each
//! layer in its own units (a raw-pixel model's first BN would otherwise outweigh the rest). On
//! such inputs the reference's predictions are not near-ties, so prediction agreement means
//! something, which on plain noise it does not.
//!
//! Images are optimised in standardized coordinates (x = domain mean + domain std * u) and kept
//! inside the domain's range, so a raw-pixel model gets pixel-like inputs.

use anyhow::{Result, ensure};
use candle_core::{DType, Tensor, Var};
use serde::Serialize;

use crate::device::HOST;
use crate::teacher::Teacher;
use crate::train::losses::bns_relative;
use crate::train::optim::Adam;

/// How the inputs are made.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SynthConfig {
    pub images: usize,
    pub steps: usize,
    /// Adam learning rate in standardized units.
    pub lr: f64,
    /// Weight of the BN-statistics term next to the class term.
    pub bns_weight: f64,
    /// The probability the reference should give each image's class: None pushes it to 1
    /// (plain CE), Some(c) aims at c (CE with soft targets), which keeps the images away from
    /// the extremes where every student agrees.
    pub confidence: Option<f64>,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            images: 128,
            steps: 100,
            lr: 0.1,
            bns_weight: 1.0,
            confidence: None,
            seed: 0,
        }
    }
}

impl SynthConfig {
    /// Inputs for checking a student of a `classes`-way reference: classified as their class
    /// with odds of 21 against each other class (probability 0.7 at 10 classes, 0.95 at 2), and
    /// never below 0.7: confident, so not near-ties, but not so extreme that a poor student
    /// agrees anyway. Odds, not a probability, because 0.7 against a single other class is
    /// close to a tie.
    pub fn verification(images: usize, seed: u64, classes: usize) -> Self {
        Self {
            images,
            confidence: Some(probability_at_odds(21.0, classes).max(0.7)),
            seed,
            ..Default::default()
        }
    }
}

/// The top class's probability when it is `odds` times as likely as each of the other
/// `classes - 1`.
pub fn probability_at_odds(odds: f64, classes: usize) -> f64 {
    odds / (odds + classes.saturating_sub(1) as f64)
}

/// A synthesized batch and what the reference makes of it.
#[derive(Debug, Clone)]
pub struct Synthesized {
    /// N x C x H x W values in the reference's input space.
    pub x: Vec<f32>,
    pub images: usize,
    /// The class each image was made for.
    pub target: Vec<usize>,
    /// The reference's softmax probability of its top class, per image.
    pub confidence: Vec<f32>,
    /// Fraction of images the reference classifies as their target.
    pub on_target: f64,
    /// Final loss terms (BNS is 0 without BN statistics).
    pub ce: f64,
    pub bns: f64,
    pub config: SynthConfig,
}

impl Synthesized {
    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "{} images synthesized from the reference ({} steps, class-balanced{}; {:.0}% classified as their target, CE {:.3}, BNS {:.3})",
            self.images,
            self.config.steps,
            self.config
                .confidence
                .map_or(String::new(), |c| format!(", aiming at confidence {c:.2}")),
            100.0 * self.on_target,
            self.ce,
            self.bns
        )
    }
}

/// Synthesizes `cfg.images` inputs for `teacher` (on the host CPU: verification runs there).
pub fn synthesize(teacher: &Teacher, cfg: SynthConfig) -> Result<Synthesized> {
    ensure!(cfg.images > 0, "at least one image is needed");
    let program = teacher.program(&HOST)?;
    let shape = teacher.input_shape(cfg.images);
    let c = teacher.channels;
    let d = &teacher.domain;
    let (m, s) = d.stats();
    let per_channel = |f: &dyn Fn(usize) -> f32| -> Result<Tensor> {
        let v: Vec<f32> = (0..c).map(f).collect();
        Ok(Tensor::from_vec(v, (1, c, 1, 1), &HOST)?)
    };
    let (mean, std) = (per_channel(&|k| m[k % 3])?, per_channel(&|k| s[k % 3])?);
    let lo = per_channel(&|k| d.channel_range(k % 3).0)?;
    let hi = per_channel(&|k| d.channel_range(k % 3).1)?;
    // Start from the domain's noise, in standardized units.
    let x0 = Tensor::from_vec(d.noise(&shape, cfg.seed), shape.to_vec(), &HOST)?;
    let u = Var::from_tensor(&x0.broadcast_sub(&mean)?.broadcast_div(&std)?)?;
    let target: Vec<usize> = (0..cfg.images).map(|i| i % teacher.classes).collect();
    let y = Tensor::from_vec(
        target.iter().map(|&t| t as u32).collect::<Vec<_>>(),
        cfg.images,
        &HOST,
    )?;
    let mut opt = Adam::new(vec![u.clone()], cfg.lr, (0.9, 0.999));
    let has_bn = !program.bn_taps().is_empty();
    let k = teacher.classes;
    // Soft targets: c on the image's class, the rest spread evenly.
    let soft = match cfg.confidence {
        Some(c) if k > 1 => {
            let c = c.clamp(1.0 / k as f64, 1.0);
            let rest = ((1.0 - c) / (k - 1) as f64) as f32;
            let mut q = vec![rest; cfg.images * k];
            for (i, &t) in target.iter().enumerate() {
                q[i * k + t] = c as f32;
            }
            Some(Tensor::from_vec(q, (cfg.images, k), &HOST)?)
        }
        _ => None,
    };
    let to_x = |u: &Tensor| -> Result<Tensor> {
        Ok(u.broadcast_mul(&std)?
            .broadcast_add(&mean)?
            .broadcast_maximum(&lo)?
            .broadcast_minimum(&hi)?)
    };
    let (mut ce_v, mut bns_v) = (f64::NAN, 0.0);
    for _ in 0..cfg.steps {
        let x = to_x(u.as_tensor())?;
        let f = program.forward_taps(&x)?;
        let ce = match &soft {
            Some(q) => (candle_nn::ops::log_softmax(&f.logits, 1)? * q)?
                .sum(1)?
                .neg()?
                .mean_all()?,
            None => candle_nn::loss::cross_entropy(&f.logits, &y)?,
        };
        let loss = if has_bn {
            let b = bns_relative(&f.bn_inputs, program.bn_taps())?;
            bns_v = b.to_scalar::<f32>()? as f64;
            (&ce + (b * cfg.bns_weight)?)?
        } else {
            // No statistics to match: keep the images near the domain's spread instead.
            (&ce + (u.as_tensor().sqr()?.mean_all()? * 1e-3)?)?
        };
        ce_v = ce.to_scalar::<f32>()? as f64;
        ensure!(
            ce_v.is_finite() && bns_v.is_finite(),
            "synthesizing verification inputs diverged (CE {ce_v}, BNS {bns_v})"
        );
        opt.step(&loss.backward()?)?;
    }
    let x = to_x(u.as_tensor())?.detach();
    let p = candle_nn::ops::softmax(&program.forward(&x)?, 1)?;
    let probs: Vec<f32> = p.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (mut confidence, mut hits) = (Vec::with_capacity(cfg.images), 0usize);
    for (row, &t) in probs.chunks_exact(k).zip(&target) {
        let top = super::eval::argmax(row);
        confidence.push(row[top]);
        hits += (top == t) as usize;
    }
    Ok(Synthesized {
        x: x.flatten_all()?.to_vec1()?,
        images: cfg.images,
        target,
        confidence,
        on_target: hits as f64 / cfg.images as f64,
        ce: ce_v,
        bns: bns_v,
        config: cfg,
    })
}
