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
use crate::onnx::graph::{GraphIndex, attr_int, attr_ints, attr_string};
use crate::onnx::padding::AutoPad;

/// Per-channel mean and std of natural RGB images with pixels scaled to [0, 1] (the ImageNet
/// statistics, the most widely used reference): the prior that turns a preprocessing into the
/// input's expected statistics, and an inferred spread back into a preprocessing.
pub const NATURAL_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const NATURAL_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Correlation of neighbouring pixels one image-width apart decays as exp(-SPATIAL_DECAY * d /
/// size); 0.9 between adjacent pixels of a 32x32 image. Between colour channels: CHANNEL_CORR.
const SPATIAL_DECAY: f64 = 3.4;
const CHANNEL_CORR: f64 = 0.88;

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
        let estimate = estimate(model, bn, size);
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
fn classify(mean: &[f64], std: &[f64]) -> (DomainKind, f64) {
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

/// Per-channel affine map x' = a x + b from the graph input to the first conv (preprocessing
/// ops with constant operands), with the tensor it arrives at.
struct Path {
    a: Vec<f64>,
    b: Vec<f64>,
    tensor: String,
    /// Extra zero padding from Pad nodes: (top, left, bottom, right).
    pad: [usize; 4],
}

/// Estimates the input statistics from the BN that sees the input first: a BN on the input
/// itself, or the BN right after the first conv. None when the graph does not start that way.
pub fn estimate(model: &LoadedModel, bn: &BnReport, (h, w): (usize, usize)) -> Option<Estimate> {
    let graph = model.graph();
    let g = GraphIndex::new(graph);
    let input = graph
        .input
        .iter()
        .find(|v| g.is_graph_input(&v.name))?
        .name
        .clone();
    let dir = Some(model.dir());
    let konst = |name: &str| -> Option<Vec<f64>> {
        g.resolve_constant(name, dir)
            .ok()
            .flatten()
            .map(|r| r.data.to_f64())
    };
    let channels = 3usize;
    let mut path = Path {
        a: vec![1.0; channels],
        b: vec![0.0; channels],
        tensor: input,
        pad: [0; 4],
    };
    let per_channel = |v: &[f64]| -> Option<Vec<f64>> {
        match v.len() {
            1 => Some(vec![v[0]; channels]),
            n if n == channels => Some(v.to_vec()),
            _ => None,
        }
    };
    for _ in 0..16 {
        let cons: Vec<usize> = g
            .consumers(&path.tensor)
            .iter()
            .copied()
            .filter(|&c| g.node(c).op_type != "Shape")
            .collect();
        if cons.len() != 1 {
            return None;
        }
        let n = g.node(cons[0]);
        let other = |n: &crate::onnx::pb::NodeProto| -> Option<(Vec<f64>, bool)> {
            let k = n.input.iter().position(|i| *i == path.tensor)?;
            let o = n.input.get(1 - k.min(1))?;
            Some((per_channel(&konst(o)?)?, k == 0))
        };
        match n.op_type.as_str() {
            "Identity" | "Dropout" | "Cast" => {}
            "Sub" | "Add" | "Mul" | "Div" => {
                let (c, first) = other(n)?;
                for ((a, b), c) in path.a.iter_mut().zip(path.b.iter_mut()).zip(c) {
                    (*a, *b) = match (n.op_type.as_str(), first) {
                        ("Add", _) => (*a, *b + c),
                        ("Sub", true) => (*a, *b - c),
                        ("Sub", false) => (-*a, c - *b),
                        ("Mul", _) => (*a * c, *b * c),
                        ("Div", true) => (*a / c, *b / c),
                        _ => return None,
                    };
                }
            }
            "Pad" => {
                let mode = attr_string(n, "mode").unwrap_or_else(|| "constant".into());
                let pads = match n.input.get(1).filter(|s| !s.is_empty()) {
                    Some(p) => konst(p)?.iter().map(|&v| v as i64).collect(),
                    None => attr_ints(n, "pads")?,
                };
                let value = n
                    .input
                    .get(2)
                    .filter(|s| !s.is_empty())
                    .and_then(|v| konst(v))
                    .map_or(0.0, |v| v.first().copied().unwrap_or(0.0));
                // Only zero padding of the spatial axes of an NCHW tensor.
                if mode != "constant"
                    || value != 0.0
                    || pads.len() != 8
                    || pads.iter().any(|&p| p < 0)
                    || pads[0] != 0
                    || pads[1] != 0
                    || pads[4] != 0
                    || pads[5] != 0
                {
                    return None;
                }
                path.pad[0] += pads[2] as usize;
                path.pad[1] += pads[3] as usize;
                path.pad[2] += pads[6] as usize;
                path.pad[3] += pads[7] as usize;
            }
            "BatchNormalization" => {
                let l = bn.layers.iter().find(|l| l.node_index == cons[0])?;
                let s = l.stats.as_ref()?;
                let mean: Vec<f64> = (0..channels)
                    .map(|k| (s.running_mean[k] as f64 - path.b[k]) / path.a[k])
                    .collect();
                let std: Vec<f64> = (0..channels)
                    .map(|k| (s.running_var[k] as f64).sqrt() / path.a[k].abs())
                    .collect();
                let (kind, confidence) = classify(&mean, &std);
                return Some(Estimate {
                    bn: l.name.clone(),
                    direct: true,
                    mean,
                    std,
                    mean_misfit: 0.0,
                    kind,
                    confidence,
                });
            }
            "Conv" => return through_conv(&g, bn, cons[0], &path, (h, w), &konst),
            _ => return None,
        }
        path.tensor = n.output.first()?.clone();
    }
    None
}

/// The estimate through the first conv and the BN after it.
fn through_conv(
    g: &GraphIndex,
    bn: &BnReport,
    ci: usize,
    path: &Path,
    (h, w): (usize, usize),
    konst: &dyn Fn(&str) -> Option<Vec<f64>>,
) -> Option<Estimate> {
    let conv = g.node(ci);
    if conv.input.first() != Some(&path.tensor) {
        return None;
    }
    let wt = g.initializer(conv.input.get(1)?)?;
    let dims: Vec<usize> = wt.dims.iter().map(|&d| d as usize).collect();
    if dims.len() != 4 {
        return None;
    }
    let (o, cg, kh, kw) = (dims[0], dims[1], dims[2], dims[3]);
    let weights = konst(conv.input.get(1)?)?;
    let group = attr_int(conv, "group", 1).max(1) as usize;
    let channels = path.a.len();
    if cg * group != channels || !o.is_multiple_of(group) {
        return None;
    }
    let bias = match conv.input.get(2).filter(|s| !s.is_empty()) {
        Some(b) => konst(b)?,
        None => vec![0.0; o],
    };
    // The BN reading the conv's output (through Identity only).
    let mut t = conv.output.first()?.clone();
    let mut layer = None;
    for _ in 0..4 {
        let cons = g.consumers(&t);
        if let Some(l) = cons.iter().find_map(|&c| {
            bn.layers
                .iter()
                .find(|l| l.node_index == c && l.input == t && l.stats.is_some())
        }) {
            layer = Some(l);
            break;
        }
        match cons
            .iter()
            .find(|&&c| g.node(c).op_type == "Identity")
            .map(|&c| g.node(c))
        {
            Some(n) => t = n.output.first()?.clone(),
            None => break,
        }
    }
    let layer = layer?;
    let stats = layer.stats.as_ref()?;
    if stats.running_mean.len() != o {
        return None;
    }
    let s = attr_ints(conv, "strides").unwrap_or_else(|| vec![1, 1]);
    let d = attr_ints(conv, "dilations").unwrap_or_else(|| vec![1, 1]);
    let pads: Vec<usize> = attr_ints(conv, "pads")
        .unwrap_or_default()
        .iter()
        .map(|&p| p.max(0) as usize)
        .collect();
    let auto = AutoPad::parse(&attr_string(conv, "auto_pad").unwrap_or_default()).ok()?;
    let (s, d) = (
        [s.first().copied()? as usize, s.get(1).copied()? as usize],
        [d.first().copied()? as usize, d.get(1).copied()? as usize],
    );
    let ins = [h + path.pad[0] + path.pad[2], w + path.pad[1] + path.pad[3]];
    let p = auto.resolve(&ins, &[kh, kw], &s, &d, &pads).ok()?;
    // How many output positions see each tap inside the image (not on padding).
    let counts = |axis: usize, k: usize, pad_before: usize| -> Vec<f64> {
        let (n, begin) = ([h, w][axis], [path.pad[0], path.pad[1]][axis] + p[axis].0);
        let full = ins[axis] + p[axis].0 + p[axis].1;
        let span = (k - 1) * d[axis] + 1;
        if full < span {
            return vec![0.0; k];
        }
        let outs = (full - span) / s[axis] + 1;
        let _ = pad_before;
        (0..k)
            .map(|t| {
                (0..outs)
                    .filter(|&i| {
                        let r = (i * s[axis] + t * d[axis]) as i64 - begin as i64;
                        r >= 0 && (r as usize) < n
                    })
                    .count() as f64
                    / outs as f64
            })
            .collect()
    };
    let (ch, cw) = (counts(0, kh, p[0].0), counts(1, kw, p[1].0));
    let og = o / group;
    // A[o][c]: the mean of output o per unit of mean in (conv-input) channel c.
    let mut a = vec![vec![0.0f64; channels]; o];
    for oo in 0..o {
        let gi = oo / og;
        for cl in 0..cg {
            let c = gi * cg + cl;
            for y in 0..kh {
                for x in 0..kw {
                    a[oo][c] += weights[((oo * cg + cl) * kh + y) * kw + x] * ch[y] * cw[x];
                }
            }
        }
    }
    let rhs: Vec<f64> = (0..o)
        .map(|k| stats.running_mean[k] as f64 - bias[k])
        .collect();
    let m_conv = least_squares(&a, &rhs)?;
    let fit: f64 = (0..o)
        .map(|k| {
            let p: f64 = (0..channels).map(|c| a[k][c] * m_conv[c]).sum();
            (p - rhs[k]).powi(2)
        })
        .sum::<f64>();
    let scale: f64 = rhs.iter().map(|v| v * v).sum::<f64>().max(1e-30);
    let mean_misfit = (fit / scale).sqrt();
    // Spread: var(y_o) = s^2 q_o under the correlation model; s from the geometric mean of
    // var_o / q_o over the outputs.
    let size = h.max(w) as f64;
    let rho = |dy: f64, dx: f64| (-(SPATIAL_DECAY / size) * (dy * dy + dx * dx).sqrt()).exp();
    let mut logs = Vec::new();
    for oo in 0..o {
        let gi = oo / og;
        let mut q = 0.0;
        let taps: Vec<(usize, usize, usize, f64)> = (0..cg)
            .flat_map(|cl| (0..kh).flat_map(move |y| (0..kw).map(move |x| (cl, y, x))))
            .map(|(cl, y, x)| {
                let c = gi * cg + cl;
                (
                    c,
                    y,
                    x,
                    weights[((oo * cg + cl) * kh + y) * kw + x] / path.a[c],
                )
            })
            .collect();
        for &(c1, y1, x1, w1) in &taps {
            for &(c2, y2, x2, w2) in &taps {
                let rc = if c1 == c2 { 1.0 } else { CHANNEL_CORR };
                let dy = (y1 as f64 - y2 as f64) * d[0] as f64;
                let dx = (x1 as f64 - x2 as f64) * d[1] as f64;
                q += w1 * w2 * rc * rho(dy, dx);
            }
        }
        let v = stats.running_var[oo] as f64;
        if q > 1e-20 && v > 1e-20 {
            logs.push((v / q).ln());
        }
    }
    if logs.is_empty() {
        return None;
    }
    logs.sort_by(f64::total_cmp);
    // The median is robust to filters whose response the correlation model gets wrong.
    let s_in = (logs[logs.len() / 2] / 2.0).exp();
    let mean: Vec<f64> = (0..channels)
        .map(|c| (m_conv[c] - path.b[c]) / path.a[c])
        .collect();
    let std = vec![s_in; channels];
    let (kind, confidence) = classify(&mean, &std);
    Some(Estimate {
        bn: layer.name.clone(),
        direct: false,
        mean,
        std,
        mean_misfit,
        kind,
        confidence: confidence * (1.0 - mean_misfit.min(1.0)),
    })
}

/// Least squares for A x = b (rows of A), ridge-regularised toward a common value across x so
/// that nearly collinear channels share their estimate instead of diverging.
fn least_squares(a: &[Vec<f64>], b: &[f64]) -> Option<Vec<f64>> {
    let n = a.first()?.len();
    // The common value first: x = c * 1.
    let s1: Vec<f64> = a.iter().map(|r| r.iter().sum()).collect();
    let den: f64 = s1.iter().map(|v| v * v).sum();
    if den <= 0.0 {
        return None;
    }
    let common = s1.iter().zip(b).map(|(s, y)| s * y).sum::<f64>() / den;
    let mut m = vec![vec![0.0; n]; n];
    let mut r = vec![0.0; n];
    for (row, &y) in a.iter().zip(b) {
        for i in 0..n {
            r[i] += row[i] * y;
            for j in 0..n {
                m[i][j] += row[i] * row[j];
            }
        }
    }
    let trace: f64 = (0..n).map(|i| m[i][i]).sum();
    let lambda = 1e-3 * trace / n as f64;
    for i in 0..n {
        m[i][i] += lambda;
        r[i] += lambda * common;
    }
    solve(m, r)
}

/// Gaussian elimination with partial pivoting.
fn solve(mut m: Vec<Vec<f64>>, mut r: Vec<f64>) -> Option<Vec<f64>> {
    let n = r.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
        if m[piv][col].abs() < 1e-300 {
            return None;
        }
        m.swap(col, piv);
        r.swap(col, piv);
        for row in col + 1..n {
            let f = m[row][col] / m[col][col];
            let pivot = m[col].clone();
            for (x, p) in m[row].iter_mut().zip(&pivot).skip(col) {
                *x -= f * p;
            }
            r[row] -= f * r[col];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| m[i][k] * x[k]).sum();
        x[i] = (r[i] - s) / m[i][i];
    }
    Some(x)
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

    #[test]
    fn least_squares_recovers_channel_means() {
        let a = vec![
            vec![1.0, 0.5, 0.2],
            vec![0.3, 1.0, 0.1],
            vec![0.2, 0.1, 1.0],
            vec![0.5, 0.5, 0.5],
        ];
        let x = [120.0, 110.0, 100.0];
        let b: Vec<f64> = a
            .iter()
            .map(|r: &Vec<f64>| r.iter().zip(&x).map(|(p, q)| p * q).sum())
            .collect();
        let got = least_squares(&a, &b).unwrap();
        for (g, e) in got.iter().zip(x) {
            assert!((g - e).abs() < 0.5, "{got:?}");
        }
    }
}
