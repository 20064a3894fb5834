//! TensorFlow/Keras-style teachers: an NHWC input (a Transpose to NCHW inside the graph) and a
//! final Softmax, written by the project's builder around a trained fixture. They must compress
//! to the same student as their plain core, and the student must keep their signature. Inputs
//! that are not one image batch are refused, naming the input.

use crate::common::{assert_success, datafree, repo, write_temp};
use datafree::onnx::builder::{ModelBuilder, attr_ints};
use datafree::onnx::interface::{Interface, Layout, OutputKind};
use datafree::onnx::load_model;
use datafree::onnx::pb::tensor_proto::DataType;

fn report(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

fn signature(path: &std::path::Path) -> (String, String) {
    let m = load_model(path).unwrap();
    let g = m.graph();
    (format!("{:?}", g.input[0]), format!("{:?}", g.output[0]))
}

#[test]
fn an_nhwc_softmax_teacher_compresses_like_its_plain_core_and_its_student_keeps_its_signature() {
    // The raw-pixel Keras-style fixture: the family TensorFlow users' files come from.
    let plain = repo().join("onnx/family-keras.onnx");
    let m = load_model(&plain).unwrap();
    let iface = Interface::around(&m.proto, Layout::Nhwc, OutputKind::Probabilities);
    let (_keep, wrapped) = write_temp(&iface.wrap(m.proto.clone()), "keras-nhwc-softmax.onnx");

    let out = datafree(&["inspect", &wrapped.display().to_string(), "--json"]);
    assert_success(&out);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        j["input_resolution"]["layout"], "NHWC",
        "{}",
        j["input_resolution"]
    );
    assert_eq!(j["output_kind"], "probabilities");
    assert_eq!(j["input_domain"]["kind"], "pixels", "{}", j["input_domain"]);

    let tmp = tempfile::tempdir().unwrap();
    let mut top1 = Vec::new();
    for (name, teacher) in [("plain", &plain), ("wrapped", &wrapped)] {
        let dir = tmp.path().join(name);
        let out = datafree(&[
            "compress",
            &teacher.display().to_string(),
            "--method",
            "ptq-bn",
            "--bits",
            "w8a8",
            "--data",
            "synthetic:shapes10:test:300",
            "--seed",
            "3",
            "--out",
            &dir.display().to_string(),
        ]);
        assert_success(&out);
        let r = report(&dir);
        assert!(r["self_check"].is_null(), "{name}: {}", r["self_check"]);
        let v = &r["verification_data"];
        assert!(v["agreement"].as_f64().unwrap() >= 0.97, "{name}: {v}");
        top1.push(v["student_top1"].as_f64().unwrap());
        // ORT computes what the simulation does (the Softmax, in float, may differ in its last
        // bits; the predictions may not).
        assert_eq!(v["simulation"]["Ok"]["top1_agreement"], 1.0, "{name}: {v}");
    }
    assert!(
        (top1[0] - top1[1]).abs() <= 0.1,
        "plain vs wrapped student top-1: {top1:?}"
    );

    let student = tmp.path().join("wrapped/student.onnx");
    assert_eq!(signature(&student), signature(&wrapped));
    let g = load_model(&student).unwrap();
    let last = g.graph().node.last().unwrap();
    assert_eq!(
        last.op_type, "Softmax",
        "the student's outputs are probabilities too"
    );
    // `eval` feeds each engine in the file's layout: the wrapped teacher scores as its core.
    for engine in ["candle", "ort", "tract"] {
        let top1: Vec<f64> = [&plain, &wrapped]
            .iter()
            .map(|t| {
                let out = datafree(&[
                    "eval",
                    &t.display().to_string(),
                    "--data",
                    "synthetic:shapes10:test:100",
                    "--engine",
                    engine,
                    "--json",
                ]);
                assert_success(&out);
                let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                j["top1"].as_f64().unwrap()
            })
            .collect();
        assert_eq!(top1[0], top1[1], "{engine}: plain vs wrapped teacher");
    }

    // The data-free gate compares like with like: each file is fed in its own layout and read
    // as its own kind of output, so the plain core's student passes against the wrapped teacher.
    for student in [&student, &tmp.path().join("plain/student.onnx")] {
        let out = datafree(&[
            "verify",
            &student.display().to_string(),
            "--reference",
            &wrapped.display().to_string(),
        ]);
        assert_success(&out);
    }
}

/// A one-node model with these inputs (name, dims).
fn model_with_inputs(inputs: &[(&str, [i64; 4])]) -> datafree::onnx::pb::ModelProto {
    let mut b = ModelBuilder::new("inputs", 17);
    for (name, dims) in inputs {
        b.input(name, DataType::Float, &dims.map(Into::into));
    }
    b.node(
        "Transpose",
        "t",
        &[inputs[0].0],
        &["y"],
        vec![attr_ints("perm", &[0, 1, 2, 3])],
    );
    b.output_any_shape("y");
    b.build()
}

#[test]
fn inputs_that_are_not_one_image_batch_are_refused_naming_the_input() {
    for (inputs, expect) in [
        (
            vec![("volume", [1, 5, 32, 7])],
            "input 'volume' has shape [1, 5, 32, 7]",
        ),
        (
            vec![("left", [1, 3, 32, 32]), ("right", [1, 3, 32, 32])],
            "2 inputs ('left', 'right')",
        ),
    ] {
        let (_keep, path) = write_temp(&model_with_inputs(&inputs), "bad.onnx");
        let o = path.with_extension("out");
        let out = datafree(&[
            "compress",
            &path.display().to_string(),
            "--bits",
            "w8a8",
            "--out",
            &o.display().to_string(),
        ]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{err}");
        assert!(err.contains("bad.onnx"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

/// The quick-start teacher at 64 x 64 and with 2 classes, as a TensorFlow file: NHWC input, a
/// 2 x 2 average pool down to the 32 x 32 it was trained at, and a head "class 0 or not"
/// (logit 0 against the largest other), then Softmax.
fn quickstart_64px_two_classes() -> datafree::onnx::pb::ModelProto {
    use datafree::onnx::builder::{attr_int, node_proto, tensor_i64, value_info};
    let mut m = load_model(std::path::Path::new(crate::common::QUICKSTART))
        .unwrap()
        .proto;
    let g = m.graph.as_mut().unwrap();
    let (input, logits) = (g.input[0].name.clone(), g.output[0].name.clone());
    g.input[0] = value_info(
        "image64",
        DataType::Float,
        &["N".into(), 3.into(), 64.into(), 64.into()],
    );
    g.node.insert(
        0,
        node_proto(
            "AveragePool",
            "down",
            &["image64"],
            &[&input],
            vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
            ],
        ),
    );
    for (name, v) in [("s0", 0i64), ("s1", 1), ("s10", 10), ("ax", 1)] {
        g.initializer.push(tensor_i64(name, &[1], &[v]));
    }
    g.node.extend([
        node_proto(
            "Slice",
            "first",
            &[&logits, "s0", "s1", "ax"],
            &["l0"],
            vec![],
        ),
        node_proto(
            "Slice",
            "others",
            &[&logits, "s1", "s10", "ax"],
            &["lr"],
            vec![],
        ),
        node_proto(
            "ReduceMax",
            "best_other",
            &["lr"],
            &["l1"],
            vec![attr_ints("axes", &[1])],
        ),
        node_proto(
            "Concat",
            "two",
            &["l0", "l1"],
            &["two_logits"],
            vec![attr_int("axis", 1)],
        ),
    ]);
    g.output[0] = value_info("two_logits", DataType::Float, &["N".into(), 2.into()]);
    let iface = Interface::around(&m, Layout::Nhwc, OutputKind::Probabilities);
    iface.wrap(m)
}

#[test]
fn a_64px_two_class_teacher_compresses_and_verifies() {
    let (_keep, teacher) = write_temp(&quickstart_64px_two_classes(), "two-classes-64.onnx");
    let t = teacher.display().to_string();
    // Labelled data at 64 x 64: shapes10 test images, class 0 against the rest.
    let data = tempfile::tempdir().unwrap();
    let ds = datafree::data::synthetic::generate("test", 300).unwrap();
    let s = datafree::data::synthetic::SIZE as u32;
    for (i, &label) in ds.labels.iter().enumerate() {
        let px = &ds.pixels[i * 3 * (s * s) as usize..(i + 1) * 3 * (s * s) as usize];
        let img = image::RgbImage::from_fn(s, s, |x, y| {
            let at = |c: u32| px[(c * s * s + y * s + x) as usize];
            image::Rgb([at(0), at(1), at(2)])
        });
        let img = image::imageops::resize(&img, 64, 64, image::imageops::FilterType::Nearest);
        let dir = data
            .path()
            .join(if label == 0 { "a-class0" } else { "b-rest" });
        std::fs::create_dir_all(&dir).unwrap();
        img.save(dir.join(format!("{i}.png"))).unwrap();
    }
    let d = data.path().display().to_string();

    let out = datafree(&["inspect", &t, "--json"]);
    assert_success(&out);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["classes"], 2);
    assert_eq!(j["input_resolution"]["height"], 64);

    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("s");
    let out = datafree(&[
        "compress",
        &t,
        "--method",
        "ptq-bn",
        "--bits",
        "w8a8",
        "--data",
        &d,
        "--out",
        &out_dir.display().to_string(),
    ]);
    assert_success(&out);
    let r = report(&out_dir);
    assert!(r["self_check"].is_null(), "{}", r["self_check"]);
    let v = &r["verification_data"];
    assert!(
        v["reference_top1"].as_f64().unwrap() >= 90.0,
        "the teacher works at 64 px: {v}"
    );
    assert!(v["agreement"].as_f64().unwrap() >= 0.99, "{v}");
    let student = out_dir.join("student.onnx");
    assert_eq!(signature(&student), signature(&teacher));
    let out = datafree(&["verify", &student.display().to_string(), "--reference", &t]);
    assert_success(&out);
}
