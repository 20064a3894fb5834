//! Teachers of other families and other input domains (the trained fixtures
//! `onnx/family-*.onnx`, see `families.rs`), compressed as a new user would: no flags about the
//! input, no data. Also what must never pass silently: a teacher with a non-finite weight and a
//! student that collapsed.

use crate::common::{QUICKSTART, assert_success, datafree, write_temp};
use datafree::onnx::load_model;
use datafree::onnx::pb::tensor_proto::DataType;

/// (family, the input domain its training used, as `inspect` names it).
const EXPECTED: &[(&str, &str)] = &[
    ("keras", "pixels"),
    ("mobilenet", "unit"),
    ("densenet", "symmetric"),
    ("preact", "standardized"),
    ("tf-mobilenet", "unit"),
];

/// The labelled test images of a family's task, drawn at its side.
fn test_data(name: &str, n: usize) -> String {
    let fam = crate::families::FAMILIES
        .iter()
        .find(|f| f.name == name)
        .expect("a family of families.rs");
    format!("synthetic:{}:test:{n}", fam.task)
}

fn family(name: &str) -> String {
    crate::common::repo()
        .join(format!("onnx/family-{name}.onnx"))
        .display()
        .to_string()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("one JSON document on stdout")
}

#[test]
fn family_fixtures_are_complete_and_their_input_domains_are_inferred() {
    for &(name, kind) in EXPECTED {
        let out = datafree(&["inspect", &family(name), "--json"]);
        assert_success(&out);
        let j = json(&out);
        let d = &j["input_domain"];
        assert_eq!(d["kind"], kind, "{name}: {d}");
        assert_eq!(d["source"]["from"], "inferred", "{name}: {d}");
        assert_eq!(j["batch_norm"]["verdict"], "complete", "{name}");
        // Convs without BN by design (projection shortcuts, squeeze-excitation) are said so.
        let msg = j["batch_norm"]["message"].as_str().unwrap();
        assert!(!msg.contains("folded"), "{name}: {msg}");
    }
}

#[test]
fn family_fixtures_compress_at_w8a8_without_flags_and_pass_verify_without_data() {
    let tmp = tempfile::tempdir().unwrap();
    for &(name, kind) in EXPECTED {
        let dir = tmp.path().join(name);
        let dir_s = dir.display().to_string();
        let teacher = family(name);
        let out = datafree(&[
            "compress",
            &teacher,
            "--method",
            "ptq-bn",
            "--bits",
            "w8a8",
            "--data",
            &test_data(name, 500),
            "--out",
            &dir_s,
        ]);
        assert_success(&out);
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
        assert_eq!(r["input_domain"]["kind"], kind, "{name}");
        assert!(r["self_check"].is_null(), "{name}: {}", r["self_check"]);
        let v = &r["verification_data"];
        let drop = v["top1_drop"].as_f64().unwrap();
        // Measured on test:2000: keras 0.45, mobilenet 0.85, densenet 0.5, preact 0.2,
        // tf-mobilenet 0.1 points.
        assert!(drop <= 2.0, "{name}: top-1 drop {drop}");
        let agreement = v["agreement"].as_f64().unwrap();
        assert!(agreement >= 0.97, "{name}: agreement {agreement}");
        // Exact scales: ORT computes the simulation's logits wherever no float op intervenes.
        let sim = &v["simulation"]["Ok"];
        assert_eq!(sim["top1_agreement"], 1.0, "{name}: {sim}");
        // The student records the domain it was calibrated for, and keeps the teacher's
        // signature (the TensorFlow-style file: NHWC input, probabilities out).
        let student = load_model(&dir.join("student.onnx")).unwrap();
        let t = load_model(std::path::Path::new(&teacher)).unwrap();
        let (sg, tg) = (student.graph(), t.graph());
        assert_eq!(sg.input, tg.input, "{name}");
        assert_eq!(sg.output, tg.output, "{name}");
        let meta = &student.proto.metadata_props;
        assert!(
            meta.iter()
                .any(|p| p.key.starts_with("datafree.preprocess")),
            "{name}: {meta:?}"
        );
        // Keras writes 'same' padding as Pad nodes; folded into the Convs, ORT fuses them all.
        if name == "keras" {
            let f = &v["fusion"]["Ok"];
            assert_eq!(f["all_conv_fused"], true, "{f}");
        }
        // The CI gate without labelled data passes it.
        let student_s = dir.join("student.onnx").display().to_string();
        let gate = datafree(&["verify", &student_s, "--reference", &teacher]);
        assert_eq!(
            gate.status.code(),
            Some(0),
            "{name}: {}{}",
            String::from_utf8_lossy(&gate.stdout),
            String::from_utf8_lossy(&gate.stderr)
        );
    }
}

/// GDFQ at 96 px with two classes on the TensorFlow-style file: the generator starts at a
/// quarter of the side, the sample grid has one row per class, the student keeps the NHWC
/// input and the probabilities output.
#[test]
fn gdfq_runs_on_the_96px_two_class_tensorflow_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gdfq");
    let teacher = family("tf-mobilenet");
    let out = datafree(&[
        "compress",
        &teacher,
        "--method",
        "gdfq",
        "--bits",
        "w4a4",
        "--epochs",
        "2",
        "--iters-per-epoch",
        "2",
        "--batch",
        "4",
        "--warmup-epochs",
        "1",
        "--grid-every",
        "4",
        "--verify-images",
        "16",
        "--data",
        &test_data("tf-mobilenet", 100),
        "--out",
        &dir.display().to_string(),
    ]);
    // A 4-iteration student may fail the self-check (exit 1); it must still be written.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grid = image::open(dir.join("samples-000004.png")).unwrap();
    assert_eq!(grid.width(), 4 * grid.height(), "8 columns, 2 class rows");
    let student = load_model(&dir.join("student.onnx")).unwrap();
    let t = load_model(std::path::Path::new(&teacher)).unwrap();
    assert_eq!(student.graph().input, t.graph().input);
    assert_eq!(student.graph().output, t.graph().output);
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let v = &r["verification_data"];
    assert!(v["reference_top1"].as_f64().unwrap() >= 95.0, "{v}");
    assert_eq!(v["simulation"]["Ok"]["top1_agreement"], 1.0, "{v}");
}

#[test]
fn a_non_finite_weight_is_refused_naming_the_tensor() {
    let mut m = load_model(std::path::Path::new(QUICKSTART)).unwrap().proto;
    let g = m.graph.as_mut().unwrap();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.dims.len() == 4 && t.data_type == DataType::Float as i32)
        .unwrap();
    let name = t.name.clone();
    if t.raw_data.is_empty() {
        t.float_data[5] = f32::NAN;
    } else {
        t.raw_data[20..24].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let (tmp, path) = write_temp(&m, "nan.onnx");
    let out_dir = tmp.path().join("out").display().to_string();
    let out = datafree(&[
        "compress",
        path.to_str().unwrap(),
        "--method",
        "ptq-bn",
        "--bits",
        "w8a8",
        "--out",
        &out_dir,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&name), "{err}");
    assert!(err.contains("nan.onnx"), "{err}");
    assert!(!tmp.path().join("out/student.onnx").exists());
}

#[test]
fn a_collapsed_student_is_reported_with_exit_1_and_kept() {
    // Ranges of mean +- 0.02 std clip nearly every activation: the student cannot agree with
    // its teacher, and compress must say so rather than hand it over as a success.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let out = datafree(&[
        "compress",
        QUICKSTART,
        "--method",
        "ptq-bn",
        "--bits",
        "w8a8",
        "--bn-k",
        "0.02",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("collapsed"), "{err}");
    assert!(dir.join("student.onnx").is_file());
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert!(r["self_check"].as_str().unwrap().contains("agrees"));
}

#[test]
fn zero_pads_fold_into_their_convs_exactly() {
    use candle_core::{DType, Tensor};
    let teacher = load_model(&crate::common::repo().join("onnx/family-keras.onnx")).unwrap();
    let (folded, n) = datafree::export::fold_pads(&teacher).unwrap();
    assert_eq!(n, 5, "the fixture's five 'same' Pads");
    assert!(
        folded
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .all(|n| n.op_type != "Pad")
    );
    let folded = datafree::onnx::LoadedModel::from_proto(&teacher.path, folded);
    let host = candle_core::Device::Cpu;
    let x: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| ((i * 37) % 256) as f32)
        .collect();
    let x = Tensor::from_vec(x, (2, 3, 32, 32), &host).unwrap();
    let run = |m| {
        let y = datafree::lower::lower(m, &host, DType::F32)
            .unwrap()
            .forward(&x)
            .unwrap();
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (run(&teacher), run(&folded));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(
        diff <= 1e-4 * a.iter().fold(1f32, |m, v| m.max(v.abs())),
        "max diff {diff}"
    );
}
