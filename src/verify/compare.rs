//! Comparing a quantized student with its reference (the teacher) in ONNX Runtime: prediction
//! agreement, accuracy and top-1 drop on labelled data, our own simulation (the candle lowering of
//! the same QDQ graph) against ORT, whether ORT fused the QDQ groups into integer kernels, and
//! speed. Shared by `compress` (after every export) and the `verify` CI gate.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;

use super::eval::{Accuracy, argmax, input_geometry};
use super::ort_runtime;
use super::synth::Synthesized;
use crate::data::Dataset;
use crate::device::HOST;
use crate::onnx::LoadedModel;
use crate::progress::progress;
use crate::teacher::Teacher;

/// Inputs to compare on.
pub enum Inputs<'a> {
    /// Labelled data, preprocessed as the reference's domain says.
    Data(&'a Dataset),
    /// Seeded noise images in the reference's input domain.
    Noise { images: usize, seed: u64 },
    /// Images synthesized from the reference alone (data-free verification).
    Synthesized(&'a Synthesized),
}

/// Reference confidence (top-class probability) above which a synthesized image of a
/// `classes`-way reference counts as clearly classified: odds of 9 against each other class
/// (0.5 at 10 classes, 0.9 at 2), never below 0.5.
pub fn confident(classes: usize) -> f32 {
    super::synth::probability_at_odds(9.0, classes).max(0.5) as f32
}

/// Agreement where the reference is sure of its prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Confident {
    /// The reference's top-class probability these images reach.
    pub threshold: f32,
    pub images: usize,
    pub agreement: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Simulation {
    /// max |simulation - ORT| over all logits.
    pub max_abs_logit_diff: f64,
    /// Fraction of images where simulation and ORT predict the same class.
    pub top1_agreement: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fusion {
    /// Op histogram of the graph ORT runs after level-2 optimisation.
    pub optimized_ops: BTreeMap<String, usize>,
    pub qlinear_conv: usize,
    /// Convolutions left running in float.
    pub float_conv: usize,
    /// All convolutions run as integer QLinearConv.
    pub all_conv_fused: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Speed {
    pub batch: usize,
    pub reference_ms: f64,
    pub student_ms: f64,
    /// student / reference wall time (below 1 = faster).
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub inputs: String,
    pub images: usize,
    /// Fraction of images where student and reference predict the same class (ORT).
    pub agreement: f64,
    pub student_top1: Option<f64>,
    pub reference_top1: Option<f64>,
    /// reference top-1 minus student top-1, in points.
    pub top1_drop: Option<f64>,
    /// Mean over images of |centered student logits - centered reference logits| /
    /// |centered reference logits| (0: the same predictions with the same margins).
    pub logit_error: f64,
    /// Share of the images in the reference's most frequent class: the agreement a student
    /// that ignores its input (one class for every image) reaches at best.
    pub reference_majority: f64,
    /// Share of the images in the student's most frequent class (1: one class for all).
    pub student_majority: f64,
    /// On synthesized inputs: the agreement where the reference is confident.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confident: Option<Confident>,
    /// Our simulation vs ORT, or why it could not run.
    pub simulation: std::result::Result<Simulation, String>,
    pub fusion: std::result::Result<Fusion, String>,
    pub speed: std::result::Result<Speed, String>,
}

/// Compares `student` with `reference` on `inputs`.
pub fn compare(
    student: &LoadedModel,
    teacher: &Teacher,
    inputs: &Inputs,
    batch: usize,
    simulate: bool,
) -> Result<Comparison> {
    let reference = &teacher.model;
    // Each file is fed in its own layout and read as its own kind of output, so a student
    // need not share its reference's interface.
    let (si, ri) = (
        crate::onnx::interface::Interface::of(student)?,
        &teacher.interface,
    );
    let (classes, c, h, w) = (
        teacher.classes,
        teacher.channels,
        teacher.height,
        teacher.width,
    );
    let (sc, ..) = input_geometry(student)?;
    anyhow::ensure!(
        sc == classes,
        "{} outputs {sc} classes but the reference {} outputs {classes}",
        student.path.display(),
        reference.path.display()
    );
    let mut s = ort_runtime::session(&student.path, 0)?;
    let mut r = ort_runtime::session(&reference.path, 0)?;
    let sim = if simulate {
        crate::lower::lower(student, &HOST, DType::F32).map_err(|e| format!("{e:#}"))
    } else {
        Err("not requested".to_string())
    };
    let (n, desc) = match inputs {
        Inputs::Data(d) => (d.len(), d.source.clone()),
        Inputs::Noise { images, seed } => {
            (*images, format!("noise in the input domain, seed {seed}"))
        }
        Inputs::Synthesized(s) => (s.images, s.describe()),
    };
    let (mut err_sum, mut conf_n, mut conf_agree) = (0.0f64, 0usize, 0usize);
    let confident_at = confident(classes);
    let (mut sa, mut ra) = (Accuracy::new(classes), Accuracy::new(classes));
    let (mut agree, mut sim_agree, mut sim_diff) = (0usize, 0usize, 0.0f64);
    let (mut s_count, mut r_count) = (vec![0usize; classes], vec![0usize; classes]);
    let mut sim_err: Option<String> = sim.as_ref().err().cloned();
    let pb = progress(n, "verify");
    let batch = batch.max(1);
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let shape = [end - start, c, h, w];
        let x: Vec<f32> = match inputs {
            Inputs::Data(d) => teacher.preprocess().batch(d, start..end),
            Inputs::Noise { seed, .. } => teacher
                .domain
                .noise(&shape, seed.wrapping_add(start as u64)),
            Inputs::Synthesized(s) => {
                let per = c * h * w;
                s.x[start * per..end * per].to_vec()
            }
        };
        let (xs, s_shape) = si.feed(&x, &shape);
        let (_, so) = ort_runtime::run_f32(&mut s, &s_shape, &xs)?;
        let (xr, r_shape) = ri.feed(&x, &shape);
        let (_, ro) = ort_runtime::run_f32(&mut r, &r_shape, &xr)?;
        let (sl, rl) = (si.logits(&so), ri.logits(&ro));
        if let Inputs::Data(d) = inputs {
            sa.add(&so, &d.labels[start..end]);
            ra.add(&ro, &d.labels[start..end]);
        }
        for (k, (a, b)) in sl
            .chunks_exact(classes)
            .zip(rl.chunks_exact(classes))
            .enumerate()
        {
            let (sk, rk) = (argmax(a), argmax(b));
            s_count[sk] += 1;
            r_count[rk] += 1;
            let same = sk == rk;
            agree += same as usize;
            err_sum += logit_error(a, b);
            if let Inputs::Synthesized(s) = inputs
                && s.confidence[start + k] >= confident_at
            {
                conf_n += 1;
                conf_agree += same as usize;
            }
        }
        if let (Ok(p), None) = (&sim, &sim_err) {
            match p
                .forward(&Tensor::from_slice(&xs, s_shape.as_slice(), &HOST)?)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            {
                Ok(y) => {
                    sim_diff = y
                        .iter()
                        .zip(&so)
                        .map(|(a, b)| (a - b).abs() as f64)
                        .fold(sim_diff, f64::max);
                    sim_agree += y
                        .chunks_exact(classes)
                        .zip(so.chunks_exact(classes))
                        .filter(|(a, b)| argmax(a) == argmax(b))
                        .count();
                }
                Err(e) => sim_err = Some(format!("{e:#}")),
            }
        }
        pb.inc((end - start) as u64);
    }
    pb.finish_and_clear();
    let labelled = matches!(inputs, Inputs::Data(..));
    let fusion = ort_runtime::optimized_op_counts(&student.path)
        .map_err(|e| format!("{e:#}"))
        .map(|ops| {
            let q = ops.get("QLinearConv").copied().unwrap_or(0);
            let f =
                ops.get("Conv").copied().unwrap_or(0) + ops.get("FusedConv").copied().unwrap_or(0);
            Fusion {
                qlinear_conv: q,
                float_conv: f,
                all_conv_fused: q > 0 && f == 0,
                optimized_ops: ops,
            }
        });
    let speed = (|| -> Result<Speed> {
        let x = teacher.domain.noise(&[64, c, h, w], 1);
        let (xr, r_shape) = ri.feed(&x, &[64, c, h, w]);
        let (xs, s_shape) = si.feed(&x, &[64, c, h, w]);
        let reference_ms = ort_runtime::time_runs(&mut r, &r_shape, &xr, 10)?;
        let student_ms = ort_runtime::time_runs(&mut s, &s_shape, &xs, 10)?;
        Ok(Speed {
            batch: 64,
            reference_ms,
            student_ms,
            ratio: student_ms / reference_ms,
        })
    })()
    .map_err(|e| format!("{e:#}"));
    Ok(Comparison {
        inputs: desc,
        images: n,
        agreement: agree as f64 / n.max(1) as f64,
        student_top1: labelled.then(|| sa.top1()),
        reference_top1: labelled.then(|| ra.top1()),
        top1_drop: labelled.then(|| ra.top1() - sa.top1()),
        logit_error: err_sum / n.max(1) as f64,
        reference_majority: majority(&r_count),
        student_majority: majority(&s_count),
        confident: matches!(inputs, Inputs::Synthesized(_)).then(|| Confident {
            threshold: confident_at,
            images: conf_n,
            agreement: conf_agree as f64 / conf_n.max(1) as f64,
        }),
        simulation: match sim_err {
            Some(e) => Err(e),
            None => Ok(Simulation {
                max_abs_logit_diff: sim_diff,
                top1_agreement: sim_agree as f64 / n.max(1) as f64,
            }),
        },
        fusion,
        speed,
    })
}

/// The largest class's share of `counts` (0 when empty).
fn majority(counts: &[usize]) -> f64 {
    let n: usize = counts.iter().sum();
    counts.iter().copied().max().unwrap_or(0) as f64 / n.max(1) as f64
}

/// |centered a - centered b| / |centered b| for one image's logits (softmax ignores a shift).
pub fn logit_error(a: &[f32], b: &[f32]) -> f64 {
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    let (ma, mb) = (mean(a), mean(b));
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64 - ma, y as f64 - mb);
        num += (x - y).powi(2);
        den += y * y;
    }
    (num / den.max(1e-30)).sqrt()
}
