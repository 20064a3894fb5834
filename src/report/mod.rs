//! Reports: human-readable renderings of what each stage produced (JSON comes from the same
//! serde structs), and small formatting helpers shared by them.

use std::fmt::Write;

use crate::onnx::inspect::{DimDesc, InspectReport, ValueDesc};

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

/// The human summary printed by `datafree inspect`.
pub fn render_inspect(r: &InspectReport) -> String {
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
    let _ = writeln!(o, "  model      {classes} classes, input {res}");
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
