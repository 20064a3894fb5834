//! AutoReCon generator search (Zhu et al. 2021, Algorithm 1): a supernet of the AutoReCon space
//! ([`crate::generator::autorecon`]) whose edges mix their candidate ops by Gumbel-softmax
//! samples of architecture weights alpha (eq. 7-8), trained by alternating first-order steps on
//! separate generated batches: the supernet's weights, then alpha, both on the reconstruction
//! loss CE(teacher(G(z, y)), y) + w * BNS. The temperature decays exponentially; samples are
//! soft (every op, weighted) or hard (one op, straight-through gradient to alpha). The genotype
//! is the argmax per edge with every node keeping an input.
//!
//! The run folder gets genotype.json and genotype.svg, alpha.jsonl (per-edge softmax(alpha)
//! over time) and alpha.svg, search.json (cost, sizes), curves.png, and a resumable
//! checkpoint/ (through the training engine, [`crate::train::engine`]).

pub mod draw;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use candle_core::{D, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::generator::autorecon::{AutoReconConfig, AutoReconGenerator, Mix, cell_edges};
use crate::generator::params::{load_tensors, save_tensors};
use crate::generator::to_domain;
use crate::generator::{Generator, Genotype};
use crate::lower::Program;
use crate::teacher::InputDomain;
use crate::train::engine::{self, LogLine, Step};
use crate::train::losses::reconstruction;
use crate::train::optim::{Adam, State};

/// How an edge's candidates are mixed during the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Every candidate, weighted by the Gumbel-softmax sample.
    Soft,
    /// One candidate per edge (the sample's argmax); alpha gets the straight-through gradient.
    /// Weight steps run only the sampled ops (cheaper).
    Hard,
}

/// Search budget presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchPreset {
    /// The paper's macro-architecture at full width (64 channels), batch 64, 100 x 100 iterations.
    Paper,
    /// About 30 minutes on 2 CPU cores for a 32x32 teacher: width 16, batch 32, hard sampling.
    Quick,
}

/// Every hyper-parameter of a search (saved in checkpoints and search.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    pub epochs: usize,
    pub iters_per_epoch: usize,
    pub batch: usize,
    /// Channels of every cell (64 x the paper's scale factor).
    pub width: usize,
    pub latent: usize,
    pub sampling: Sampling,
    /// Gumbel-softmax temperature, decayed exponentially from the first to the second value.
    pub tau: (f64, f64),
    pub weight_lr: f64,
    pub weight_betas: (f64, f64),
    pub arch_lr: f64,
    pub arch_betas: (f64, f64),
    pub arch_weight_decay: f64,
    /// alpha ~ N(0, std^2) at the start.
    pub alpha_init_std: f64,
    pub bns_weight: f64,
    /// BNS units (`auto` is decided from the teacher's input domain before the search).
    #[serde(default)]
    pub bns_units: crate::train::losses::BnsUnits,
    pub seed: u64,
}

impl SearchConfig {
    pub fn preset(p: SearchPreset, seed: u64) -> Self {
        let paper = SearchConfig {
            epochs: 100,
            iters_per_epoch: 100,
            batch: 64,
            width: 64,
            latent: 100,
            sampling: Sampling::Soft,
            tau: (5.0, 0.1),
            weight_lr: 1e-3,
            weight_betas: (0.5, 0.999),
            arch_lr: 3e-4,
            arch_betas: (0.5, 0.999),
            arch_weight_decay: 1e-4,
            alpha_init_std: 1e-3,
            bns_weight: 0.1,
            bns_units: Default::default(),
            seed,
        };
        match p {
            SearchPreset::Paper => paper,
            SearchPreset::Quick => SearchConfig {
                epochs: 10,
                iters_per_epoch: 100,
                batch: 32,
                width: 16,
                sampling: Sampling::Hard,
                // 1000 steps instead of 10000: a 10x larger architecture step lets alpha move
                // as far in the shorter search.
                arch_lr: 3e-3,
                ..paper
            },
        }
    }

    pub fn total_iters(&self) -> usize {
        self.epochs * self.iters_per_epoch
    }

    fn tau_at(&self, iter: usize) -> f64 {
        let t = if self.total_iters() > 1 {
            iter as f64 / (self.total_iters() - 1) as f64
        } else {
            1.0
        };
        self.tau.0 * (self.tau.1 / self.tau.0).powf(t)
    }
}

/// One line of alpha.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchLog {
    pub iter: usize,
    pub epoch: usize,
    pub tau: f64,
    /// Reconstruction loss terms of the weight step and of the architecture step.
    pub weight_ce: f64,
    pub weight_bns: f64,
    pub arch_ce: f64,
    pub arch_bns: f64,
    /// softmax(alpha) per cell, per edge, over the edge's candidates.
    pub probs: Vec<Vec<Vec<f32>>>,
    pub seconds: f64,
}

/// What search.json holds.
#[derive(Debug, Clone, Serialize)]
pub struct SearchReport {
    pub config: SearchConfig,
    pub teacher: String,
    pub genotype: Genotype,
    pub supernet_params: usize,
    pub supernet_macs_per_image: u64,
    pub derived_params: usize,
    pub derived_macs_per_image: u64,
    /// Wall seconds of every epoch run in this process (resumed epochs are not re-timed).
    pub epoch_seconds: Vec<f64>,
    pub seconds: f64,
    pub peak_rss_mb: Option<f64>,
    pub resumed_from_iter: Option<usize>,
}

impl LogLine for SearchLog {
    fn iter(&self) -> usize {
        self.iter
    }
    fn set_seconds(&mut self, s: f64) {
        self.seconds = s;
    }
    fn summary(&self) -> String {
        format!(
            "search ep {} tau {:.2} w: CE {:.3} BNS {:.3} alpha: CE {:.3} BNS {:.3}",
            self.epoch, self.tau, self.weight_ce, self.weight_bns, self.arch_ce, self.arch_bns
        )
    }
    fn curves(&self) -> Vec<crate::plot::CurvePoint> {
        vec![
            ("reconstruction loss", "weights: CE", self.weight_ce),
            ("reconstruction loss", "weights: BNS", self.weight_bns),
            ("reconstruction loss", "alpha: CE", self.arch_ce),
            ("reconstruction loss", "alpha: BNS", self.arch_bns),
            ("Gumbel-softmax temperature", "tau", self.tau),
        ]
    }
}

/// The step's part of a checkpoint's state.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    config: SearchConfig,
    rng_word_pos: String,
}

/// Where a search reads and writes.
pub struct SearchIo<'a> {
    pub out: &'a Path,
    pub resume: Option<&'a Path>,
    pub checkpoint_every: usize,
    /// alpha.jsonl gets a line every N iterations (and the last).
    pub log_every: usize,
    /// Fails after this many iterations, as if killed (tests resume).
    pub stop_after: Option<usize>,
}

struct Search<'a> {
    cfg: SearchConfig,
    teacher: &'a Program,
    /// The teacher's input domain, where the supernet's images are put.
    domain: &'a InputDomain,
    net: AutoReconGenerator,
    alpha: Vec<Vec<Var>>,
    weight_opt: Adam,
    arch_opt: Adam,
    rng: ChaCha8Rng,
    classes: usize,
    device: Device,
    epoch_start: Instant,
    /// Wall seconds of every epoch run in this process.
    epoch_seconds: Vec<f64>,
}

impl Search<'_> {
    fn alpha_named(&self) -> Vec<(String, Tensor)> {
        self.alpha
            .iter()
            .enumerate()
            .flat_map(|(k, edges)| {
                cell_edges(k)
                    .into_iter()
                    .zip(edges)
                    .map(move |(d, a)| (format!("cell{k}.{}", d.name()), a.as_tensor().clone()))
            })
            .collect()
    }

    fn probs(&self) -> Result<Vec<Vec<Vec<f32>>>> {
        self.alpha
            .iter()
            .map(|edges| {
                edges
                    .iter()
                    .map(|a| Ok(candle_nn::ops::softmax(a.as_tensor(), D::Minus1)?.to_vec1()?))
                    .collect()
            })
            .collect()
    }

    /// Gumbel-softmax sample per edge: softmax((log softmax(alpha) + g) / tau) (eq. 7-8), with
    /// gradient to alpha when `grad`; hard samples become one-hot in value.
    fn gumbel(&mut self, tau: f64, grad: bool) -> Result<Vec<Vec<Mix>>> {
        let mut out = Vec::new();
        for k in 0..self.alpha.len() {
            let mut cell = Vec::new();
            for e in 0..self.alpha[k].len() {
                let a = self.alpha[k][e].as_tensor().clone();
                let a = if grad { a } else { a.detach() };
                let n = a.dim(0)?;
                let g: Vec<f32> = (0..n)
                    .map(|_| {
                        let u: f64 = self.rng.random::<f64>().clamp(1e-12, 1.0 - 1e-12);
                        -(-u.ln()).ln() as f32
                    })
                    .collect();
                let logits = (candle_nn::ops::log_softmax(&a, D::Minus1)?
                    + Tensor::from_vec(g, n, &self.device)?)?;
                let w = candle_nn::ops::softmax(&(logits / tau)?, D::Minus1)?;
                cell.push(match self.cfg.sampling {
                    Sampling::Soft => Mix::Weights(w),
                    Sampling::Hard => {
                        let i = w.argmax(0)?.to_scalar::<u32>()? as usize;
                        if grad {
                            // Straight-through: one-hot in value, the soft sample's gradient.
                            let mut oh = vec![0f32; n];
                            oh[i] = 1.0;
                            let oh = Tensor::from_vec(oh, n, &self.device)?;
                            Mix::Weights(((oh - w.detach())? + &w)?)
                        } else {
                            Mix::One(i)
                        }
                    }
                });
            }
            out.push(cell);
        }
        Ok(out)
    }

    /// One reconstruction-loss step on a fresh batch; returns (CE, BNS) and the gradients.
    fn loss(
        &mut self,
        tau: f64,
        arch: bool,
        iter: usize,
    ) -> Result<(f64, f64, candle_core::backprop::GradStore)> {
        let (z, y) = crate::generator::sample(
            &mut self.rng,
            self.cfg.batch,
            self.cfg.latent,
            self.classes,
            &self.device,
        )?;
        let mix = self.gumbel(tau, arch)?;
        let pick = |k: usize, e: usize| match &mix[k][e] {
            Mix::One(i) => Mix::One(*i),
            Mix::Weights(w) => Mix::Weights(w.clone()),
        };
        let images = to_domain(&self.net.forward_mixed(&z, &y, &pick)?, self.domain)?;
        let t = self.teacher.forward_taps(&images)?;
        let (loss, cv, bv) = reconstruction(
            &t,
            self.teacher.bn_taps(),
            &y,
            (self.cfg.bns_weight, self.cfg.bns_units),
            iter,
        )?;
        Ok((cv, bv, loss.backward()?))
    }
}

impl Step for Search<'_> {
    type Log = SearchLog;

    fn step(&mut self, iter: usize) -> Result<SearchLog> {
        let tau = self.cfg.tau_at(iter);
        // Algorithm 1: the supernet's weights on one batch, alpha on another.
        let (wce, wbns, grads) = self.loss(tau, false, iter)?;
        self.weight_opt.step(&grads)?;
        let (ace, abns, grads) = self.loss(tau, true, iter)?;
        self.arch_opt.step(&grads)?;
        if (iter + 1).is_multiple_of(self.cfg.iters_per_epoch) {
            self.epoch_seconds
                .push(self.epoch_start.elapsed().as_secs_f64());
            self.epoch_start = Instant::now();
        }
        Ok(SearchLog {
            iter,
            epoch: iter / self.cfg.iters_per_epoch,
            tau,
            weight_ce: wce,
            weight_bns: wbns,
            arch_ce: ace,
            arch_bns: abns,
            probs: self.probs()?,
            seconds: 0.0,
        })
    }

    fn save(&self, tmp: &Path) -> Result<()> {
        self.net.params.save(&tmp.join("supernet.safetensors"))?;
        save_tensors(&tmp.join("alpha.safetensors"), self.alpha_named())?;
        save_tensors(
            &tmp.join("weight-adam.safetensors"),
            self.weight_opt.state()?,
        )?;
        save_tensors(&tmp.join("arch-adam.safetensors"), self.arch_opt.state()?)?;
        Ok(())
    }

    fn state(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let s = CheckpointState {
            config: self.cfg.clone(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
        };
        crate::train::engine::state_object(&s)
    }

    fn load(
        &mut self,
        dir: &Path,
        state: serde_json::Map<String, serde_json::Value>,
        _iter: usize,
    ) -> Result<()> {
        let state: CheckpointState =
            engine::checked_state(dir, state, &self.cfg, |s: &CheckpointState| &s.config)?;
        self.net.params.load(&dir.join("supernet.safetensors"))?;
        let alpha = load_tensors(&dir.join("alpha.safetensors"), &self.device)?;
        for (name, t) in self.alpha_named() {
            let saved = alpha
                .get(&name)
                .with_context(|| format!("{}: alpha of {name} missing", dir.display()))?;
            ensure!(
                saved.dims() == t.dims(),
                "{}: alpha of {name} has the wrong shape",
                dir.display()
            );
        }
        for (k, edges) in self.alpha.iter().enumerate() {
            for (d, a) in cell_edges(k).iter().zip(edges) {
                a.set(&alpha[&format!("cell{k}.{}", d.name())])?;
            }
        }
        self.weight_opt.load_state(&load_tensors(
            &dir.join("weight-adam.safetensors"),
            &self.device,
        )?)?;
        self.arch_opt.load_state(&load_tensors(
            &dir.join("arch-adam.safetensors"),
            &self.device,
        )?)?;
        self.rng.set_word_pos(state.rng_word_pos.parse()?);
        Ok(())
    }
}

/// Runs the search against `teacher` (BN taps needed) and writes the run folder; returns the
/// derived genotype and the report.
pub fn search(
    teacher: &Program,
    teacher_name: &str,
    classes: usize,
    (channels, size): (usize, usize),
    domain: &InputDomain,
    cfg: SearchConfig,
    io: &SearchIo,
) -> Result<(Genotype, SearchReport)> {
    ensure!(
        !teacher.bn_taps().is_empty(),
        "{teacher_name}: the AutoReCon search needs the teacher's BatchNormalization statistics and this teacher has none (BN was folded at export); re-export it with BN kept"
    );
    ensure!(
        cfg.batch >= 2,
        "the search batch must be at least 2 (batch statistics)"
    );
    ensure!(
        cfg.total_iters() > 0 && cfg.width > 0,
        "the search needs at least one iteration and a positive width"
    );
    ensure!(
        cfg.tau.0 > 0.0 && cfg.tau.1 > 0.0,
        "Gumbel-softmax temperatures must be positive, got {:?}",
        cfg.tau
    );
    let device = teacher.device().clone();
    let net = AutoReconGenerator::supernet(
        AutoReconConfig {
            latent: cfg.latent,
            classes,
            channels,
            size,
            width: cfg.width,
        },
        &device,
        cfg.seed,
    )?;
    let mut r = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(2));
    let normal = Normal::new(0.0, cfg.alpha_init_std)?;
    let alpha: Vec<Vec<Var>> = net
        .candidates()
        .iter()
        .map(|cell| {
            cell.iter()
                .map(|c| {
                    let v: Vec<f32> = (0..c.len()).map(|_| normal.sample(&mut r) as f32).collect();
                    Ok(Var::from_tensor(&Tensor::from_vec(v, c.len(), &device)?)?)
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let weight_opt = Adam::new(net.params.vars(), cfg.weight_lr, cfg.weight_betas);
    let mut arch_opt = Adam::new(
        alpha.iter().flatten().cloned().collect(),
        cfg.arch_lr,
        cfg.arch_betas,
    );
    arch_opt.weight_decay = cfg.arch_weight_decay;
    let mut s = Search {
        rng: ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1)),
        cfg: cfg.clone(),
        teacher,
        domain,
        net,
        alpha,
        weight_opt,
        arch_opt,
        classes,
        device: device.clone(),
        epoch_start: Instant::now(),
        epoch_seconds: Vec::new(),
    };
    let outcome = engine::run(
        &mut s,
        cfg.total_iters(),
        &engine::RunIo {
            out: io.out,
            resume: io.resume,
            log_name: "alpha.jsonl",
            log_every: io.log_every,
            checkpoint_every: io.checkpoint_every,
            stop_after: io.stop_after,
            label: "search",
        },
    )?;
    let probs = s.probs()?;
    let genotype = Genotype::derive(cfg.width, &probs)?;
    crate::io::write_atomic(
        &io.out.join("genotype.json"),
        serde_json::to_string_pretty(&genotype)?.as_bytes(),
    )?;
    crate::io::write_atomic(
        &io.out.join("genotype.svg"),
        draw::genotype_svg(&genotype, teacher_name)?.as_bytes(),
    )?;
    crate::io::write_atomic(
        &io.out.join("alpha.svg"),
        draw::alpha_svg(&outcome.history)?.as_bytes(),
    )?;
    let derived = AutoReconGenerator::derived(
        &genotype,
        (cfg.latent, classes, channels, size),
        &device,
        cfg.seed,
    )?;
    let report = SearchReport {
        config: cfg.clone(),
        teacher: teacher_name.to_string(),
        genotype: genotype.clone(),
        supernet_params: s.net.params.count(),
        supernet_macs_per_image: s.net.macs_per_image(),
        derived_params: derived.params().count(),
        derived_macs_per_image: Generator::macs_per_image(&derived),
        epoch_seconds: s.epoch_seconds,
        seconds: outcome.seconds,
        peak_rss_mb: crate::io::peak_rss_mb(),
        resumed_from_iter: outcome.resumed_from,
    };
    crate::io::write_atomic(
        &io.out.join("search.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok((genotype, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_decays_exponentially_from_start_to_end() {
        let mut c = SearchConfig::preset(SearchPreset::Quick, 0);
        c.epochs = 2;
        c.iters_per_epoch = 3;
        let t: Vec<f64> = (0..6).map(|i| c.tau_at(i)).collect();
        assert!(
            (t[0] - 5.0).abs() < 1e-12 && (t[5] - 0.1).abs() < 1e-12,
            "{t:?}"
        );
        // Constant ratio between steps.
        let r = t[1] / t[0];
        assert!(t.windows(2).all(|w| (w[1] / w[0] - r).abs() < 1e-12));
    }
}
