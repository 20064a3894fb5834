//! Optimisers with PyTorch's semantics and inspectable state (for checkpoints): SGD with
//! momentum (optionally Nesterov) and L2 weight decay, v = mu * v + (g + wd * w);
//! w -= lr * (nesterov ? g + wd * w + mu * v : v); and Adam (candle-nn's AdamW hides its moments).

use anyhow::{Context, Result};
use candle_core::{Tensor, Var, backprop::GradStore};
use std::collections::HashMap;

/// Optimiser state as named tensors (for safetensors checkpoints).
pub trait State {
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    fn load_state(&mut self, s: &HashMap<String, Tensor>) -> Result<()>;
}

fn save_slots(prefix: &str, slots: &[Option<Tensor>], out: &mut Vec<(String, Tensor)>) {
    for (i, t) in slots.iter().enumerate() {
        if let Some(t) = t {
            out.push((format!("{prefix}.{i}"), t.clone()));
        }
    }
}

fn load_slots(prefix: &str, slots: &mut [Option<Tensor>], s: &HashMap<String, Tensor>) {
    for (i, t) in slots.iter_mut().enumerate() {
        *t = s.get(&format!("{prefix}.{i}")).cloned();
    }
}

pub struct Sgd {
    vars: Vec<Var>,
    velocity: Vec<Option<Tensor>>,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Sgd {
    pub fn new(vars: Vec<Var>, lr: f64, momentum: f64, weight_decay: f64, nesterov: bool) -> Self {
        let velocity = vec![None; vars.len()];
        Self {
            vars,
            velocity,
            lr,
            momentum,
            weight_decay,
            nesterov,
        }
    }

    /// One update from the gradients of a loss (vars without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (var, vel) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = if self.weight_decay != 0.0 {
                (g + (var.as_tensor() * self.weight_decay)?)?
            } else {
                g.clone()
            };
            let v = match vel.take() {
                Some(v) if self.momentum != 0.0 => ((v * self.momentum)? + &g)?,
                _ => g.clone(),
            };
            let update = if self.nesterov {
                (&g + (&v * self.momentum)?)?
            } else {
                v.clone()
            };
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            *vel = Some(v.detach());
        }
        Ok(())
    }
}

impl State for Sgd {
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = Vec::new();
        save_slots("velocity", &self.velocity, &mut v);
        Ok(v)
    }
    fn load_state(&mut self, s: &HashMap<String, Tensor>) -> Result<()> {
        load_slots("velocity", &mut self.velocity, s);
        Ok(())
    }
}

/// Adam (no weight decay), PyTorch's update: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
pub struct Adam {
    vars: Vec<Var>,
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    pub t: u64,
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// L2 penalty added to the gradient (PyTorch Adam's `weight_decay`, not AdamW's).
    pub weight_decay: f64,
}

impl Adam {
    pub fn new(vars: Vec<Var>, lr: f64, betas: (f64, f64)) -> Self {
        let n = vars.len();
        Adam {
            vars,
            m: vec![None; n],
            v: vec![None; n],
            t: 0,
            lr,
            betas,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let (b1, b2) = self.betas;
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for ((var, m), v) in self.vars.iter().zip(&mut self.m).zip(&mut self.v) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let decayed;
            let g = if self.weight_decay != 0.0 {
                decayed = (g + (var.as_tensor() * self.weight_decay)?)?;
                &decayed
            } else {
                g
            };
            let nm = match m.take() {
                Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
                None => (g * (1.0 - b1))?,
            };
            let nv = match v.take() {
                Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                None => (g.sqr()? * (1.0 - b2))?,
            };
            let denom = ((&nv / c2)?.sqrt()? + self.eps)?;
            let update = ((&nm / c1)? / denom)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            *m = Some(nm.detach());
            *v = Some(nv.detach());
        }
        Ok(())
    }
}

impl State for Adam {
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        save_slots("m", &self.m, &mut out);
        save_slots("v", &self.v, &mut out);
        out.push((
            "t".into(),
            Tensor::new(&[self.t as f64], &crate::device::HOST)?,
        ));
        Ok(out)
    }
    fn load_state(&mut self, s: &HashMap<String, Tensor>) -> Result<()> {
        load_slots("m", &mut self.m, s);
        load_slots("v", &mut self.v, s);
        self.t = s
            .get("t")
            .context("Adam state has no step count")?
            .to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm` (when it is
/// positive); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let k = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * k)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_pytorch_sgd_momentum_on_a_quadratic() {
        // f(w) = w^2 / 2, grad = w; PyTorch SGD(lr=0.1, momentum=0.9, weight_decay=0.1):
        // step1: g=1+0.1=1.1, v=1.1, w=1-0.11=0.89; step2: g=0.89*1.1=0.979, v=0.99+0.979=1.969, w=0.89-0.1969.
        let w = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(vec![w.clone()], 0.1, 0.9, 0.1, false);
        for _ in 0..2 {
            let loss = (w.as_tensor().sqr().unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let v = w.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((v - (0.89 - 0.1969)).abs() < 1e-12, "{v}");
    }

    #[test]
    fn matches_pytorch_adam_on_a_quadratic() {
        // torch.optim.Adam([w], lr=0.1, betas=(0.5, 0.999)) on f = w^2/2 from w = 1: every
        // bias-corrected step is lr * sign(g) while g keeps its sign: 1 -> 0.9 -> 0.8...
        // (step 2 from the actual w1: m = 0.5*0.5 + 0.5*w1, v = 0.999e-3 + 1e-3*w1^2).
        let w = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![w.clone()], 0.1, (0.5, 0.999));
        let mut seen = vec![];
        for _ in 0..2 {
            let loss = (w.as_tensor().sqr().unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            seen.push(w.as_tensor().to_vec1::<f64>().unwrap()[0]);
        }
        assert!((seen[0] - 0.9).abs() < 1e-7, "{seen:?}");
        let w1 = seen[0];
        let (m, v) = (0.5 * 0.5 + 0.5 * w1, 0.999 * 0.001 + 0.001 * w1 * w1);
        let want = w1 - 0.1 * (m / 0.75) / ((v / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        assert!((seen[1] - want).abs() < 1e-12, "{seen:?} vs {want}");
    }

    #[test]
    fn adam_weight_decay_is_added_to_the_gradient() {
        // PyTorch Adam(weight_decay=0.5) on f = w^2/2 from w = 1: g' = (1 + 0.5) w.
        let w = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![w.clone()], 0.1, (0.5, 0.999));
        opt.weight_decay = 0.5;
        let mut seen = vec![];
        for _ in 0..2 {
            let loss = (w.as_tensor().sqr().unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            seen.push(w.as_tensor().to_vec1::<f64>().unwrap()[0]);
        }
        let (g1, w1) = (1.5, seen[0]);
        let g2 = 1.5 * w1;
        let (m, v) = (
            0.5 * 0.5 * g1 + 0.5 * g2,
            0.999 * 0.001 * g1 * g1 + 0.001 * g2 * g2,
        );
        let want = w1 - 0.1 * (m / 0.75) / ((v / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        assert!((seen[1] - want).abs() < 1e-12, "{seen:?} vs {want}");
        // Without the decay the second step differs.
        let plain_m = 0.5 * 0.5 + 0.5 * w1;
        assert!((plain_m - m).abs() > 0.1);
    }
}
