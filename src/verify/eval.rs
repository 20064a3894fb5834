//! `datafree eval` and `datafree check`: accuracy of a model on labelled data in one engine, and
//! the side-by-side comparison of candle, ONNX Runtime and tract on the same batches.

use std::time::Instant;

use anyhow::{Result, ensure};
use serde::Serialize;

use super::engine::{Engine, EngineKind};
use crate::data::{Dataset, Preprocess};
use crate::onnx::LoadedModel;
use crate::onnx::interface::Interface;
use crate::progress::progress;

/// Top-1 / top-5 accumulators with per-class counts.
#[derive(Debug, Clone)]
pub struct Accuracy {
    classes: usize,
    seen: Vec<usize>,
    top1: Vec<usize>,
    top5: usize,
}

impl Accuracy {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            seen: vec![0; classes],
            top1: vec![0; classes],
            top5: 0,
        }
    }

    /// Adds one batch of logits (N x classes) with labels.
    pub fn add(&mut self, logits: &[f32], labels: &[usize]) {
        for (row, &y) in logits.chunks_exact(self.classes).zip(labels) {
            let pred = argmax(row);
            // Rank of the true class: how many logits beat it.
            let better = row.iter().filter(|&&v| v > row[y]).count();
            self.seen[y] += 1;
            self.top1[y] += (pred == y) as usize;
            self.top5 += (better < 5) as usize;
        }
    }

    pub fn total(&self) -> usize {
        self.seen.iter().sum()
    }

    pub fn top1(&self) -> f64 {
        100.0 * self.top1.iter().sum::<usize>() as f64 / self.total().max(1) as f64
    }

    pub fn top5(&self) -> f64 {
        100.0 * self.top5 as f64 / self.total().max(1) as f64
    }
}

/// Index of the largest value (first one on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassAccuracy {
    pub class: usize,
    pub name: String,
    pub images: usize,
    pub top1: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub model_sha256: String,
    pub engine: EngineKind,
    pub data: String,
    pub data_format: String,
    pub images: usize,
    pub preprocess: Preprocess,
    pub batch: usize,
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<ClassAccuracy>,
    pub wall_seconds: f64,
    pub images_per_second: f64,
}

/// Classes and image geometry (C x H x W, whatever the file's layout) from the model's declared
/// input and output.
pub fn input_geometry(model: &LoadedModel) -> Result<(usize, usize, usize, usize)> {
    Interface::of(model)?;
    let r = crate::teacher::inspect::inspect(model);
    let res = r.input_resolution.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the input has no fixed C x H x W shape",
            model.path.display()
        )
    })?;
    ensure!(
        res.channels == 3,
        "{}: expects {} input channels; the data is RGB",
        model.path.display(),
        res.channels
    );
    let classes = r.classes.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the output has no fixed class dimension",
            model.path.display()
        )
    })?;
    Ok((
        classes,
        res.channels as usize,
        res.height as usize,
        res.width as usize,
    ))
}

/// Checks the data's labels fit the model's outputs.
pub fn check_classes(model: &LoadedModel, data: &Dataset, classes: usize) -> Result<()> {
    ensure!(
        data.classes() <= classes,
        "{} has {} classes but {} outputs {classes}",
        data.source,
        data.classes(),
        model.path.display()
    );
    Ok(())
}

/// Accuracy of `model` on `data` in one engine.
pub fn evaluate(
    model: &LoadedModel,
    data: &Dataset,
    engine: EngineKind,
    pre: &Preprocess,
    batch: usize,
    threads: usize,
) -> Result<EvalReport> {
    let (classes, c, h, w) = input_geometry(model)?;
    check_classes(model, data, classes)?;
    let mut eng = Engine::open(engine, model, threads)?;
    let mut acc = Accuracy::new(classes);
    let pb = progress(data.len(), &format!("eval {engine}"));
    let t0 = Instant::now();
    let batch = batch.max(1);
    for start in (0..data.len()).step_by(batch) {
        let end = (start + batch).min(data.len());
        let x = pre.batch(data, start..end);
        let (_, logits) = eng.run(&[end - start, c, h, w], &x)?;
        acc.add(&logits, &data.labels[start..end]);
        pb.inc((end - start) as u64);
    }
    pb.finish_and_clear();
    let wall = t0.elapsed().as_secs_f64();
    let per_class = (0..data.classes())
        .map(|k| ClassAccuracy {
            class: k,
            name: data.class_names[k].clone(),
            images: acc.seen[k],
            top1: 100.0 * acc.top1[k] as f64 / acc.seen[k].max(1) as f64,
        })
        .collect();
    Ok(EvalReport {
        model: model.path.display().to_string(),
        model_sha256: model.sha256.clone(),
        engine,
        data: data.source.clone(),
        data_format: data.format.to_string(),
        images: acc.total(),
        preprocess: pre.clone(),
        batch,
        top1: acc.top1(),
        top5: acc.top5(),
        per_class,
        wall_seconds: wall,
        images_per_second: acc.total() as f64 / wall.max(1e-9),
    })
}

/// Differences between two engines' logits over the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct PairDiff {
    pub a: EngineKind,
    pub b: EngineKind,
    pub max_abs: f64,
    /// max |a - b| / max |b| over each image's logits, maximised over images.
    pub max_rel: f64,
    /// Images whose predicted class differs.
    pub argmax_disagreements: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineSummary {
    pub engine: EngineKind,
    pub wall_seconds: f64,
    /// Top-1 when the inputs are labelled.
    pub top1: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub model: String,
    pub inputs: String,
    pub images: usize,
    pub engines: Vec<EngineSummary>,
    pub pairs: Vec<PairDiff>,
    pub tolerance: f64,
    /// candle vs ORT within tolerance with identical predictions.
    pub pass: bool,
}

/// Runs candle, ORT and tract on the same batches; `data` None means seeded N(0,1) inputs.
pub fn check(
    model: &LoadedModel,
    data: Option<&Dataset>,
    pre: &Preprocess,
    images: usize,
    batch: usize,
    seed: u64,
    tolerance: f64,
) -> Result<CheckReport> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let (classes, c, h, w) = input_geometry(model)?;
    if let Some(d) = data {
        check_classes(model, d, classes)?;
    }
    let kinds = [EngineKind::Candle, EngineKind::Ort, EngineKind::Tract];
    let mut engines: Vec<Engine> = kinds
        .iter()
        .map(|&k| Engine::open(k, model, 0))
        .collect::<Result<_>>()?;
    let n = data.map_or(images, |d| d.len().min(images));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::StandardNormal;
    let mut walls = [0.0f64; 3];
    let mut accs: Vec<Accuracy> = kinds.iter().map(|_| Accuracy::new(classes)).collect();
    let mut pairs: Vec<PairDiff> = [(0, 1), (0, 2), (1, 2)]
        .iter()
        .map(|&(a, b)| PairDiff {
            a: kinds[a],
            b: kinds[b],
            max_abs: 0.0,
            max_rel: 0.0,
            argmax_disagreements: 0,
        })
        .collect();
    let pb = progress(n, "check");
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(n);
        let x: Vec<f32> = match data {
            Some(d) => pre.batch(d, start..end),
            None => (0..(end - start) * c * h * w)
                .map(|_| normal.sample(&mut rng))
                .collect(),
        };
        let mut outs = Vec::new();
        for (k, e) in engines.iter_mut().enumerate() {
            let t0 = Instant::now();
            let (_, y) = e.run(&[end - start, c, h, w], &x)?;
            walls[k] += t0.elapsed().as_secs_f64();
            if let Some(d) = data {
                accs[k].add(&y, &d.labels[start..end]);
            }
            outs.push(y);
        }
        for (p, &(a, b)) in pairs.iter_mut().zip(&[(0, 1), (0, 2), (1, 2)]) {
            for (ra, rb) in outs[a]
                .chunks_exact(classes)
                .zip(outs[b].chunks_exact(classes))
            {
                let d = ra
                    .iter()
                    .zip(rb)
                    .map(|(x, y)| (x - y).abs() as f64)
                    .fold(0.0, f64::max);
                let scale = rb
                    .iter()
                    .map(|y| y.abs() as f64)
                    .fold(0.0, f64::max)
                    .max(1e-12);
                p.max_abs = p.max_abs.max(d);
                p.max_rel = p.max_rel.max(d / scale);
                p.argmax_disagreements += (argmax(ra) != argmax(rb)) as usize;
            }
        }
        pb.inc((end - start) as u64);
    }
    pb.finish_and_clear();
    let co = &pairs[0];
    Ok(CheckReport {
        model: model.path.display().to_string(),
        inputs: data.map_or(format!("N(0,1) noise, seed {seed}"), |d| d.source.clone()),
        images: n,
        engines: kinds
            .iter()
            .enumerate()
            .map(|(k, &e)| EngineSummary {
                engine: e,
                wall_seconds: walls[k],
                top1: data.map(|_| accs[k].top1()),
            })
            .collect(),
        pass: co.max_abs <= tolerance && co.argmax_disagreements == 0,
        pairs,
        tolerance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_top1_top5_and_per_class() {
        let mut a = Accuracy::new(6);
        // Row 0: class 2 wins (label 2). Row 1: label 0 ranks 6th. Row 2: label 1 ranks 2nd.
        let logits = [
            0., 1., 5., 2., 3., 4., 0., 1., 2., 3., 4., 5., 1., 5., 6., 0., 0., 0.,
        ];
        a.add(&logits, &[2, 0, 1]);
        assert_eq!(a.total(), 3);
        assert!((a.top1() - 100.0 / 3.0).abs() < 1e-9);
        assert!((a.top5() - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
