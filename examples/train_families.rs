//! Trains the architecture-family fixtures (`tests/it/families.rs`: Keras-style raw-pixel
//! ResNet, MobileNet-style, DenseNet-style, pre-activation ResNet, TensorFlow-style MobileNetV1
//! at 96 px with two classes) on the procedural shapes10 train split, each with its own input
//! preprocessing, and writes them with BN kept and NO preprocessing metadata to
//! `onnx/family-NAME.onnx`, so that `datafree` must infer each input domain from the BN
//! statistics. TensorFlow-style families are trained as their NCHW logits core, then written
//! with the NHWC input and final Softmax around it. Deterministic for a machine of the project's
//! kind.
//!
//!     cargo run --release --example train_families [-- OUT_DIR [NAME ...]]

#[path = "../tests/it/families.rs"]
mod families;

use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use datafree::data::{Preprocess, synthetic};
use datafree::onnx::builder::write_model;
use datafree::onnx::interface::{Interface, Layout, OutputKind};
use datafree::train::classifier::{Recipe, train};

fn main() -> Result<()> {
    datafree::kernels::tune_process();
    let mut args = std::env::args().skip(1);
    let dir = match args.next() {
        Some(d) => std::path::PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx"),
    };
    let only: Vec<String> = args.collect();
    std::fs::create_dir_all(&dir)?;
    let recipe = Recipe {
        steps: 600,
        batch: 64,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        bn_batches: 20,
    };
    for fam in families::FAMILIES {
        let name = fam.name;
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let side = fam.side;
        let test = synthetic::generate_task(fam.task, "test", 2000, side).expect("test split");
        let pre = Preprocess {
            mean: fam.mean,
            std: fam.std,
            scale: fam.scale,
        };
        let tmp_dir = tempfile::tempdir()?;
        let tmp = tmp_dir.path().join("init.onnx");
        write_model(&tmp, &families::build(name, 7))?;
        let init = datafree::onnx::load_model(&tmp)?;
        let seed = synthetic::split_seed("train").expect("train split");
        let mut batches = |step: usize| -> Result<(Tensor, Vec<u32>)> {
            let mut px = Vec::with_capacity(recipe.batch * 3 * side * side);
            let mut labels = Vec::with_capacity(recipe.batch);
            for i in 0..recipe.batch {
                let (p, l) = synthetic::render_sized(seed, (step * recipe.batch + i) as u64, side);
                px.extend(p);
                labels.push(synthetic::relabel(fam.task, l) as u32);
            }
            let d = datafree::data::Dataset {
                source: String::new(),
                format: "synthetic",
                height: side,
                width: side,
                pixels: px,
                labels: vec![],
                class_names: vec![],
            };
            Ok((
                Tensor::from_vec(
                    pre.batch(&d, 0..recipe.batch),
                    (recipe.batch, 3, side, side),
                    &Device::Cpu,
                )?,
                labels,
            ))
        };
        let t0 = std::time::Instant::now();
        let pb = datafree::progress::progress(recipe.steps, name);
        let mut trained = train(&init, &Device::Cpu, &recipe, &mut batches, |s, l| {
            pb.set_position(s as u64 + 1);
            pb.set_message(format!("{name}, loss {l:.3}"));
        })?;
        pb.finish_and_clear();
        if fam.tensorflow {
            let interface = Interface::around(&trained, Layout::Nhwc, OutputKind::Probabilities);
            trained = interface.wrap(trained);
        }
        trained
            .metadata_props
            .push(datafree::onnx::pb::StringStringEntryProto {
                key: "datafree.dataset".into(),
                value: format!("synthetic:{}", fam.task),
            });
        let p = dir.join(format!("family-{name}.onnx"));
        write_model(&p, &trained)?;
        let m = datafree::onnx::load_model(&p)?;
        let r = datafree::verify::eval::evaluate(
            &m,
            &test,
            datafree::verify::engine::EngineKind::Ort,
            &pre,
            200,
            0,
        )?;
        println!(
            "{name}: {} ({} bytes), trained in {:.0} s, top-1 on {} test:2000 (ORT) {:.2}%",
            p.display(),
            m.size_bytes,
            t0.elapsed().as_secs_f64(),
            fam.task,
            r.top1
        );
    }
    Ok(())
}
