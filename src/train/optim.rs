//! Optimisers candle-nn lacks: SGD with momentum (optionally Nesterov) and decoupled-from-nothing
//! L2 weight decay, PyTorch's semantics: v = mu * v + (g + wd * w); w -= lr * (nesterov ? g + wd * w
//! + mu * v : v).

use anyhow::Result;
use candle_core::{Tensor, Var, backprop::GradStore};

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
}
