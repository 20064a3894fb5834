//! A lowered program: the ONNX graph's nodes in topological order, each bound to a registry op,
//! with constants loaded once onto the device as plain (non-`Var`) tensors, so a frozen teacher's
//! weights never receive gradients.

use std::collections::{HashMap, HashSet, VecDeque};

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::{DType, Device, Tensor, Var};

use super::ops::{self, NodeCtx, Op};
use super::value::{RunCtx, Value};
use crate::onnx::bn::{self, BnStats};
use crate::onnx::graph::{GraphIndex, display_name};
use crate::onnx::load::LoadedModel;

struct Step {
    name: String,
    op_type: String,
    op: Box<dyn Op>,
    inputs: Vec<Option<usize>>,
    outputs: Vec<Option<usize>>,
    /// Slots whose last reader is this step (freed after it in inference).
    free: Vec<usize>,
}

/// A BatchNormalization whose input is tapped, with the running statistics to match.
#[derive(Debug, Clone)]
pub struct BnTap {
    pub name: String,
    /// Index of the BatchNormalization node in the graph.
    pub node_index: usize,
    pub slot: usize,
    pub stats: BnStats,
}

pub struct Program {
    steps: Vec<Step>,
    slots: usize,
    constants: Vec<(usize, Value)>,
    input_slot: usize,
    input_name: String,
    output_slot: usize,
    bn_taps: Vec<BnTap>,
    penultimate: Option<usize>,
    ctx: RunCtx,
    slot_of: HashMap<String, usize>,
    vars: Vec<(String, Var)>,
    /// Per-slot rewrites applied where a value is produced (fake quantization of weights and
    /// activations while fine-tuning a student).
    transforms: HashMap<usize, Transform>,
}

/// What one forward pass returns.
pub struct Forward {
    /// The first graph output (logits).
    pub logits: Tensor,
    /// Inputs of the tapped BatchNormalization layers, in [`Program::bn_taps`] order.
    pub bn_inputs: Vec<Tensor>,
    /// Input of the final classifier layer (N x features; a spatial input averaged over its
    /// positions), when found.
    pub penultimate: Option<Tensor>,
}

/// A rewrite of one tensor of the program (see [`Program::set_transform`]).
pub type Transform = std::sync::Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Lowers `model` onto `device` computing in `dtype` (F32 normally, F64 for gradient checks).
pub fn lower(model: &LoadedModel, device: &Device, dtype: DType) -> Result<Program> {
    lower_with(model, device, dtype, false)
}

/// Like [`lower`]; with `trainable`, the float parameters (weights and biases of Conv,
/// ConvTranspose, Gemm, MatMul, PRelu, and BatchNormalization's scale and bias) become `Var`s,
/// listed by [`Program::vars`].
pub fn lower_with(
    model: &LoadedModel,
    device: &Device,
    dtype: DType,
    trainable: bool,
) -> Result<Program> {
    let file = model.path.display().to_string();
    lower_inner(model, device, dtype, trainable).with_context(|| file)
}

/// Whether initializer `name` is a trainable parameter of some node.
fn is_parameter(g: &GraphIndex, name: &str) -> bool {
    g.consumers(name).iter().any(|&c| {
        let n = g.node(c);
        let k = n.input.iter().position(|i| i == name).unwrap_or(0);
        match n.op_type.as_str() {
            "Conv" | "ConvTranspose" | "Gemm" => k == 1 || k == 2,
            "MatMul" | "PRelu" => k == 1,
            "BatchNormalization" => k == 1 || k == 2,
            _ => false,
        }
    })
}

fn lower_inner(
    model: &LoadedModel,
    device: &Device,
    dtype: DType,
    trainable: bool,
) -> Result<Program> {
    let graph = model.graph();
    let g = GraphIndex::new(graph);
    let ctx = RunCtx {
        bn_batch_stats: false,
        device: device.clone(),
        dtype,
    };
    let mut slot_of: HashMap<String, usize> = HashMap::new();
    let mut constants = Vec::new();
    let new_slot = |name: &str, slot_of: &mut HashMap<String, usize>| -> usize {
        let n = slot_of.len();
        *slot_of.entry(name.to_string()).or_insert(n)
    };
    let mut vars = Vec::new();
    for t in &graph.initializer {
        let v = ops::array::tensor_value_at(t, &ctx, model.dir())
            .with_context(|| format!("initializer '{}'", t.name))?;
        let v = match v {
            Value::F(f) if trainable && is_parameter(&g, &t.name) => {
                let var = Var::from_tensor(&f)?;
                let value = Value::F(var.as_tensor().clone());
                vars.push((t.name.clone(), var));
                value
            }
            other => other,
        };
        let s = new_slot(&t.name, &mut slot_of);
        constants.push((s, v));
    }
    let real_inputs: Vec<&str> = graph
        .input
        .iter()
        .map(|v| v.name.as_str())
        .filter(|n| g.is_graph_input(n))
        .collect();
    ensure!(
        real_inputs.len() == 1,
        "the model has {} inputs ({}); datafree expects one image input",
        real_inputs.len(),
        real_inputs.join(", ")
    );
    let input_name = real_inputs[0].to_string();
    let input_slot = new_slot(&input_name, &mut slot_of);

    let order = topological_order(&g)?;
    let mut steps = Vec::with_capacity(order.len());
    for &i in &order {
        let node = g.node(i);
        let name = display_name(node, i);
        let here = || format!("node '{name}' ({})", node.op_type);
        if !super::is_supported(&node.op_type, &node.domain) {
            bail!(
                "{}: op not supported by the lowering (run `datafree inspect` for the full list)",
                here()
            );
        }
        let builder = ops::registry()
            .get(node.op_type.as_str())
            .ok_or_else(|| anyhow!("{}: no builder", here()))?;
        let input_types = node.input.iter().map(|n| const_type(&g, n)).collect();
        let op = builder(&NodeCtx {
            node,
            opset: model.opset,
            ctx: &ctx,
            input_types,
        })
        .with_context(here)?;
        let inputs = node
            .input
            .iter()
            .map(|n| {
                if n.is_empty() {
                    None
                } else {
                    slot_of.get(n).copied()
                }
            })
            .collect::<Vec<_>>();
        for (k, n) in node.input.iter().enumerate() {
            if !n.is_empty() && inputs[k].is_none() {
                bail!(
                    "{}: input '{n}' is produced by no node, initializer or graph input",
                    here()
                );
            }
        }
        let outputs = node
            .output
            .iter()
            .map(|o| (!o.is_empty()).then(|| new_slot(o, &mut slot_of)))
            .collect();
        steps.push(Step {
            name,
            op_type: node.op_type.clone(),
            op,
            inputs,
            outputs,
            free: vec![],
        });
    }
    let out_name = &graph.output[0].name;
    let output_slot = *slot_of
        .get(out_name)
        .with_context(|| format!("graph output '{out_name}' is produced by no node"))?;

    let bn_taps = bn::analyse(model)
        .layers
        .into_iter()
        .filter_map(|l| {
            Some(BnTap {
                node_index: l.node_index,
                slot: *slot_of.get(&l.input)?,
                stats: l.stats?,
                name: l.name,
            })
        })
        .collect::<Vec<_>>();
    let penultimate = penultimate_tensor(&g, out_name).and_then(|n| slot_of.get(&n).copied());

    // Liveness: free a slot after its last reader, unless it is an output or a tap.
    let mut keep: HashSet<usize> = bn_taps.iter().map(|t| t.slot).collect();
    keep.insert(output_slot);
    keep.extend(penultimate);
    keep.extend(constants.iter().map(|(s, _)| *s));
    let mut last_reader: HashMap<usize, usize> = HashMap::new();
    for (k, s) in steps.iter().enumerate() {
        for &i in s.inputs.iter().flatten() {
            last_reader.insert(i, k);
        }
    }
    for (slot, k) in last_reader {
        if !keep.contains(&slot) {
            steps[k].free.push(slot);
        }
    }
    Ok(Program {
        steps,
        slots: slot_of.len(),
        constants,
        input_slot,
        input_name,
        output_slot,
        bn_taps,
        penultimate,
        ctx,
        slot_of,
        vars,
        transforms: HashMap::new(),
    })
}

/// Element type of a constant tensor (initializer or Constant node), if `name` is one.
fn const_type(g: &GraphIndex, name: &str) -> Option<i32> {
    if let Some(t) = g.initializer(name) {
        return Some(t.data_type);
    }
    let n = g.node(g.producer(name)?);
    match n.op_type.as_str() {
        "Constant" => n
            .attribute
            .iter()
            .find_map(|a| a.t.as_ref())
            .map(|t| t.data_type),
        "Identity" => const_type(g, n.input.first()?),
        _ => None,
    }
}

/// Kahn's algorithm over tensor dependencies (ONNX requires sorted nodes; not every exporter obeys).
fn topological_order(g: &GraphIndex) -> Result<Vec<usize>> {
    let nodes = &g.graph.node;
    let mut pending: Vec<usize> = vec![0; nodes.len()];
    let mut waiting: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            if g.producer(inp).is_some() {
                pending[i] += 1;
                waiting.entry(inp.as_str()).or_default().push(i);
            }
        }
    }
    let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for o in &nodes[i].output {
            for &j in waiting.get(o.as_str()).map(Vec::as_slice).unwrap_or(&[]) {
                pending[j] -= 1;
                if pending[j] == 0 {
                    ready.push_back(j);
                }
            }
        }
    }
    if order.len() != nodes.len() {
        let stuck = (0..nodes.len())
            .find(|i| pending[*i] > 0)
            .expect("some node is pending");
        bail!(
            "the graph has a cycle (at node '{}')",
            display_name(&nodes[stuck], stuck)
        );
    }
    Ok(order)
}

/// The tensor [`Forward::penultimate`] taps in `model`: the input of its final classifier
/// layer, if one is found.
pub fn penultimate_of(model: &LoadedModel) -> Option<String> {
    let graph = model.graph();
    penultimate_tensor(&GraphIndex::new(graph), &graph.output.first()?.name)
}

/// The input of the classifier layer: walk back from the output through head ops to the last
/// Gemm, MatMul or Conv, and take its data input.
fn penultimate_tensor(g: &GraphIndex, output: &str) -> Option<String> {
    let mut t = output.to_string();
    for _ in 0..8 {
        let n = g.node(g.producer(&t)?);
        match n.op_type.as_str() {
            "Gemm" | "MatMul" | "Conv" => return n.input.first().cloned(),
            // Through the pooling (and ReLU) of an all-convolutional head, whose last conv
            // classifies every position (NiN, SqueezeNet).
            "Softmax" | "LogSoftmax" | "Identity" | "Flatten" | "Reshape" | "Squeeze"
            | "Dropout" | "Add" | "GlobalAveragePool" | "ReduceMean" | "AveragePool" | "Relu" => {
                t = n.input.first()?.clone();
            }
            _ => return None,
        }
    }
    None
}

/// Features per image: a spatial (N x C x H x W) tensor averaged over its positions, anything
/// else flattened after the batch axis.
fn pooled(t: &Tensor) -> Result<Tensor> {
    Ok(match t.rank() {
        4 => t.mean((2, 3))?,
        _ => t.flatten_from(1)?,
    })
}

impl Program {
    pub fn device(&self) -> &Device {
        &self.ctx.device
    }

    pub fn dtype(&self) -> DType {
        self.ctx.dtype
    }

    pub fn input_name(&self) -> &str {
        &self.input_name
    }

    /// Trainable parameters by initializer name (empty unless lowered with `trainable`).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// BatchNormalization with batch statistics (training) or running statistics (inference).
    pub fn set_bn_batch_stats(&mut self, on: bool) {
        self.ctx.bn_batch_stats = on;
    }

    /// Replaces the value of the constant (initializer) `name`, e.g. BN running statistics a
    /// run keeps up to date; its shape must not change.
    pub fn set_constant(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let slot = *self
            .slot_of
            .get(name)
            .ok_or_else(|| anyhow!("the graph has no tensor '{name}'"))?;
        let c = self
            .constants
            .iter_mut()
            .find(|(s, _)| *s == slot)
            .ok_or_else(|| anyhow!("'{name}' is not a constant of the graph"))?;
        match &c.1 {
            Value::F(old) if old.dims() == t.dims() => {
                c.1 = Value::F(t.to_dtype(self.ctx.dtype)?.to_device(&self.ctx.device)?);
                Ok(())
            }
            _ => anyhow::bail!("'{name}' is not a float constant of shape {:?}", t.dims()),
        }
    }

    /// The tapped BatchNormalization layers and their running statistics.
    pub fn bn_taps(&self) -> &[BnTap] {
        &self.bn_taps
    }

    /// Rewrites the tensor `name` (an initializer or a node output) with `f` wherever the
    /// forward pass produces it.
    pub fn set_transform(&mut self, name: &str, f: Transform) -> Result<()> {
        let slot = *self
            .slot_of
            .get(name)
            .ok_or_else(|| anyhow!("the graph has no tensor '{name}'"))?;
        self.transforms.insert(slot, f);
        Ok(())
    }

    pub fn clear_transforms(&mut self) {
        self.transforms.clear();
    }

    fn produce(&self, slot: usize, v: Value) -> Result<Value> {
        match self.transforms.get(&slot) {
            Some(f) => Ok(Value::F(f(&v.float(&self.ctx)?)?)),
            None => Ok(v),
        }
    }

    /// Logits only (frees intermediate tensors as it goes).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, false, &[])?.0.logits)
    }

    /// Logits plus the BN-input and penultimate taps.
    pub fn forward_taps(&self, x: &Tensor) -> Result<Forward> {
        Ok(self.run(x, true, &[])?.0)
    }

    /// Logits plus the float tensors of the graph named in `names`.
    pub fn forward_tensors(&self, x: &Tensor, names: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
        let (f, kept) = self.run(x, false, &self.slots_of(names)?)?;
        Ok((f.logits, kept))
    }

    /// `forward_taps` plus the float tensors named in `names`, from one pass.
    pub fn forward_taps_tensors(
        &self,
        x: &Tensor,
        names: &[String],
    ) -> Result<(Forward, Vec<Tensor>)> {
        self.run(x, true, &self.slots_of(names)?)
    }

    fn slots_of(&self, names: &[String]) -> Result<Vec<usize>> {
        names
            .iter()
            .map(|n| {
                self.slot_of
                    .get(n)
                    .copied()
                    .ok_or_else(|| anyhow!("the graph has no tensor '{n}'"))
            })
            .collect()
    }

    fn run(&self, x: &Tensor, taps: bool, keep: &[usize]) -> Result<(Forward, Vec<Tensor>)> {
        let mut vals: Vec<Option<Value>> = vec![None; self.slots];
        for (s, v) in &self.constants {
            vals[*s] = Some(self.produce(*s, v.clone())?);
        }
        let x = if x.dtype() == self.ctx.dtype {
            x.clone()
        } else {
            x.to_dtype(self.ctx.dtype)?
        };
        vals[self.input_slot] = Some(self.produce(self.input_slot, Value::F(x))?);
        for step in &self.steps {
            let outs = {
                let ins: Vec<Option<&Value>> = step
                    .inputs
                    .iter()
                    .map(|s| s.and_then(|s| vals[s].as_ref()))
                    .collect();
                step.op
                    .run(&self.ctx, &ins)
                    .with_context(|| format!("node '{}' ({})", step.name, step.op_type))?
            };
            for (slot, v) in step.outputs.iter().zip(outs) {
                if let Some(s) = slot {
                    vals[*s] = Some(self.produce(*s, v)?);
                }
            }
            if !taps {
                for &s in step.free.iter().filter(|s| !keep.contains(s)) {
                    vals[s] = None;
                }
            }
        }
        let float = |s: usize| -> Result<Tensor> {
            match vals[s].as_ref() {
                Some(v) => v.float(&self.ctx),
                None => bail!("tensor slot {s} was not computed"),
            }
        };
        let logits = float(self.output_slot)?;
        let (bn_inputs, penultimate) = if taps {
            (
                self.bn_taps
                    .iter()
                    .map(|t| float(t.slot))
                    .collect::<Result<_>>()?,
                self.penultimate
                    .map(|s| float(s).and_then(|t| pooled(&t)))
                    .transpose()?,
            )
        } else {
            (vec![], None)
        };
        let kept = keep.iter().map(|&s| float(s)).collect::<Result<_>>()?;
        Ok((
            Forward {
                logits,
                bn_inputs,
                penultimate,
            },
            kept,
        ))
    }
}
