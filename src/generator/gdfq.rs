//! The GDFQ CIFAR generator (Xu et al. 2020, reference code github xushoukai/GDFQ): latent z
//! times a label embedding -> Linear to width x s x s -> BN -> nearest up x2 -> conv3x3 -> BN ->
//! LeakyReLU(0.2) -> up x2 -> conv3x3 -> BN -> LeakyReLU -> conv3x3 to the image channels ->
//! tanh -> BN without affine. The trunk works at a quarter of the image size, rounded up; an
//! image whose height or width is not a multiple of 4 is the centre of the one it makes
//! (cropped before the last BN, so that BN sees the teacher's image size).
//!
//! The ImageNet variant (`conditional_bn`) runs the same trunk on z alone and replaces every BN
//! by class-conditional BN: BN without affine, then per-class gamma/beta rows (initialised to
//! 1 and 0) picked by the label.
//!
//! Convs followed by batch-statistics BN carry no bias: it would be subtracted again by the BN,
//! so the output is the reference's exactly, with fewer parameters.

use super::{Generator, Params, batch_norm};
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
    /// Image height (and width, unless `image_width` is set).
    pub size: usize,
    /// Image width when it differs from the height (None: square, as every checkpoint written
    /// before non-square teachers were supported).
    #[serde(default)]
    pub image_width: Option<usize>,
    /// Channels of the trunk.
    pub width: usize,
    /// BN epsilons of the two inner BNs: 0.8 in the reference (a positional-argument slip,
    /// kept for fidelity).
    pub inner_eps: f64,
    /// Epsilon of the first and the last BN (1e-5 in GDFQ, 1e-3 in CPSC-DFKD).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Class-conditional BN everywhere instead of the label embedding (the ImageNet generator).
    pub conditional_bn: bool,
}

fn default_eps() -> f64 {
    1e-5
}

impl GdfqConfig {
    /// `(height, width)`: the teacher's image size.
    pub fn cifar(classes: usize, channels: usize, (height, width): (usize, usize)) -> Self {
        GdfqConfig {
            latent: 100,
            classes,
            channels,
            size: height,
            image_width: (width != height).then_some(width),
            width: 128,
            inner_eps: 0.8,
            eps: default_eps(),
            conditional_bn: false,
        }
    }

    /// The CPSC-DFKD generator: latent 256, every BN with eps 1e-3; `cfe` = categorical feature
    /// embeddings (class-conditional BN everywhere), else plain BN after a label embedding (the
    /// paper's "BN" ablation).
    pub fn cpsc(classes: usize, channels: usize, size: (usize, usize), cfe: bool) -> Self {
        GdfqConfig {
            latent: 256,
            inner_eps: 1e-3,
            eps: 1e-3,
            conditional_bn: cfe,
            ..Self::cifar(classes, channels, size)
        }
    }

    /// The reference ImageNet generator: class-conditional BN, no label embedding.
    pub fn imagenet(classes: usize, channels: usize, size: (usize, usize)) -> Self {
        GdfqConfig {
            conditional_bn: true,
            ..Self::cifar(classes, channels, size)
        }
    }

    /// (height, width) of the images.
    pub fn hw(&self) -> (usize, usize) {
        (self.size, self.image_width.unwrap_or(self.size))
    }

    /// (height, width) of the trunk's first feature map: a quarter of the image, rounded up.
    fn trunk(&self) -> (usize, usize) {
        let (h, w) = self.hw();
        (h.div_ceil(4), w.div_ceil(4))
    }
}

pub struct GdfqGenerator {
    pub cfg: GdfqConfig,
    pub params: Params,
    emb: Option<Tensor>,
    l1: (Tensor, Tensor),
    bn0: (Tensor, Tensor),
    conv1: Tensor,
    bn1: (Tensor, Tensor),
    conv2: Tensor,
    bn2: (Tensor, Tensor),
    conv3: (Tensor, Tensor),
    /// Per-class gamma/beta of the last BN (conditional variant only).
    bn_out: Option<(Tensor, Tensor)>,
}

impl GdfqGenerator {
    /// A generator with PyTorch's default initialisation drawn from `seed`.
    pub fn new(cfg: GdfqConfig, device: &Device, seed: u64) -> Result<Self> {
        let (h, iw) = cfg.hw();
        ensure!(
            h > 0 && iw > 0,
            "the GDFQ generator needs a positive image size, got {h}x{iw}"
        );
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let mut p = Params::new(device);
        let (w, (sh, sw)) = (cfg.width, cfg.trunk());
        let fan = |n: usize| 1.0 / (n as f64).sqrt();
        let emb = if cfg.conditional_bn {
            None
        } else {
            Some(p.normal("label_emb", &[cfg.classes, cfg.latent], 1.0, &mut r)?)
        };
        let l1 = (
            p.uniform(
                "l1.weight",
                &[w * sh * sw, cfg.latent],
                fan(cfg.latent),
                &mut r,
            )?,
            p.uniform("l1.bias", &[w * sh * sw], fan(cfg.latent), &mut r)?,
        );
        // Conditional BN keeps one gamma/beta row per class.
        let rows = cfg.conditional_bn.then_some(cfg.classes);
        let bn = |p: &mut Params, name: &str, c: usize| -> Result<(Tensor, Tensor)> {
            let shape: Vec<usize> = rows.into_iter().chain([c]).collect();
            Ok((
                p.constant(&format!("{name}.weight"), &shape, 1.0)?,
                p.constant(&format!("{name}.bias"), &shape, 0.0)?,
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
        let bn_out = if cfg.conditional_bn {
            Some(bn(&mut p, "bn_out", cfg.channels)?)
        } else {
            None
        };
        Ok(GdfqGenerator {
            bn_out,
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

    /// Images (N x channels x height x width) for latents `z` (N x latent) and labels (N, u32).
    pub fn forward(&self, z: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let (w, (sh, sw)) = (self.cfg.width, self.cfg.trunk());
        let same = Conv2dSpec::uniform(1, 1, 1, 1);
        let h = match &self.emb {
            Some(e) => (z * e.index_select(labels, 0)?)?,
            None => z.clone(),
        };
        // Conditional BN: the label's gamma/beta rows.
        let pick = |(g, b): &(Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
            Ok(if self.cfg.conditional_bn {
                (g.index_select(labels, 0)?, b.index_select(labels, 0)?)
            } else {
                (g.clone(), b.clone())
            })
        };
        let (bn0, bn1, bn2) = (pick(&self.bn0)?, pick(&self.bn1)?, pick(&self.bn2)?);
        let h = h
            .matmul(&self.l1.0.t()?)?
            .broadcast_add(&self.l1.1)?
            .reshape((n, w, sh, sw))?;
        let h = batch_norm(&h, Some((&bn0.0, &bn0.1)), self.cfg.eps)?;
        let h = upsample2d(&h, 2, UpMode::Nearest)?;
        let h = conv2d(&h, &self.conv1, same)?;
        let h = batch_norm(&h, Some((&bn1.0, &bn1.1)), self.cfg.inner_eps)?;
        let h = leaky_relu(&h, 0.2)?;
        let h = upsample2d(&h, 2, UpMode::Nearest)?;
        let h = conv2d(&h, &self.conv2, same)?;
        let h = batch_norm(&h, Some((&bn2.0, &bn2.1)), self.cfg.inner_eps)?;
        let h = leaky_relu(&h, 0.2)?;
        let h = conv2d(&h, &self.conv3.0, same)?;
        let ones = Tensor::ones(self.cfg.channels, h.dtype(), h.device())?;
        let h = crate::kernels::channel_affine(&h, &ones, &self.conv3.1)?.tanh()?;
        let (ih, iw) = self.cfg.hw();
        let h = h
            .narrow(2, (4 * sh - ih) / 2, ih)?
            .narrow(3, (4 * sw - iw) / 2, iw)?;
        match &self.bn_out {
            Some(t) => {
                let (g, b) = pick(t)?;
                batch_norm(&h, Some((&g, &b)), self.cfg.eps)
            }
            None => batch_norm(&h, None, self.cfg.eps),
        }
    }
}

impl Generator for GdfqGenerator {
    fn latent(&self) -> usize {
        self.cfg.latent
    }
    fn image(&self) -> (usize, usize, usize) {
        let (h, w) = self.cfg.hw();
        (self.cfg.channels, h, w)
    }
    fn forward(&self, z: &Tensor, labels: &Tensor) -> Result<Tensor> {
        GdfqGenerator::forward(self, z, labels)
    }
    fn params(&self) -> &Params {
        &self.params
    }
    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }
    fn macs_per_image(&self) -> u64 {
        let (sh, sw) = self.cfg.trunk();
        let (w, ss, c) = (
            self.cfg.width as u64,
            (sh * sw) as u64,
            self.cfg.channels as u64,
        );
        // l1, conv1 at twice the trunk's size, conv2 and conv3 at four times.
        self.cfg.latent as u64 * w * ss
            + w * w * 9 * 4 * ss
            + w / 2 * w * 9 * 16 * ss
            + c * w / 2 * 9 * 16 * ss
    }
}
