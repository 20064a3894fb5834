//! `inspect` on models the tests build: BN statistics resolved through every route exporters use,
//! and the verdict for kept, folded, partially folded, pre-activation and unresolvable BN.

use crate::fixtures::{self, BnVariant, QUICKSTART_SEED};
use datafree::onnx::bn::Verdict;
use datafree::onnx::load_model;
use datafree::onnx::pb::ModelProto;
use datafree::teacher::inspect::{DimDesc, InspectReport, inspect};

fn report(model: &ModelProto) -> InspectReport {
    let (_dir, path) = crate::common::write_temp(model, "m.onnx");
    inspect(&load_model(&path).unwrap())
}

#[test]
fn quickstart_is_complete_with_exact_statistics() {
    let r = report(&fixtures::quickstart());
    assert_eq!(
        r.batch_norm.verdict,
        Verdict::Complete,
        "{}",
        r.batch_norm.message
    );
    assert_eq!(r.batch_norm.bn_count, 4);
    assert!(r.batch_norm.fix.is_none());
    assert_eq!(r.classes, Some(10));
    let res = r.input_resolution.as_ref().unwrap();
    assert_eq!(
        (res.channels, res.height, res.width, res.layout.as_str()),
        (3, 32, 32, "NCHW")
    );
    assert_eq!(
        r.inputs[0].shape.as_ref().unwrap()[0],
        DimDesc::Symbolic("N".into())
    );
    assert_eq!(r.op_histogram["Conv"], 4);
    assert!(r.lowering.all_supported);
    // conv 3*16*9 + 16*32*9 + 2*32*32*9, fc 32*10+10, BN 4 params x (16+32+32+32).
    assert_eq!(
        r.parameters.count,
        432 + 4608 + 2 * 9216 + 330 + 4 * (16 + 32 + 32 + 32)
    );
    assert_eq!(r.parameters.bytes, 4 * r.parameters.count);
    let bn2 = &r.batch_norm.layers[1];
    assert_eq!(
        (
            bn2.name.as_str(),
            bn2.input.as_str(),
            bn2.input_producer.as_str()
        ),
        ("bn2", "conv2_out", "Conv")
    );
    assert_eq!(bn2.channels, Some(32));
    assert!((bn2.epsilon - 1e-5).abs() < 1e-12);
    // Running variances were drawn from U(0.5, 1.5).
    let v = bn2.running_var.unwrap();
    assert!(v.min >= 0.5 && v.max <= 1.5 && v.min < v.mean && v.mean < v.max);
    let stats = bn2.stats.as_ref().unwrap();
    assert_eq!(stats.running_var.len(), 32);
    assert_eq!(
        v.max,
        stats.running_var.iter().cloned().fold(f32::MIN, f32::max) as f64
    );
}

#[test]
fn folded_model_has_no_statistics_and_says_how_to_fix() {
    let r = report(&fixtures::resnet_like(BnVariant::Folded, QUICKSTART_SEED));
    assert_eq!(r.batch_norm.verdict, Verdict::None);
    assert_eq!(r.batch_norm.bn_count, 0);
    assert!(
        r.batch_norm.message.contains("4 Conv layers look folded"),
        "{}",
        r.batch_norm.message
    );
    assert!(
        r.batch_norm
            .fix
            .as_ref()
            .unwrap()
            .contains("do_constant_folding=False")
    );
}

#[test]
fn partially_folded_model_names_the_conv_without_bn() {
    let r = report(&fixtures::resnet_like(
        BnVariant::PartiallyFolded,
        QUICKSTART_SEED,
    ));
    assert_eq!(r.batch_norm.verdict, Verdict::Partial);
    assert_eq!(r.batch_norm.bn_count, 3);
    assert_eq!(r.batch_norm.convs_without_bn, vec!["conv3".to_string()]);
    assert!(r.batch_norm.fix.is_some());
}

#[test]
fn constant_and_identity_routes_resolve_to_the_same_statistics() {
    let kept = report(&fixtures::quickstart());
    let routed = report(&fixtures::resnet_like(
        BnVariant::ConstantParams,
        QUICKSTART_SEED,
    ));
    assert_eq!(
        routed.batch_norm.verdict,
        Verdict::Complete,
        "{}",
        routed.batch_norm.message
    );
    assert_eq!(routed.parameters.constant_nodes, 4);
    for (a, b) in kept.batch_norm.layers.iter().zip(&routed.batch_norm.layers) {
        assert_eq!(
            a.stats, b.stats,
            "BN {} differs when routed through Constant/Identity",
            a.name
        );
    }
    let bn1 = &routed.batch_norm.layers[0];
    assert_eq!(
        bn1.sources[0],
        "Identity 'bn1_id0b' <- Identity 'bn1_id0a' <- Constant 'bn1_const0'"
    );
    assert_eq!(bn1.sources[2], "Constant 'bn1_const2'");
    assert_eq!(
        routed.batch_norm.layers[3].sources[1],
        "Identity 'bn4_bias_identity' <- initializer 'bn4.bias'"
    );
}

#[test]
fn statistics_from_a_graph_input_are_unresolved() {
    let r = report(&fixtures::resnet_like(
        BnVariant::ParamFromInput,
        QUICKSTART_SEED,
    ));
    assert_eq!(r.batch_norm.verdict, Verdict::Partial);
    assert_eq!(r.batch_norm.resolved_count, 3);
    let bn2 = &r.batch_norm.layers[1];
    assert!(!bn2.resolved);
    assert!(
        bn2.problem.as_ref().unwrap().contains("graph input"),
        "{:?}",
        bn2.problem
    );
    // The extra graph input is reported as an input.
    assert_eq!(r.inputs.len(), 2);
}

#[test]
fn preactivation_net_is_complete() {
    let r = report(&fixtures::preactivation(7));
    assert_eq!(
        r.batch_norm.verdict,
        Verdict::Complete,
        "{}",
        r.batch_norm.message
    );
    let producers: Vec<&str> = r
        .batch_norm
        .layers
        .iter()
        .map(|l| l.input_producer.as_str())
        .collect();
    assert_eq!(producers, ["Conv", "Conv", "Add"]);
}

#[test]
fn unsupported_ops_are_listed_with_their_nodes() {
    let mut m = fixtures::quickstart();
    let g = m.graph.as_mut().unwrap();
    g.node[1].op_type = "LpNormalization".into();
    g.node[2].domain = "com.example".into();
    let r = report(&m);
    assert!(!r.lowering.all_supported);
    let ops: Vec<(&str, usize)> = r
        .lowering
        .unsupported
        .iter()
        .map(|u| (u.op.as_str(), u.count))
        .collect();
    assert_eq!(ops, [("LpNormalization", 1), ("com.example::Relu", 1)]);
    assert_eq!(r.lowering.unsupported[0].nodes, ["bn1"]);
}

#[test]
fn json_has_the_documented_top_level_fields() {
    let r = report(&fixtures::quickstart());
    let v = serde_json::to_value(&r).unwrap();
    for k in [
        "schema_version",
        "file",
        "size_bytes",
        "sha256",
        "ir_version",
        "opset_imports",
        "producer_name",
        "producer_version",
        "inputs",
        "outputs",
        "node_count",
        "op_histogram",
        "parameters",
        "classes",
        "input_resolution",
        "batch_norm",
        "lowering",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!(["N", 3, 32, 32]));
    assert_eq!(v["batch_norm"]["verdict"], "complete");
    assert!(
        v["batch_norm"]["layers"][0].get("stats").is_none(),
        "full vectors stay out of JSON"
    );
}
