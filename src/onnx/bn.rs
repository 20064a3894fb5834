//! BatchNormalization statistics: the only "data" a data-free method has. Finds every BN node,
//! resolves its parameters (initializers, Constant nodes, Identity chains), summarises the running
//! mean and variance, and decides whether the model still carries them: `complete`, `partial` (some
//! BN folded or unresolvable) or `none` (all folded away).

use std::collections::HashSet;

use serde::Serialize;

use super::graph::{
    GraphIndex, attr_float, attr_int, display_name, is_default_domain, is_passthrough,
};
use super::load::LoadedModel;

/// min / mean / max of a vector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub min: f64,
    pub mean: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(v: &[f64]) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        let (mut min, mut max, mut sum) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
        for &x in v {
            min = min.min(x);
            max = max.max(x);
            sum += x;
        }
        Some(Self {
            min,
            mean: sum / v.len() as f64,
            max,
        })
    }
}

/// One BatchNormalization layer as found in the graph.
#[derive(Debug, Clone, Serialize)]
pub struct BnLayer {
    /// Node name (or `#index BatchNormalization` when unnamed).
    pub name: String,
    /// The tensor it normalizes (its input X): the tap for batch statistics.
    pub input: String,
    /// Op type producing `input` (`Conv`, or `Add`/`Relu`/... in pre-activation nets; `graph input`).
    pub input_producer: String,
    /// Name of that node, when there is one.
    pub input_producer_node: Option<String>,
    pub channels: Option<usize>,
    pub epsilon: f32,
    pub training_mode: bool,
    /// Whether scale, bias, mean and variance all resolved to constants.
    pub resolved: bool,
    /// Why not, when unresolved.
    pub problem: Option<String>,
    /// Where scale, bias, running mean and running variance came from (initializer, Constant
    /// node, Identity chain), as far as they resolved.
    pub sources: Vec<String>,
    pub running_mean: Option<Summary>,
    pub running_var: Option<Summary>,
    #[serde(skip)]
    pub stats: Option<BnStats>,
    /// Index of the node in the graph.
    #[serde(skip)]
    pub node_index: usize,
}

/// The full parameters of a resolved BN layer, for training losses.
#[derive(Debug, Clone, PartialEq)]
pub struct BnStats {
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Complete,
    Partial,
    None,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Complete => "complete",
            Verdict::Partial => "partial",
            Verdict::None => "none",
        })
    }
}

/// What the BN statistics allow, in words a user can act on.
#[derive(Debug, Clone, Serialize)]
pub struct BnReport {
    pub verdict: Verdict,
    pub bn_count: usize,
    pub resolved_count: usize,
    /// Conv nodes with no BatchNormalization before or after them (likely folded).
    pub convs_without_bn: Vec<String>,
    /// Convs without BN that architectures have by design: 1x1 projection shortcuts added to a
    /// normalized branch, convs on globally pooled features (squeeze-excitation).
    pub convs_without_bn_by_design: Vec<String>,
    pub message: String,
    /// How to get a model with statistics, when they are missing.
    pub fix: Option<String>,
    pub layers: Vec<BnLayer>,
}

pub const REEXPORT_FIX: &str = "re-export the model with BatchNormalization kept: in PyTorch call model.eval() and torch.onnx.export(..., do_constant_folding=False) (or training=torch.onnx.TrainingMode.PRESERVE); with other exporters, disable BN folding/fusion";

fn is_activation(op: &str) -> bool {
    matches!(
        op,
        "Relu"
            | "LeakyRelu"
            | "PRelu"
            | "Clip"
            | "Sigmoid"
            | "HardSigmoid"
            | "HardSwish"
            | "Tanh"
            | "Elu"
            | "Selu"
            | "Softplus"
            | "Mish"
    )
}

fn is_conv(op: &str) -> bool {
    matches!(op, "Conv" | "ConvTranspose")
}

/// Analyses every BatchNormalization of the model.
pub fn analyse(model: &LoadedModel) -> BnReport {
    let graph = model.graph();
    let g = GraphIndex::new(graph);
    let mut layers = Vec::new();
    let mut bn_nodes = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type == "BatchNormalization" && is_default_domain(n) {
            layers.push(layer(&g, model, i));
            bn_nodes.push(i);
        }
    }
    let (convs_without_bn, convs_without_bn_by_design) = convs_without_bn(&g, &bn_nodes);
    let bn_count = layers.len();
    let resolved_count = layers.iter().filter(|l| l.resolved).count();
    let conv_count = graph.node.iter().filter(|n| is_conv(&n.op_type)).count();
    let (verdict, message) = if bn_count == 0 {
        let what = if conv_count > 0 {
            format!(
                "no BatchNormalization nodes: the {conv_count} Conv layers look folded (BN merged into conv weights), so there are no running statistics to match"
            )
        } else {
            "no BatchNormalization nodes: the model carries no running statistics".to_string()
        };
        (Verdict::None, what)
    } else if resolved_count < bn_count || !convs_without_bn.is_empty() {
        let mut parts = Vec::new();
        if resolved_count < bn_count {
            parts.push(format!(
                "{} of {bn_count} BatchNormalization layers have statistics that are not constants",
                bn_count - resolved_count
            ));
        }
        if !convs_without_bn.is_empty() {
            parts.push(format!(
                "{} Conv layers have no BatchNormalization (folded?): {}",
                convs_without_bn.len(),
                convs_without_bn.join(", ")
            ));
        }
        (
            Verdict::Partial,
            format!(
                "{}; BN-statistics losses will only see the {resolved_count} resolved layers",
                parts.join("; ")
            ),
        )
    } else {
        let design = if convs_without_bn_by_design.is_empty() {
            String::new()
        } else {
            format!(
                "; {} convs have no BN by design (projection shortcuts, convs on pooled features): {}",
                convs_without_bn_by_design.len(),
                convs_without_bn_by_design.join(", ")
            )
        };
        (
            Verdict::Complete,
            format!("all {bn_count} BatchNormalization layers carry running statistics{design}"),
        )
    };
    BnReport {
        verdict,
        bn_count,
        resolved_count,
        convs_without_bn,
        convs_without_bn_by_design,
        message,
        fix: (verdict != Verdict::Complete).then(|| REEXPORT_FIX.to_string()),
        layers,
    }
}

fn layer(g: &GraphIndex, model: &LoadedModel, i: usize) -> BnLayer {
    let n = g.node(i);
    let input = n.input.first().cloned().unwrap_or_default();
    let (input_producer, input_producer_node) = match g.producer(&input) {
        Some(p) => (g.node(p).op_type.clone(), Some(display_name(g.node(p), p))),
        None if g.is_graph_input(&input) => ("graph input".to_string(), None),
        None => ("constant".to_string(), None),
    };
    let mut problem = None;
    let mut values: Vec<Vec<f32>> = Vec::new();
    let mut sources = Vec::new();
    for (k, what) in ["scale", "bias", "running mean", "running variance"]
        .iter()
        .enumerate()
    {
        let Some(name) = n.input.get(k + 1).filter(|s| !s.is_empty()) else {
            problem = Some(format!("input {what} is missing"));
            break;
        };
        match g.resolve_constant(name, Some(model.dir())) {
            Ok(Some(r)) => {
                sources.push(r.source);
                values.push(r.data.to_f32());
            }
            Ok(None) => {
                let why = if g.is_graph_input(name) {
                    "a graph input"
                } else {
                    "computed by the graph"
                };
                problem = Some(format!("{what} '{name}' is {why}, not a constant"));
                break;
            }
            Err(e) => {
                problem = Some(format!("{what} '{name}': {e}"));
                break;
            }
        }
    }
    if problem.is_none() {
        let c = values[0].len();
        if let Some((k, v)) = values.iter().enumerate().find(|(_, v)| v.len() != c) {
            problem = Some(format!(
                "parameter {k} has {} values, scale has {c}",
                v.len()
            ));
        } else if let Some(v) = values[3].iter().find(|v| !v.is_finite() || **v < 0.0) {
            problem = Some(format!("running variance holds an invalid value {v}"));
        }
    }
    let stats = problem.is_none().then(|| BnStats {
        scale: values[0].clone(),
        bias: values[1].clone(),
        running_mean: values[2].clone(),
        running_var: values[3].clone(),
    });
    let summary = |v: &[f32]| Summary::of(&v.iter().map(|&x| x as f64).collect::<Vec<_>>());
    BnLayer {
        name: display_name(n, i),
        input,
        input_producer,
        input_producer_node,
        channels: values.first().map(Vec::len),
        epsilon: attr_float(n, "epsilon", 1e-5),
        training_mode: attr_int(n, "training_mode", 0) != 0
            || n.output.iter().filter(|o| !o.is_empty()).count() > 1,
        resolved: stats.is_some(),
        problem,
        sources,
        running_mean: stats.as_ref().and_then(|s| summary(&s.running_mean)),
        running_var: stats.as_ref().and_then(|s| summary(&s.running_var)),
        stats,
        node_index: i,
    }
}

/// The first BN reachable from `tensor` walking downstream through `through` ops (at most `depth` hops).
fn bn_downstream(
    g: &GraphIndex,
    tensor: &str,
    through: fn(&str) -> bool,
    depth: usize,
    found: &mut Vec<usize>,
) {
    for &c in g.consumers(tensor) {
        let n = g.node(c);
        if n.op_type == "BatchNormalization" {
            found.push(c);
        } else if depth > 0 && through(&n.op_type) {
            for o in &n.output {
                bn_downstream(g, o, through, depth - 1, found);
            }
        }
    }
}

/// Conv nodes that have no BN: neither directly after them (post-activation nets), nor reached
/// through Add/activations, nor feeding them through activations (pre-activation nets). Convs that
/// only lead to the graph output through pooling/reshaping (classifier heads) are not counted;
/// those an architecture has without BN by design come back separately (second list).
fn convs_without_bn(g: &GraphIndex, bn_nodes: &[usize]) -> (Vec<String>, Vec<String>) {
    let graph = g.graph;
    // BNs that directly follow a conv belong to it ("post" BNs); the rest can normalize the
    // input or residual output of other convs.
    let mut claimed: HashSet<usize> = HashSet::new();
    let mut has_post = HashSet::new();
    for (i, n) in graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| is_conv(&n.op_type))
    {
        let mut found = Vec::new();
        bn_downstream(g, &n.output[0], is_passthrough, 2, &mut found);
        if !found.is_empty() {
            claimed.extend(found);
            has_post.insert(i);
        }
    }
    let free: HashSet<usize> = bn_nodes
        .iter()
        .copied()
        .filter(|b| !claimed.contains(b))
        .collect();
    let (mut missing, mut by_design) = (Vec::new(), Vec::new());
    for (i, n) in graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| is_conv(&n.op_type))
    {
        if has_post.contains(&i) || is_head(g, &n.output[0], 6) {
            continue;
        }
        let mut found = Vec::new();
        bn_downstream(
            g,
            &n.output[0],
            |op| {
                is_passthrough(op)
                    || is_activation(op)
                    || matches!(
                        op,
                        "Add" | "Sub" | "Mul" | "Concat" | "AveragePool" | "MaxPool"
                    )
            },
            4,
            &mut found,
        );
        let mut normalized = found.iter().any(|b| free.contains(b));
        // Upstream: BN -> activation/pad/pool -> this conv.
        let mut t = n.input.first().cloned().unwrap_or_default();
        for _ in 0..4 {
            if normalized {
                break;
            }
            let Some(p) = g.producer(&t) else { break };
            let pn = g.node(p);
            if pn.op_type == "BatchNormalization" {
                normalized = free.contains(&p);
                break;
            }
            if !(is_passthrough(&pn.op_type)
                || is_activation(&pn.op_type)
                || matches!(pn.op_type.as_str(), "Pad" | "MaxPool" | "AveragePool"))
            {
                break;
            }
            t = pn.input.first().cloned().unwrap_or_default();
        }
        if normalized {
            continue;
        }
        if by_design_without_bn(g, n) {
            by_design.push(display_name(n, i));
        } else {
            missing.push(display_name(n, i));
        }
    }
    (missing, by_design)
}

/// Whether a conv without BN is one that architectures have by design: a conv on globally
/// pooled features (squeeze-excitation, FC as 1x1 conv), or a 1x1 projection shortcut whose
/// output is added to a branch that ends in a BN. (A BN-folded export has no BN at the end of
/// the other branch either, so its projections still count as folded.)
fn by_design_without_bn(g: &GraphIndex, n: &crate::onnx::pb::NodeProto) -> bool {
    let producer_op = |t: &str| g.producer(t).map(|p| g.node(p).op_type.clone());
    let mut t = n.input.first().cloned().unwrap_or_default();
    for _ in 0..4 {
        match producer_op(&t).as_deref() {
            Some("GlobalAveragePool" | "GlobalMaxPool" | "ReduceMean") => return true,
            // Through activations and further convs on the same pooled features.
            Some(op) if is_passthrough(op) || is_activation(op) || is_conv(op) => {
                let p = g.producer(&t).expect("has a producer");
                t = g.node(p).input.first().cloned().unwrap_or_default();
            }
            _ => break,
        }
    }
    let one_by_one = g
        .initializer(n.input.get(1).map(String::as_str).unwrap_or(""))
        .is_some_and(|w| w.dims.len() == 4 && w.dims[2] == 1 && w.dims[3] == 1);
    one_by_one
        && g.consumers(&n.output[0]).iter().any(|&c| {
            let add = g.node(c);
            add.op_type == "Add"
                && add
                    .input
                    .iter()
                    .filter(|x| **x != n.output[0])
                    .any(|x| producer_op(x).as_deref() == Some("BatchNormalization"))
        })
}

/// Whether `tensor` reaches a graph output only through head ops (pooling, flatten, softmax...).
fn is_head(g: &GraphIndex, tensor: &str, depth: usize) -> bool {
    if g.is_graph_output(tensor) {
        return true;
    }
    let cons = g.consumers(tensor);
    depth > 0
        && !cons.is_empty()
        && cons.iter().all(|&c| {
            let n = g.node(c);
            matches!(
                n.op_type.as_str(),
                "GlobalAveragePool"
                    | "GlobalMaxPool"
                    | "ReduceMean"
                    | "Flatten"
                    | "Reshape"
                    | "Squeeze"
                    | "Softmax"
                    | "LogSoftmax"
                    | "Identity"
            ) && n.output.iter().all(|o| is_head(g, o, depth - 1))
        })
}
