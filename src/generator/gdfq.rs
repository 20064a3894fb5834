//! The GDFQ CIFAR generator (Xu et al. 2020, reference code github xushoukai/GDFQ): latent z
//! times a label embedding -> Linear to width x s x s -> BN -> nearest up x2 -> conv3x3 -> BN ->
//! LeakyReLU(0.2) -> up x2 -> conv3x3 -> BN -> LeakyReLU -> conv3x3 to the image channels ->
//! tanh -> BN without affine. s = image size / 4.
//!
//! Convs followed by batch-statistics BN carry no bias: it would be subtracted again by the BN,
//! so the output is the reference's exactly, with fewer parameters.

use super::{Params, batch_norm};
use crate::kernels::{Conv2dSpec, UpMode, conv2d, leaky_relu, upsample2d};
use anyhow::{Result, ensure};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GdfqConfig {
    pub latent: usize,
    pub classes: usize,
    pub channels: usize,
    pub size: usize,
    pub width: usize,
    /// BN epsilons of the two inner BNs: 0.8 in the reference (a positional-argument slip,
    /// kept for fidelity).
    pub inner_eps: f64,
}

impl GdfqConfig {
    pub fn cifar(classes: usize, channels: usize, size: usize) -> Self {
        GdfqConfig {
            latent: 100,
            classes,
            channels,
            size,
            width: 128,
            inner_eps: 0.8,
        }
    }
}

pub struct GdfqGenerator {
    pub cfg: GdfqConfig,
    pub params: Params,
    emb: Tensor,
    l1: (Tensor, Tensor),
    bn0: (Tensor, Tensor),
    conv1: Tensor,
    bn1: (Tensor, Tensor),
    conv2: Tensor,
    bn2: (Tensor, Tensor),
    conv3: (Tensor, Tensor),
}

impl GdfqGenerator {
    /// A generator with PyTorch's default initialisation drawn from `seed`.
    pub fn new(cfg: GdfqConfig, device: &Device, seed: u64) -> Result<Self> {
        ensure!(
            cfg.size.is_multiple_of(4) && cfg.size >= 4,
            "the GDFQ generator needs an image size divisible by 4, got {}",
            cfg.size
        );
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let mut p = Params::new(device);
        let (w, s) = (cfg.width, cfg.size / 4);
        let fan = |n: usize| 1.0 / (n as f64).sqrt();
        let emb = p.normal("label_emb", &[cfg.classes, cfg.latent], 1.0, &mut r)?;
        let l1 = (
            p.uniform(
                "l1.weight",
                &[w * s * s, cfg.latent],
                fan(cfg.latent),
                &mut r,
            )?,
            p.uniform("l1.bias", &[w * s * s], fan(cfg.latent), &mut r)?,
        );
        let bn = |p: &mut Params, name: &str, c: usize| -> Result<(Tensor, Tensor)> {
            Ok((
                p.constant(&format!("{name}.weight"), &[c], 1.0)?,
                p.constant(&format!("{name}.bias"), &[c], 0.0)?,
            ))
        };
        let bn0 = bn(&mut p, "bn0", w)?;
        let conv1 = p.uniform("conv1.weight", &[w, w, 3, 3], fan(w * 9), &mut r)?;
        let bn1 = bn(&mut p, "bn1", w)?;
        let conv2 = p.uniform("conv2.weight", &[w / 2, w, 3, 3], fan(w * 9), &mut r)?;
        let bn2 = bn(&mut p, "bn2", w / 2)?;
        let conv3 = (
            p.uniform(
                "conv3.weight",
                &[cfg.channels, w / 2, 3, 3],
                fan(w / 2 * 9),
                &mut r,
            )?,
            p.uniform("conv3.bias", &[cfg.channels], fan(w / 2 * 9), &mut r)?,
        );
        Ok(GdfqGenerator {
            cfg,
            params: p,
            emb,
            l1,
            bn0,
            conv1,
            bn1,
            conv2,
            bn2,
            conv3,
        })
    }

    /// Images (N x channels x size x size) for latents `z` (N x latent) and labels (N, u32).
    pub fn forward(&self, z: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let (w, s) = (self.cfg.width, self.cfg.size / 4);
        let same = Conv2dSpec::uniform(1, 1, 1, 1);
        let h = (z * self.emb.index_select(labels, 0)?)?;
        let h = h
            .matmul(&self.l1.0.t()?)?
            .broadcast_add(&self.l1.1)?
            .reshape((n, w, s, s))?;
        let h = batch_norm(&h, Some((&self.bn0.0, &self.bn0.1)), 1e-5)?;
        let h = upsample2d(&h, 2, UpMode::Nearest)?;
        let h = conv2d(&h, &self.conv1, same)?;
        let h = batch_norm(&h, Some((&self.bn1.0, &self.bn1.1)), self.cfg.inner_eps)?;
        let h = leaky_relu(&h, 0.2)?;
        let h = upsample2d(&h, 2, UpMode::Nearest)?;
        let h = conv2d(&h, &self.conv2, same)?;
        let h = batch_norm(&h, Some((&self.bn2.0, &self.bn2.1)), self.cfg.inner_eps)?;
        let h = leaky_relu(&h, 0.2)?;
        let h = conv2d(&h, &self.conv3.0, same)?;
        let ones = Tensor::ones(self.cfg.channels, h.dtype(), h.device())?;
        let h = crate::kernels::channel_affine(&h, &ones, &self.conv3.1)?.tanh()?;
        batch_norm(&h, None, 1e-5)
    }
}
