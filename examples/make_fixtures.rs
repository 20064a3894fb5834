//! Writes the project's own ONNX models into `onnx/`: the quick-start teacher and a BN-folded twin.
//! Deterministic: re-running produces byte-identical files (a test checks the committed ones).
//!
//!     cargo run --release --example make_fixtures

use std::path::Path;

use datafree::onnx::builder::write_model;
use datafree::onnx::fixtures::{self, BnVariant, QUICKSTART_SEED};

fn main() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx");
    std::fs::create_dir_all(&dir)?;
    for (name, model) in [
        ("quickstart.onnx", fixtures::quickstart()),
        (
            "quickstart.bn-folded.onnx",
            fixtures::resnet_like(BnVariant::Folded, QUICKSTART_SEED),
        ),
    ] {
        let path = dir.join(name);
        write_model(&path, &model)?;
        let bytes = std::fs::read(&path)?;
        println!(
            "wrote {} ({} bytes, sha256 {})",
            path.display(),
            bytes.len(),
            datafree::onnx::load::sha256_hex(&bytes)
        );
    }
    Ok(())
}
