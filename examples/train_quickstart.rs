//! Trains the quick-start teacher (the `resnet_like` fixture: 4 conv+BN layers, one residual
//! block, 24k parameters) on the procedural shapes10 train split, and writes it with BN kept to
//! `onnx/quickstart.onnx`, plus its BN-folded twin. Deterministic: the same command re-creates the
//! committed files bit for bit on a machine of the project's kind.
//!
//!     cargo run --release --example train_quickstart [-- OUT_DIR]

#[path = "../tests/it/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use datafree::data::{Preprocess, synthetic};
use datafree::onnx::builder::write_model;
use datafree::train::classifier::{Recipe, train};
use fixtures::{BnVariant, QUICKSTART_SEED};

const MEAN: [f32; 3] = [0.5, 0.5, 0.5];
const STD: [f32; 3] = [0.25, 0.25, 0.25];

fn main() -> Result<()> {
    datafree::kernels::tune_process();
    let recipe = Recipe {
        steps: 600,
        batch: 64,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        bn_batches: 20,
    };
    let pre = Preprocess {
        mean: MEAN,
        std: STD,
        scale: 255.0,
    };
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx"),
    };
    std::fs::create_dir_all(&dir)?;
    let tmp_dir = tempfile::tempdir()?;
    let tmp = tmp_dir.path().join("init.onnx");
    write_model(
        &tmp,
        &fixtures::resnet_like(BnVariant::Kept, QUICKSTART_SEED),
    )?;
    let init = datafree::onnx::load_model(&tmp)?;
    let seed = synthetic::split_seed("train").expect("train split");
    let mut batches = |step: usize| -> Result<(Tensor, Vec<u32>)> {
        let mut px = Vec::with_capacity(recipe.batch * 3072);
        let mut labels = Vec::with_capacity(recipe.batch);
        for i in 0..recipe.batch {
            let (p, l) = synthetic::render(seed, (step * recipe.batch + i) as u64);
            px.extend(p);
            labels.push(l as u32);
        }
        let d = datafree::data::Dataset {
            source: String::new(),
            format: "synthetic",
            height: 32,
            width: 32,
            pixels: px,
            labels: vec![],
            class_names: vec![],
        };
        Ok((
            Tensor::from_vec(
                pre.batch(&d, 0..recipe.batch),
                (recipe.batch, 3, 32, 32),
                &Device::Cpu,
            )?,
            labels,
        ))
    };
    let pb = datafree::progress::progress(recipe.steps, "train");
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} steps, eta {eta}",
    )?);
    let t0 = std::time::Instant::now();
    let mut trained = train(&init, &Device::Cpu, &recipe, &mut batches, |s, l| {
        pb.set_position(s as u64 + 1);
        pb.set_message(format!("train, loss {l:.3}"));
    })?;
    pb.finish_and_clear();
    let meta = [
        ("datafree.preprocess.mean", "0.5,0.5,0.5".to_string()),
        ("datafree.preprocess.std", "0.25,0.25,0.25".to_string()),
        ("datafree.preprocess.scale", "255".to_string()),
        ("datafree.dataset", "synthetic:shapes10".to_string()),
        ("datafree.recipe", serde_json::to_string(&recipe)?),
    ];
    trained.metadata_props.extend(meta.iter().map(|(k, v)| {
        datafree::onnx::pb::StringStringEntryProto {
            key: k.to_string(),
            value: v.clone(),
        }
    }));
    let (folded, _) = datafree::export::fold_bn(&datafree::onnx::LoadedModel::from_proto(
        &dir.join("quickstart.onnx"),
        trained.clone(),
    ))?;
    for (name, m) in [
        ("quickstart.onnx", &trained),
        ("quickstart.bn-folded.onnx", &folded),
    ] {
        let p = dir.join(name);
        write_model(&p, m)?;
        let bytes = std::fs::read(&p)?;
        println!(
            "wrote {} ({} bytes, sha256 {})",
            p.display(),
            bytes.len(),
            datafree::onnx::load::sha256_hex(&bytes)
        );
    }
    println!(
        "trained {} steps of {} images in {:.0} s",
        recipe.steps,
        recipe.batch,
        t0.elapsed().as_secs_f64()
    );
    let test = synthetic::generate("test", 2000).expect("test split");
    let m = datafree::onnx::load_model(&dir.join("quickstart.onnx"))?;
    let r = datafree::verify::eval::evaluate(
        &m,
        &test,
        datafree::verify::engine::EngineKind::Ort,
        &pre,
        200,
        0,
    )?;
    println!(
        "top-1 on synthetic:shapes10:test:2000 (ONNX Runtime): {:.2}%",
        r.top1
    );
    Ok(())
}
