//! AutoReCon: the supernet with a one-hot architecture is exactly the derived generator (same
//! weights), the derivation rule keeps an input for every node, bad genotypes are refused with
//! the edge named, and `datafree search` / `compress --method autorecon` on the quick-start
//! teacher are deterministic, resume bit for bit after a crash, and hand back a student.

use crate::common::{QUICKSTART, datafree};
use std::path::Path;

use candle_core::{D, Device, Tensor, Var};
use candle_nn::ops::softmax;
use datafree::generator::autorecon::{
    AutoReconConfig, AutoReconGenerator, CELLS, EdgeKind, Mix, Op, cell_edges,
};
use datafree::generator::{Generator, Genotype};

/// Pseudo-random architecture weights (deterministic, no RNG crate needed).
fn probs(seed: u32) -> Vec<Vec<Vec<f32>>> {
    let mut x = seed.wrapping_mul(2654435761).max(1);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x % 1000) as f32 / 1000.0
    };
    (0..CELLS)
        .map(|k| {
            cell_edges(k)
                .iter()
                .map(|d| d.kind.candidates().iter().map(|_| next()).collect())
                .collect()
        })
        .collect()
}

#[test]
fn supernet_with_a_one_hot_architecture_is_the_derived_generator() {
    let cfg = AutoReconConfig {
        latent: 12,
        classes: 3,
        channels: 3,
        size: 16,
        width: 6,
    };
    let dev = Device::Cpu;
    let supernet = AutoReconGenerator::supernet(cfg.clone(), &dev, 5).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("supernet.safetensors");
    supernet.params.save(&weights).unwrap();
    let z = Tensor::from_vec(
        (0..4 * 12)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect(),
        (4, 12),
        &dev,
    )
    .unwrap();
    let y = Tensor::new(&[0u32, 2, 1, 2], &dev).unwrap();
    let cands = supernet.candidates();
    for seed in [1, 2, 3] {
        let g = Genotype::derive(6, &probs(seed)).unwrap();
        let ops = g.ops().unwrap();
        let mut derived = AutoReconGenerator::derived(&g, (12, 3, 3, 16), &dev, 9).unwrap();
        derived.params_mut().load(&weights).unwrap();
        assert!(derived.params.count() < supernet.params.count());
        let want = derived.forward(&z, &y).unwrap();
        let index = |k: usize, e: usize| cands[k][e].iter().position(|&o| o == ops[k][e]).unwrap();
        let one = supernet
            .forward_mixed(&z, &y, &|k, e| Mix::One(index(k, e)))
            .unwrap();
        let weighted = supernet
            .forward_mixed(&z, &y, &|k, e| {
                let mut w = vec![0f32; cands[k][e].len()];
                w[index(k, e)] = 1.0;
                Mix::Weights(Tensor::new(w.as_slice(), &Device::Cpu).unwrap())
            })
            .unwrap();
        for (name, got) in [("one", one), ("one-hot weights", weighted)] {
            let d = (&got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "genotype {seed}, {name}: max difference {d}");
        }
        assert_eq!(want.dims(), &[4, 3, 16, 16]);
    }
    // A mixed forward differs from every single architecture (the weights matter).
    let uniform = supernet
        .forward_mixed(&z, &y, &|k, e| {
            let n = cands[k][e].len();
            Mix::Weights(Tensor::new(vec![1.0 / n as f32; n].as_slice(), &Device::Cpu).unwrap())
        })
        .unwrap();
    assert!(
        uniform
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    );
}

#[test]
fn every_architecture_weight_reaches_the_images() {
    // Each edge's output must flow into the image: a gradient to every edge's weights (an edge
    // added to a node after the node was read would get none).
    let cfg = AutoReconConfig {
        latent: 12,
        classes: 3,
        channels: 3,
        size: 16,
        width: 6,
    };
    let dev = Device::Cpu;
    let net = AutoReconGenerator::supernet(cfg, &dev, 5).unwrap();
    let alpha: Vec<Vec<Var>> = net
        .candidates()
        .iter()
        .map(|c| {
            c.iter()
                .map(|o| {
                    let v: Vec<f32> = (0..o.len()).map(|i| i as f32 * 0.01).collect();
                    Var::from_tensor(&Tensor::from_vec(v, o.len(), &dev).unwrap()).unwrap()
                })
                .collect()
        })
        .collect();
    let z = Tensor::from_vec(
        (0..8 * 12)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect(),
        (8, 12),
        &dev,
    )
    .unwrap();
    let y = Tensor::new(&[0u32, 2, 1, 2, 0, 1, 1, 0], &dev).unwrap();
    let img = net
        .forward_mixed(&z, &y, &|k, e| {
            Mix::Weights(softmax(alpha[k][e].as_tensor(), D::Minus1).unwrap())
        })
        .unwrap();
    let target: Vec<f32> = (0..img.elem_count())
        .map(|i| ((i * 7919 % 13) as f32 - 6.0) / 6.0)
        .collect();
    let target = Tensor::from_vec(target, img.dims(), &dev).unwrap();
    let loss = (img - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (k, cell) in alpha.iter().enumerate() {
        for (d, a) in cell_edges(k).iter().zip(cell) {
            let g = grads
                .get(a.as_tensor())
                .unwrap_or_else(|| panic!("cell {k} edge {}: no gradient", d.name()));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 1e-7, "cell {k} edge {}: gradient {n}", d.name());
        }
    }
}

#[test]
fn derivation_keeps_an_input_for_every_node() {
    // `none` wins on every normal and cross edge: nodes 2 and 3 must still get their
    // strongest other op.
    let mut p = probs(4);
    for (k, cell) in p.iter_mut().enumerate() {
        for (e, d) in cell_edges(k).iter().enumerate() {
            if d.kind != EdgeKind::Up {
                cell[e][0] = 5.0;
            }
        }
    }
    // In cell 1 make conv5x5 on n1->n2 the strongest non-none op into node 2.
    let e = cell_edges(0)
        .iter()
        .position(|d| d.name() == "n1->n2")
        .unwrap();
    p[0][e][4] = 2.0;
    let g = Genotype::derive(8, &p).unwrap();
    let ops = g.ops().unwrap();
    for (k, cell) in ops.iter().enumerate() {
        let defs = cell_edges(k);
        for node in [2, 3] {
            let kept: Vec<Op> = defs
                .iter()
                .zip(cell)
                .filter(|(d, o)| d.to == node && **o != Op::None)
                .map(|(_, o)| *o)
                .collect();
            assert_eq!(kept.len(), 1, "cell {k} node {node}: {kept:?}");
        }
    }
    assert_eq!(ops[0][e], Op::Conv5x5);
    // Round trip through JSON.
    let text = serde_json::to_string(&g).unwrap();
    assert_eq!(serde_json::from_str::<Genotype>(&text).unwrap(), g);
}

#[test]
fn bad_genotypes_are_refused_naming_the_edge() {
    let g = Genotype::derive(8, &probs(7)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let check = |g: &Genotype, want: &str| {
        let p = tmp.path().join("g.json");
        std::fs::write(&p, serde_json::to_string(g).unwrap()).unwrap();
        let err = format!("{:#}", Genotype::load(&p).unwrap_err());
        assert!(err.contains("g.json") && err.contains(want), "{err}");
    };
    let mut bad = g.clone();
    bad.cells[1][0].op = Op::Conv3x3; // an up edge
    check(&bad, "in->n0");
    let mut bad = g.clone();
    bad.cells[2][3].edge = "n0->n1".into();
    check(&bad, "n0->n1");
    let mut bad = g.clone();
    for c in bad.cells[0].iter_mut().filter(|c| c.edge.ends_with("->n3")) {
        c.op = Op::None;
    }
    check(&bad, "node n3 has no input");
    let mut bad = g;
    bad.cells.pop();
    check(&bad, "2 cells");
    let p = tmp.path().join("junk.json");
    std::fs::write(&p, "{").unwrap();
    assert!(format!("{:#}", Genotype::load(&p).unwrap_err()).contains("not a genotype JSON"));
}

fn search(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "search",
        QUICKSTART,
        "--out",
        out.to_str().unwrap(),
        "--force",
        "--search-epochs",
        "2",
        "--search-iters-per-epoch",
        "4",
        "--search-batch",
        "4",
        "--width",
        "4",
        "--search-checkpoint-every",
        "3",
        "--log-every",
        "1",
        "--seed",
        "3",
        "--arch-lr",
        "0.05",
    ];
    args.extend_from_slice(extra);
    datafree(&args)
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn search_is_deterministic_resumes_bit_for_bit_and_feeds_compress() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    ok(&search(&a, &[]));
    for f in [
        "genotype.json",
        "genotype.svg",
        "alpha.svg",
        "alpha.jsonl",
        "search.json",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    let svg = std::fs::read_to_string(a.join("genotype.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("cell 3"));
    let log = std::fs::read_to_string(a.join("alpha.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 8);
    // alpha moved from its near-uniform start.
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let p0 = last["probs"][0][2].as_array().unwrap();
    let spread = p0.iter().map(|v| v.as_f64().unwrap()).fold(0f64, f64::max)
        - p0.iter().map(|v| v.as_f64().unwrap()).fold(1f64, f64::min);
    assert!(spread > 0.01, "alpha did not move: {p0:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("search.json")).unwrap()).unwrap();
    assert!(
        report["derived_params"].as_u64().unwrap() < report["supernet_params"].as_u64().unwrap()
    );
    assert_eq!(report["epoch_seconds"].as_array().unwrap().len(), 2);

    ok(&search(&b, &[]));
    let same = |f: &str, x: &Path, y: &Path| {
        assert_eq!(
            std::fs::read(x.join(f)).unwrap(),
            std::fs::read(y.join(f)).unwrap(),
            "{f} differs"
        )
    };
    same("genotype.json", &a, &b);
    same("checkpoint/alpha.safetensors", &a, &b);
    same("checkpoint/supernet.safetensors", &a, &b);

    // Killed after iteration 5 (last checkpoint at 3), resumed in place.
    let crashed = search(&c, &["--stop-after", "5"]);
    assert!(!crashed.status.success());
    ok(&search(&c, &["--resume", c.to_str().unwrap()]));
    same("genotype.json", &a, &c);
    same("checkpoint/alpha.safetensors", &a, &c);
    same("checkpoint/supernet.safetensors", &a, &c);
    let resumed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.join("search.json")).unwrap()).unwrap();
    assert_eq!(resumed["resumed_from_iter"], 3);
    let clog = std::fs::read_to_string(c.join("alpha.jsonl")).unwrap();
    let iters: Vec<u64> = clog
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["iter"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(iters, (0..8).collect::<Vec<_>>());

    // The genotype drives the GDFQ stage, from scratch and from the supernet's weights.
    let genotype = a.join("genotype.json");
    for (dir, extra) in [("s1", vec![]), ("s2", vec!["--inherit-weights"])] {
        let out = tmp.path().join(dir);
        let mut args = vec![
            "compress",
            QUICKSTART,
            "--bits",
            "w4a4",
            "--method",
            "autorecon",
            "--genotype",
            genotype.to_str().unwrap(),
            "--epochs",
            "2",
            "--iters-per-epoch",
            "2",
            "--batch",
            "4",
            "--warmup-epochs",
            "1",
            "--verify-images",
            "16",
            "--grid-every",
            "4",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        args.extend(extra);
        let o = datafree(&args);
        ok(&o);
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["method"], "autorecon");
        assert_eq!(r["training"]["method"], "autorecon");
        assert_eq!(r["training"]["config"]["generator"], "autorecon");
        assert_eq!(r["training"]["config"]["genotype"]["width"], 4);
        assert!(r["training"]["generator_macs"].as_u64().unwrap() > 0);
        assert!(out.join("student.onnx").exists() && out.join("samples-000004.png").exists());
        assert!(r["verification_synthetic"]["agreement"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn compress_autorecon_without_a_genotype_searches_first() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let args = vec![
        "compress",
        QUICKSTART,
        "--bits",
        "w6a6",
        "--method",
        "autorecon",
        "--search-epochs",
        "1",
        "--search-iters-per-epoch",
        "2",
        "--search-batch",
        "4",
        "--width",
        "4",
        "--generator-width",
        "8",
        "--epochs",
        "2",
        "--iters-per-epoch",
        "1",
        "--batch",
        "4",
        "--warmup-epochs",
        "1",
        "--verify-images",
        "16",
        "--out",
        out.to_str().unwrap(),
        "--json",
        "--search-checkpoint-every",
        "1",
    ];
    let o = datafree(&args);
    ok(&o);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(out.join("search/genotype.json").exists() && out.join("search/genotype.svg").exists());
    assert_eq!(r["training"]["search"]["config"]["width"], 4);
    assert_eq!(r["training"]["config"]["genotype"]["width"], 8);
    // Killed during the search, resumed: the same student as the uninterrupted run.
    let k = tmp.path().join("k");
    let mut args = args.clone();
    let at = args
        .iter()
        .position(|a| *a == out.to_str().unwrap())
        .unwrap();
    args[at] = k.to_str().unwrap();
    let crashed = datafree(&[args.as_slice(), &["--search-stop-after", "1"]].concat());
    assert!(!crashed.status.success());
    assert!(!k.join("student.onnx").exists());
    ok(&datafree(
        &[args.as_slice(), &["--resume", k.to_str().unwrap()]].concat(),
    ));
    assert_eq!(
        std::fs::read(out.join("student.onnx")).unwrap(),
        std::fs::read(k.join("student.onnx")).unwrap()
    );
    // A BN-folded teacher cannot be searched for.
    let folded = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/onnx/quickstart.bn-folded.onnx"
    );
    let e = datafree(&[
        "search",
        folded,
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(e.status.code(), Some(2));
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        msg.contains("BatchNormalization statistics")
            && msg.contains("folded")
            && msg.contains("quickstart.bn-folded.onnx"),
        "{msg}"
    );
}

#[test]
fn the_autorecon_pipeline_file_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/autorecon-cifar.toml"
    );
    let out = tmp.path().join("p");
    let mut args = vec![
        "run",
        pipeline,
        "--teacher",
        QUICKSTART,
        "--out",
        out.to_str().unwrap(),
    ];
    for s in [
        "compress.search_epochs=1",
        "compress.search_iters_per_epoch=2",
        "compress.search_batch=4",
        "compress.width=4",
        "compress.epochs=2",
        "compress.iters_per_epoch=1",
        "compress.batch=4",
        "compress.warmup_epochs=1",
    ] {
        args.extend(["--set", s]);
    }
    args.extend(["--", "--verify-images", "16"]);
    ok(&datafree(&args));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["training"]["search"]["config"]["sampling"], "soft");
    assert_eq!(r["training"]["search"]["config"]["tau"][1], 0.1);
    assert_eq!(r["training"]["config"]["temperature"], 20.0);
}
