//! The reference engines on the project's own models: ONNX Runtime is found without any variable
//! set by hand (scripts/setup.sh + .cargo/config.toml), runs the quick-start teacher and agrees
//! with tract; BN folding is exact; the committed files are what the fixture code writes.

use crate::fixtures::{self, BnVariant, QUICKSTART_SEED};
use datafree::onnx::load_model;
use datafree::verify::{ort_runtime, tract_runtime::TractModel};
use prost::Message;

fn batch(n: usize) -> (Vec<usize>, Vec<f32>) {
    // A deterministic, image-like input in roughly [-2, 2].
    let len = n * 3 * 32 * 32;
    let x = (0..len)
        .map(|i| ((i * 7919 % 1000) as f32 / 250.0) - 2.0)
        .collect();
    (vec![n, 3, 32, 32], x)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn ort_library_loads_and_reports_its_version() {
    let v = ort_runtime::version().expect("ONNX Runtime must load: run scripts/setup.sh");
    assert!(v.starts_with("1.31"), "version {v}");
}

#[test]
fn ort_and_tract_agree_on_the_quickstart_teacher() {
    let path = std::path::PathBuf::from(crate::common::QUICKSTART);
    let (shape, x) = batch(4);
    let mut s = ort_runtime::session(&path, 1).unwrap();
    let (oshape, ort_out) = ort_runtime::run_f32(&mut s, &shape, &x).unwrap();
    assert_eq!(oshape, vec![4, 10]);
    let (tshape, tract_out) = TractModel::load(&path, &shape)
        .unwrap()
        .run_f32(&shape, &x)
        .unwrap();
    assert_eq!(tshape, oshape);
    let d = max_abs_diff(&ort_out, &tract_out);
    assert!(d < 1e-4, "ORT vs tract max |diff| {d}");
    // Logits of different inputs differ: the model is not degenerate.
    assert!(max_abs_diff(&ort_out[..10], &ort_out[10..20]) > 1e-3);
}

#[test]
fn folding_bn_into_conv_does_not_change_the_outputs() {
    let (_d1, kept) = crate::common::write_temp(&fixtures::quickstart(), "kept.onnx");
    let (_d2, folded) = crate::common::write_temp(
        &fixtures::resnet_like(BnVariant::Folded, QUICKSTART_SEED),
        "folded.onnx",
    );
    let (shape, x) = batch(2);
    let a = ort_runtime::run_f32(&mut ort_runtime::session(&kept, 1).unwrap(), &shape, &x)
        .unwrap()
        .1;
    let b = ort_runtime::run_f32(&mut ort_runtime::session(&folded, 1).unwrap(), &shape, &x)
        .unwrap()
        .1;
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-4, "kept vs folded max |diff| {d}");
}

/// The committed teacher is the `resnet_like` fixture trained by `examples/train_quickstart.rs`:
/// same graph, trained values; its BN-folded twin is exactly `export::fold_bn` of it.
#[test]
fn committed_quickstart_models_are_what_the_project_makes() {
    let teacher = load_model(&std::path::PathBuf::from(crate::common::QUICKSTART)).unwrap();
    let arch = fixtures::resnet_like(BnVariant::Kept, QUICKSTART_SEED);
    let (tg, ag) = (teacher.graph(), arch.graph.as_ref().unwrap());
    assert_eq!(tg.node, ag.node, "same nodes as the fixture");
    let dims = |g: &datafree::onnx::pb::GraphProto| {
        g.initializer
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(dims(tg), dims(ag), "same parameters as the fixture");
    assert_ne!(tg.initializer, ag.initializer, "but trained values");
    let meta: Vec<&str> = teacher
        .proto
        .metadata_props
        .iter()
        .map(|e| e.key.as_str())
        .collect();
    assert!(
        meta.contains(&"datafree.preprocess.mean") && meta.contains(&"datafree.recipe"),
        "{meta:?}"
    );
    let (folded, n) = datafree::export::fold_bn(&teacher).unwrap();
    assert_eq!(n, 4);
    let committed =
        std::fs::read(crate::common::repo().join("onnx/quickstart.bn-folded.onnx")).unwrap();
    assert!(
        committed == folded.encode_to_vec(),
        "onnx/quickstart.bn-folded.onnx differs from fold_bn(onnx/quickstart.onnx)"
    );
}

#[test]
fn missing_library_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_datafree"))
        .arg("doctor")
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "ONNX Runtime library not found at /nonexistent/libonnxruntime.so (from ORT_DYLIB_PATH)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("scripts/setup.sh"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
