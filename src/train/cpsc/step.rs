//! One CPSC-DFKD round (generator steps, then student steps), the student's running
//! statistics, the contrastive projection head, and the round's checkpointed state.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{CeForm, Config, Io, L2Form, Metrics, Variant};
use crate::generator::Generator;
use crate::generator::params::Params;
use crate::lower::Program;
use crate::train::engine::{self, Step, finite};
use crate::train::generated::{load_pair, samples_when_due, save_pair};
use crate::train::losses::{bn_prior, channel_moments, kl_batchmean, supcon};
use crate::train::optim::{Adam, Sgd, clip_grad_norm};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    config: Config,
    rng_word_pos: String,
}

/// The reference's adapter for students whose feature size differs from the teacher's: an MLP
/// (in -> in, ReLU, in -> teacher's size) on the L2-normalised student features. It stays at its
/// initial weights, as in the reference, where its gradients (from the generator's loss) are
/// cleared before every student step and no generator optimiser holds it.
struct Projection {
    layers: Vec<(Tensor, Tensor)>,
}

impl Projection {
    fn new(p: &mut Params, from: usize, to: usize, rng: &mut ChaCha8Rng) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, (a, b)) in [(from, from), (from, to)].into_iter().enumerate() {
            let bound = 1.0 / (a as f64).sqrt();
            layers.push((
                p.uniform(&format!("adapter.{i}.weight"), &[b, a], bound, rng)?,
                p.uniform(&format!("adapter.{i}.bias"), &[b], bound, rng)?,
            ));
        }
        Ok(Projection { layers })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// A student BatchNormalization's running statistics (EMA of batch moments).
struct Running {
    mean_name: String,
    var_name: String,
    mean: Tensor,
    var: Tensor,
}

pub(super) struct Run<'a> {
    cfg: Config,
    teacher: &'a Program,
    student: &'a mut Program,
    generator: Box<dyn Generator>,
    /// The adapter's parameters (fixed; saved with checkpoints).
    head: Params,
    projection: Option<Projection>,
    gen_vars: Vec<candle_core::Var>,
    gen_opt: Adam,
    /// The L2 term's form, resolved from the class count when `auto`.
    l2_form: L2Form,
    student_opt: Sgd,
    running: Vec<Running>,
    rng: ChaCha8Rng,
    classes: usize,
    io: &'a Io<'a>,
    device: Device,
}

/// A scalar's value, refused when not finite.
fn value(t: &Tensor, what: &str, iter: usize) -> Result<f64> {
    finite(
        t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64,
        what,
        iter,
    )
}

/// Rows scaled to unit L2 norm.
fn normalize(x: &Tensor) -> Result<Tensor> {
    let l = (x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&l)?)
}

impl<'a> Run<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        teacher: &'a Program,
        student: &'a mut Program,
        student_model: &crate::onnx::LoadedModel,
        generator: Box<dyn Generator>,
        classes: usize,
        cfg: Config,
        io: &'a Io<'a>,
        device: Device,
    ) -> Result<Self> {
        let mut rng = super::rng(&cfg);
        // The adapter's sizes: one probe image through both networks.
        let mut head = Params::new(&device);
        let projection = if cfg.variant == Variant::Cpsc && cfg.contrastive_weight > 0.0 {
            let (c, h, w) = generator.image();
            let probe = Tensor::zeros((2, c, h, w), DType::F32, &device)?;
            let t = teacher.forward_taps(&probe)?.penultimate;
            let st = student.forward_taps(&probe)?.penultimate;
            match (t, st) {
                (Some(t), Some(st)) => {
                    let (from, to) = (st.dim(1)?, t.dim(1)?);
                    (from != to)
                        .then(|| Projection::new(&mut head, from, to, &mut rng))
                        .transpose()?
                }
                _ => anyhow::bail!(
                    "the contrastive loss needs the penultimate features of teacher and student (the input of a final Gemm, MatMul or Conv classifier); one has none: use --contrastive-weight 0"
                ),
            }
        } else {
            None
        };
        let graph = student_model.graph();
        let running = student
            .bn_taps()
            .iter()
            .map(|tap| {
                let n = &graph.node[tap.node_index];
                Ok(Running {
                    mean_name: n.input[3].clone(),
                    var_name: n.input[4].clone(),
                    mean: Tensor::new(tap.stats.running_mean.as_slice(), &device)?,
                    var: Tensor::new(tap.stats.running_var.as_slice(), &device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let gen_vars = generator.params().vars();
        let student_vars = student.vars().iter().map(|(_, v)| v.clone()).collect();
        let (gen_opt, student_opt) = super::optimisers(&cfg, gen_vars.clone(), student_vars);
        let l2_form = cfg.l2_form.resolve(classes);
        Ok(Run {
            cfg,
            teacher,
            student,
            generator,
            head,
            projection,
            gen_vars,
            gen_opt,
            l2_form,
            student_opt,
            running,
            rng,
            classes,
            io,
            device,
        })
    }

    fn images(&mut self) -> Result<(Tensor, Tensor, Vec<u32>)> {
        let (z, y) = crate::generator::sample(
            &mut self.rng,
            self.cfg.batch,
            self.generator.latent(),
            self.classes,
            &self.device,
        )?;
        let x = crate::generator::to_domain(&self.generator.forward(&z, &y)?, self.io.domain)?;
        let labels = y.to_vec1::<u32>()?;
        Ok((x, y, labels))
    }

    /// EMA of the student's BN batch moments (unbiased variance, as PyTorch keeps it).
    fn track(&mut self, bn_inputs: &[Tensor]) -> Result<()> {
        let m = self.cfg.bn_momentum;
        for (r, x) in self.running.iter_mut().zip(bn_inputs) {
            let x = x.detach();
            let n = (x.elem_count() / x.dim(1)?.max(1)) as f64;
            let (mean, var) = channel_moments(&x)?;
            let var = (var * (n / (n - 1.0).max(1.0)))?;
            r.mean = ((&r.mean * (1.0 - m))? + (mean * m)?)?;
            r.var = ((&r.var * (1.0 - m))? + (var * m)?)?;
        }
        Ok(())
    }

    /// The student in inference mode (running statistics), for evaluation.
    fn with_running_stats<T>(&mut self, f: impl FnOnce(&Program) -> Result<T>) -> Result<T> {
        for r in &self.running {
            self.student.set_constant(&r.mean_name, &r.mean)?;
            self.student.set_constant(&r.var_name, &r.var)?;
        }
        self.student.set_bn_batch_stats(false);
        let out = f(self.student);
        self.student.set_bn_batch_stats(true);
        out
    }

    /// What the generator maximises and the student minimises: (total, KL or L1, L2 term).
    /// The L2 term is the reference's: with `log`, log MSE for the generator and the log of
    /// the L2 norm of the logit difference for the student; with `mse`, MSE for both.
    fn discrepancy(
        &self,
        s: &Tensor,
        t: &Tensor,
        generator: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if self.cfg.variant == Variant::Dfad {
            let l1 = (s - t)?.abs()?.mean_all()?;
            let zero = l1.zeros_like()?;
            return Ok((l1.clone(), l1, zero));
        }
        let kl = kl_batchmean(s, t)?;
        let d = (s - t)?;
        let l2 = match (self.l2_form, generator) {
            (L2Form::Mse, _) | (L2Form::Auto, _) => d.sqr()?.mean_all()?,
            (L2Form::Log, true) => d.sqr()?.mean_all()?.log()?,
            (L2Form::Log, false) => d.sqr()?.sum_all()?.sqrt()?.log()?,
        };
        Ok((((&kl) + (&l2 * self.cfg.l2_weight)?)?, kl, l2))
    }

    /// CE with the sampled labels, in `--ce-form`: the reference's on the softmax of the logits
    /// (it applies PyTorch's cross_entropy to probabilities, so it saturates instead of
    /// growing), or the paper's on the logits.
    fn label_ce(&self, logits: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.ce_form {
            CeForm::Probabilities => {
                let p = candle_nn::ops::softmax(logits, candle_core::D::Minus1)?;
                candle_nn::loss::cross_entropy(&p, y)?
            }
            CeForm::Logits => candle_nn::loss::cross_entropy(logits, y)?,
        })
    }

    /// One generator step: (loss, adversarial, BN prior, contrastive, CE).
    fn generator_step(&mut self, iter: usize) -> Result<[f64; 5]> {
        let (x, y, labels) = self.images()?;
        let tf = self.teacher.forward_taps(&x)?;
        let cfg = self.cfg.clone();
        let zero = || -> Result<Tensor> { Ok(Tensor::zeros((), DType::F32, &self.device)?) };
        let (mut loss, mut adv_v, mut con_v) = (zero()?, 0.0, 0.0);
        if cfg.variant != Variant::BnPrior {
            let sf = self.student.forward_taps(&x)?;
            self.track(&sf.bn_inputs)?;
            let (adv, _, _) = self.discrepancy(&sf.logits, &tf.logits, true)?;
            adv_v = value(&adv, "the adversarial loss", iter)?;
            loss = adv.neg()?;
            let contrast = cfg.variant == Variant::Cpsc && cfg.contrastive_weight > 0.0;
            if let (true, Some(tp), Some(sp)) = (contrast, &tf.penultimate, &sf.penultimate) {
                let (tp, sp) = (normalize(tp)?, normalize(sp)?);
                let sp = match &self.projection {
                    Some(p) => p.forward(&sp)?,
                    None => sp,
                };
                let con = supcon(&tp, &sp, &labels, cfg.contrastive_temperature)?;
                con_v = value(&con, "the contrastive loss", iter)?;
                loss = (loss + (con * cfg.contrastive_weight)?)?;
            }
        }
        let (mut bn_v, mut ce_v) = (0.0, 0.0);
        if cfg.variant != Variant::Dfad {
            let bn = bn_prior(&tf.bn_inputs, self.teacher.bn_taps())?;
            bn_v = value(&bn, "the BN prior", iter)?;
            let ce = self.label_ce(&tf.logits, &y)?;
            ce_v = value(&ce, "the generator's CE", iter)?;
            loss = ((loss + (bn * cfg.bn_weight)?)? + (ce * cfg.ce_weight)?)?;
        }
        let loss_v = value(&loss, "the generator's loss", iter)?;
        if cfg.generator_adam_reset {
            // The reference builds a new Adam at every generator step.
            self.gen_opt = Adam::new(self.gen_vars.clone(), cfg.generator_lr, cfg.generator_betas);
        }
        self.gen_opt.lr = cfg.generator_lr_at(iter);
        self.gen_opt.step(&loss.backward()?)?;
        Ok([loss_v, adv_v, bn_v, con_v, ce_v])
    }

    /// One student step: (KD or L1, L2, CE).
    fn student_step(&mut self, iter: usize) -> Result<[f64; 3]> {
        let (x, y, _) = self.images()?;
        let x = x.detach();
        let t = self.teacher.forward(&x)?.detach();
        let sf = self.student.forward_taps(&x)?;
        self.track(&sf.bn_inputs)?;
        let (mut loss, kd, l2) = self.discrepancy(&sf.logits, &t, false)?;
        let mut ce_v = 0.0;
        if self.cfg.variant != Variant::Dfad && self.cfg.student_ce_weight > 0.0 {
            let ce = self.label_ce(&sf.logits, &y)?;
            ce_v = value(&ce, "the student's CE", iter)?;
            loss = (loss + (ce * self.cfg.student_ce_weight)?)?;
        }
        value(&loss, "the student's loss", iter)?;
        self.student_opt.lr = self.cfg.student_lr_at(iter);
        let mut grads = loss.backward()?;
        let vars: Vec<candle_core::Var> =
            self.student.vars().iter().map(|(_, v)| v.clone()).collect();
        clip_grad_norm(&mut grads, &vars, self.cfg.student_grad_clip)?;
        self.student_opt.step(&grads)?;
        Ok([
            value(&kd, "the distillation loss", iter)?,
            value(&l2, "the L2 loss", iter)?,
            ce_v,
        ])
    }

    /// Every trained value of the student by initializer name (running statistics included).
    pub(super) fn values(&self) -> Result<HashMap<String, Vec<f32>>> {
        let mut out = HashMap::new();
        for (n, v) in self.student.vars() {
            out.insert(
                n.clone(),
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            );
        }
        for r in &self.running {
            out.insert(r.mean_name.clone(), r.mean.to_vec1()?);
            out.insert(r.var_name.clone(), r.var.to_vec1()?);
        }
        Ok(out)
    }

    pub(super) fn generator_size(&self) -> (usize, u64) {
        (
            self.generator.params().count(),
            self.generator.macs_per_image(),
        )
    }
}

impl Step for Run<'_> {
    type Log = Metrics;

    fn step(&mut self, iter: usize) -> Result<Metrics> {
        let mut g = [0.0; 5];
        for _ in 0..self.cfg.generator_steps {
            g = self.generator_step(iter)?;
        }
        let mut s = [0.0; 3];
        for _ in 0..self.cfg.student_steps {
            s = self.student_step(iter)?;
        }
        let done = iter + 1;
        let total = self.cfg.total_rounds();
        let eval_top1 = match self.io.eval {
            Some((every, f)) if every > 0 && (done.is_multiple_of(every) || done == total) => {
                Some(self.with_running_stats(f)?)
            }
            _ => None,
        };
        Ok(Metrics {
            iter,
            epoch: iter / self.cfg.rounds_per_epoch,
            generator_loss: g[0],
            adversarial: g[1],
            bn_prior: g[2],
            contrastive: g[3],
            generator_ce: g[4],
            student_kd: s[0],
            student_l2: s[1],
            student_ce: s[2],
            student_lr: self.cfg.student_lr_at(iter),
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
        self.head.save(&tmp.join("projection.safetensors"))?;
        let running = self.running.iter().flat_map(|r| {
            [
                (r.mean_name.clone(), r.mean.clone()),
                (r.var_name.clone(), r.var.clone()),
            ]
        });
        save_pair(
            tmp,
            self.generator.as_ref(),
            self.student,
            running.collect(),
            (&self.gen_opt, &self.student_opt),
        )
    }

    fn state(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let s = CheckpointState {
            config: self.cfg.clone(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
        };
        engine::state_object(&s)
    }

    fn load(
        &mut self,
        dir: &Path,
        state: serde_json::Map<String, serde_json::Value>,
        _iter: usize,
    ) -> Result<()> {
        let state: CheckpointState =
            engine::checked_state(dir, state, &self.cfg, |s: &CheckpointState| &s.config)?;
        self.head.load(&dir.join("projection.safetensors"))?;
        let saved = load_pair(
            dir,
            self.generator.as_mut(),
            self.student,
            (&mut self.gen_opt, &mut self.student_opt),
            &self.device,
        )?;
        for r in &mut self.running {
            for (name, t) in [(&r.mean_name, &mut r.mean), (&r.var_name, &mut r.var)] {
                *t = saved
                    .get(name)
                    .with_context(|| format!("{}: student tensor {name} missing", dir.display()))?
                    .clone();
            }
        }
        self.rng.set_word_pos(state.rng_word_pos.parse()?);
        Ok(())
    }
}
