//! Running float models through tract, the second reference engine.

use std::path::Path;

use anyhow::{Context, Result};
use tract_onnx::prelude::*;

/// A model made runnable by tract for a fixed input shape.
pub struct TractModel(std::sync::Arc<TypedSimplePlan>);

impl TractModel {
    pub fn load(model: &Path, input_shape: &[usize]) -> Result<Self> {
        let ctx = || format!("{}: tract cannot prepare the model", model.display());
        let plan = tract_onnx::onnx()
            .model_for_path(model)
            .with_context(ctx)?
            .with_input_fact(0, f32::fact(input_shape).into())
            .with_context(ctx)?
            .into_optimized()
            .with_context(ctx)?
            .into_runnable()
            .with_context(ctx)?;
        Ok(Self(plan))
    }

    /// Runs on one input batch; returns the first output's shape and values.
    pub fn run_f32(&self, shape: &[usize], input: &[f32]) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = Tensor::from_shape(shape, input).context("building the tract input tensor")?;
        let out = self.0.run(tvec!(t.into())).context("tract run failed")?;
        let o = &out[0];
        Ok((
            o.shape().to_vec(),
            o.to_plain_array_view::<f32>()
                .context("tract output is not float32")?
                .iter()
                .copied()
                .collect(),
        ))
    }
}
