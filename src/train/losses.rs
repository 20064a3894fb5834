//! Losses. BNS (GDFQ/ZeroQ): for every BatchNormalization of the teacher, the batch mean and
//! biased variance per channel of its INPUT against the running statistics. Feature
//! distillation: student activations against the teacher's, tensor by tensor.

use anyhow::{Result, ensure};
use candle_core::Tensor;

use serde::{Deserialize, Serialize};

use crate::lower::program::{BnTap, Forward};
use crate::teacher::InputDomain;

pub use crate::lower::ops::nn::channel_moments;

/// BNS = mean over layers of [MSE(mean, running mean) + MSE(var, running var)].
pub fn bns(inputs: &[Tensor], taps: &[BnTap]) -> Result<Tensor> {
    bns_terms(inputs, taps, false)
}

/// BNS in each channel's own units: the mean's error over the running std and the variance's
/// relative error. A BN's input scale is arbitrary (the BN undoes it), so the plain BNS can be
/// dominated by one layer, e.g. the first conv of a raw-pixel model (variances ~1e4 there).
pub fn bns_relative(inputs: &[Tensor], taps: &[BnTap]) -> Result<Tensor> {
    bns_terms(inputs, taps, true)
}

fn bns_terms(inputs: &[Tensor], taps: &[BnTap], relative: bool) -> Result<Tensor> {
    let total = per_layer_sum(inputs, taps, "BNS", |m, v, rm, rv| {
        Ok(if relative {
            let unit = (rv.clone() + 1e-5)?;
            let dm = (m - rm)?.sqr()?.div(&unit)?.mean_all()?;
            let dv = (v - rv)?.div(&unit)?.sqr()?.mean_all()?;
            (dm + dv)?
        } else {
            ((m - rm)?.sqr()?.mean_all()? + (v - rv)?.sqr()?.mean_all()?)?
        })
    })?;
    Ok((total / taps.len() as f64)?)
}

/// Sum over the teacher's BN layers of `term(batch mean, batch variance, running mean, running
/// variance)` of each layer's input.
fn per_layer_sum(
    inputs: &[Tensor],
    taps: &[BnTap],
    what: &str,
    term: impl Fn(Tensor, Tensor, Tensor, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    ensure!(
        !taps.is_empty() && inputs.len() == taps.len(),
        "{what} needs the BN taps of the teacher ({} inputs, {} taps)",
        inputs.len(),
        taps.len()
    );
    let mut total: Option<Tensor> = None;
    for (x, tap) in inputs.iter().zip(taps) {
        let (m, v) = channel_moments(x)?;
        let rm = Tensor::new(tap.stats.running_mean.as_slice(), x.device())?.to_dtype(x.dtype())?;
        let rv = Tensor::new(tap.stats.running_var.as_slice(), x.device())?.to_dtype(x.dtype())?;
        let l = term(m, v, rm, rv)?;
        total = Some(match total {
            None => l,
            Some(t) => (t + l)?,
        });
    }
    Ok(total.expect("non-empty"))
}

/// The units the generators' BNS measures each BN layer in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BnsUnits {
    /// `relative` for a teacher whose inputs are in pixel units, else `plain`.
    #[default]
    Auto,
    /// The references' loss: squared errors of the raw means and variances.
    Plain,
    /// Each layer in its own units ([`bns_relative`]).
    Relative,
}

impl BnsUnits {
    /// `Auto` decided for a teacher with input domain `domain`. The references' plain loss was
    /// made for standardized inputs; on pixel-unit inputs the first conv's outputs, and so its
    /// BN's variances, are ~255^2 times larger and the plain loss is that one layer (measured on
    /// the Keras-style fixture: BNS ~1e5, the generator's CE at 16 where chance is 2.3).
    pub fn resolve(self, domain: &InputDomain) -> Self {
        match self {
            BnsUnits::Auto if domain.in_pixel_units() => BnsUnits::Relative,
            BnsUnits::Auto => BnsUnits::Plain,
            u => u,
        }
    }
}

/// The reconstruction loss of GDFQ's generator and of AutoReCon's search, CE(teacher(x), y) +
/// `bns_weight` BNS (in `units`), from the teacher's forward pass; returns it with the values of
/// its two terms (finite, else the divergence error naming iteration `iter`).
pub fn reconstruction(
    t: &Forward,
    taps: &[BnTap],
    y: &Tensor,
    (bns_weight, units): (f64, BnsUnits),
    iter: usize,
) -> Result<(Tensor, f64, f64)> {
    let ce = candle_nn::loss::cross_entropy(&t.logits, y)?;
    let b = match units {
        BnsUnits::Relative => bns_relative(&t.bn_inputs, taps)?,
        BnsUnits::Auto | BnsUnits::Plain => bns(&t.bn_inputs, taps)?,
    };
    let loss = (&ce + (&b * bns_weight)?)?;
    let ce_v = super::engine::finite(
        ce.to_scalar::<f32>()? as f64,
        "the generator's CE loss",
        iter,
    )?;
    let bns_v = super::engine::finite(b.to_scalar::<f32>()? as f64, "the BNS loss", iter)?;
    Ok((loss, ce_v, bns_v))
}

/// Intermediate-feature distillation: the mean over tensors of MSE(s, t) / mean(t^2), so every
/// layer counts alike whatever its scale.
pub fn feature_loss(student: &[Tensor], teacher: &[Tensor]) -> Result<Tensor> {
    ensure!(
        !student.is_empty() && student.len() == teacher.len(),
        "feature distillation needs matching, non-empty tensor lists"
    );
    let mut total: Option<Tensor> = None;
    for (s, t) in student.iter().zip(teacher) {
        let t = t.detach();
        let power = t.sqr()?.mean_all()?.to_scalar::<f32>()?.max(1e-8) as f64;
        let l = ((s - &t)?.sqr()?.mean_all()? / power)?;
        total = Some(match total {
            Some(a) => (a + l)?,
            None => l,
        });
    }
    Ok((total.expect("non-empty") / student.len() as f64)?)
}

/// The DeepInversion/CMI BN prior CPSC-DFKD uses: over the teacher's BN layers, the sum of the
/// (un-squared) L2 norms of the batch mean's and the batch variance's differences from the
/// running statistics.
pub fn bn_prior(inputs: &[Tensor], taps: &[BnTap]) -> Result<Tensor> {
    per_layer_sum(inputs, taps, "the BN prior", |m, v, rm, rv| {
        Ok(((m - rm)?.sqr()?.sum_all()?.sqrt()? + (v - rv)?.sqr()?.sum_all()?.sqrt()?)?)
    })
}

/// KL(softmax(teacher) || softmax(student)) at temperature 1, summed over classes and averaged
/// over the batch (PyTorch's `batchmean`).
pub fn kl_batchmean(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let ls = candle_nn::ops::log_softmax(student, candle_core::D::Minus1)?;
    let lt = candle_nn::ops::log_softmax(teacher, candle_core::D::Minus1)?;
    Ok((lt.exp()? * (lt - ls)?)?.sum(1)?.mean_all()?)
}

/// Supervised contrastive loss (Khosla et al.) over two views per sample (`a`, `b`: N x D, used
/// as given: the caller normalises), positives = the other samples of the same label (the other
/// view of the same sample included), at temperature `tau`.
pub fn supcon(a: &Tensor, b: &Tensor, labels: &[u32], tau: f64) -> Result<Tensor> {
    let n = labels.len();
    ensure!(
        a.dim(0)? == n && b.dim(0)? == n,
        "supcon: {n} labels for {} and {} features",
        a.dim(0)?,
        b.dim(0)?
    );
    let f = Tensor::cat(&[a, b], 0)?;
    let sim = (f.matmul(&f.t()?)? / tau)?;
    // Subtracting each row's maximum (a constant for the softmax) keeps exp finite.
    let sim = sim.broadcast_sub(&sim.max_keepdim(1)?.detach())?;
    let m = 2 * n;
    let label = |i: usize| labels[i % n];
    let others: Vec<f32> = (0..m * m)
        .map(|k| if k / m == k % m { 0.0 } else { 1.0 })
        .collect();
    let pos: Vec<f32> = (0..m * m)
        .map(|k| {
            let (i, j) = (k / m, k % m);
            if i != j && label(i) == label(j) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let dev = a.device();
    let others = Tensor::from_vec(others, (m, m), dev)?.to_dtype(sim.dtype())?;
    let pos = Tensor::from_vec(pos, (m, m), dev)?.to_dtype(sim.dtype())?;
    let log_den = (sim.exp()? * &others)?.sum_keepdim(1)?.log()?;
    let log_prob = sim.broadcast_sub(&log_den)?;
    // Every anchor has at least one positive: its other view.
    let mean_pos = ((log_prob * &pos)?.sum(1)? / pos.sum(1)?)?;
    Ok(mean_pos.mean_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn feature_loss_is_relative_per_tensor_and_reaches_the_student() {
        let d = Device::Cpu;
        let t1 = Tensor::new(&[1f32, -2.0, 3.0, 0.0], &d).unwrap();
        let t2 = (&t1 * 1000.0).unwrap();
        let s1 = Var::new(&[1.5f32, -2.0, 3.0, 0.0], &d).unwrap();
        let s2 = (&t2 + 10.0).unwrap();
        // MSE / mean(t^2): (0.25 / 4) / (14 / 4) for the first, (100) / (14e6 / 4) for the
        // second: the large tensor's absolute error is 400x larger but counts less.
        let l = feature_loss(&[s1.as_tensor().clone(), s2], &[t1.clone(), t2])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = ((0.25 / 4.0) / 3.5 + 100.0 / 3.5e6) / 2.0;
        assert!((l as f64 - want).abs() < 1e-7, "{l} vs {want}");
        // Zero for equal tensors; the gradient reaches the student where it differs.
        let one = std::slice::from_ref(&t1);
        let same = feature_loss(one, one).unwrap();
        assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0);
        let g = feature_loss(&[s1.as_tensor().clone()], &[t1])
            .unwrap()
            .backward()
            .unwrap();
        let gs: Vec<f32> = g.get(s1.as_tensor()).unwrap().to_vec1().unwrap();
        assert!(gs[0] > 0.0 && gs[1..].iter().all(|&v| v == 0.0), "{gs:?}");
        assert!(feature_loss(&[], &[]).is_err());
    }
}
