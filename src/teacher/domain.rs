//! The teacher's input domain: how an 8-bit pixel becomes the model's input,
//! x = (pixel / scale - mean[c]) / std[c] (a [`Preprocess`]), and where that knowledge came from:
//! the user's flags, the model's metadata, or an estimate from the first BatchNormalization's
//! running statistics (the running means through the first conv give the input's per-channel
//! mean by least squares; the running variances give its spread under a natural-image
//! correlation model). Every stage that makes or reads inputs (calibration noise, the network
//! input's quantization range, generator outputs, sample grids, verification inputs) asks the
//! domain rather than assuming a standardized N(0, 1) input.

use serde::Serialize;

use crate::data::Preprocess;
use crate::onnx::LoadedModel;
use crate::onnx::bn::BnReport;

/// Per-channel mean and std of natural RGB images with pixels scaled to [0, 1] (the ImageNet
/// statistics, the most widely used reference): the prior that turns a preprocessing into the
/// input's expected statistics, and an inferred spread back into a preprocessing.
pub const NATURAL_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const NATURAL_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Correlation of neighbouring pixels one image-width apart decays as exp(-SPATIAL_DECAY * d /
/// size); 0.9 between adjacent pixels of a 32x32 image. Between colour channels: CHANNEL_CORR.
pub(super) const SPATIAL_DECAY: f64 = 3.4;
pub(super) const CHANNEL_CORR: f64 = 0.88;

/// What kind of input a model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainKind {
    /// Raw pixels 0..255.
    Pixels,
    /// Pixels scaled to [0, 1].
    Unit,
    /// Pixels scaled to [-1, 1].
    Symmetric,
    /// Per-channel standardized: (pixel/255 - mean) / std.
    Standardized,
    /// Raw pixels minus a per-channel mean (Caffe style).
    MeanSubtracted,
    /// Another affine map.
    Custom,
}

impl DomainKind {
    pub fn describe(self) -> &'static str {
        match self {
            DomainKind::Pixels => "raw pixels 0..255",
            DomainKind::Unit => "pixels scaled to [0, 1]",
            DomainKind::Symmetric => "pixels scaled to [-1, 1]",
            DomainKind::Standardized => "standardized per channel ((pixel/255 - mean) / std)",
            DomainKind::MeanSubtracted => "raw pixels minus a per-channel mean",
            DomainKind::Custom => "another affine map of the pixels",
        }
    }

    /// The canonical preprocessing of a kind (`Standardized`: the natural-image statistics).
    fn canonical(self) -> Option<Preprocess> {
        let p = |scale: f32, mean: [f32; 3], std: [f32; 3]| Preprocess { mean, std, scale };
        Some(match self {
            DomainKind::Pixels => p(1.0, [0.0; 3], [1.0; 3]),
            DomainKind::Unit => p(255.0, [0.0; 3], [1.0; 3]),
            DomainKind::Symmetric => p(255.0, [0.5; 3], [0.5; 3]),
            DomainKind::Standardized => p(255.0, NATURAL_MEAN, NATURAL_STD),
            DomainKind::MeanSubtracted => p(1.0, NATURAL_MEAN.map(|m| m * 255.0), [1.0; 3]),
            DomainKind::Custom => return None,
        })
    }
}

/// Where the domain came from, most trusted first.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "from", content = "detail")]
pub enum DomainSource {
    /// `--scale/--mean/--std` or `--input-range`.
    Flags,
    /// A metadata key of the model.
    Metadata(String),
    /// Estimated from the BatchNormalization statistics.
    Inferred,
    /// Nothing said anything: standardized inputs assumed.
    Assumed,
}

/// The estimate of the input's statistics from the teacher's BatchNormalization layers.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// The BN layer the estimate comes from.
    pub bn: String,
    /// Whether that BN normalizes the input itself (exact) or the first conv's output.
    pub direct: bool,
    /// Per-channel mean of the input.
    pub mean: Vec<f64>,
    /// Per-channel std of the input.
    pub std: Vec<f64>,
    /// Relative RMS misfit of the running means (0 = the linear model explains them exactly).
    pub mean_misfit: f64,
    /// The kind the statistics point to and how sure (0..1: 1 = far from every other kind).
    pub kind: DomainKind,
    pub confidence: f64,
}

/// The input domain of a teacher.
#[derive(Debug, Clone, Serialize)]
pub struct InputDomain {
    pub preprocess: Preprocess,
    pub kind: DomainKind,
    pub source: DomainSource,
    /// The BN-statistics estimate, when the teacher allows one.
    pub estimate: Option<Estimate>,
    /// Contradictions between the given preprocessing and the estimate.
    pub warnings: Vec<String>,
}

impl InputDomain {
    /// The domain from (in this order) an explicit preprocessing, the model's metadata, the
    /// BN-statistics estimate, else standardized inputs assumed.
    pub fn resolve(
        model: &LoadedModel,
        bn: &BnReport,
        given: Option<Preprocess>,
        size: (usize, usize),
    ) -> InputDomain {
        let estimate = super::infer::estimate(model, bn, size);
        let (preprocess, source) = match given {
            Some(p) => (p, DomainSource::Flags),
            None => match from_metadata(model) {
                Some((p, key)) => (p, DomainSource::Metadata(key)),
                None => match &estimate {
                    Some(e) => (e.preprocess(), DomainSource::Inferred),
                    None => (
                        DomainKind::Standardized.canonical().expect("canonical"),
                        DomainSource::Assumed,
                    ),
                },
            },
        };
        let kind = match (&source, &estimate) {
            (DomainSource::Inferred, Some(e)) => e.kind,
            _ => kind_of(&preprocess),
        };
        let mut warnings = Vec::new();
        if let Some(e) = &estimate
            && source != DomainSource::Inferred
            && e.confidence >= 0.5
            && e.kind != kind
            && !(e.kind == DomainKind::Custom || kind == DomainKind::Custom)
        {
            warnings.push(format!(
                "the preprocessing given ({}) says the input is {}, but the teacher's BatchNormalization statistics ({}) look like {} (confidence {:.2}); check --scale/--mean/--std",
                match &source {
                    DomainSource::Metadata(k) => format!("metadata {k}"),
                    _ => "flags".into(),
                },
                kind.describe(),
                e.bn,
                e.kind.describe(),
                e.confidence
            ));
        }
        InputDomain {
            preprocess,
            kind,
            source,
            estimate,
            warnings,
        }
    }

    /// The domain of a known preprocessing (no model at hand).
    pub fn given(p: Preprocess) -> InputDomain {
        InputDomain {
            kind: kind_of(&p),
            preprocess: p,
            source: DomainSource::Flags,
            estimate: None,
            warnings: vec![],
        }
    }

    /// Whether inputs are pixel-sized (raw or mean-subtracted 0..255 values) rather than
    /// normalised to a few units.
    pub fn in_pixel_units(&self) -> bool {
        match self.kind {
            DomainKind::Pixels | DomainKind::MeanSubtracted => true,
            DomainKind::Custom => self.stats().1.iter().any(|&s| s > 8.0),
            _ => false,
        }
    }

    /// Expected per-channel mean and std of natural images in the input space.
    pub fn stats(&self) -> ([f32; 3], [f32; 3]) {
        stats_of(&self.preprocess)
    }

    /// The input values pixels 0 and 255 map to, per channel (lo <= hi).
    pub fn channel_range(&self, c: usize) -> (f32, f32) {
        let p = &self.preprocess;
        let a = (0.0 - p.mean[c]) / p.std[c];
        let b = (255.0 / p.scale - p.mean[c]) / p.std[c];
        (a.min(b), a.max(b))
    }

    /// The range of the whole input tensor for quantization: the union of the channel ranges,
    /// widened by a quarter on each side when the preprocessing is only an estimate.
    pub fn quant_range(&self) -> (f32, f32) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for c in 0..3 {
            let (a, b) = self.channel_range(c);
            lo = lo.min(a);
            hi = hi.max(b);
        }
        if self.is_estimate() {
            let w = hi - lo;
            (lo - 0.25 * w, hi + 0.25 * w)
        } else {
            (lo, hi)
        }
    }

    /// Whether the preprocessing is an estimate rather than known or a canonical kind.
    pub fn is_estimate(&self) -> bool {
        self.source == DomainSource::Inferred
            && matches!(
                self.kind,
                DomainKind::Standardized | DomainKind::MeanSubtracted | DomainKind::Custom
            )
            || self.source == DomainSource::Assumed
    }

    /// One line for humans.
    pub fn summary(&self) -> String {
        let p = &self.preprocess;
        let (lo, hi) = (self.channel_range(0), self.channel_range(2));
        let from = match &self.source {
            DomainSource::Flags => "given by the flags".to_string(),
            DomainSource::Metadata(k) => format!("from the model's metadata ({k})"),
            DomainSource::Inferred => {
                let e = self.estimate.as_ref().expect("inferred has an estimate");
                format!(
                    "inferred from BN '{}' (confidence {:.2})",
                    e.bn, e.confidence
                )
            }
            DomainSource::Assumed => {
                "assumed (no flags, metadata or BN statistics say otherwise)".to_string()
            }
        };
        format!(
            "{}: x = (pixel/{} - [{}]) / [{}], input range {:.3}..{:.3} (R) .. {:.3}..{:.3} (B); {from}",
            self.kind.describe(),
            fmt_num(p.scale as f64),
            p.mean.map(|v| fmt_num(v as f64)).join(", "),
            p.std.map(|v| fmt_num(v as f64)).join(", "),
            lo.0,
            lo.1,
            hi.0,
            hi.1
        )
    }

    /// Seeded images (N x 3 x H x W values): per channel N(mean, std) of natural images in this
    /// domain, clamped to the input range (a pixel never leaves 0..255).
    pub fn noise(&self, shape: &[usize], seed: u64) -> Vec<f32> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (m, s) = self.stats();
        let plane: usize = shape[2..].iter().product();
        let c = shape[1];
        let n: usize = shape.iter().product();
        (0..n)
            .map(|i| {
                let k = (i / plane) % c;
                let (lo, hi) = self.channel_range(k % 3);
                let z: f32 = rand_distr::StandardNormal.sample(&mut rng);
                (m[k % 3] + s[k % 3] * z).clamp(lo, hi)
            })
            .collect()
    }

    /// An input value of channel `c` back as a pixel 0..255 (for pictures).
    pub fn to_pixel(&self, x: f32, c: usize) -> f32 {
        let p = &self.preprocess;
        (x * p.std[c] + p.mean[c]) * p.scale
    }

    /// Whether the natural-image statistics are the standard N(0, 1) (nothing to rescale).
    pub fn is_unit_normal(&self) -> bool {
        let (m, s) = self.stats();
        m.iter().all(|&v| v == 0.0) && s.iter().all(|&v| v == 1.0)
    }
}

fn fmt_num(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// Natural-image mean and std in the input space of a preprocessing.
fn stats_of(p: &Preprocess) -> ([f32; 3], [f32; 3]) {
    let mut m = [0.0; 3];
    let mut s = [0.0; 3];
    for c in 0..3 {
        m[c] = (NATURAL_MEAN[c] * 255.0 / p.scale - p.mean[c]) / p.std[c];
        s[c] = (NATURAL_STD[c] * 255.0 / p.scale / p.std[c]).abs();
    }
    (m, s)
}

/// The kind a preprocessing belongs to (exact forms for the fixed kinds). In [0, 1] pixel units
/// u = pixel / 255 every preprocessing reads x = (u - mean') / std'.
pub fn kind_of(p: &Preprocess) -> DomainKind {
    let k = 255.0 / p.scale;
    let (mean, std) = (p.mean.map(|m| m / k), p.std.map(|s| s / k));
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-3 * b.abs().max(1e-3);
    let all = |v: [f32; 3], t: f32| v.iter().all(|&x| close(x, t));
    let (m, s) = stats_of(p);
    let avg = |v: [f32; 3]| v.iter().sum::<f32>() / 3.0;
    let (ma, sa) = (avg(m), avg(s));
    if all(std, 1.0 / 255.0) {
        if all(mean, 0.0) {
            return DomainKind::Pixels;
        }
        if ma.abs() < 0.5 * sa {
            return DomainKind::MeanSubtracted;
        }
    }
    if all(mean, 0.0) && all(std, 1.0) {
        DomainKind::Unit
    } else if all(mean, 0.5) && all(std, 0.5) {
        DomainKind::Symmetric
    } else if ma.abs() < 0.5 && (0.5..2.0).contains(&sa) {
        DomainKind::Standardized
    } else {
        DomainKind::Custom
    }
}

/// A preprocessing recorded in the model: ours (`datafree.preprocess.mean/std/scale`), else the
/// Windows ML image convention (`Image.NominalPixelRange`).
fn from_metadata(model: &LoadedModel) -> Option<(Preprocess, String)> {
    let meta = |k: &str| {
        model
            .proto
            .metadata_props
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.trim().to_string())
    };
    let triple = |k: &str| meta(k).and_then(|v| crate::data::parse_triple(&v).ok());
    let (mean, std) = (
        triple("datafree.preprocess.mean"),
        triple("datafree.preprocess.std"),
    );
    if mean.is_some() || std.is_some() {
        let d = Preprocess::default();
        let scale = meta("datafree.preprocess.scale")
            .and_then(|v| v.parse::<f32>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(d.scale);
        return Some((
            Preprocess {
                mean: mean.unwrap_or(d.mean),
                std: std.unwrap_or(d.std),
                scale,
            },
            "datafree.preprocess".into(),
        ));
    }
    let kind = match meta("Image.NominalPixelRange")?.as_str() {
        "NominalRange_0_255" => DomainKind::Pixels,
        "Normalized_0_1" => DomainKind::Unit,
        "Normalized_1_1" => DomainKind::Symmetric,
        _ => return None,
    };
    Some((
        kind.canonical().expect("fixed kind"),
        "Image.NominalPixelRange".into(),
    ))
}

impl Estimate {
    /// The preprocessing the estimate stands for: the canonical one of a fixed kind; for
    /// standardized and mean-subtracted inputs the estimated means with the kind's spread;
    /// otherwise the estimate itself.
    pub fn preprocess(&self) -> Preprocess {
        let m = |c: usize| self.mean[c.min(self.mean.len() - 1)] as f32;
        let s = |c: usize| self.std[c.min(self.std.len() - 1)] as f32;
        match self.kind {
            DomainKind::Pixels | DomainKind::Unit | DomainKind::Symmetric => {
                self.kind.canonical().expect("fixed kind")
            }
            // Natural statistics (N_m, N_s) map to (m, s): std' = N_s / s, mean' = N_m - m std'.
            DomainKind::Standardized => {
                let std = NATURAL_STD;
                Preprocess {
                    scale: 255.0,
                    mean: [0, 1, 2].map(|c| NATURAL_MEAN[c] - m(c) * std[c]),
                    std,
                }
            }
            DomainKind::MeanSubtracted => Preprocess {
                scale: 1.0,
                mean: [0, 1, 2].map(|c| NATURAL_MEAN[c] * 255.0 - m(c)),
                std: [1.0; 3],
            },
            DomainKind::Custom => {
                let std = [0, 1, 2].map(|c| NATURAL_STD[c] / s(c).max(1e-12));
                Preprocess {
                    scale: 255.0,
                    mean: [0, 1, 2].map(|c| NATURAL_MEAN[c] - m(c) * std[c]),
                    std,
                }
            }
        }
    }
}

/// Classifies estimated (mean, std) against the canonical kinds: distance in log-spread and in
/// mean-over-spread; returns the kind and a confidence (1 - best / second-best distance).
pub(super) fn classify(mean: &[f64], std: &[f64]) -> (DomainKind, f64) {
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (m, s) = (avg(mean), avg(std));
    let mut d: Vec<(f64, DomainKind)> = [
        DomainKind::Pixels,
        DomainKind::Unit,
        DomainKind::Symmetric,
        DomainKind::Standardized,
        DomainKind::MeanSubtracted,
    ]
    .iter()
    .map(|&k| {
        let (cm, cs) = stats_of(&k.canonical().expect("fixed kind"));
        let (cm, cs) = (
            cm.iter().sum::<f32>() as f64 / 3.0,
            cs.iter().sum::<f32>() as f64 / 3.0,
        );
        let dist = ((s / cs).ln().powi(2) + ((m / s - cm / cs) / 2.0).powi(2)).sqrt();
        (dist, k)
    })
    .collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (best, kind) = d[0];
    // Further than a factor 2 in spread from every kind: something else.
    if best > std::f64::consts::LN_2 {
        return (
            DomainKind::Custom,
            (1.0 - 2.0_f64.ln() / best).clamp(0.0, 1.0),
        );
    }
    (kind, (1.0 - best / d[1].0).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(scale: f32, mean: [f32; 3], std: [f32; 3]) -> Preprocess {
        Preprocess { mean, std, scale }
    }

    #[test]
    fn kinds_of_common_preprocessings() {
        assert_eq!(kind_of(&pre(1.0, [0.0; 3], [1.0; 3])), DomainKind::Pixels);
        assert_eq!(kind_of(&pre(255.0, [0.0; 3], [1.0; 3])), DomainKind::Unit);
        assert_eq!(
            kind_of(&pre(255.0, [0.5; 3], [0.5; 3])),
            DomainKind::Symmetric
        );
        assert_eq!(
            kind_of(&pre(
                255.0,
                [0.4914, 0.4822, 0.4465],
                [0.2023, 0.1994, 0.201]
            )),
            DomainKind::Standardized
        );
        assert_eq!(
            kind_of(&pre(1.0, [123.7, 116.3, 103.5], [1.0; 3])),
            DomainKind::MeanSubtracted
        );
    }

    #[test]
    fn classification_separates_the_kinds_by_their_natural_statistics() {
        for k in [
            DomainKind::Pixels,
            DomainKind::Unit,
            DomainKind::Symmetric,
            DomainKind::Standardized,
            DomainKind::MeanSubtracted,
        ] {
            let (m, s) = stats_of(&k.canonical().unwrap());
            let m: Vec<f64> = m.iter().map(|&v| v as f64).collect();
            // A spread estimated 30% off still lands on the right kind.
            let s: Vec<f64> = s.iter().map(|&v| v as f64 * 1.3).collect();
            let (got, conf) = classify(&m, &s);
            assert_eq!(got, k);
            assert!(conf > 0.3, "{k:?}: confidence {conf}");
        }
    }

    #[test]
    fn ranges_and_pixels_round_trip() {
        let d = InputDomain::given(pre(1.0, [0.0; 3], [1.0; 3]));
        assert_eq!(d.quant_range(), (0.0, 255.0));
        let d = InputDomain::given(pre(255.0, [0.5; 3], [0.25; 3]));
        assert_eq!(d.channel_range(1), (-2.0, 2.0));
        assert!((d.to_pixel(2.0, 0) - 255.0).abs() < 1e-4);
        let x = d.noise(&[2, 3, 4, 4], 1);
        assert!(x.iter().all(|v| (-2.0..=2.0).contains(v)));
    }
}
