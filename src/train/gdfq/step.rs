//! The GDFQ training step: one generator update on the reconstruction loss, then (after the
//! warm-up) one distillation update of the fake-quantized student; its checkpointed state and
//! the sample grids.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Config, Io, Metrics, kd_loss};
use crate::generator::Generator;
use crate::generator::params::{load_tensors, save_tensors};
use crate::lower::Program;
use crate::quant::fake::{LearnedRange, fake_quant_activation, fake_quant_learned};
use crate::quant::placement::{Plan, Role, point_params};
use crate::quant::{InputMoments, QParams, Scales, clip_weight};
use crate::train::engine::{self, Step, finite};
use crate::train::generated::{load_pair, samples_when_due, save_pair};
use crate::train::losses::{feature_loss, reconstruction};
use crate::train::optim::{Adam, Sgd, State};

/// The step's part of a checkpoint's state.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    config: Config,
    rng_word_pos: String,
    /// Activation ranges (EMA while warming up, frozen after).
    ranges: HashMap<String, (f32, f32)>,
}

/// The GDFQ step and everything it trains.
pub(super) struct Run<'a> {
    pub(super) cfg: Config,
    pub(super) teacher: &'a Program,
    pub(super) student: &'a mut Program,
    pub(super) plan: &'a Plan,
    pub(super) generator: Box<dyn Generator>,
    pub(super) gen_opt: Adam,
    pub(super) student_opt: Sgd,
    pub(super) rng: ChaCha8Rng,
    pub(super) ranges: HashMap<String, (f32, f32)>,
    /// Points whose ranges were given (not observed).
    pub(super) fixed: std::collections::HashSet<String>,
    pub(super) classes: usize,
    pub(super) scales: Scales,
    /// Learned activation ranges by tensor (empty unless `range_lr` > 0 and warm-up is over);
    /// `ranges` then keeps the starting ranges they were built from.
    pub(super) learned: Vec<(String, LearnedRange)>,
    pub(super) range_opt: Option<Adam>,
    /// The grid of each layer input the weight quantizers read (None during warm-up).
    pub(super) grids: HashMap<String, GridCell>,
    /// Weights clamped to their starting clips after every student step.
    pub(super) clips: Vec<(candle_core::Var, crate::quant::placement::Layer, Vec<f32>)>,
    /// Teacher tensors distilled feature by feature (`feature_weight` > 0).
    pub(super) features: Vec<String>,
    pub(super) io: &'a Io<'a>,
    pub(super) device: Device,
}

/// An activation grid as the weight quantizers see it: fixed, or learned (read at every use).
#[derive(Clone)]
pub(super) enum Grid {
    Fixed(QParams),
    Learned {
        range: LearnedRange,
        bits: u8,
        scales: Scales,
    },
}

impl Grid {
    pub(super) fn qparams(&self) -> anyhow::Result<QParams> {
        Ok(match self {
            Grid::Fixed(q) => *q,
            Grid::Learned {
                range,
                bits,
                scales,
            } => {
                let (lo, hi) = range.range()?;
                QParams::activation(lo, hi, *bits, *scales)
            }
        })
    }
}

/// A layer input's grid, shared between the activation quantizer and the weight quantizer.
pub(super) type GridCell = Arc<std::sync::RwLock<Option<Grid>>>;

impl Run<'_> {
    fn warmup(&self) -> usize {
        self.cfg.warmup_epochs * self.cfg.iters_per_epoch
    }

    fn set_activation_quant(&mut self) -> Result<()> {
        self.learned.clear();
        for p in &self.plan.points {
            let (lo, hi) = self.ranges[&p.tensor];
            let (bits, scales) = (p.bits, self.scales);
            // The network input's range is its domain's, known exactly: it never trains.
            let grid = if self.cfg.range_lr > 0.0 && p.role != Role::NetworkInput {
                let r = LearnedRange::new(lo, hi, &self.device)?;
                self.learned.push((p.tensor.clone(), r.clone()));
                let range = r.clone();
                self.student.set_transform(
                    &p.tensor,
                    Arc::new(move |x| fake_quant_learned(x, &r, bits, scales)),
                )?;
                Grid::Learned {
                    range,
                    bits,
                    scales,
                }
            } else {
                let q = point_params(p.role, (lo, hi), bits, scales);
                self.student
                    .set_transform(&p.tensor, Arc::new(move |x| fake_quant_activation(x, q)))?;
                Grid::Fixed(q)
            };
            if let Some(cell) = self.grids.get(&p.tensor) {
                *cell.write().expect("not poisoned") = Some(grid);
            }
        }
        if !self.learned.is_empty() {
            let vars = self.learned.iter().flat_map(|(_, r)| r.vars()).collect();
            self.range_opt = Some(Adam::new(vars, self.cfg.range_lr, (0.9, 0.999)));
        }
        Ok(())
    }

    /// The activation ranges now: the learned ones where ranges train, else the fixed ones.
    pub(super) fn current_ranges(&self) -> Result<HashMap<String, (f32, f32)>> {
        let mut out = self.ranges.clone();
        for (name, r) in &self.learned {
            out.insert(name.clone(), r.range()?);
        }
        Ok(out)
    }

    fn learned_tensors(&self) -> Vec<(String, Tensor)> {
        self.learned
            .iter()
            .flat_map(|(n, r)| {
                [
                    (format!("{n}.a"), r.a.as_tensor().clone()),
                    (format!("{n}.b"), r.b.as_tensor().clone()),
                ]
            })
            .collect()
    }

    /// Restores learned ranges and their optimiser (after `set_activation_quant`).
    fn load_learned(&mut self, dir: &Path) -> Result<()> {
        let Some(opt) = &mut self.range_opt else {
            return Ok(());
        };
        let saved = load_tensors(&dir.join("ranges.safetensors"), &self.device)?;
        for (n, r) in &self.learned {
            for (k, v) in [("a", &r.a), ("b", &r.b)] {
                let t = saved
                    .get(&format!("{n}.{k}"))
                    .with_context(|| format!("{}: learned range of {n} missing", dir.display()))?;
                v.set(t)?;
            }
        }
        opt.load_state(&load_tensors(
            &dir.join("ranges-adam.safetensors"),
            &self.device,
        )?)?;
        Ok(())
    }

    fn observe(&mut self, images: &Tensor) -> Result<()> {
        let names: Vec<String> = self
            .plan
            .points
            .iter()
            .map(|p| p.tensor.clone())
            .filter(|t| !self.fixed.contains(t))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let (_, kept) = self.student.forward_tensors(images, &names)?;
        let beta = self.cfg.range_ema as f32;
        for (name, t) in names.iter().zip(kept) {
            let t = t.flatten_all()?;
            let (lo, hi) = (t.min(0)?.to_scalar::<f32>()?, t.max(0)?.to_scalar::<f32>()?);
            self.ranges
                .entry(name.clone())
                .and_modify(|r| {
                    *r = (
                        beta * r.0 + (1.0 - beta) * lo,
                        beta * r.1 + (1.0 - beta) * hi,
                    )
                })
                .or_insert((lo, hi));
        }
        Ok(())
    }
}

impl Step for Run<'_> {
    type Log = Metrics;

    fn step(&mut self, iter: usize) -> Result<Metrics> {
        let cfg = &self.cfg;
        let epoch = iter / cfg.iters_per_epoch;
        let warmup = self.warmup();
        let (z, y) = crate::generator::sample(
            &mut self.rng,
            cfg.batch,
            self.generator.latent(),
            self.classes,
            &self.device,
        )?;
        let images = crate::generator::to_domain(&self.generator.forward(&z, &y)?, self.io.domain)?;
        let (t, teacher_features) = self.teacher.forward_taps_tensors(&images, &self.features)?;
        let (loss_g, ce_v, bns_v) = reconstruction(
            &t,
            self.teacher.bn_taps(),
            &y,
            (cfg.bns_weight, cfg.bns_units),
            iter,
        )?;
        self.gen_opt.step(&loss_g.backward()?)?;
        let images = images.detach();
        let lr = cfg.student_lr_at(epoch);
        let (mut kd_v, mut sce_v, mut feat_v) = (None, None, None);
        if iter < warmup {
            self.observe(&images)?;
            if iter + 1 == warmup {
                self.set_activation_quant()?;
            }
        } else {
            let cfg = &self.cfg;
            self.student_opt.lr = lr;
            let (s, student_features) = self.student.forward_tensors(&images, &self.features)?;
            let kd = kd_loss(&s, &t.logits.detach(), cfg.temperature)?;
            let sce = candle_nn::loss::cross_entropy(&s, &y)?;
            let mut loss_s = (&kd + (&sce * cfg.student_ce_weight)?)?;
            if !self.features.is_empty() {
                let f = feature_loss(&student_features, &teacher_features)?;
                feat_v = Some(finite(
                    f.to_scalar::<f32>()? as f64,
                    "the feature-distillation loss",
                    iter,
                )?);
                loss_s = (loss_s + (f * cfg.feature_weight)?)?;
            }
            kd_v = Some(finite(
                kd.to_scalar::<f32>()? as f64,
                "the distillation loss",
                iter,
            )?);
            sce_v = Some(finite(
                sce.to_scalar::<f32>()? as f64,
                "the student's CE loss",
                iter,
            )?);
            let grads = loss_s.backward()?;
            self.student_opt.step(&grads)?;
            for (var, l, c) in &self.clips {
                clamp_var(var, l, Some(c), None)?;
            }
            if let Some(opt) = &mut self.range_opt {
                opt.lr = cfg.range_lr * lr / cfg.student_lr;
                opt.step(&grads)?;
            }
        }
        let done = iter + 1;
        let total = self.cfg.total_iters();
        let eval_top1 = match self.io.eval {
            Some((every, f)) if every > 0 && (done.is_multiple_of(every) || done == total) => {
                if done < warmup {
                    None
                } else {
                    Some(f(self.student)?)
                }
            }
            _ => None,
        };
        Ok(Metrics {
            iter,
            epoch,
            generator_ce: ce_v,
            bns: bns_v,
            student_kd: kd_v,
            student_ce: sce_v,
            student_feature: feat_v,
            student_lr: lr,
            eval_top1,
            seconds: 0.0,
        })
    }

    fn after(&mut self, done: usize, total: usize) -> Result<()> {
        samples_when_due(
            self.generator.as_ref(),
            self.io.out,
            (self.io.grid_every, done, total),
            self.classes,
            self.io.domain,
            &self.device,
        )
    }

    fn save(&self, tmp: &Path) -> Result<()> {
        save_pair(
            tmp,
            self.generator.as_ref(),
            self.student,
            vec![],
            (&self.gen_opt, &self.student_opt),
        )?;
        if let Some(opt) = &self.range_opt {
            save_tensors(&tmp.join("ranges.safetensors"), self.learned_tensors())?;
            save_tensors(&tmp.join("ranges-adam.safetensors"), opt.state()?)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let s = CheckpointState {
            config: self.cfg.clone(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
            ranges: self.ranges.clone(),
        };
        engine::state_object(&s)
    }

    fn load(
        &mut self,
        dir: &Path,
        state: serde_json::Map<String, serde_json::Value>,
        iter: usize,
    ) -> Result<()> {
        let state: CheckpointState =
            engine::checked_state(dir, state, &self.cfg, |s: &CheckpointState| &s.config)?;
        load_pair(
            dir,
            self.generator.as_mut(),
            self.student,
            (&mut self.gen_opt, &mut self.student_opt),
            &self.device,
        )?;
        self.rng.set_word_pos(state.rng_word_pos.parse()?);
        self.ranges = state.ranges;
        if iter >= self.warmup() {
            self.set_activation_quant()?;
            self.load_learned(dir)?;
        }
        Ok(())
    }
}

/// Clamps a weight variable per output channel (see [`clip_weight`]); returns the clips.
pub(super) fn clamp_var(
    var: &candle_core::Var,
    l: &crate::quant::placement::Layer,
    clips: Option<&[f32]>,
    input: Option<InputMoments>,
) -> Result<Vec<f32>> {
    let dims = var.dims().to_vec();
    let mut v: Vec<f32> = var.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let c = clip_weight(&mut v, &dims, l.weight_axis, l.weight_bits, clips, input);
    var.set(&Tensor::from_vec(v, dims, var.device())?.to_dtype(var.dtype())?)?;
    Ok(c)
}
