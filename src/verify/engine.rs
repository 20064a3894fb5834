//! One interface over the three engines that can run a float model: our candle lowering, ONNX
//! Runtime and tract. Used by `eval` and by the side-by-side `check`.

use anyhow::{Result, ensure};
use candle_core::{DType, Tensor};

use super::{ort_runtime, tract_runtime::TractModel};
use crate::device::HOST;
use crate::lower::{Program, lower};
use crate::onnx::LoadedModel;
use crate::onnx::interface::Interface;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// datafree's differentiable candle lowering.
    Candle,
    /// ONNX Runtime (the deployment reference).
    Ort,
    /// tract.
    Tract,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Candle => "candle",
            EngineKind::Ort => "ort",
            EngineKind::Tract => "tract",
        })
    }
}

enum Inner {
    Candle(Box<Program>),
    Ort(Box<ort::session::Session>),
    /// tract plans for a fixed batch; re-planned when the batch size changes.
    Tract(Option<(Vec<usize>, TractModel)>),
}

pub struct Engine {
    pub kind: EngineKind,
    path: std::path::PathBuf,
    /// The file's layout, which every engine is fed in.
    interface: Interface,
    inner: Inner,
}

impl Engine {
    /// Opens `model` in `kind`. `threads` = 0 leaves each engine's default.
    pub fn open(kind: EngineKind, model: &LoadedModel, threads: usize) -> Result<Self> {
        let inner = match kind {
            EngineKind::Candle => Inner::Candle(Box::new(lower(model, &HOST, DType::F32)?)),
            EngineKind::Ort => Inner::Ort(Box::new(ort_runtime::session(&model.path, threads)?)),
            EngineKind::Tract => Inner::Tract(None),
        };
        Ok(Self {
            kind,
            path: model.path.clone(),
            interface: Interface::of(model)?,
            inner,
        })
    }

    /// Runs one batch (N x C x H x W, flat, fed in the file's layout) and returns the flat outputs
    /// and their shape.
    pub fn run(&mut self, shape: &[usize], x: &[f32]) -> Result<(Vec<usize>, Vec<f32>)> {
        let (x, shape) = self.interface.feed(x, shape);
        let (x, shape) = (x.as_slice(), shape.as_slice());
        let (s, y) = match &mut self.inner {
            Inner::Candle(p) => {
                let t = Tensor::from_slice(x, shape, &HOST)?;
                let y = p.forward(&t)?.to_dtype(DType::F32)?;
                (y.dims().to_vec(), y.flatten_all()?.to_vec1::<f32>()?)
            }
            Inner::Ort(s) => ort_runtime::run_f32(s, shape, x)?,
            Inner::Tract(cache) => {
                if cache.as_ref().is_none_or(|(s, _)| s != shape) {
                    *cache = Some((shape.to_vec(), TractModel::load(&self.path, shape)?));
                }
                cache.as_ref().expect("just set").1.run_f32(shape, x)?
            }
        };
        ensure!(
            s.first() == shape.first() && s.len() == 2,
            "{} returned logits of shape {s:?} for a batch of {}",
            self.kind,
            shape[0]
        );
        Ok((s, y))
    }
}
