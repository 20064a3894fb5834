//! Reports: human-readable renderings of what each command produced (JSON comes from the same
//! serde structs), and small formatting helpers shared by them.

use std::fmt::Write;

use crate::teacher::inspect::{DimDesc, InspectReport, ValueDesc};

/// "97.3 KiB" style sizes.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// 1234567 -> "1,234,567".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn shape(v: &ValueDesc) -> String {
    match &v.shape {
        Some(s) => format!(
            "[{}]",
            s.iter()
                .map(DimDesc::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "(no shape)".into(),
    }
}

fn g4(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e4) {
        format!("{x:.2e}")
    } else {
        format!("{x:.4}")
    }
}

/// The human summary printed by `datafree inspect`, with the input domain when the model has an
/// image input.
pub fn render_inspect(r: &InspectReport, domain: Option<&crate::teacher::InputDomain>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", r.file);
    let _ = writeln!(
        o,
        "  size       {} ({} bytes), sha256 {}",
        human_bytes(r.size_bytes),
        r.size_bytes,
        r.sha256
    );
    let opsets: Vec<String> = r
        .opset_imports
        .iter()
        .map(|o| format!("{} {}", o.domain, o.version))
        .collect();
    let producer = format!("{} {}", r.producer_name, r.producer_version);
    let _ = writeln!(
        o,
        "  format     IR {}, opset {}; producer {}",
        r.ir_version,
        opsets.join(", "),
        producer.trim()
    );
    for (label, vals) in [("input ", &r.inputs), ("output", &r.outputs)] {
        for v in vals {
            let _ = writeln!(o, "  {label}     {} {} {}", v.name, v.elem_type, shape(v));
        }
    }
    let classes = r.classes.map_or("unknown".into(), |c| c.to_string());
    let res = r.input_resolution.as_ref().map_or("unknown".into(), |i| {
        format!("{}x{}x{} ({})", i.channels, i.height, i.width, i.layout)
    });
    let kind = r.output_kind.map_or("unknown".into(), |k| k.to_string());
    let _ = writeln!(
        o,
        "  model      {classes} classes, input {res}, output {kind}"
    );
    let mut ops: Vec<_> = r.op_histogram.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let ops: Vec<String> = ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(o, "  ops        {} nodes: {}", r.node_count, ops.join(", "));
    let p = &r.parameters;
    let _ = writeln!(
        o,
        "  parameters {} ({}) in {} initializers and {} Constant nodes",
        thousands(p.count),
        human_bytes(p.bytes as u64),
        p.initializers,
        p.constant_nodes
    );
    if let Some(m) = r.macs_per_image {
        let _ = writeln!(
            o,
            "  compute    {:.2} M multiply-accumulates per image",
            m as f64 / 1e6
        );
    }
    let bn = &r.batch_norm;
    let _ = writeln!(
        o,
        "\nBatchNormalization layers: {} ({} resolved)",
        bn.bn_count, bn.resolved_count
    );
    if !bn.layers.is_empty() {
        // Exporters write long node names: size the column to them; the normalized tensor's
        // full name is in the JSON.
        let w = bn
            .layers
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let stat = |s: &Option<crate::onnx::bn::Summary>| {
            s.map_or("-".into(), |s| {
                format!("{}/{}/{}", g4(s.min), g4(s.mean), g4(s.max))
            })
        };
        let _ = writeln!(
            o,
            "  {:<w$}  {:<8} {:>5} {:>6}  {:<28} running var min/mean/max",
            "node", "after", "ch", "eps", "running mean min/mean/max"
        );
        for l in &bn.layers {
            let ch = l.channels.map_or("?".into(), |c| c.to_string());
            let mut line = format!(
                "  {:<w$}  {:<8} {:>5} {:>6.0e}  {:<28} {}",
                l.name,
                l.input_producer,
                ch,
                l.epsilon,
                stat(&l.running_mean),
                stat(&l.running_var)
            );
            if l.training_mode {
                line.push_str("  training_mode");
            }
            if let Some(pr) = &l.problem {
                let _ = write!(line, "  UNRESOLVED: {pr}");
            }
            let _ = writeln!(o, "{}", line.trim_end());
        }
    }
    let _ = writeln!(o, "BN statistics: {} — {}", bn.verdict, bn.message);
    if let Some(fix) = &bn.fix {
        let _ = writeln!(o, "  fix: {fix}");
    }
    if let Some(d) = domain {
        let _ = writeln!(o, "\nInput domain: {}", d.summary());
        if let Some(e) = &d.estimate {
            let _ = writeln!(
                o,
                "  BN estimate ({}): input mean [{}], std {}; points to {} (confidence {:.2}{})",
                e.bn,
                e.mean.iter().map(|v| g4(*v)).collect::<Vec<_>>().join(", "),
                g4(e.std[0]),
                e.kind.describe(),
                e.confidence,
                if e.direct { ", BN on the input" } else { "" }
            );
        }
        for w in &d.warnings {
            let _ = writeln!(o, "  warning: {w}");
        }
    }
    let lw = &r.lowering;
    if lw.all_supported {
        let _ = writeln!(
            o,
            "\nLowering: all {} op types are supported",
            lw.supported.len()
        );
    } else {
        let _ = writeln!(
            o,
            "\nLowering: NOT supported, compression will refuse this model:"
        );
        for u in &lw.unsupported {
            let _ = writeln!(o, "  {} x{} (nodes: {})", u.op, u.count, u.nodes.join(", "));
        }
    }
    o
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

fn comparison_lines(o: &mut String, c: &crate::verify::compare::Comparison) {
    let _ = writeln!(o, "  on {} images ({}):", c.images, c.inputs);
    let _ = writeln!(
        o,
        "    student vs teacher agreement  {:.2}%",
        100.0 * c.agreement
    );
    if c.student_top1.is_some() {
        let _ = writeln!(
            o,
            "    top-1 teacher / student       {} / {} (drop {})",
            pct(c.reference_top1),
            pct(c.student_top1),
            pct(c.top1_drop)
        );
    }
    match &c.simulation {
        Ok(s) => {
            let _ = writeln!(
                o,
                "    simulation vs ORT             max |logit diff| {:.2e}, top-1 agreement {:.2}%",
                s.max_abs_logit_diff,
                100.0 * s.top1_agreement
            );
        }
        Err(e) => {
            let _ = writeln!(o, "    simulation vs ORT             not run: {e}");
        }
    }
}

fn fusion_speed_lines(o: &mut String, c: &crate::verify::compare::Comparison) {
    match &c.fusion {
        Ok(f) => {
            let _ = writeln!(
                o,
                "  ORT fusion: {} QLinearConv, {} float Conv{}",
                f.qlinear_conv,
                f.float_conv,
                if f.all_conv_fused { " (all fused)" } else { "" }
            );
        }
        Err(e) => {
            let _ = writeln!(o, "  ORT fusion: unknown ({e})");
        }
    }
    if let Ok(s) = &c.speed {
        let _ = writeln!(
            o,
            "  ORT speed, batch {}: teacher {:.2} ms, student {:.2} ms ({:.2}x)",
            s.batch, s.reference_ms, s.student_ms, s.ratio
        );
    }
}

/// The summary printed by `datafree compress`.
pub fn render_compress(r: &crate::pipeline::Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{} -> {}", r.teacher, r.student);
    let _ = writeln!(
        o,
        "  {} {}, weights {} (clip {}), BN {} ({} folded), {} layers, {} activation points",
        r.bits,
        r.method.name(),
        crate::cli_name(&r.weight_scheme),
        crate::cli_name(&r.weight_clip),
        crate::cli_name(&r.bn),
        r.bn_folded,
        r.layers.len(),
        r.activations.len()
    );
    if r.inexact_layers.is_empty() {
        let _ = writeln!(
            o,
            "  scales {}: f32 arithmetic provably exact in all {} layers (every engine computes the same codes)",
            crate::cli_name(&r.scales),
            r.layers.len()
        );
    } else {
        let _ = writeln!(
            o,
            "  scales {}: {} ops not provably exact (engines may differ in the last bits there):",
            crate::cli_name(&r.scales),
            r.inexact_layers.len()
        );
        for l in &r.inexact_layers {
            let _ = writeln!(o, "    {l}");
        }
    }
    if let Some(d) = &r.verification_data {
        comparison_lines(&mut o, d);
    }
    comparison_lines(&mut o, &r.verification_synthetic);
    fusion_speed_lines(&mut o, &r.verification_synthetic);
    if let Some(t) = &r.training {
        let g = t.stage();
        let c = &g.config;
        let _ = writeln!(
            o,
            "  {}: {} x {} iterations, batch {}, warm-up {} epochs, {:.0} s{}; generator {} ({} parameters, {:.1} M MACs per image)",
            r.method.name(),
            c.epochs,
            c.iters_per_epoch,
            c.batch,
            c.warmup_epochs,
            g.train_seconds,
            g.resumed_from_iter
                .map_or(String::new(), |i| format!(" (resumed at {i})")),
            crate::cli_name(&c.generator),
            g.generator_params,
            g.generator_macs as f64 / 1e6
        );
        if let Some(sr) = t.search() {
            o.push_str(&render_search(sr));
        }
        if !g.eval_curve.is_empty() {
            let curve: Vec<String> = g
                .eval_curve
                .iter()
                .map(|(i, a)| format!("{i}: {a:.2}"))
                .collect();
            let _ = writeln!(o, "  simulated top-1 by iteration: {}", curve.join(", "));
        }
    }
    for b in &r.baselines {
        let _ = writeln!(
            o,
            "  baseline {:<10} top-1 {}, agreement {:.2}%",
            b.method.name(),
            b.top1.map_or("-".into(), |x| format!("{x:.2}")),
            100.0 * b.agreement
        );
    }
    for n in &r.notes {
        let _ = writeln!(o, "  note: {n}");
    }
    if let Some(why) = &r.self_check {
        let _ = writeln!(o, "  CHECK FAILED: {why}");
    }
    o
}

/// The summary printed by `datafree verify`.
pub fn render_gate(g: &crate::verify::gate::GateReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{} vs {}", g.student, g.reference);
    comparison_lines(&mut o, &g.comparison);
    fusion_speed_lines(&mut o, &g.comparison);
    for c in &g.checks {
        let _ = writeln!(
            o,
            "  [{}] {}: {}",
            if c.pass { "pass" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    let _ = writeln!(o, "{}", if g.pass { "PASS" } else { "FAIL" });
    o
}

/// The human summary of an AutoReCon search.
pub fn render_search(r: &crate::search::SearchReport) -> String {
    let mut o = String::new();
    let c = &r.config;
    let per_epoch = if r.epoch_seconds.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{:.1}",
            r.epoch_seconds.iter().sum::<f64>() / r.epoch_seconds.len() as f64
        )
    };
    let _ = writeln!(
        o,
        "  search: {} x {} iterations, batch {}, width {}, {:?} sampling, {:.0} s ({per_epoch} s per epoch), peak {} MB{}",
        c.epochs,
        c.iters_per_epoch,
        c.batch,
        c.width,
        c.sampling,
        r.seconds,
        r.peak_rss_mb.map_or("?".into(), |m| format!("{m:.0}")),
        r.resumed_from_iter
            .map_or(String::new(), |i| format!(" (resumed at {i})"))
    );
    let _ = writeln!(
        o,
        "  supernet {} parameters, {:.1} M MACs/image; derived generator {} parameters, {:.1} M MACs/image",
        r.supernet_params,
        r.supernet_macs_per_image as f64 / 1e6,
        r.derived_params,
        r.derived_macs_per_image as f64 / 1e6
    );
    for (k, cell) in r.genotype.cells.iter().enumerate() {
        let edges: Vec<String> = cell
            .iter()
            .filter(|e| e.op != crate::generator::autorecon::Op::None)
            .map(|e| format!("{} {}", e.edge, e.op))
            .collect();
        let _ = writeln!(o, "  cell {}: {}", k + 1, edges.join(", "));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
