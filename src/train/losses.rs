//! Losses. BNS (GDFQ/ZeroQ): for every BatchNormalization of the teacher, the batch mean and
//! biased variance per channel of its INPUT against the running statistics.

use anyhow::{Result, ensure};
use candle_core::Tensor;

use crate::lower::program::BnTap;

pub use crate::lower::ops::nn::channel_moments;

/// BNS = mean over layers of [MSE(mean, running mean) + MSE(var, running var)].
pub fn bns(inputs: &[Tensor], taps: &[BnTap]) -> Result<Tensor> {
    ensure!(
        !taps.is_empty() && inputs.len() == taps.len(),
        "BNS needs the BN taps of the teacher ({} inputs, {} taps)",
        inputs.len(),
        taps.len()
    );
    let mut total: Option<Tensor> = None;
    for (x, tap) in inputs.iter().zip(taps) {
        let (m, v) = channel_moments(x)?;
        let rm = Tensor::new(tap.stats.running_mean.as_slice(), x.device())?.to_dtype(x.dtype())?;
        let rv = Tensor::new(tap.stats.running_var.as_slice(), x.device())?.to_dtype(x.dtype())?;
        let l = ((m - rm)?.sqr()?.mean_all()? + (v - rv)?.sqr()?.mean_all()?)?;
        total = Some(match total {
            None => l,
            Some(t) => (t + l)?,
        });
    }
    Ok((total.expect("non-empty") / taps.len() as f64)?)
}
