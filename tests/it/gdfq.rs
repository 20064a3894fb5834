//! GDFQ on the project's own quick-start teacher with a tiny budget: the run is deterministic
//! for a seed, a crash after a checkpoint resumes to the same student bit for bit, a BN-folded
//! teacher is refused with a clear message; the fake quantizers equal the export's arithmetic.

use crate::common::{QUICKSTART, assert_success, datafree};
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use datafree::generator::{GdfqConfig, GdfqGenerator};
use datafree::quant::fake::{dequantized_weight, fake_quant_activation, fake_quant_weight};
use datafree::quant::{QParams, Scales, WeightScheme, quantize_weight};
use datafree::train::gdfq::Metrics;

fn gdfq(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "compress",
        QUICKSTART,
        "--bits",
        "w4a4",
        "--method",
        "gdfq",
        "--epochs",
        "3",
        "--iters-per-epoch",
        "4",
        "--batch",
        "8",
        "--warmup-epochs",
        "1",
        "--checkpoint-every",
        "3",
        "--grid-every",
        "6",
        "--verify-images",
        "16",
        "--force",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--seed") {
        args.extend(["--seed", "7"]);
    }
    datafree(&args)
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

fn student_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("student.onnx")).unwrap()
}

#[test]
fn same_seed_same_student_and_a_crash_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let run = gdfq(&a, &[]);
    assert_success(&run);
    assert!(gdfq(&b, &[]).status.success());
    assert_eq!(
        student_bytes(&a),
        student_bytes(&b),
        "same seed, same student"
    );
    assert!(a.join("samples-000006.png").exists() && a.join("samples-000012.png").exists());
    // The quick preset (the default) learns ranges, clips weights and trains the
    // class-conditional-BN generator.
    let cfg = &report(&a)["training"]["config"];
    assert_eq!(
        (
            cfg["range_lr"].as_f64(),
            cfg["weight_clip"].as_str(),
            cfg["generator"].as_str()
        ),
        (Some(1e-3), Some("output"), Some("gdfq-imagenet"))
    );

    // Crash after iteration 7 (last checkpoint: 6), then resume in place.
    let c = tmp.path().join("c");
    let crashed = gdfq(&c, &["--stop-after", "7"]);
    assert!(!crashed.status.success());
    assert!(!c.join("student.onnx").exists());
    // Resuming with other settings is refused, naming the setting and both values, and
    // leaves the checkpoint to resume from.
    let other = gdfq(
        &c,
        &["--resume", c.to_str().unwrap(), "--generator", "gdfq-cifar"],
    );
    assert_eq!(other.status.code(), Some(2));
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        err.contains(r#"generator: checkpoint "gdfq-imagenet", this run "gdfq-cifar""#),
        "{err}"
    );
    let resumed = gdfq(&c, &["--resume", c.to_str().unwrap()]);
    assert_success(&resumed);
    assert_eq!(
        student_bytes(&a),
        student_bytes(&c),
        "resumed run equals the uninterrupted one"
    );
    let iters: Vec<usize> = std::fs::read_to_string(c.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Metrics>(l).unwrap().iter)
        .collect();
    assert_eq!(
        iters,
        (0..12).collect::<Vec<_>>(),
        "one metrics line per iteration"
    );
    let r = report(&c);
    assert_eq!(r["training"]["resumed_from_iter"], 6);

    // A different seed trains a different student.
    let d = tmp.path().join("d");
    assert!(gdfq(&d, &["--seed", "8"]).status.success());
    assert_ne!(student_bytes(&a), student_bytes(&d));
}

#[test]
fn a_pipeline_file_runs_the_same_compress_as_the_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/gdfq-cifar.toml");
    let via_file = tmp.path().join("file");
    let sets = [
        "compress.epochs=2",
        "compress.iters_per_epoch=3",
        "compress.batch=8",
        "compress.warmup_epochs=1",
        "compress.seed=3",
        "compress.grid_every=0",
    ];
    let mut args = vec![
        "run",
        pipeline,
        "--teacher",
        QUICKSTART,
        "--out",
        via_file.to_str().unwrap(),
    ];
    for s in &sets {
        args.extend(["--set", s]);
    }
    args.extend(["--", "--verify-images", "16"]);
    let out = datafree(&args);
    assert_success(&out);
    // The reference settings of the file, given as flags.
    let via_flags = tmp.path().join("flags");
    let out = datafree(&[
        "compress",
        QUICKSTART,
        "--out",
        via_flags.to_str().unwrap(),
        "--method",
        "gdfq",
        "--bits",
        "w4a4",
        "--epochs",
        "2",
        "--iters-per-epoch",
        "3",
        "--batch",
        "8",
        "--warmup-epochs",
        "1",
        "--seed",
        "3",
        "--grid-every",
        "0",
        "--verify-images",
        "16",
        "--preset",
        "paper",
        "--lr-milestones",
        "100,200,300",
        "--generator-betas",
        "0.5,0.999",
    ]);
    assert_success(&out);
    assert_eq!(student_bytes(&via_file), student_bytes(&via_flags));
    let r = report(&via_file);
    assert_eq!(r["training"]["config"]["temperature"], 20.0);
    assert_eq!(r["training"]["config"]["batch"], 8);
    // The reference's choices, not the quick preset's.
    assert_eq!(r["training"]["config"]["student_ce_weight"], 1.0);
    assert_eq!(r["training"]["config"]["student_lr"], 1e-4);
    assert_eq!(r["training"]["config"]["range_source"], "ema");
    assert_eq!(r["training"]["config"]["range_lr"], 0.0);
    assert_eq!(r["training"]["config"]["weight_clip"], "none");
}

#[test]
fn feature_distillation_trains_a_different_student_and_logs_its_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, feat) = (tmp.path().join("plain"), tmp.path().join("feat"));
    assert!(gdfq(&plain, &[]).status.success());
    let run = gdfq(&feat, &["--feature-weight", "1"]);
    assert_success(&run);
    assert_ne!(student_bytes(&plain), student_bytes(&feat));
    let lines: Vec<Metrics> = std::fs::read_to_string(feat.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Warm-up (4 iterations) has no student loss; every student iteration has a feature loss.
    for m in &lines {
        match m.student_feature {
            Some(f) => assert!(m.iter >= 4 && f.is_finite() && f > 0.0, "{m:?}"),
            None => assert!(m.iter < 4, "{m:?}"),
        }
    }
    let r = report(&feat);
    assert_eq!(r["training"]["config"]["feature_weight"], 1.0);
}

#[test]
fn negative_loss_weights_and_non_positive_rates_are_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    for (arg, flag) in [
        ("--feature-weight=-1", "--feature-weight"),
        ("--student-ce-weight=-0.5", "--student-ce-weight"),
        ("--bns-weight=NaN", "--bns-weight"),
        ("--student-lr=0", "--student-lr"),
        ("--temperature=-20", "--temperature"),
    ] {
        let out = tmp.path().join(flag.trim_start_matches('-'));
        let run = gdfq(&out, &[arg]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{arg}: {err}");
        assert!(err.contains(flag), "{arg}: {err}");
        assert!(!out.exists(), "{arg}: nothing is written");
    }
}

#[test]
fn a_diverging_run_stops_with_a_message_and_keeps_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nan");
    let run = gdfq(&out, &["--student-lr", "1e30"]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("diverged") && err.contains("checkpoint"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("checkpoint/state.json")).unwrap()).unwrap();
    assert!(state["iter"].as_u64().unwrap() >= 3, "{state}");
    assert!(!out.join("student.onnx").exists());
}

#[test]
fn a_bn_folded_teacher_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let folded = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/onnx/quickstart.bn-folded.onnx"
    );
    let dir = tmp.path().join("x");
    let out = datafree(&[
        "compress",
        folded,
        "--method",
        "gdfq",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.exists(), "refused before the output folder is made");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BatchNormalization statistics")
            && err.contains("folded")
            && err.contains("quickstart.bn-folded.onnx"),
        "{err}"
    );
}

#[test]
fn fake_weight_quantization_is_the_exported_arithmetic_with_a_straight_through_gradient() {
    let v: Vec<f32> = (0..4 * 2 * 3 * 3)
        .map(|i| ((i * 37 % 19) as f32 - 9.0) / 7.0)
        .collect();
    let w = Var::from_vec(v.clone(), (4, 2, 3, 3), &Device::Cpu).unwrap();
    let fq = fake_quant_weight(w.as_tensor(), 0, 4, WeightScheme::Symmetric).unwrap();
    let q = quantize_weight(&v, 4, 4, WeightScheme::Symmetric);
    let want: Vec<f32> = q
        .values
        .iter()
        .enumerate()
        .map(|(i, &x)| x as f32 * q.scales[i / 18])
        .collect();
    assert_eq!(fq.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    let g = fq.sum_all().unwrap().backward().unwrap();
    let gw: Vec<f32> = g.get(&w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(gw.iter().all(|&x| x == 1.0));
    // A 2-D weight quantized per column (Gemm with output channels on axis 1).
    let m: Vec<f32> = vec![0.5, -2.0, 1.0, 0.25, 3.0, -0.75];
    let d = dequantized_weight(&m, &[3, 2], 1, 4, WeightScheme::Symmetric);
    let col0 = [0.5f32, 1.0, 3.0];
    let s0 = 3.0f32 / 7.0;
    for (k, &x) in col0.iter().enumerate() {
        assert_eq!(d[k * 2], (x / s0).round_ties_even().clamp(-7.0, 7.0) * s0);
    }
}

#[test]
fn fake_activation_quantization_rounds_half_to_even_and_saturates() {
    let q = QParams::activation(0.0, 15.0, 4, Scales::Free);
    let x = Var::from_vec(vec![0.5f32, 1.5, 2.5, -3.0, 14.5, 40.0], 6, &Device::Cpu).unwrap();
    let y = fake_quant_activation(x.as_tensor(), q).unwrap();
    assert_eq!(
        y.to_vec1::<f32>().unwrap(),
        vec![0.0, 2.0, 2.0, 0.0, 14.0, 15.0]
    );
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(&x).unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 6]);
}

#[test]
fn the_generator_makes_the_teachers_image_size_even_when_not_square_or_a_multiple_of_4() {
    use datafree::generator::Generator;
    let cfg = GdfqConfig::imagenet(10, 1, (30, 45));
    let square_macs =
        GdfqGenerator::new(GdfqConfig::imagenet(10, 1, (32, 32)), &Device::Cpu, 1).unwrap();
    let g = GdfqGenerator::new(cfg.clone(), &Device::Cpu, 1).unwrap();
    let z = Tensor::randn(0f32, 1.0, (6, 100), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..6u32).collect(), 6, &Device::Cpu).unwrap();
    let x = g.forward(&z, &y).unwrap();
    assert_eq!(x.dims(), &[6, 1, 30, 45]);
    assert_eq!(g.image(), (1, 30, 45));
    // The last BN normalises the cropped image, not the 32x48 one it was cut from.
    let (m, _) = datafree::kernels::channel_moments(&x).unwrap();
    assert!(m.to_vec1::<f32>().unwrap()[0].abs() < 1e-4);
    // The trunk works at 8x12 (a quarter, rounded up): 1.5 times the 8x8 of a 32x32 image.
    let (a, b) = (g.macs_per_image(), square_macs.macs_per_image());
    assert!(a > b && a < 2 * b, "{a} vs {b}");
    // Checkpoints written before the image width existed describe square images.
    let mut old = serde_json::to_value(GdfqConfig::cifar(10, 3, (32, 32))).unwrap();
    old.as_object_mut().unwrap().remove("image_width");
    let old: GdfqConfig = serde_json::from_value(old).unwrap();
    assert_eq!(old.hw(), (32, 32));
    assert_eq!(serde_json::to_value(&cfg).unwrap()["image_width"], 45);
}

#[test]
fn the_generator_emits_normalised_images_and_is_seeded() {
    let g = GdfqGenerator::new(GdfqConfig::cifar(10, 3, (32, 32)), &Device::Cpu, 1).unwrap();
    let z = Tensor::randn(0f32, 1.0, (16, 100), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..16u32).map(|i| i % 10).collect(), 16, &Device::Cpu).unwrap();
    let x = g.forward(&z, &y).unwrap();
    assert_eq!(x.dims(), &[16, 3, 32, 32]);
    // The last layer is BN without affine: per-channel batch mean 0 and variance 1 (slightly
    // less: var / (var + eps) with the small variance of tanh outputs).
    let (m, v) = datafree::kernels::channel_moments(&x).unwrap();
    for (m, v) in m
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .zip(v.to_vec1::<f32>().unwrap())
    {
        assert!(m.abs() < 1e-4 && (v - 1.0).abs() < 1e-2, "mean {m} var {v}");
    }
    let grads = x.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let missing = g
        .params
        .vars()
        .iter()
        .filter(|v| grads.get(v).is_none())
        .count();
    assert_eq!(missing, 0, "every generator parameter gets a gradient");
    let again = GdfqGenerator::new(GdfqConfig::cifar(10, 3, (32, 32)), &Device::Cpu, 1).unwrap();
    assert_eq!(
        again
            .forward(&z, &y)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn the_generator_flag_picks_the_generator() {
    use datafree::train::gdfq::{Config, GeneratorFamily, Preset, build_generator};
    // The reference's generator in the paper preset, class-conditional BN in the others.
    assert_eq!(
        Config::preset(Preset::Quick, 0).generator,
        GeneratorFamily::GdfqImagenet
    );
    assert_eq!(
        Config::preset(Preset::Tiny, 0).generator,
        GeneratorFamily::GdfqImagenet
    );
    let mut cfg = Config::preset(Preset::Paper, 0);
    let names = |cfg: &Config| -> Vec<String> {
        build_generator(cfg, 10, (3, 32, 32), &Device::Cpu)
            .unwrap()
            .params()
            .named()
            .map(|(n, _)| n.clone())
            .collect()
    };
    let cifar = names(&cfg);
    assert!(cifar.contains(&"label_emb".to_string()));
    cfg.generator = GeneratorFamily::GdfqImagenet;
    let imagenet = names(&cfg);
    assert!(!imagenet.contains(&"label_emb".to_string()));
    assert!(imagenet.contains(&"bn_out.weight".to_string()));
    cfg.generator = GeneratorFamily::Autorecon;
    let err = build_generator(&cfg, 10, (3, 32, 32), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("genotype"), "{err}");
}

#[test]
fn learned_ranges_move_the_exported_grids_and_resume_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, a, c) = (
        tmp.path().join("plain"),
        tmp.path().join("a"),
        tmp.path().join("c"),
    );
    assert!(gdfq(&plain, &["--range-lr", "0"]).status.success());
    let learn = ["--range-lr", "0.05"];
    let run = gdfq(&a, &learn);
    assert_success(&run);
    let (rp, ra) = (report(&plain), report(&a));
    assert_eq!(ra["training"]["config"]["range_lr"], 0.05);
    // Same starting ranges, 8 student iterations of learning: some grid moved, and the
    // exported student is still exactly what our simulation computes.
    let acts = |r: &serde_json::Value| r["activations"].as_array().unwrap().clone();
    let moved = acts(&rp)
        .iter()
        .zip(acts(&ra))
        .filter(|(p, l)| p["range"] != l["range"])
        .count();
    assert!(moved > 0, "no activation range moved");
    // Every range learns but the network input's, which is its domain's (known exactly).
    for act in acts(&ra) {
        let source = act["source"].as_str().unwrap();
        if act["role"] == "network_input" {
            assert!(
                source.contains("input domain") && !source.contains("learned"),
                "{act}"
            );
        } else {
            assert!(source.contains("learned"), "{act}");
        }
    }
    assert_eq!(
        ra["verification_synthetic"]["simulation"]["Ok"]["max_abs_logit_diff"],
        0.0
    );
    // A crash after iteration 7 (checkpoint 6, during student training) resumes to the same
    // student: learned ranges and their optimiser are part of the checkpoint.
    let mut crash = learn.to_vec();
    crash.extend(["--stop-after", "7"]);
    assert!(!gdfq(&c, &crash).status.success());
    assert!(c.join("checkpoint/ranges.safetensors").exists());
    let mut resume = learn.to_vec();
    resume.extend(["--resume", c.to_str().unwrap()]);
    let resumed = gdfq(&c, &resume);
    assert_success(&resumed);
    assert_eq!(student_bytes(&a), student_bytes(&c));
}

#[test]
fn weight_clipping_changes_the_student_and_keeps_it_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let ptq = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "compress",
            QUICKSTART,
            "--bits",
            "w4a4",
            "--verify-images",
            "16",
            "--force",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        datafree(&args)
    };
    let (plain, clipped) = (tmp.path().join("plain"), tmp.path().join("clipped"));
    assert!(ptq(&plain, &[]).status.success());
    let run = ptq(&clipped, &["--weight-clip", "mse"]);
    assert_success(&run);
    assert_ne!(student_bytes(&plain), student_bytes(&clipped));
    let r = report(&clipped);
    assert_eq!(r["weight_clip"], "mse");
    assert_eq!(
        r["verification_synthetic"]["simulation"]["Ok"]["max_abs_logit_diff"],
        0.0
    );

    // The output-error clip: another student, exact as well.
    let by_output = tmp.path().join("output");
    assert_success(&ptq(&by_output, &["--weight-clip", "output"]));
    assert_ne!(student_bytes(&by_output), student_bytes(&clipped));
    assert_ne!(student_bytes(&by_output), student_bytes(&plain));
    let r = report(&by_output);
    assert_eq!(r["weight_clip"], "output");
    assert_eq!(
        r["verification_synthetic"]["simulation"]["Ok"]["max_abs_logit_diff"],
        0.0
    );

    // GDFQ keeps the clip while it trains.
    let (g_plain, g_clipped) = (tmp.path().join("g-plain"), tmp.path().join("g-clipped"));
    assert!(gdfq(&g_plain, &["--weight-clip", "none"]).status.success());
    let run = gdfq(&g_clipped, &["--weight-clip", "mse"]);
    assert_success(&run);
    assert_ne!(student_bytes(&g_plain), student_bytes(&g_clipped));
    assert_eq!(
        report(&g_clipped)["training"]["config"]["weight_clip"],
        "mse"
    );

    // Clipping is symmetric: asymmetric weights with it are refused before anything is written.
    let bad = tmp.path().join("bad");
    let run = ptq(
        &bad,
        &["--weight-clip", "mse", "--weight-scheme", "asymmetric"],
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("--weight-clip"), "{err}");
    assert!(!bad.exists());
}

#[test]
fn relative_bns_ignores_a_layers_arbitrary_scale_and_auto_picks_it_for_pixel_inputs() {
    use datafree::data::Preprocess;
    use datafree::lower::program::BnTap;
    use datafree::onnx::bn::BnStats;
    use datafree::teacher::InputDomain;
    use datafree::train::losses::{BnsUnits, bns, bns_relative};
    // One BN input (2 channels), and the same layer with its input 100 times larger (what a
    // raw-pixel model's first conv gives): the relative loss is the same, the plain one is not.
    let x = Tensor::new(&[1.0f32, 2.0, 4.0, 0.5, -1.0, 3.0, 0.0, 2.5], &Device::Cpu)
        .unwrap()
        .reshape((2, 2, 2, 1))
        .unwrap();
    let tap = |a: f32| BnTap {
        name: "bn".into(),
        node_index: 0,
        slot: 0,
        stats: BnStats {
            scale: vec![1.0; 2],
            bias: vec![0.0; 2],
            running_mean: vec![0.5 * a, 1.0 * a],
            running_var: vec![2.0 * a * a, 3.0 * a * a],
        },
    };
    let value = |t: Tensor| t.to_scalar::<f32>().unwrap();
    let big = (&x * 100.0).unwrap();
    let rel = value(bns_relative(std::slice::from_ref(&x), &[tap(1.0)]).unwrap());
    let rel_big = value(bns_relative(std::slice::from_ref(&big), &[tap(100.0)]).unwrap());
    assert!(
        rel > 0.0 && (rel - rel_big).abs() <= 1e-4 * rel,
        "{rel} vs {rel_big}"
    );
    let plain = value(bns(std::slice::from_ref(&x), &[tap(1.0)]).unwrap());
    let plain_big = value(bns(&[big], &[tap(100.0)]).unwrap());
    assert!(plain_big > 1000.0 * plain, "{plain} vs {plain_big}");
    // Auto: relative for pixel-unit inputs only; an explicit choice stays.
    let pixels = InputDomain::given(Preprocess {
        mean: [0.0; 3],
        std: [1.0; 3],
        scale: 1.0,
    });
    let standardized = InputDomain::given(Preprocess::default());
    assert_eq!(BnsUnits::Auto.resolve(&pixels), BnsUnits::Relative);
    assert_eq!(BnsUnits::Auto.resolve(&standardized), BnsUnits::Plain);
    assert_eq!(BnsUnits::Plain.resolve(&pixels), BnsUnits::Plain);
}
