//! The lowered teacher as a whole: exact against ONNX Runtime, differentiable with respect to its
//! input (f64 finite differences through conv/BN/ReLU/residual/pooling/Gemm), taps that equal the
//! tensors ORT computes, and `eval`'s data path end to end.

use std::process::Command;

use crate::fixtures;
use candle_core::{DType, Device, Tensor, Var};
use datafree::lower::lower;
use datafree::onnx::builder::value_info_any_shape;
use datafree::onnx::load_model;
use datafree::verify::ort_runtime;
use rand::{Rng, SeedableRng};

fn noise(n: usize, seed: u64) -> Vec<f64> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-2.0..2.0)).collect()
}

#[test]
fn whole_teacher_input_gradient_matches_finite_differences() {
    let path = std::path::PathBuf::from(crate::common::QUICKSTART);
    let prog = lower(&load_model(&path).unwrap(), &Device::Cpu, DType::F64).unwrap();
    let dims = [2usize, 3, 32, 32];
    let x0 = noise(dims.iter().product(), 3);
    let x = Var::from_vec(x0.clone(), &dims, &Device::Cpu).unwrap();
    let w = Tensor::from_vec(noise(20, 4), (2, 10), &Device::Cpu).unwrap();
    // A loss that also uses the BN taps, as the BNS loss will.
    let loss = |t: &Tensor| {
        let f = prog.forward_taps(t).unwrap();
        let mut l = (f.logits * &w).unwrap().sum_all().unwrap();
        for b in &f.bn_inputs {
            l = (l + b.sqr().unwrap().mean_all().unwrap()).unwrap();
        }
        l
    };
    let g: Vec<f64> = loss(x.as_tensor())
        .backward()
        .unwrap()
        .get(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let eps = 1e-6;
    for i in (0..x0.len()).step_by(97) {
        let f = |d: f64| {
            let mut v = x0.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, &dims, &Device::Cpu).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (f(eps) - f(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "d/dx[{i}]: autograd {} vs finite difference {fd}",
            g[i]
        );
    }
}

#[test]
fn taps_equal_the_tensors_ort_computes() {
    // Expose every BN input and the classifier input as extra graph outputs, run that in ORT.
    let mut m = fixtures::quickstart();
    let g = m.graph.as_mut().unwrap();
    for name in ["conv1_out", "conv2_out", "conv3_out", "conv4_out", "flat"] {
        g.output.push(value_info_any_shape(name));
    }
    let (_dir, path) = crate::common::write_temp(&m, "taps.onnx");
    let prog = lower(&load_model(&path).unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(
        prog.bn_taps()
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["bn1", "bn2", "bn3", "bn4"]
    );
    let x: Vec<f32> = noise(3 * 3 * 32 * 32, 5)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let f = prog
        .forward_taps(&Tensor::from_slice(&x, (3, 3, 32, 32), &Device::Cpu).unwrap())
        .unwrap();
    let mut s = ort_runtime::session(&path, 1).unwrap();
    let input =
        ort::value::TensorRef::from_array_view(([3usize, 3, 32, 32], x.as_slice())).unwrap();
    let outs = s.run(ort::inputs![input]).unwrap();
    let ours: Vec<&Tensor> = f.bn_inputs.iter().chain(f.penultimate.as_ref()).collect();
    assert_eq!(ours.len(), 5);
    for (k, t) in ours.iter().enumerate() {
        let (shape, theirs) = outs[k + 1].try_extract_tensor::<f32>().unwrap();
        assert_eq!(
            t.dims(),
            shape
                .iter()
                .map(|&d| d as usize)
                .collect::<Vec<_>>()
                .as_slice(),
            "tap {k}"
        );
        let ours: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let d = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "tap {k}: max |diff| {d}");
    }
    // The running statistics of each tap come along.
    assert_eq!(prog.bn_taps()[1].stats.running_var.len(), 32);
}

#[test]
fn real_teachers_match_ort_and_expose_their_bn_taps() {
    for (name, taps, feat) in [
        ("cifar10_resnet20.onnx", 19, 64),
        ("cifar10_resnet20.bn-folded.onnx", 0, 64),
        ("cifar100_resnet20.onnx", 22, 256),
        ("cifar100_resnet20.bn-folded.onnx", 0, 256),
    ] {
        let Some(path) = crate::common::shared_teacher(name) else {
            return;
        };
        let prog = lower(&load_model(&path).unwrap(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(prog.bn_taps().len(), taps, "{name}");
        let x: Vec<f32> = noise(16 * 3 * 32 * 32, 6)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let f = prog
            .forward_taps(&Tensor::from_slice(&x, (16, 3, 32, 32), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(f.penultimate.unwrap().dims(), &[16, feat], "{name}");
        let ours: Vec<f32> = f.logits.flatten_all().unwrap().to_vec1().unwrap();
        let (_, theirs) = ort_runtime::run_f32(
            &mut ort_runtime::session(&path, 0).unwrap(),
            &[16, 3, 32, 32],
            &x,
        )
        .unwrap();
        let d = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-4, "{name}: max |candle - ORT| {d}");
    }
}

/// A CIFAR-10 binary file whose labels are ORT's own predictions: every engine must score 100%
/// through `eval`'s data path (record parsing, planes, preprocessing, batching incl. a partial one).
#[test]
fn eval_cli_scores_ort_labelled_data_perfectly_in_every_engine() {
    let (_mdir, model) = crate::common::write_temp(&fixtures::linear_classifier(11), "linear.onnx");
    let n = 37;
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let pixels: Vec<u8> = (0..n * 3072).map(|_| r.random()).collect();
    let (mean, std) = ([0.5f32, 0.4, 0.3], [0.25f32, 0.2, 0.3]);
    let x: Vec<f32> = pixels
        .iter()
        .enumerate()
        .map(|(i, &p)| (p as f32 / 255.0 - mean[(i / 1024) % 3]) / std[(i / 1024) % 3])
        .collect();
    let (_, logits) = ort_runtime::run_f32(
        &mut ort_runtime::session(&model, 1).unwrap(),
        &[n, 3, 32, 32],
        &x,
    )
    .unwrap();
    let mut bytes = Vec::new();
    for i in 0..n {
        bytes.push(datafree::verify::eval::argmax(&logits[i * 10..(i + 1) * 10]) as u8);
        bytes.extend_from_slice(&pixels[i * 3072..(i + 1) * 3072]);
    }
    let distinct: std::collections::HashSet<u8> = (0..n).map(|i| bytes[i * 3073]).collect();
    assert!(
        distinct.len() >= 5,
        "labels must be diverse for the test to mean anything: {distinct:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("test_batch.bin");
    std::fs::write(&data, &bytes).unwrap();
    for engine in ["candle", "ort", "tract"] {
        let out = Command::new(env!("CARGO_BIN_EXE_datafree"))
            .args([
                "eval",
                "--engine",
                engine,
                "--batch",
                "16",
                "--json",
                "--mean",
                "0.5,0.4,0.3",
                "--std",
                "0.25,0.2,0.3",
                "--data",
            ])
            .arg(&data)
            .arg(&model)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{engine}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["images"], n, "{engine}");
        assert_eq!(v["top1"], 100.0, "{engine}");
        assert_eq!(v["per_class"].as_array().unwrap().len(), 10);
    }
    // Wrong normalisation changes predictions: the test would notice a preprocessing bug.
    let out = Command::new(env!("CARGO_BIN_EXE_datafree"))
        .args(["eval", "--json", "--data"])
        .arg(&data)
        .arg(&model)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["top1"].as_f64().unwrap() < 100.0);
}

#[test]
fn eval_rejects_data_with_more_classes_than_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = vec![0u8, 42];
    rec.extend(vec![0u8; 3072]);
    let data = dir.path().join("c100.bin");
    std::fs::write(&data, &rec).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_datafree"))
        .args(["eval", "--data"])
        .arg(format!("cifar100:{}", data.display()))
        .arg(std::path::PathBuf::from(crate::common::QUICKSTART))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("has 100 classes but") && stderr.contains("outputs 10"),
        "{stderr}"
    );
}

#[test]
fn check_command_passes_on_the_quickstart_teacher() {
    let out = Command::new(env!("CARGO_BIN_EXE_datafree"))
        .args(["check", "--limit", "40", "--batch", "16", "--json"])
        .arg(std::path::PathBuf::from(crate::common::QUICKSTART))
        .output()
        .unwrap();
    crate::common::assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pass"], true);
    assert_eq!(v["images"], 40);
    for p in v["pairs"].as_array().unwrap() {
        assert!(p["max_abs"].as_f64().unwrap() < 1e-4, "{p}");
        assert_eq!(p["argmax_disagreements"], 0);
    }
}
