//! A named, ordered set of trainable tensors initialised from a seeded Rust RNG (candle's CPU
//! seeding is broken), saved and loaded as safetensors.

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;
use std::path::Path;

pub struct Params {
    vars: BTreeMap<String, Var>,
    device: Device,
}

impl Params {
    pub fn new(device: &Device) -> Self {
        Params {
            vars: BTreeMap::new(),
            device: device.clone(),
        }
    }

    fn add(&mut self, name: &str, shape: &[usize], v: Vec<f32>) -> Result<Tensor> {
        ensure!(
            !self.vars.contains_key(name),
            "parameter {name} defined twice"
        );
        let var = Var::from_tensor(&Tensor::from_vec(v, shape, &self.device)?)?;
        let t = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(t)
    }

    /// Uniform in [-bound, bound] (PyTorch's default for conv and linear layers uses
    /// bound = 1/sqrt(fan_in)).
    pub fn uniform(
        &mut self,
        name: &str,
        shape: &[usize],
        bound: f64,
        rng: &mut impl Rng,
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| rng.random_range(-bound..=bound) as f32)
            .collect();
        self.add(name, shape, v)
    }

    pub fn normal(
        &mut self,
        name: &str,
        shape: &[usize],
        std: f64,
        rng: &mut impl Rng,
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        let d = Normal::new(0.0, std)?;
        let v = (0..n).map(|_| d.sample(rng) as f32).collect();
        self.add(name, shape, v)
    }

    pub fn constant(&mut self, name: &str, shape: &[usize], value: f32) -> Result<Tensor> {
        let n = shape.iter().product();
        self.add(name, shape, vec![value; n])
    }

    /// The trainable variables, in name order.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.values().cloned().collect()
    }

    pub fn named(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    /// Number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Atomically writes the parameters to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        save_tensors(
            path,
            self.named()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect(),
        )
    }

    /// Loads values saved by `save`: every parameter must be present with the same shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let map = load_tensors(path, &self.device)?;
        for (name, var) in &self.vars {
            let Some(t) = map.get(name) else {
                bail!("{}: parameter {name} is missing", path.display());
            };
            ensure!(
                t.dims() == var.dims(),
                "{}: parameter {name} has shape {:?}, expected {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}

/// Atomically writes named tensors to `path` as safetensors.
pub fn save_tensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let bytes = safetensors::serialize(tensors, None)?;
    crate::io::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// Reads a safetensors file onto `device`.
pub fn load_tensors(
    path: &Path,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("{}: not a safetensors file", path.display()))
}
