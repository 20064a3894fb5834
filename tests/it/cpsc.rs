//! Distillation into another architecture: the student architectures (`datafree student`) and
//! CPSC-DFKD (`compress --method cpsc`) end to end on the quick-start teacher at the tiny
//! budget, its resume, and what it refuses.

use std::path::Path;

use crate::common::{QUICKSTART, assert_success, datafree};
use candle_core::{Device, Tensor};

const ARCHS: &[&str] = &[
    "resnet8",
    "resnet20",
    "resnet8-small",
    "resnet20-small",
    "wrn-10-1",
    "wrn-16-1",
    "wrn-16-2",
    "wrn-40-1",
    "mobilenetv2",
];

fn student(dir: &Path, arch: &str, classes: usize) -> std::path::PathBuf {
    let p = dir.join(format!("{arch}-{classes}.onnx"));
    let c = classes.to_string();
    let out = datafree(&[
        "student",
        "--arch",
        arch,
        "--classes",
        &c,
        "--out",
        p.to_str().unwrap(),
        "--json",
    ]);
    assert_success(&out);
    p
}

#[test]
fn every_student_architecture_runs_alike_in_candle_and_ort_with_the_expected_size() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let p = student(dir.path(), arch, 10);
        let out = datafree(&["check", p.to_str().unwrap(), "--limit", "4"]);
        assert_success(&out);
        let out = datafree(&["inspect", p.to_str().unwrap(), "--json"]);
        assert_success(&out);
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let params = j["parameters"]["count"].as_u64().unwrap();
        let macs = j["macs_per_image"].as_u64().unwrap();
        // Parameters (running statistics included) and MACs of the published architectures:
        // He et al.'s ResNet-20 has 0.27M weights, WRN-16-2 0.69M and ~101M MACs (as CPSC-DFKD's
        // table lists it), MobileNetV2 2.2-2.3M.
        let (p_lo, p_hi, m_lo, m_hi) = match *arch {
            "resnet8" => (70_000, 80_000, 10e6, 15e6),
            "resnet20" => (265_000, 275_000, 38e6, 43e6),
            // ../shared/teachers/cifar10_resnet8.onnx: 90,013 in the file (three biases shared).
            "resnet8-small" => (90_122, 90_122, 21.9e6, 22.0e6),
            "resnet20-small" => (280_000, 290_000, 45e6, 55e6),
            // ../shared/teachers/cifar10_wrn10_1_preact.onnx: 78,332 (a 2-value shape constant).
            "wrn-10-1" => (78_330, 78_330, 12.4e6, 12.6e6),
            "wrn-16-1" => (170_000, 180_000, 25e6, 28e6),
            "wrn-16-2" => (690_000, 700_000, 100e6, 102e6),
            "wrn-40-1" => (560_000, 570_000, 80e6, 86e6),
            "mobilenetv2" => (2_200_000, 2_300_000, 85e6, 92e6),
            other => panic!("no expectation for {other}"),
        };
        assert!(
            (p_lo..=p_hi).contains(&params) && (m_lo..=m_hi).contains(&(macs as f64)),
            "{arch}: {params} parameters, {macs} MACs"
        );
    }
}

#[test]
fn a_student_that_does_not_fit_the_teacher_or_float_bits_without_cpsc_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s5 = student(dir.path(), "resnet8", 5);
    let out_dir = dir.path().join("out");
    let out = datafree(&[
        "compress",
        QUICKSTART,
        "--method",
        "cpsc",
        "--student",
        s5.to_str().unwrap(),
        "--bits",
        "fp32",
        "--preset",
        "tiny",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("resnet8-5.onnx")
            && err.contains("quickstart.onnx")
            && err.contains("5 classes")
            && err.contains("10 classes"),
        "{err}"
    );
    assert!(!out_dir.exists(), "a refusal writes nothing");
    // A teacher without BN statistics, and settings that cannot run: refused before the folder.
    let s10 = student(dir.path(), "resnet8", 10);
    let folded = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/onnx/quickstart.bn-folded.onnx"
    );
    for (teacher, extra, says) in [
        (
            folded,
            "--preset=tiny",
            "quickstart.bn-folded.onnx: cpsc needs the teacher's BatchNormalization",
        ),
        (QUICKSTART, "--batch=1", "--batch must be at least 2"),
    ] {
        let out = datafree(&[
            "compress",
            teacher,
            "--method",
            "cpsc",
            "--student",
            s10.to_str().unwrap(),
            "--bits",
            "fp32",
            extra,
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert!(!out_dir.exists(), "a refusal writes nothing: {err}");
    }
    let out = datafree(&[
        "compress",
        QUICKSTART,
        "--bits",
        "fp32",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--method cpsc"));
    let out = datafree(&[
        "compress",
        QUICKSTART,
        "--method",
        "cpsc",
        "--bits",
        "fp32",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--student"));
    // The pipeline file is the same command line.
    let pipeline = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/cpsc-cifar.toml");
    let set = format!("compress.student={}", s5.display());
    let out = datafree(&["run", pipeline, "--set", &set, "--dry-run"]);
    assert_success(&out);
    let line = String::from_utf8_lossy(&out.stderr);
    assert!(
        line.contains("--method cpsc")
            && line.contains("--l2-weight 5")
            && line.contains("--ce-form logits")
            && line.contains("--l2-form auto"),
        "{line}"
    );
}

fn cpsc(student: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    cpsc_from(QUICKSTART, student, out, extra)
}

/// `compress TEACHER --method cpsc` at the tiny preset, with checkpoints and grids due.
fn cpsc_from(teacher: &str, student: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "compress",
        teacher,
        "--method",
        "cpsc",
        "--student",
        student.to_str().unwrap(),
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--force",
        "--checkpoint-every",
        "2",
        "--grid-every",
        "4",
        "--verify-images",
        "32",
        "--json",
    ];
    args.extend_from_slice(extra);
    datafree(&args)
}

/// A tiny-budget distillation (8 rounds) may leave the student no better than a constant, which
/// the self-check refuses with exit 1 while still writing every file; anything else must succeed.
fn assert_done(out: &std::process::Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(1) => assert!(err.contains("it collapsed"), "{err}"),
        _ => panic!("{:?}: {err}", out.status),
    }
}

#[test]
fn cpsc_distils_into_a_float_student_that_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path(), "resnet8", 10);
    let a = dir.path().join("a");
    let out = cpsc(&s, &a, &["--bits", "fp32", "--bn", "keep"]);
    assert_done(&out);
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["config"]["variant"], "cpsc");
    assert_eq!(r["student_params"].as_u64(), Some(75_802));
    assert!(r["verification_synthetic"]["agreement"].as_f64().is_some());
    // 8 rounds: one metrics line each, with every loss finite.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8);
    for k in [
        "adversarial",
        "bn_prior",
        "contrastive",
        "student_kd",
        "student_l2",
    ] {
        assert!(
            lines.iter().all(|l| l[k].as_f64().unwrap().is_finite()),
            "{k}"
        );
    }
    assert!(a.join("samples-000008.png").is_file());
    // The student's BN kept its trained running statistics (they start at 0 and 1).
    let m = datafree::onnx::load_model(&a.join("student.onnx")).unwrap();
    let var = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name == "layer1.0.bn1.running_var")
        .expect("BN kept");
    let v = datafree::onnx::tensor::decode(var, None).unwrap().to_f32();
    assert!(v.iter().any(|x| (x - 1.0).abs() > 1e-3), "{v:?}");
    // Killed after 3 rounds, resumed: the same student, byte for byte.
    let b = dir.path().join("b");
    let out = cpsc(
        &s,
        &b,
        &["--bits", "fp32", "--bn", "keep", "--stop-after", "3"],
    );
    assert!(!out.status.success());
    let out = cpsc(
        &s,
        &b,
        &[
            "--bits",
            "fp32",
            "--bn",
            "keep",
            "--resume",
            b.to_str().unwrap(),
        ],
    );
    assert_done(&out);
    assert_eq!(
        std::fs::read(a.join("student.onnx")).unwrap(),
        std::fs::read(b.join("student.onnx")).unwrap()
    );
}

#[test]
fn distil_then_quantize_writes_a_qdq_student_of_the_new_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path(), "wrn-10-1", 10);
    let a = dir.path().join("a");
    let out = cpsc(&s, &a, &["--bits", "w8a8", "--variant", "dfad"]);
    assert_done(&out);
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["config"]["variant"], "dfad");
    let q = &r["quantized"];
    assert_eq!(q["bits"], "w8a8");
    let m = datafree::onnx::load_model(&a.join("quantized/student.onnx")).unwrap();
    let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(ops.contains(&"QuantizeLinear") && ops.contains(&"DequantizeLinear"));
    // The quantized file is the distilled student's graph (a pre-activation WRN's Adds).
    assert!(ops.iter().filter(|o| **o == "Add").count() >= 3);
    // Quantized from the student with its BN layers and learned running statistics (the float
    // export folds them), so ptq-bn has its BN ranges.
    assert_eq!(q["method"], "ptq-bn");
    let kept = datafree::onnx::load_model(&a.join("quantized/distilled-bn.onnx")).unwrap();
    let bn = datafree::onnx::bn::analyse(&kept);
    assert!(bn.bn_count >= 3 && bn.verdict == datafree::onnx::bn::Verdict::Complete);
}

#[test]
fn finetune_quantizes_the_distilled_student_by_gdfq() {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path(), "resnet8", 10);
    let a = dir.path().join("a");
    let out = cpsc(
        &s,
        &a,
        &[
            "--bits",
            "w4a4",
            "--finetune",
            "--finetune-epochs",
            "2",
            "--finetune-iters-per-epoch",
            "2",
        ],
    );
    // A 4-iteration fine-tuning may fail the self-check (exit 1); its files are still written.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report.json")).unwrap()).unwrap();
    let q = &r["quantized"];
    assert_eq!(
        (q["method"].as_str(), q["bits"].as_str()),
        (Some("gdfq"), Some("w4a4"))
    );
    // GDFQ's own schedule (tiny preset, 2 x 2 iterations), not the distillation's rounds.
    let cfg = &q["training"]["config"];
    assert_eq!(
        (cfg["epochs"].as_u64(), cfg["iters_per_epoch"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(cfg["warmup_epochs"].as_u64(), Some(1));
    let lines = std::fs::read_to_string(a.join("quantized/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert!(a.join("quantized/student.onnx").exists());
    // Without quantized bits there is nothing to fine-tune.
    let out = cpsc(&s, &dir.path().join("b"), &["--bits", "fp32", "--finetune"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--finetune"));
}

#[test]
fn the_contrastive_loss_rewards_views_that_agree_within_a_class() {
    use datafree::train::losses::supcon;
    let d = Device::Cpu;
    let a = Tensor::new(
        &[[1f32, 0.0], [0.0, 1.0], [0.995, 0.0995], [0.0995, 0.995]],
        &d,
    )
    .unwrap();
    let labels = [0u32, 1, 0, 1];
    let same = supcon(&a, &a, &labels, 0.07)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // The second view swapped between classes.
    let b = Tensor::new(
        &[[0f32, 1.0], [1.0, 0.0], [0.0995, 0.995], [0.995, 0.0995]],
        &d,
    )
    .unwrap();
    let swapped = supcon(&a, &b, &labels, 0.07)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(same.is_finite() && swapped.is_finite());
    assert!(same < swapped - 1.0, "aligned {same}, swapped {swapped}");
}

#[test]
fn student_init_random_redraws_a_trained_students_weights() {
    // The quick-start teacher itself as the student: `keep` starts from its trained weights,
    // `random` from fresh ones, so the two runs must end with different students.
    let dir = tempfile::tempdir().unwrap();
    let qs = Path::new(QUICKSTART);
    let (a, b) = (dir.path().join("keep"), dir.path().join("random"));
    // With the reference code's bounded CE, 8 rounds at lr 0.1 leave the teacher's own weights
    // a working student (the self-check's passing side); the paper's CE, pulling towards the
    // labels of a generator that has not learned yet, takes it apart within those 8 rounds.
    let code_ce = ["--ce-form", "probabilities"];
    assert_success(&cpsc(qs, &a, &[&["--bits", "fp32"][..], &code_ce].concat()));
    assert_done(&cpsc(
        qs,
        &b,
        &[
            &["--bits", "fp32", "--student-init", "random"][..],
            &code_ce,
        ]
        .concat(),
    ));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["student_init"], "random");
    let weights = |d: &Path| {
        let m = datafree::onnx::load_model(&d.join("student.onnx")).unwrap();
        let t = m
            .graph()
            .initializer
            .iter()
            .find(|t| t.dims.len() == 4)
            .cloned()
            .unwrap();
        datafree::onnx::tensor::decode(&t, None).unwrap().to_f32()
    };
    let (wa, wb) = (weights(&a), weights(&b));
    assert_eq!(wa.len(), wb.len());
    let diff: f32 = wa.iter().zip(&wb).map(|(x, y)| (x - y).abs()).sum::<f32>() / wa.len() as f32;
    let scale: f32 = wa.iter().map(|x| x.abs()).sum::<f32>() / wa.len() as f32;
    assert!(diff > 0.1 * scale, "mean |diff| {diff} vs mean |w| {scale}");
}

#[test]
fn a_student_that_ignores_its_input_fails_the_self_check_with_its_files_kept() {
    // A student whose classifier bias puts class 0 a million above the rest, and that barely
    // trains (learning rate 1e-30), predicts class 0 for every image: no better than a constant.
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path(), "resnet8", 10);
    let m = datafree::onnx::load_model(&s).unwrap();
    let bias = m
        .graph()
        .node
        .iter()
        .find(|n| n.op_type == "Gemm")
        .expect("a Gemm classifier")
        .input[2]
        .clone();
    let mut b = vec![0f32; 10];
    b[0] = 1e6;
    let biased = std::collections::HashMap::from([(bias, b)]);
    let dead = dir.path().join("dead.onnx");
    let proto = datafree::export::with_initializers(&m.proto, &biased).unwrap();
    datafree::onnx::builder::write_model(&dead, &proto).unwrap();
    let a = dir.path().join("a");
    let out = cpsc(&dead, &a, &["--bits", "fp32", "--student-lr", "1e-30"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no more than predicting the teacher's most frequent class")
            && err.contains("100.0% of them into one class"),
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["self_check"].as_str().unwrap().contains("collapsed"));
    assert_eq!(r["verification_synthetic"]["student_majority"], 1.0);
    assert!(a.join("student.onnx").is_file() && a.join("report.json").is_file());
    // With measuring data, the data decides.
    let b = dir.path().join("b");
    let out = cpsc(
        &dead,
        &b,
        &[
            "--bits",
            "fp32",
            "--student-lr",
            "1e-30",
            "--data",
            "synthetic:shapes10:test:200",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("of 200 data images"), "{err}");
}

#[test]
fn ce_form_switches_between_the_reference_codes_and_the_papers_cross_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path(), "resnet8", 10);
    let lines = |form: &str| {
        let d = dir.path().join(form);
        assert_done(&cpsc(&s, &d, &["--bits", "fp32", "--ce-form", form]));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("report.json")).unwrap()).unwrap();
        assert_eq!(r["config"]["ce_form"], form);
        // The scale-free L2 form unless --preset paper (the reference's per-dataset choice).
        assert_eq!(r["config"]["l2_form"], "log");
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let (p, l) = (lines("probabilities"), lines("logits"));
    // Cross-entropy of 10-way softmax probabilities is bounded: between -ln(e / (e + 9)) = 1.46
    // (the label's probability 1) and -ln(1 / (e + 9)) = 2.46 (another class's probability 1).
    for line in &p {
        for k in ["generator_ce", "student_ce"] {
            let v = line[k].as_f64().unwrap();
            assert!((1.46..=2.47).contains(&v), "{k} {v}");
        }
    }
    assert_ne!(p[0]["generator_ce"], l[0]["generator_ce"]);
}

#[test]
fn generators_make_the_teachers_own_image_size_when_it_is_not_square_or_a_multiple_of_4() {
    // Global pooling lets these networks take any size, so images of the wrong size would run
    // through them unnoticed; the sample grids show the size the generators made.
    let dir = tempfile::tempdir().unwrap();
    let net = |name: &str, seed: &str| {
        let p = dir.path().join(name);
        let path = p.to_str().unwrap();
        let args = ["student", "--arch", "resnet8", "--classes", "4", "--input"];
        assert_success(&datafree(
            &[
                &args[..],
                &["3x30x45", "--seed", seed, "--out", path, "--json"],
            ]
            .concat(),
        ));
        p
    };
    let (teacher, s) = (net("teacher.onnx", "0"), net("student.onnx", "1"));
    let (teacher, s) = (teacher.to_str().unwrap(), s.to_str().unwrap());
    let grid = |d: &Path| {
        let png = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_str().unwrap().contains("samples-"))
            .expect("a sample grid");
        image::image_dimensions(png).unwrap()
    };
    // 8 latents x 4 classes, each image framed by 1 px and drawn 3x.
    let expected = (8 * (45 + 2) * 3, 4 * (30 + 2) * 3);
    let g = dir.path().join("gdfq");
    let budget = [
        "--epochs",
        "2",
        "--iters-per-epoch",
        "2",
        "--warmup-epochs",
        "1",
    ];
    let out = datafree(
        &[
            &["compress", teacher, "--method", "gdfq", "--bits", "w8a8"][..],
            &[
                "--preset",
                "tiny",
                "--verify-images",
                "16",
                "--json",
                "--out",
            ],
            &[g.to_str().unwrap()],
            &budget,
        ]
        .concat(),
    );
    assert_success(&out);
    assert_eq!(grid(&g), expected);
    let c = dir.path().join("cpsc");
    let budget = ["--bits", "fp32", "--epochs", "2", "--iters-per-epoch", "2"];
    assert_done(&cpsc_from(teacher, Path::new(s), &c, &budget));
    assert_eq!(grid(&c), expected);
}

/// `student`'s GlobalAveragePool -> Flatten -> Gemm head rebuilt as an all-convolutional one
/// (1x1 Conv classifying every position -> GlobalAveragePool -> Flatten), the same function;
/// with `scale`, the logits then pass a Mul the penultimate search does not walk through.
fn conv_head(student: &Path, out: &Path, scale: bool) {
    use datafree::onnx::builder::{node_proto, tensor_f32, write_model};
    let m = datafree::onnx::load_model(student).unwrap();
    let mut proto = m.proto.clone();
    let g = proto.graph.as_mut().unwrap();
    let at = |op: &str| g.node.iter().position(|n| n.op_type == op).unwrap();
    let (pool, gemm) = (at("GlobalAveragePool"), at("Gemm"));
    let features = g.node[pool].input[0].clone();
    let logits = g.node[gemm].output[0].clone();
    let init = |name: &str| {
        let t = g.initializer.iter().find(|t| t.name == name).unwrap();
        datafree::onnx::tensor::decode(t, None).unwrap().to_f32()
    };
    let (w, b) = (init(&g.node[gemm].input[1]), init(&g.node[gemm].input[2]));
    let (classes, c) = (b.len(), w.len() / b.len());
    g.node.truncate(pool);
    g.initializer
        .push(tensor_f32("head.w", &[classes, c, 1, 1], &w));
    g.initializer.push(tensor_f32("head.b", &[classes], &b));
    let last = if scale { "unscaled" } else { logits.as_str() };
    g.node.extend([
        node_proto(
            "Conv",
            "head",
            &[&features, "head.w", "head.b"],
            &["head"],
            vec![],
        ),
        node_proto(
            "GlobalAveragePool",
            "head_pool",
            &["head"],
            &["head_pool"],
            vec![],
        ),
        node_proto("Flatten", "head_flat", &["head_pool"], &[last], vec![]),
    ]);
    if scale {
        g.initializer.push(tensor_f32("two", &[], &[2.0]));
        g.node.push(node_proto(
            "Mul",
            "scale",
            &["unscaled", "two"],
            &[&logits],
            vec![],
        ));
    }
    write_model(out, &proto).unwrap();
}

#[test]
fn an_all_convolutional_head_gives_its_pooled_features_to_the_contrastive_loss() {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path(), "resnet8", 10);
    let conv = dir.path().join("conv-head.onnx");
    conv_head(&s, &conv, false);
    // The same function, and the features the classifier reads averaged over positions.
    let (a, b) = (
        datafree::onnx::load_model(&s).unwrap(),
        datafree::onnx::load_model(&conv).unwrap(),
    );
    let x =
        candle_core::Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &candle_core::Device::Cpu).unwrap();
    let run = |m| {
        datafree::lower::lower(m, &candle_core::Device::Cpu, candle_core::DType::F32)
            .unwrap()
            .forward_taps(&x)
            .unwrap()
    };
    let (fa, fb) = (run(&a), run(&b));
    let diff = (fa.logits - fb.logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "{diff}");
    let (pa, pb) = (fa.penultimate.unwrap(), fb.penultimate.unwrap());
    assert_eq!(pb.dims(), &[2, 64]);
    assert_eq!(pa.dims(), pb.dims());
    // It distils as a teacher with the contrastive loss on.
    let b = dir.path().join("b");
    assert_done(&cpsc_from(
        conv.to_str().unwrap(),
        &s,
        &b,
        &["--bits", "fp32"],
    ));
    // A head the search cannot walk through is refused up front, naming the file.
    let odd = dir.path().join("odd-head.onnx");
    conv_head(&s, &odd, true);
    let c = dir.path().join("c");
    let out = cpsc_from(odd.to_str().unwrap(), &s, &c, &["--bits", "fp32"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("teacher")
            && err.contains("odd-head.onnx")
            && err.contains("--contrastive-weight 0"),
        "{err}"
    );
    assert!(!c.exists());
}
