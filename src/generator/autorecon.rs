//! The AutoReCon search space (Zhu et al. 2021, macro-architecture of its derived generators,
//! see ../shared/notes/reference-recipes.md): 3 cells of `width` channels doubling the spatial
//! size (size/8 -> size). The latent is split in three; part k goes through its own Linear and is
//! added at the input of cell k. In each cell, two UP edges (x2 interpolation, then
//! class-conditional BN -> LeakyReLU(0.2) -> conv1x1) make nodes 0 and 1; node 2 sums NORMAL
//! edges from nodes 0 and 1, node 3 from nodes 0, 1 and 2 (pre-activation CBN -> LeakyReLU ->
//! conv, or identity, or none); cells 2 and 3 get CROSS edges (none / x2 interpolation) from the
//! previous cell's nodes 0-2 into nodes 2 and 3. Node 3 is the cell's output. Output: CBN ->
//! LeakyReLU -> conv3x3 to the image channels -> tanh -> BN without affine.
//!
//! One network type serves both the supernet (every candidate op on every edge, mixed by
//! weights the search supplies) and a derived generator (one op per edge, from a [`Genotype`]).
//! Parameter names depend only on (cell, edge, op), so a derived generator can inherit the
//! supernet's weights.

use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use super::genotype::{CELLS, EdgeChoice, EdgeDef, EdgeKind, Genotype, Op, Src, cell_edges};
use super::{Generator, Params, batch_norm};
use crate::kernels::{Conv2dSpec, conv2d, leaky_relu, upsample2d};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AutoReconConfig {
    pub latent: usize,
    pub classes: usize,
    pub channels: usize,
    pub size: usize,
    pub width: usize,
}

struct Cand {
    op: Op,
    /// Per-class gamma/beta of the pre-activation CBN (conv ops).
    bn: Option<(Tensor, Tensor)>,
    conv: Option<(Tensor, Conv2dSpec)>,
}

struct Edge {
    def: EdgeDef,
    cands: Vec<Cand>,
}

/// How an edge mixes its candidates in one forward pass.
pub enum Mix {
    /// Only candidate `i`, weight 1 (a derived edge, or a hard sample without gradient).
    One(usize),
    /// sum_i w_i op_i(x), `w` a vector over the edge's candidates.
    Weights(Tensor),
}

pub struct AutoReconGenerator {
    pub cfg: AutoReconConfig,
    pub params: Params,
    linears: Vec<(Tensor, Tensor)>,
    cells: Vec<Vec<Edge>>,
    out_bn: (Tensor, Tensor),
    out_conv: (Tensor, Tensor),
}

const EPS: f64 = 1e-5;

impl AutoReconGenerator {
    /// The supernet: every candidate on every edge.
    pub fn supernet(cfg: AutoReconConfig, device: &Device, seed: u64) -> Result<Self> {
        let all: Vec<Vec<Vec<Op>>> = (0..CELLS)
            .map(|k| {
                cell_edges(k)
                    .iter()
                    .map(|d| d.kind.candidates().to_vec())
                    .collect()
            })
            .collect();
        Self::build(cfg, &all, device, seed)
    }

    /// The generator a genotype describes (width from the genotype).
    pub fn derived(
        genotype: &Genotype,
        (latent, classes, channels, size): (usize, usize, usize, usize),
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let ops = genotype.ops()?;
        let one: Vec<Vec<Vec<Op>>> = ops
            .iter()
            .map(|c| c.iter().map(|&o| vec![o]).collect())
            .collect();
        let cfg = AutoReconConfig {
            latent,
            classes,
            channels,
            size,
            width: genotype.width,
        };
        Self::build(cfg, &one, device, seed)
    }

    fn build(
        cfg: AutoReconConfig,
        ops: &[Vec<Vec<Op>>],
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        ensure!(
            cfg.size.is_multiple_of(8) && cfg.size >= 8,
            "the AutoReCon generator needs an image size divisible by 8, got {}",
            cfg.size
        );
        ensure!(
            cfg.latent >= CELLS,
            "latent size {} is smaller than the number of cells",
            cfg.latent
        );
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let mut p = Params::new(device);
        let (w, classes) = (cfg.width, cfg.classes);
        let fan = |n: usize| 1.0 / (n as f64).sqrt();
        let cbn = |p: &mut Params, name: &str, c: usize| -> Result<(Tensor, Tensor)> {
            Ok((
                p.constant(&format!("{name}.weight"), &[classes, c], 1.0)?,
                p.constant(&format!("{name}.bias"), &[classes, c], 0.0)?,
            ))
        };
        let mut linears = Vec::new();
        for (k, &part) in latent_parts(cfg.latent).iter().enumerate() {
            let s = (cfg.size / 8) << k;
            linears.push((
                p.uniform(
                    &format!("l{k}.weight"),
                    &[w * s * s, part],
                    fan(part),
                    &mut r,
                )?,
                p.uniform(&format!("l{k}.bias"), &[w * s * s], fan(part), &mut r)?,
            ));
        }
        let mut cells = Vec::new();
        for (k, cell_ops) in ops.iter().enumerate() {
            let defs = cell_edges(k);
            ensure!(
                cell_ops.len() == defs.len(),
                "cell {k}: wrong number of edges"
            );
            let mut edges = Vec::new();
            for (d, cands) in defs.iter().zip(cell_ops) {
                let mut cs = Vec::new();
                for &op in cands {
                    let prefix = format!("cell{k}.{}.{}", d.name(), op.name());
                    let conv_def = match (d.kind, op) {
                        (EdgeKind::Up, _) => Some((1, 1)),
                        (EdgeKind::Normal, o) => o.conv(),
                        _ => None,
                    };
                    let (bn, conv) = match conv_def {
                        Some((kk, dil)) => (
                            Some(cbn(&mut p, &format!("{prefix}.bn"), w)?),
                            Some((
                                p.uniform(
                                    &format!("{prefix}.conv.weight"),
                                    &[w, w, kk, kk],
                                    fan(w * kk * kk),
                                    &mut r,
                                )?,
                                Conv2dSpec::uniform(dil * (kk - 1) / 2, 1, dil, 1),
                            )),
                        ),
                        None => (None, None),
                    };
                    cs.push(Cand { op, bn, conv });
                }
                edges.push(Edge { def: *d, cands: cs });
            }
            cells.push(edges);
        }
        let out_bn = cbn(&mut p, "out.bn", w)?;
        let out_conv = (
            p.uniform(
                "out.conv.weight",
                &[cfg.channels, w, 3, 3],
                fan(w * 9),
                &mut r,
            )?,
            p.uniform("out.conv.bias", &[cfg.channels], fan(w * 9), &mut r)?,
        );
        Ok(AutoReconGenerator {
            cfg,
            params: p,
            linears,
            cells,
            out_bn,
            out_conv,
        })
    }

    /// Candidates of every edge, by cell (all of the space for the supernet).
    pub fn candidates(&self) -> Vec<Vec<Vec<Op>>> {
        self.cells
            .iter()
            .map(|c| {
                c.iter()
                    .map(|e| e.cands.iter().map(|c| c.op).collect())
                    .collect()
            })
            .collect()
    }

    /// Images for latents `z` and labels, each edge mixed as `mix(cell, edge)` says.
    pub fn forward_mixed(
        &self,
        z: &Tensor,
        labels: &Tensor,
        mix: &dyn Fn(usize, usize) -> Mix,
    ) -> Result<Tensor> {
        let n = z.dim(0)?;
        let w = self.cfg.width;
        let cbn = |xn: &Tensor, (g, b): &(Tensor, Tensor)| -> Result<Tensor> {
            let c = xn.dim(1)?;
            let g = g.index_select(labels, 0)?.reshape((n, c, 1, 1))?;
            let b = b.index_select(labels, 0)?.reshape((n, c, 1, 1))?;
            Ok(xn.broadcast_mul(&g)?.broadcast_add(&b)?)
        };
        let mut prev: Option<Vec<Tensor>> = None;
        let mut h: Option<Tensor> = None;
        let mut offset = 0;
        for (k, (edges, part)) in self
            .cells
            .iter()
            .zip(latent_parts(self.cfg.latent))
            .enumerate()
        {
            let s = (self.cfg.size / 8) << k;
            let (lw, lb) = &self.linears[k];
            let inj = z
                .narrow(1, offset, part)?
                .matmul(&lw.t()?)?
                .broadcast_add(lb)?
                .reshape((n, w, s, s))?;
            offset += part;
            let input = match h.take() {
                Some(h) => (h + inj)?,
                None => inj,
            };
            let mut nodes: Vec<Option<Tensor>> = vec![None; 4];
            // `cell_edges` orders edges by target node: every source is complete when read.
            for (e, edge) in edges.iter().enumerate() {
                let x = match edge.def.from {
                    Src::Input => input.clone(),
                    Src::Node(i) => match &nodes[i] {
                        Some(t) => t.clone(),
                        None => Tensor::zeros((n, w, 2 * s, 2 * s), z.dtype(), z.device())?,
                    },
                    Src::Prev(i) => {
                        prev.as_ref().context("cross edge in the first cell")?[i].clone()
                    }
                };
                let mix = mix(k, e);
                // The normalisation is shared by the edge's candidates; only the per-class
                // affine differs (identical to one CBN per candidate).
                let needs_bn = edge.def.kind == EdgeKind::Normal
                    && match &mix {
                        Mix::One(i) => edge.cands[*i].bn.is_some(),
                        Mix::Weights(_) => edge.cands.iter().any(|c| c.bn.is_some()),
                    };
                let xn = if needs_bn {
                    Some(batch_norm(&x, None, EPS)?)
                } else {
                    None
                };
                let run = |c: &Cand| -> Result<Option<Tensor>> {
                    Ok(match (edge.def.kind, c.op) {
                        (_, Op::None) => None,
                        (_, Op::Identity) => Some(x.clone()),
                        (EdgeKind::Up, op) => {
                            let u = upsample2d(&x, 2, op.up().expect("up op"))?;
                            let un = batch_norm(&u, None, EPS)?;
                            let a = leaky_relu(&cbn(&un, c.bn.as_ref().expect("bn"))?, 0.2)?;
                            let (cw, spec) = c.conv.as_ref().expect("conv");
                            Some(conv2d(&a, cw, *spec)?)
                        }
                        (EdgeKind::Cross, op) => Some(upsample2d(&x, 2, op.up().expect("up op"))?),
                        (EdgeKind::Normal, _) => {
                            let xn = xn.as_ref().expect("normalised input");
                            let a = leaky_relu(&cbn(xn, c.bn.as_ref().expect("bn"))?, 0.2)?;
                            let (cw, spec) = c.conv.as_ref().expect("conv");
                            Some(conv2d(&a, cw, *spec)?)
                        }
                    })
                };
                let out = match mix {
                    Mix::One(i) => run(&edge.cands[i])?,
                    Mix::Weights(wt) => {
                        let mut acc: Option<Tensor> = None;
                        for (i, c) in edge.cands.iter().enumerate() {
                            if let Some(o) = run(c)? {
                                let o =
                                    o.broadcast_mul(&wt.narrow(0, i, 1)?.reshape((1, 1, 1, 1))?)?;
                                acc = Some(match acc {
                                    Some(a) => (a + o)?,
                                    None => o,
                                });
                            }
                        }
                        acc
                    }
                };
                if let Some(o) = out {
                    let t = edge.def.to;
                    nodes[t] = Some(match nodes[t].take() {
                        Some(a) => (a + o)?,
                        None => o,
                    });
                }
            }
            let nodes: Vec<Tensor> = nodes
                .into_iter()
                .map(|t| match t {
                    Some(t) => Ok(t),
                    None => Ok(Tensor::zeros((n, w, 2 * s, 2 * s), z.dtype(), z.device())?),
                })
                .collect::<Result<_>>()?;
            h = Some(nodes[3].clone());
            prev = Some(nodes);
        }
        let h = h.expect("three cells");
        let h = leaky_relu(&cbn(&batch_norm(&h, None, EPS)?, &self.out_bn)?, 0.2)?;
        let h = conv2d(&h, &self.out_conv.0, Conv2dSpec::uniform(1, 1, 1, 1))?;
        let ones = Tensor::ones(self.cfg.channels, h.dtype(), h.device())?;
        let h = crate::kernels::channel_affine(&h, &ones, &self.out_conv.1)?.tanh()?;
        batch_norm(&h, None, EPS)
    }

    /// Multiply-accumulates per image of every conv and linear (all candidates in a supernet).
    pub fn macs_per_image(&self) -> u64 {
        let w = self.cfg.width as u64;
        let mut m = 0u64;
        for (k, (edges, part)) in self
            .cells
            .iter()
            .zip(latent_parts(self.cfg.latent))
            .enumerate()
        {
            let s = ((self.cfg.size / 8) << k) as u64;
            m += part as u64 * w * s * s;
            for e in edges {
                for c in &e.cands {
                    if let Some((cw, _)) = &c.conv {
                        let kk = cw.dim(2).unwrap_or(1) as u64;
                        m += w * w * kk * kk * 4 * s * s;
                    }
                }
            }
        }
        let size = self.cfg.size as u64;
        m + self.cfg.channels as u64 * w * 9 * size * size
    }
}

impl Generator for AutoReconGenerator {
    fn latent(&self) -> usize {
        self.cfg.latent
    }
    fn image(&self) -> (usize, usize, usize) {
        (self.cfg.channels, self.cfg.size, self.cfg.size)
    }
    /// A derived generator's forward pass (candidate 0 on every edge).
    fn forward(&self, z: &Tensor, labels: &Tensor) -> Result<Tensor> {
        if self.cells.iter().flatten().any(|e| e.cands.len() != 1) {
            bail!("a supernet needs architecture weights: use forward_mixed");
        }
        self.forward_mixed(z, labels, &|_, _| Mix::One(0))
    }
    fn params(&self) -> &Params {
        &self.params
    }
    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }
    fn macs_per_image(&self) -> u64 {
        AutoReconGenerator::macs_per_image(self)
    }
}

/// The latent split across cells: 100 -> 33, 33, 34.
pub fn latent_parts(latent: usize) -> [usize; CELLS] {
    let a = latent / CELLS;
    [a, a, latent - 2 * a]
}
