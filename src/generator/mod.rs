//! Generators: networks that map a latent code and a class label to an image in the teacher's
//! input space. One file per family; parameters live in a `Params` store (seeded init,
//! safetensors checkpoints).

pub mod autorecon;
pub mod gdfq;
pub mod genotype;
pub mod params;

pub use autorecon::{AutoReconConfig, AutoReconGenerator, Genotype};
pub use gdfq::{GdfqConfig, GdfqGenerator};
pub use params::Params;

use anyhow::Result;
use candle_core::Tensor;

use crate::kernels::{channel_affine, channel_moments};

/// Training-mode batch normalisation over N x C x ... (batch statistics), with an optional
/// per-channel affine `gamma`, `beta` (C vectors, or N x C rows for class-conditional BN).
pub fn batch_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f64) -> Result<Tensor> {
    let (mean, var) = channel_moments(x)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(match affine {
        None => channel_affine(x, &inv, &(mean * &inv)?.neg()?)?,
        Some((g, b)) if g.rank() == 1 => {
            let a = (g * &inv)?;
            channel_affine(x, &a, &(b - (mean * &a)?)?)?
        }
        Some((g, b)) => {
            // Per-sample gamma/beta (class-conditional): normalise, then scale rows.
            let xn = channel_affine(x, &inv, &(mean * &inv)?.neg()?)?;
            let mut shape = vec![1usize; x.rank()];
            shape[0] = x.dim(0)?;
            shape[1] = x.dim(1)?;
            xn.broadcast_mul(&g.reshape(shape.clone())?)?
                .broadcast_add(&b.reshape(shape)?)?
        }
    })
}

/// A batch of latents z ~ N(0, 1) (n x latent) and labels uniform over `classes`, drawn from
/// `rng` in that order (the same draws on every device).
pub fn sample(
    rng: &mut impl rand::Rng,
    n: usize,
    latent: usize,
    classes: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    use rand_distr::Distribution;
    let z: Vec<f32> = (0..n * latent)
        .map(|_| rand_distr::StandardNormal.sample(rng))
        .collect();
    let y: Vec<u32> = (0..n)
        .map(|_| rng.random_range(0..classes as u32))
        .collect();
    Ok((
        Tensor::from_vec(z, (n, latent), device)?,
        Tensor::from_vec(y, n, device)?,
    ))
}

/// A generator's standardized images (per-channel batch mean 0, std 1 from its last BN) moved
/// into the teacher's input domain: mean and spread of natural images there.
pub fn to_domain(x: &Tensor, domain: &crate::teacher::InputDomain) -> Result<Tensor> {
    if domain.is_unit_normal() {
        return Ok(x.clone());
    }
    let (m, s) = domain.stats();
    let c = x.dim(1)?;
    let pick = |v: [f32; 3]| -> Result<Tensor> {
        let v: Vec<f32> = (0..c).map(|k| v[k % 3]).collect();
        Ok(Tensor::from_vec(v, c, x.device())?.to_dtype(x.dtype())?)
    };
    Ok(crate::kernels::channel_affine(x, &pick(s)?, &pick(m)?)?)
}

/// What the training loops need of a generator.
pub trait Generator {
    fn latent(&self) -> usize;
    /// (channels, height, width) of the images it makes.
    fn image(&self) -> (usize, usize, usize);
    /// Images (N x channels x height x width) for latents `z` (N x latent) and labels (N, u32).
    fn forward(&self, z: &Tensor, labels: &Tensor) -> Result<Tensor>;
    fn params(&self) -> &Params;
    fn params_mut(&mut self) -> &mut Params;
    /// Multiply-accumulates of its convs and linears per generated image.
    fn macs_per_image(&self) -> u64;
}
