//! The AutoReCon search space's vocabulary: the candidate ops of each edge kind, the edges of a
//! cell, and a genotype (one op per edge) with its derivation from architecture weights (argmax
//! per edge, every node keeping an input).

use std::fmt;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::kernels::UpMode;

/// A candidate operation on an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    None,
    Identity,
    Nearest,
    Bilinear,
    Conv1x1,
    Conv3x3,
    Conv5x5,
    DilConv3x3,
    DilConv5x5,
}

impl Op {
    /// (kernel, dilation) of the conv ops.
    pub(super) fn conv(self) -> Option<(usize, usize)> {
        match self {
            Op::Conv1x1 => Some((1, 1)),
            Op::Conv3x3 => Some((3, 1)),
            Op::Conv5x5 => Some((5, 1)),
            Op::DilConv3x3 => Some((3, 2)),
            Op::DilConv5x5 => Some((5, 2)),
            _ => None,
        }
    }

    pub(super) fn up(self) -> Option<UpMode> {
        match self {
            Op::Nearest => Some(UpMode::Nearest),
            Op::Bilinear => Some(UpMode::Bilinear),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::None => "none",
            Op::Identity => "identity",
            Op::Nearest => "nearest",
            Op::Bilinear => "bilinear",
            Op::Conv1x1 => "conv1x1",
            Op::Conv3x3 => "conv3x3",
            Op::Conv5x5 => "conv5x5",
            Op::DilConv3x3 => "dil_conv3x3",
            Op::DilConv5x5 => "dil_conv5x5",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    Up,
    Normal,
    Cross,
}

impl EdgeKind {
    pub fn candidates(self) -> &'static [Op] {
        match self {
            EdgeKind::Up => &[Op::Nearest, Op::Bilinear],
            EdgeKind::Normal => &[
                Op::None,
                Op::Identity,
                Op::Conv1x1,
                Op::Conv3x3,
                Op::Conv5x5,
                Op::DilConv3x3,
                Op::DilConv5x5,
            ],
            EdgeKind::Cross => &[Op::None, Op::Nearest, Op::Bilinear],
        }
    }
}

/// Where an edge starts: the cell input, a node of this cell, or a node of the previous cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    Input,
    Node(usize),
    Prev(usize),
}

impl fmt::Display for Src {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Src::Input => write!(f, "in"),
            Src::Node(i) => write!(f, "n{i}"),
            Src::Prev(i) => write!(f, "prev.n{i}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeDef {
    pub kind: EdgeKind,
    pub from: Src,
    /// Node index in this cell (0..=3).
    pub to: usize,
}

impl EdgeDef {
    /// "n0->n2", "prev.n1->n3": the edge's name in genotypes and logs.
    pub fn name(&self) -> String {
        format!("{}->n{}", self.from, self.to)
    }
}

pub const CELLS: usize = 3;

/// The edges of cell `k` (0-based), grouped by target node, so a forward pass in this order
/// completes every node before an edge reads it.
pub fn cell_edges(k: usize) -> Vec<EdgeDef> {
    let e = |kind, from, to| EdgeDef { kind, from, to };
    let mut v = vec![
        e(EdgeKind::Up, Src::Input, 0),
        e(EdgeKind::Up, Src::Input, 1),
    ];
    for to in [2, 3] {
        for i in 0..to {
            v.push(e(EdgeKind::Normal, Src::Node(i), to));
        }
        if k > 0 {
            for p in 0..3 {
                v.push(e(EdgeKind::Cross, Src::Prev(p), to));
            }
        }
    }
    v
}

/// One edge of a derived architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeChoice {
    /// "n0->n2" (see [`EdgeDef::name`]).
    pub edge: String,
    pub op: Op,
}

/// A derived architecture: one op per edge of every cell, and the width it was searched at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Genotype {
    /// Channels of every cell (64 x the scale factor).
    pub width: usize,
    pub cells: Vec<Vec<EdgeChoice>>,
}

impl Genotype {
    /// Reads and validates a genotype JSON file.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read genotype", path.display()))?;
        let g: Genotype = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a genotype JSON file", path.display()))?;
        g.ops()
            .with_context(|| format!("{}: invalid genotype", path.display()))?;
        Ok(g)
    }

    /// The op of every edge, by cell, checked against the search space.
    pub fn ops(&self) -> Result<Vec<Vec<Op>>> {
        ensure!(self.width > 0, "width must be positive");
        ensure!(
            self.cells.len() == CELLS,
            "{} cells, the search space has {CELLS}",
            self.cells.len()
        );
        let mut out = Vec::new();
        for (k, cell) in self.cells.iter().enumerate() {
            let defs = cell_edges(k);
            ensure!(
                cell.len() == defs.len(),
                "cell {k} has {} edges, expected {}",
                cell.len(),
                defs.len()
            );
            let mut ops = Vec::new();
            for (c, d) in cell.iter().zip(&defs) {
                ensure!(
                    c.edge == d.name(),
                    "cell {k}: edge '{}' where '{}' was expected",
                    c.edge,
                    d.name()
                );
                ensure!(
                    d.kind.candidates().contains(&c.op),
                    "cell {k} edge {}: '{}' is not a {:?} op (one of {:?})",
                    c.edge,
                    c.op,
                    d.kind,
                    d.kind.candidates()
                );
                ops.push(c.op);
            }
            for node in [2, 3] {
                ensure!(
                    defs.iter()
                        .zip(&ops)
                        .any(|(d, &o)| d.to == node && o != Op::None),
                    "cell {k}: node n{node} has no input (every edge into it is none)"
                );
            }
            out.push(ops);
        }
        Ok(out)
    }

    /// The derivation rule: argmax of `probs` (per cell, per edge, over its candidates) on every
    /// edge; a node left without inputs gets its strongest non-none edge.
    pub fn derive(width: usize, probs: &[Vec<Vec<f32>>]) -> Result<Self> {
        ensure!(probs.len() == CELLS, "expected {CELLS} cells of weights");
        let argmax = |p: &[f32], skip_none: bool, cands: &[Op]| -> (usize, f32) {
            p.iter()
                .enumerate()
                .filter(|(i, _)| !(skip_none && cands[*i] == Op::None))
                .fold(
                    (usize::MAX, f32::MIN),
                    |b, (i, &v)| {
                        if v > b.1 { (i, v) } else { b }
                    },
                )
        };
        let mut cells = Vec::new();
        for (k, cell) in probs.iter().enumerate() {
            let defs = cell_edges(k);
            ensure!(cell.len() == defs.len(), "cell {k}: wrong number of edges");
            let mut pick: Vec<usize> = cell
                .iter()
                .zip(&defs)
                .map(|(p, d)| argmax(p, false, d.kind.candidates()).0)
                .collect();
            for node in [2, 3] {
                let into: Vec<usize> = (0..defs.len()).filter(|&e| defs[e].to == node).collect();
                if into
                    .iter()
                    .all(|&e| defs[e].kind.candidates()[pick[e]] == Op::None)
                {
                    let (e, (i, _)) = into
                        .iter()
                        .map(|&e| (e, argmax(&cell[e], true, defs[e].kind.candidates())))
                        .fold((0, (0, f32::MIN)), |b, c| if c.1.1 > b.1.1 { c } else { b });
                    pick[e] = i;
                }
            }
            cells.push(
                defs.iter()
                    .zip(pick)
                    .map(|(d, i)| EdgeChoice {
                        edge: d.name(),
                        op: d.kind.candidates()[i],
                    })
                    .collect(),
            );
        }
        Ok(Genotype { width, cells })
    }
}
