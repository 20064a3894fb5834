//! Pictures of a search, as standalone SVG: the derived genotype (cells as small DAGs, one
//! labelled arrow per kept edge) and the evolution of softmax(alpha) per edge.

use std::fmt::Write;

use anyhow::Result;

use super::SearchLog;
use crate::generator::Genotype;
use crate::generator::autorecon::{CELLS, EdgeKind, Op, Src, cell_edges};

fn color(op: Op) -> &'static str {
    match op {
        Op::None => "#9e9e9e",
        Op::Identity => "#000000",
        Op::Nearest => "#1f77b4",
        Op::Bilinear => "#ff7f0e",
        Op::Conv1x1 => "#2ca02c",
        Op::Conv3x3 => "#d62728",
        Op::Conv5x5 => "#9467bd",
        Op::DilConv3x3 => "#8c564b",
        Op::DilConv5x5 => "#e377c2",
    }
}

const CELL_W: f64 = 360.0;

/// Node centre in the picture: cell `k`, node `n` (None = the cell input).
fn node_xy(k: usize, n: Option<usize>) -> (f64, f64) {
    let x0 = 40.0 + k as f64 * CELL_W;
    match n {
        None => (x0 + 20.0, 190.0),
        Some(0) => (x0 + 110.0, 115.0),
        Some(1) => (x0 + 110.0, 265.0),
        Some(2) => (x0 + 220.0, 215.0),
        _ => (x0 + 320.0, 150.0),
    }
}

/// Where the previous cell's node `i` is shown inside cell `k` (a dashed stand-in, so cross
/// edges stay short).
fn ghost_xy(k: usize, i: usize) -> (f64, f64) {
    (40.0 + k as f64 * CELL_W + 150.0 + 60.0 * i as f64, 350.0)
}

fn arrow(svg: &mut String, a: (f64, f64), b: (f64, f64), bend: f64, op: Op, cross: bool) {
    let (mx, my) = ((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0);
    // Bend perpendicular to the chord so parallel edges stay apart.
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len = (dx * dx + dy * dy).sqrt().max(1.0);
    let (cx, cy) = (mx - dy / len * bend, my + dx / len * bend);
    // End on the target circle's rim, so the arrow head shows.
    let (ex, ey) = (b.0 - cx, b.1 - cy);
    let el = (ex * ex + ey * ey).sqrt().max(1.0);
    let end = (b.0 - ex / el * 14.0, b.1 - ey / el * 14.0);
    let dash = if cross {
        " stroke-dasharray=\"5,3\""
    } else {
        ""
    };
    let _ = writeln!(
        svg,
        r#"<path d="M{:.1},{:.1} Q{cx:.1},{cy:.1} {:.1},{:.1}" fill="none" stroke="{}" stroke-width="2"{dash} marker-end="url(#arrow)"/>"#,
        a.0,
        a.1,
        end.0,
        end.1,
        color(op)
    );
    // The label sits on the curve (near the start for the fanned-out cross edges), on a white
    // patch: SVG text halos are not supported by every renderer.
    let t = if cross { 0.3 } else { 0.5 };
    let (u, v, w) = ((1.0 - t) * (1.0 - t), 2.0 * t * (1.0 - t), t * t);
    let (lx, ly) = (u * a.0 + v * cx + w * b.0, u * a.1 + v * cy + w * b.1 + 4.0);
    let tw = 6.6 * op.name().len() as f64;
    let _ = writeln!(
        svg,
        r#"<rect x="{:.1}" y="{:.1}" width="{tw:.1}" height="13" fill="white" opacity="0.85"/><text x="{lx:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="{}">{}</text>"#,
        lx - tw / 2.0,
        ly - 10.0,
        ly,
        color(op),
        op.name()
    );
}

/// The derived architecture: latent parts and Linear into each cell's input, up edges, normal
/// edges and cross edges (dashed) with their ops; `none` edges are left out.
pub fn genotype_svg(g: &Genotype, title: &str) -> Result<String> {
    let ops = g.ops()?;
    let (w, h) = (CELL_W * CELLS as f64 + 160.0, 410.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">"#
    );
    s.push_str(r##"<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="4.5" markerHeight="4.5" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#444"/></marker></defs>"##);
    s.push('\n');
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15">AutoReCon generator, width {} — {}</text>"#,
        g.width,
        escape(title)
    );
    for (k, cell) in ops.iter().enumerate() {
        let x0 = 40.0 + k as f64 * CELL_W;
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="60" width="{:.1}" height="315" rx="10" fill="#f6f8fa" stroke="#ccc"/><text x="{:.1}" y="78" font-size="12" fill="#555">cell {} (x2 up)</text>"##,
            x0 - 5.0,
            CELL_W - 25.0,
            x0 + 150.0,
            k + 1
        );
        let (ix, iy) = node_xy(k, None);
        let _ = writeln!(
            s,
            r##"<text x="{ix:.1}" y="48" font-size="11" text-anchor="middle" fill="#555">z part {} → Linear</text><line x1="{ix:.1}" y1="52" x2="{ix:.1}" y2="{:.1}" stroke="#555" marker-end="url(#arrow)"/>"##,
            k + 1,
            iy - 12.0
        );
        if k > 0 {
            let (px, py) = node_xy(k - 1, Some(3));
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{py:.1}" x2="{:.1}" y2="{iy:.1}" stroke="#444" stroke-width="2" marker-end="url(#arrow)"/>"##,
                px + 12.0,
                ix - 12.0
            );
        }
        for (d, &op) in cell_edges(k).iter().zip(cell) {
            if op == Op::None {
                continue;
            }
            let b = node_xy(k, Some(d.to));
            match d.from {
                Src::Input => {
                    let bend = if d.to == 0 { -15.0 } else { 15.0 };
                    arrow(&mut s, node_xy(k, None), b, bend, op, false)
                }
                Src::Node(i) => {
                    let bend = match (i, d.to) {
                        (0, 3) => -30.0,
                        (1, 3) => 70.0,
                        _ => 0.0,
                    };
                    arrow(&mut s, node_xy(k, Some(i)), b, bend, op, false)
                }
                Src::Prev(i) => arrow(&mut s, ghost_xy(k, i), b, 0.0, op, true),
            }
            debug_assert!(d.kind != EdgeKind::Up || d.from == Src::Input);
        }
        if k > 0 {
            for i in 0..3 {
                let (x, y) = ghost_xy(k, i);
                let _ = writeln!(
                    s,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="15" fill="white" stroke="#888" stroke-dasharray="3,2"/><text x="{x:.1}" y="{:.1}" font-size="9" text-anchor="middle" fill="#555">c{}.n{i}</text>"##,
                    y + 3.0,
                    k
                );
            }
        }
        for n in [None, Some(0), Some(1), Some(2), Some(3)] {
            let (x, y) = node_xy(k, n);
            let label = n.map_or("in".to_string(), |i| format!("n{i}"));
            let _ = writeln!(
                s,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="13" fill="white" stroke="#333"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{label}</text>"##,
                y + 4.0
            );
        }
    }
    let (ox, oy) = node_xy(CELLS - 1, Some(3));
    let _ = writeln!(
        s,
        r##"<line x1="{:.1}" y1="{oy:.1}" x2="{:.1}" y2="{oy:.1}" stroke="#444" stroke-width="2" marker-end="url(#arrow)"/><text x="{:.1}" y="{:.1}" font-size="11">CBN, LReLU,</text><text x="{:.1}" y="{:.1}" font-size="11">conv3x3, tanh, BN</text><text x="{:.1}" y="{:.1}" font-size="11">→ image</text>"##,
        ox + 13.0,
        ox + 50.0,
        ox + 55.0,
        oy - 8.0,
        ox + 55.0,
        oy + 6.0,
        ox + 55.0,
        oy + 20.0
    );
    legend(&mut s, 10.0, h - 12.0);
    s.push_str("</svg>\n");
    Ok(s)
}

fn legend(s: &mut String, x: f64, y: f64) {
    let all = [
        Op::None,
        Op::Identity,
        Op::Nearest,
        Op::Bilinear,
        Op::Conv1x1,
        Op::Conv3x3,
        Op::Conv5x5,
        Op::DilConv3x3,
        Op::DilConv5x5,
    ];
    for (i, op) in all.iter().enumerate() {
        let lx = x + i as f64 * 105.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="4" fill="{}"/><text x="{:.1}" y="{y:.1}" font-size="11">{}</text>"#,
            y - 6.0,
            color(*op),
            lx + 16.0,
            op.name()
        );
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Small multiples: one panel per (cell, edge), softmax(alpha) of every candidate against the
/// iteration.
pub fn alpha_svg(history: &[SearchLog]) -> Result<String> {
    let (pw, ph, gap) = (130.0, 80.0, 28.0);
    let cols = (0..CELLS).map(|k| cell_edges(k).len()).max().unwrap_or(1);
    let (w, h) = (
        20.0 + cols as f64 * (pw + 10.0),
        50.0 + CELLS as f64 * (ph + gap) + 30.0,
    );
    let last = history.last().map_or(1, |l| l.iter.max(1)) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">softmax(alpha) per edge over {} iterations (rows: cells; y from 0 to 1)</text>"#,
        last as usize + 1
    );
    for k in 0..CELLS {
        for (e, d) in cell_edges(k).iter().enumerate() {
            let (x0, y0) = (10.0 + e as f64 * (pw + 10.0), 40.0 + k as f64 * (ph + gap));
            let _ = writeln!(
                s,
                r##"<rect x="{x0:.1}" y="{:.1}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbb"/><text x="{x0:.1}" y="{:.1}" font-size="10">cell {} {}</text>"##,
                y0 + 12.0,
                y0 + 9.0,
                k + 1,
                d.name()
            );
            for (i, op) in d.kind.candidates().iter().enumerate() {
                let pts: Vec<String> = history
                    .iter()
                    .filter_map(|l| {
                        let p = *l.probs.get(k)?.get(e)?.get(i)? as f64;
                        Some(format!(
                            "{:.1},{:.1}",
                            x0 + pw * l.iter as f64 / last,
                            y0 + 12.0 + ph * (1.0 - p)
                        ))
                    })
                    .collect();
                if !pts.is_empty() {
                    let _ = writeln!(
                        s,
                        r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.5"/>"#,
                        pts.join(" "),
                        color(*op)
                    );
                }
            }
        }
    }
    legend(&mut s, 10.0, h - 10.0);
    s.push_str("</svg>\n");
    Ok(s)
}
