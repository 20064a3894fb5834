//! Supervised training of a classifier given as an ONNX graph (the project's own teacher): the
//! graph is lowered with trainable parameters and BatchNormalization in batch-statistics mode,
//! trained with SGD and a cosine schedule, then its BN running statistics are re-estimated on
//! training batches and everything is written back into the graph's initializers.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor};

use super::optim::Sgd;
use crate::lower::lower_with;
use crate::onnx::LoadedModel;
use crate::onnx::pb::ModelProto;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Recipe {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Batches used to re-estimate BN running statistics after training.
    pub bn_batches: usize,
}

/// A source of labelled batches: (N x C x H x W input already preprocessed, labels).
pub type Batches<'a> = dyn FnMut(usize) -> Result<(Tensor, Vec<u32>)> + 'a;

/// Trains `model`; `batch(step)` yields training batches. Returns the trained graph.
pub fn train(
    model: &LoadedModel,
    device: &Device,
    recipe: &Recipe,
    batch: &mut Batches,
    mut on_step: impl FnMut(usize, f32),
) -> Result<ModelProto> {
    let mut prog = lower_with(model, device, DType::F32, true)?;
    prog.set_bn_batch_stats(true);
    let vars: Vec<_> = prog.vars().iter().map(|(_, v)| v.clone()).collect();
    ensure!(
        !vars.is_empty(),
        "{}: nothing to train",
        model.path.display()
    );
    let mut opt = Sgd::new(vars, recipe.lr, recipe.momentum, recipe.weight_decay, true);
    for step in 0..recipe.steps {
        // Cosine decay to zero.
        opt.lr = recipe.lr
            * 0.5
            * (1.0 + (std::f64::consts::PI * step as f64 / recipe.steps as f64).cos());
        let (x, y) = batch(step)?;
        let y = Tensor::new(y.as_slice(), device)?;
        let loss = candle_nn::loss::cross_entropy(&prog.forward(&x)?, &y)?;
        let l = loss.to_scalar::<f32>()?;
        ensure!(
            l.is_finite(),
            "training diverged at step {step} (loss {l}); lower the learning rate"
        );
        opt.step(&loss.backward()?)?;
        on_step(step, l);
    }
    // Running statistics = mean of per-batch moments of each BN input over fresh batches.
    let mut sums: Vec<Option<(Tensor, Tensor)>> = vec![None; prog.bn_taps().len()];
    for k in 0..recipe.bn_batches {
        let (x, _) = batch(recipe.steps + k)?;
        let f = prog.forward_taps(&x.detach())?;
        for (acc, t) in sums.iter_mut().zip(&f.bn_inputs) {
            let (m, v) = crate::train::losses::channel_moments(&t.detach())?;
            *acc = Some(match acc.take() {
                None => (m, v),
                Some((a, b)) => ((a + m)?, (b + v)?),
            });
        }
    }
    let mut values: HashMap<String, Vec<f32>> = HashMap::new();
    for (name, var) in prog.vars() {
        values.insert(
            name.clone(),
            var.as_tensor().flatten_all()?.to_vec1::<f32>()?,
        );
    }
    let graph = model.graph();
    for (tap, acc) in prog.bn_taps().iter().zip(sums) {
        let (m, v) = acc.context("no BN statistics gathered")?;
        let node = &graph.node[tap.node_index];
        let n = recipe.bn_batches as f64;
        values.insert(node.input[3].clone(), (m / n)?.to_vec1::<f32>()?);
        values.insert(node.input[4].clone(), (v / n)?.to_vec1::<f32>()?);
    }
    crate::export::with_initializers(&model.proto, &values)
}
