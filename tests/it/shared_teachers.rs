//! `inspect` on the real PyTorch-exported teachers in ../shared/teachers (skipped with a printed
//! reason when that folder is absent).

use datafree::onnx::bn::Verdict;
use datafree::onnx::load_model;
use datafree::teacher::inspect::{InspectReport, inspect};

fn report(name: &str) -> Option<InspectReport> {
    let p = crate::common::shared_teacher(name)?;
    Some(inspect(&load_model(&p).unwrap()))
}

fn check_kept(r: &InspectReport, bn: usize, classes: usize) {
    assert_eq!(r.batch_norm.bn_count, bn);
    assert_eq!(
        r.batch_norm.resolved_count,
        bn,
        "{:?}",
        r.batch_norm
            .layers
            .iter()
            .filter_map(|l| l.problem.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        r.batch_norm.verdict,
        Verdict::Complete,
        "{}",
        r.batch_norm.message
    );
    assert_eq!(r.classes, Some(classes));
    let res = r.input_resolution.as_ref().unwrap();
    assert_eq!((res.channels, res.height, res.width), (3, 32, 32));
    assert!(r.lowering.all_supported, "{:?}", r.lowering.unsupported);
    for l in &r.batch_norm.layers {
        let v = l.running_var.unwrap();
        assert!(v.min > 0.0 && v.max.is_finite(), "{}: {v:?}", l.name);
        assert_eq!(l.input_producer, "Conv", "{}", l.name);
    }
}

#[test]
fn cifar10_resnet20_has_19_complete_bn_layers() {
    let Some(r) = report("cifar10_resnet20.onnx") else {
        return;
    };
    check_kept(&r, 19, 10);
}

#[test]
fn cifar100_resnet20_resolves_all_22_bn_layers() {
    let Some(r) = report("cifar100_resnet20.onnx") else {
        return;
    };
    check_kept(&r, 22, 100);
    // Three shortcut BNs take their bias through an Identity node.
    let via_identity = r
        .batch_norm
        .layers
        .iter()
        .filter(|l| l.sources[1].starts_with("Identity"))
        .count();
    assert_eq!(via_identity, 3);
}

#[test]
fn folded_teachers_have_no_statistics() {
    for name in [
        "cifar10_resnet20.bn-folded.onnx",
        "cifar100_resnet20.bn-folded.onnx",
    ] {
        let Some(r) = report(name) else { return };
        assert_eq!(r.batch_norm.bn_count, 0, "{name}");
        assert_eq!(r.batch_norm.verdict, Verdict::None, "{name}");
        assert!(
            r.batch_norm
                .fix
                .as_ref()
                .unwrap()
                .contains("do_constant_folding=False")
        );
    }
}

/// GDFQ trains the teacher's own parametrization (conv weights, BN scale and shift): the shortcut
/// BNs whose shift comes through an Identity node train their initializer (a regression: GDFQ
/// refused this teacher, "... bias is not a trainable parameter of the student").
#[test]
fn gdfq_trains_cifar100_resnet20_whose_bn_shifts_pass_through_identity() {
    let Some(t) = crate::common::shared_teacher("cifar100_resnet20.onnx") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gdfq");
    let run = crate::common::datafree(&[
        "compress",
        t.to_str().unwrap(),
        "--method",
        "gdfq",
        "--bits",
        "w4a4",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--iters-per-epoch",
        "1",
        "--batch",
        "4",
        "--verify-images",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    crate::common::assert_success(&run);
    assert!(out.join("student.onnx").exists());
}
