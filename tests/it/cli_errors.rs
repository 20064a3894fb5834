//! Bad input to the binary: one line on stderr naming the file and the problem, exit code 2, no
//! panic or backtrace, for every way a model file can be wrong.

use std::path::Path;
use std::process::Command;

use crate::fixtures;
use datafree::onnx::builder::write_model;
use datafree::onnx::pb::{NodeProto, StringStringEntryProto, tensor_proto::DataLocation};
use prost::Message;

fn inspect(path: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_datafree"))
        .arg("inspect")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Asserts the one-line, exit-2 failure and that the line names the file and contains `what`.
fn assert_bad(path: &Path, what: &str) {
    let (code, stdout, stderr) = inspect(path);
    assert_eq!(code, 2, "stderr: {stderr}");
    assert!(stdout.is_empty(), "nothing on stdout on failure: {stdout}");
    assert_eq!(stderr.lines().count(), 1, "exactly one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(&path.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(stderr.contains(what), "expected '{what}' in: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_bad(&dir.path().join("nope.onnx"), "cannot read file");
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_bad(&write(dir.path(), "empty.onnx", b""), "file is empty");
}

#[test]
fn random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // Deterministic pseudo-random bytes (xorshift).
    let mut x = 0x2545F4914F6CDD1Du64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert_bad(
        &write(dir.path(), "random.onnx", &bytes),
        "not an ONNX model",
    );
}

#[test]
fn truncated_protobuf() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fixtures::quickstart().encode_to_vec();
    assert_bad(
        &write(dir.path(), "trunc.onnx", &bytes[..bytes.len() / 2]),
        "protobuf decoding failed",
    );
}

#[test]
fn valid_protobuf_that_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProto {
        name: "n".into(),
        op_type: "Relu".into(),
        ..Default::default()
    };
    assert_bad(
        &write(dir.path(), "node.onnx", &node.encode_to_vec()),
        "not an ONNX model",
    );
}

#[test]
fn missing_external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = fixtures::quickstart();
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    let raw = std::mem::take(&mut t.raw_data);
    let len = raw.len();
    t.data_location = Some(DataLocation::External as i32);
    let kv = |k: &str, v: &str| StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    };
    t.external_data = vec![
        kv("location", "weights.bin"),
        kv("length", &len.to_string()),
    ];
    let path = dir.path().join("ext.onnx");
    write_model(&path, &m).unwrap();
    assert_bad(&path, "weights.bin");
    // With the file present the same model inspects fine.
    std::fs::write(dir.path().join("weights.bin"), raw).unwrap();
    let (code, stdout, stderr) = inspect(&path);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("BN statistics: complete"), "{stdout}");
}

#[test]
fn unsupported_opset() {
    let dir = tempfile::tempdir().unwrap();
    for v in [3, 99] {
        let mut m = fixtures::quickstart();
        m.opset_import[0].version = v;
        let path = dir.path().join(format!("opset{v}.onnx"));
        write_model(&path, &m).unwrap();
        assert_bad(&path, &format!("opset {v} is outside the supported range"));
    }
}

#[test]
fn usage_errors_exit_2_and_help_explains() {
    let bin = env!("CARGO_BIN_EXE_datafree");
    let out = Command::new(bin).arg("inspect").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = Command::new(bin).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success());
    assert!(
        text.contains("inspect") && text.contains("Exit codes"),
        "{text}"
    );
}

#[test]
fn json_output_is_one_parseable_document() {
    let out = Command::new(env!("CARGO_BIN_EXE_datafree"))
        .args(["inspect", "--json"])
        .arg(std::path::PathBuf::from(crate::common::QUICKSTART))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["batch_norm"]["verdict"], "complete");
    assert_eq!(v["classes"], 10);
}
