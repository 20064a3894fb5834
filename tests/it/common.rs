//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use datafree::onnx::builder::write_model;
use datafree::onnx::pb::ModelProto;

/// The quick-start teacher committed under onnx/.
pub const QUICKSTART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/onnx/quickstart.onnx");

/// Runs the datafree binary built for these tests.
pub fn datafree(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_datafree"))
        .args(args)
        .output()
        .unwrap()
}

/// Asserts that a run succeeded, showing its stderr when it did not.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Prints past libtest's output capture (which also takes the process's stderr handle) through a
/// duplicate of file descriptor 2, so skip reasons show in CI logs. A duplicate shares the file
/// offset, so nothing written later overwrites the line when stderr is a file.
pub fn say(msg: &str) {
    use std::io::Write;
    use std::os::fd::AsFd;
    match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => {
            let _ = writeln!(std::fs::File::from(fd), "{msg}");
        }
        Err(_) => eprintln!("{msg}"),
    }
}

/// `../shared/teachers/NAME`, or None (with the reason printed) when the shared folder is absent.
pub fn shared_teacher(name: &str) -> Option<PathBuf> {
    let p = repo().join("../shared/teachers").join(name);
    if p.is_file() {
        Some(p)
    } else {
        say(&format!(
            "SKIP: {} is absent (the shared teachers are not on this machine)",
            p.display()
        ));
        None
    }
}

/// Writes a model into a fresh temp dir; returns (dir guard, path).
pub fn write_temp(model: &ModelProto, name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    write_model(&path, model).unwrap();
    (dir, path)
}
