//! What `compress` reports (DIR/report.json; `crate::report` renders it for humans) and what it
//! records in the student's metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::{BnMode, CompressConfig};
use crate::methods::{Method, MethodReport, RangeOrigin};
use crate::quant::placement::{self, Plan};
use crate::quant::{BitSpec, Scales, WeightClip, WeightScheme};
use crate::teacher::Teacher;
use crate::verify::compare::Comparison;

/// One PTQ baseline's result (with `--baselines`).
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub method: Method,
    /// Student top-1 in ONNX Runtime on the measuring data (None without --data).
    pub top1: Option<f64>,
    /// Agreement with the teacher (on the data, else on noise).
    pub agreement: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointReport {
    pub tensor: String,
    pub bits: u8,
    pub role: placement::Role,
    pub range: (f32, f32),
    pub scale: f32,
    pub zero_point: i32,
    /// How the range was found.
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub teacher: String,
    pub teacher_sha256: String,
    pub student: String,
    pub student_sha256: String,
    pub method: Method,
    pub bits: String,
    pub first_last_bits: Option<u8>,
    pub weight_scheme: WeightScheme,
    pub weight_clip: WeightClip,
    pub scales: Scales,
    /// Layers whose f32 arithmetic is not provably exact (see `Scales::Exact`).
    pub inexact_layers: Vec<String>,
    pub bn: BnMode,
    pub bn_folded: usize,
    pub seed: u64,
    /// How pixels become the teacher's inputs, and where that came from.
    pub input_domain: crate::teacher::InputDomain,
    pub placement: String,
    pub notes: Vec<String>,
    pub layers: Vec<placement::Layer>,
    pub activations: Vec<PointReport>,
    pub calibration_seconds: f64,
    /// What a training method (gdfq, autorecon) did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<MethodReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baselines: Vec<Baseline>,
    /// Why the student cannot be right (non-finite parameters, agreement with the teacher far
    /// below what its bit widths give), or None when it passed; `compress` then exits 1.
    pub self_check: Option<String>,
    /// On inputs synthesized from the teacher alone.
    pub verification_synthetic: Comparison,
    /// On the labelled data given with --data.
    pub verification_data: Option<Comparison>,
    pub wall_seconds: f64,
}

pub const PLACEMENT: &str = "weights per output channel (int8 container); activations at the data input of every Conv/Gemm/MatMul (M bits, uint8 container, Clip for M < 8); the network input at 8 bits; with BN folded, layer outputs feeding anything but a ReLU at 8 bits (where the GDFQ reference keeps float), so ONNX Runtime can fuse Conv/Add";

/// Writes the report atomically next to the student.
pub fn write_report(out: &Path, r: &Report) -> Result<PathBuf> {
    let p = out.join("report.json");
    crate::io::write_atomic(&p, serde_json::to_string_pretty(r)?.as_bytes())?;
    Ok(p)
}

/// The provenance written into the student's metadata.
pub fn metadata(teacher: &Teacher, cfg: &CompressConfig) -> Vec<(String, String)> {
    provenance(
        teacher,
        &[
            ("datafree.method", cfg.method.name().to_string()),
            ("datafree.bits", cfg.bits.to_string()),
            (
                "datafree.first_last_bits",
                cfg.first_last_bits.map_or("none".into(), |b| b.to_string()),
            ),
            ("datafree.seed", cfg.seed.to_string()),
            ("datafree.scales", crate::cli_name(&cfg.scales)),
        ],
    )
}

/// The datafree version, `settings`, and the teacher's hash, preprocessing and input domain
/// (which travel with every student, so `eval` and `verify` feed it without flags).
pub fn provenance(teacher: &Teacher, settings: &[(&str, String)]) -> Vec<(String, String)> {
    let p = teacher.preprocess();
    let triple = |v: [f32; 3]| format!("{},{},{}", v[0], v[1], v[2]);
    let mut out = vec![("datafree.version", env!("CARGO_PKG_VERSION").to_string())];
    out.extend(settings.iter().cloned());
    out.extend([
        ("datafree.teacher_sha256", teacher.model.sha256.clone()),
        ("datafree.preprocess.mean", triple(p.mean)),
        ("datafree.preprocess.std", triple(p.std)),
        ("datafree.preprocess.scale", p.scale.to_string()),
        (
            "datafree.input_domain",
            crate::cli_name_of(&teacher.domain.kind),
        ),
    ]);
    out.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Notes a user should read with the numbers.
pub fn notes(
    teacher: &Teacher,
    cfg: &CompressConfig,
    plan: &Plan,
    origins: &HashMap<String, RangeOrigin>,
) -> Vec<String> {
    let mut notes = Vec::new();
    let fallback = origins
        .values()
        .filter(|o| {
            matches!(
                o,
                RangeOrigin::NoiseFallback | RangeOrigin::SynthesizedFallback { .. }
            )
        })
        .count();
    if cfg.method == Method::PtqBn && fallback > 0 {
        notes.push(format!(
            "ptq-bn: {fallback} of {} activation points are not reached by BN statistics and were calibrated on {} instead{}",
            plan.points.len(),
            if teacher.has_bn_statistics() {
                "inputs synthesized from the statistics"
            } else {
                "noise"
            },
            if teacher.bn().bn_count == 0 {
                " (the teacher has no BatchNormalization: BN was folded at export)"
            } else {
                ""
            }
        ));
    }
    if !cfg.full_range_weights
        && plan.layers.iter().any(|l| l.weight_bits == 7)
        && cfg.bits.weights == 8
    {
        notes.push("8-bit weights use a 7-bit range (+-63): ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI saturate int16 pair sums with full-range int8 weights (measured on cifar10_resnet20: simulation-vs-ORT agreement 97.3% -> 99.95%); pass --full-range-weights for VNNI/ARM targets".into());
    }
    if cfg.bits.activations < 8 {
        notes.push(format!("{}-bit activations need Clip before QuantizeLinear: ONNX Runtime runs those layers through float kernels (no QLinearConv), so this model is smaller but not faster on ORT CPU", cfg.bits.activations));
    }
    if cfg.int4_weights {
        notes.push("weights of 4 bits or fewer are stored as INT4 (opset 21): the file is smaller, but ONNX Runtime does not fuse INT4 layers and tract cannot read INT4".into());
    }
    if cfg.bn == BnMode::Keep {
        notes.push(
            "BatchNormalization kept in float between Conv and ReLU: ORT cannot fuse those convs"
                .into(),
        );
    }
    notes
}

/// The lowest agreement with the teacher, on the synthesized inputs it classifies with
/// confidence, that a student of `bits` can have and still be a working compression: far below
/// what each width gives (measured in docs/results.md), so only a broken or collapsed student
/// falls under it.
pub fn agreement_floor(bits: BitSpec) -> f64 {
    match bits.weights.min(bits.activations) {
        8.. => 0.9,
        7 => 0.85,
        6 => 0.75,
        5 => 0.6,
        4 => 0.4,
        _ => 0.2,
    }
}

/// Refuses a student that cannot be right: non-finite parameters, or an agreement with the
/// teacher below [`agreement_floor`].
pub fn self_check(
    student: &crate::onnx::LoadedModel,
    bits: BitSpec,
    v: &Comparison,
) -> Option<String> {
    if let Err(e) = crate::onnx::check::parameters(student) {
        return Some(format!("the student has broken parameters: {e}"));
    }
    let floor = agreement_floor(bits);
    let (agreement, what) = match &v.confident {
        Some(k) if k.images > 0 => (
            k.agreement,
            "of the synthesized images the teacher classifies with confidence",
        ),
        _ => (v.agreement, "of the synthesized images"),
    };
    (agreement < floor).then(|| {
        format!(
            "the student agrees with the teacher on only {:.1}% {what}; a {bits} student should exceed {:.0}%: it is broken or collapsed (student.onnx is kept for inspection)",
            100.0 * agreement,
            100.0 * floor
        )
    })
}

/// Refuses a distilled student that ignores its input. A student of another architecture may
/// be weak and still right; one no better than a constant is not a distillation. On measuring
/// `data` (the distribution the teacher was made for, thousands of images): refused when it
/// agrees with the teacher no more often than predicting the teacher's most frequent class for
/// every image would. Without data, on the `synthesized` images (a hundred or so, not the
/// distribution the student was distilled on): refused only when it also puts every one of them
/// into one class, since a weak working student can fall below the majority share there (five
/// measured cases: docs/results.md, "Distillation self-check"). Inputs the teacher puts into a
/// single class cannot tell a constant student apart and pass.
pub fn distil_check(synthesized: &Comparison, data: Option<&Comparison>) -> Option<String> {
    let (what, v) = data.map_or(("synthesized", synthesized), |d| ("data", d));
    let constant = data.is_some() || v.student_majority >= 1.0;
    (v.images > 0 && v.reference_majority < 1.0 && v.agreement <= v.reference_majority && constant)
        .then(|| {
            format!(
                "the student agrees with the teacher on {:.1}% of {} {what} images, no more than predicting the teacher's most frequent class for every image ({:.1}%); it puts {:.1}% of them into one class: it collapsed (student.onnx is kept for inspection)",
                100.0 * v.agreement,
                v.images,
                100.0 * v.reference_majority,
                100.0 * v.student_majority
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comparison(agreement: f64, reference_majority: f64, student_majority: f64) -> Comparison {
        Comparison {
            inputs: "test inputs".into(),
            images: 100,
            agreement,
            student_top1: None,
            reference_top1: None,
            top1_drop: None,
            logit_error: 0.0,
            reference_majority,
            student_majority,
            confident: None,
            simulation: Err("not requested".into()),
            fusion: Err("not requested".into()),
            speed: Err("not requested".into()),
        }
    }

    #[test]
    fn a_distilled_student_no_better_than_a_constant_is_refused() {
        let (weak, constant) = (comparison(0.22, 0.12, 0.5), comparison(0.10, 0.12, 0.5));
        assert_eq!(
            distil_check(&constant, Some(&weak)),
            None,
            "the data decides"
        );
        let why = distil_check(&weak, Some(&constant)).expect("refused");
        assert!(
            why.contains("10.0% of 100 data images") && why.contains("12.0%"),
            "{why}"
        );
        // Equal to the majority share is what a constant student reaches: refused.
        assert!(distil_check(&weak, Some(&comparison(0.12, 0.12, 0.5))).is_some());
        // Without data, below the majority share on the synthesized images is refused only when
        // every image gets the same class.
        assert_eq!(distil_check(&constant, None), None);
        let why = distil_check(&comparison(0.10, 0.12, 1.0), None).expect("refused");
        assert!(why.contains("of 100 synthesized images"), "{why}");
        // A teacher that puts every input into one class cannot tell a constant student apart.
        assert_eq!(distil_check(&comparison(1.0, 1.0, 1.0), None), None);
        assert_eq!(distil_check(&weak, Some(&comparison(1.0, 1.0, 1.0))), None);
        // No inputs, no verdict.
        let none = Comparison {
            images: 0,
            ..comparison(0.0, 0.5, 1.0)
        };
        assert_eq!(distil_check(&none, None), None);
    }
}
