//! Export: rewriting the teacher's ONNX graph into the quantized student. BatchNormalization is
//! folded into the preceding Conv (names of the BN outputs are kept, so tensors line up with the
//! teacher), weights become int8 initializers with DequantizeLinear (per output channel), biases
//! int32 with DequantizeLinear, and every planned activation gets an optional Clip, then
//! QuantizeLinear and DequantizeLinear. The result carries provenance in `metadata_props`.

mod pad;

use std::collections::{HashMap, HashSet};

pub use pad::fold_pads;

use anyhow::{Context, Result, bail, ensure};

use crate::onnx::LoadedModel;
use crate::onnx::builder::{node_proto, tensor_f32, tensor_raw};
use crate::onnx::graph::{GraphIndex, attr_float, display_name};
use crate::onnx::pb::{
    ModelProto, NodeProto, StringStringEntryProto, TensorProto, tensor_proto::DataType,
};
use crate::onnx::tensor;
use crate::quant::placement::Plan;
use crate::quant::{
    QParams, Scales, WeightScheme, quantize_bias, quantize_weight, quantize_weight_exact,
};

/// Folds every BatchNormalization whose input comes only from a Conv into that Conv. Returns the
/// new model and the number of BNs folded. BNs elsewhere (pre-activation nets) stay.
pub fn fold_bn(model: &LoadedModel) -> Result<(ModelProto, usize)> {
    let dir = Some(model.dir());
    let model = &model.proto;
    let mut out = model.clone();
    let graph = model.graph.as_ref().expect("validated");
    let g = GraphIndex::new(graph);
    let mut remove: HashSet<usize> = HashSet::new();
    let mut rewired: HashMap<usize, NodeProto> = HashMap::new();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    for (i, bn) in graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "BatchNormalization")
    {
        let x = &bn.input[0];
        let Some(ci) = g.producer(x) else { continue };
        let conv = g.node(ci);
        if conv.op_type != "Conv"
            || g.consumers(x).len() != 1
            || g.is_graph_output(x)
            || bn.output.iter().skip(1).any(|o| !o.is_empty())
        {
            continue;
        }
        let Some(w_t) = conv.input.get(1).and_then(|w| g.initializer(w)) else {
            continue;
        };
        let get = |k: usize| -> Result<Vec<f32>> {
            let name = bn.input.get(k).context("BN input missing")?;
            Ok(g.resolve_constant(name, dir)
                .map_err(anyhow::Error::msg)?
                .with_context(|| format!("BN parameter '{name}' is not constant"))?
                .data
                .to_f32())
        };
        let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
        let eps = attr_float(bn, "epsilon", 1e-5);
        let w = tensor::decode(w_t, dir)
            .map_err(anyhow::Error::msg)?
            .to_f32();
        let c = gamma.len();
        ensure!(
            w.len() % c == 0 && w_t.dims.first() == Some(&(c as i64)),
            "BN '{}' has {c} channels but conv '{}' weight is {:?}",
            bn.name,
            conv.name,
            w_t.dims
        );
        let b0 = match conv.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => g
                .resolve_constant(b, dir)
                .map_err(anyhow::Error::msg)?
                .context("conv bias is not constant")?
                .data
                .to_f32(),
            None => vec![0.0; c],
        };
        let per = w.len() / c;
        let mut wf = w.clone();
        let mut bf = vec![0.0f32; c];
        for o in 0..c {
            // Computed in f64 so folding adds no error beyond the final rounding to f32.
            let s = gamma[o] as f64 / (var[o] as f64 + eps as f64).sqrt();
            for v in &mut wf[o * per..(o + 1) * per] {
                *v = (*v as f64 * s) as f32;
            }
            bf[o] = ((b0[o] as f64 - mean[o] as f64) * s + beta[o] as f64) as f32;
        }
        let dims: Vec<usize> = w_t.dims.iter().map(|&d| d as usize).collect();
        let (wn, bn_name) = (
            format!("{}.folded_weight", display_name(conv, ci)),
            format!("{}.folded_bias", display_name(conv, ci)),
        );
        new_inits.push(tensor_f32(&wn, &dims, &wf));
        new_inits.push(tensor_f32(&bn_name, &[c], &bf));
        let mut nc = conv.clone();
        nc.input = vec![conv.input[0].clone(), wn, bn_name];
        // The conv now writes the BN's output tensor: names downstream stay the teacher's.
        nc.output = vec![bn.output[0].clone()];
        rewired.insert(ci, nc);
        remove.insert(i);
    }
    let og = out.graph.as_mut().expect("validated");
    og.node = graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| !remove.contains(i))
        .map(|(i, n)| rewired.remove(&i).unwrap_or_else(|| n.clone()))
        .collect();
    og.initializer.extend(new_inits);
    prune_initializers(og);
    Ok((out, remove.len()))
}

/// Drops initializers (and their graph-input entries) nothing reads any more.
fn prune_initializers(g: &mut crate::onnx::pb::GraphProto) {
    let used: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(g.output.iter().map(|o| o.name.clone()))
        .collect();
    g.initializer.retain(|t| used.contains(&t.name));
    let inits: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    g.input
        .retain(|v| used.contains(&v.name) || !inits.contains(&v.name) && !v.name.is_empty());
}

fn scalar_f32(name: &str, v: f32) -> TensorProto {
    tensor_f32(name, &[], &[v])
}

/// Packs signed 4-bit values two per byte, low nibble first (ONNX INT4).
pub fn pack_int4(v: &[i8]) -> Vec<u8> {
    v.chunks(2)
        .map(|p| (p[0] as u8 & 0x0F) | ((p.get(1).copied().unwrap_or(0) as u8 & 0x0F) << 4))
        .collect()
}

/// Raises the model to ai.onnx opset 21 (IR 10), which INT4 tensors need, rewriting the one op
/// this project lowers whose signature changed since opset 13: ReduceMean's `axes` attribute
/// became an input at opset 18.
pub fn raise_to_opset21(model: &mut ModelProto) -> Result<()> {
    let opset = model
        .opset_import
        .iter_mut()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .context("no ai.onnx opset")?;
    if opset.version >= 21 {
        return Ok(());
    }
    opset.version = 21;
    model.ir_version = model.ir_version.max(10);
    let graph = model.graph.as_mut().expect("validated");
    let mut extra = Vec::new();
    for (i, n) in graph.node.iter_mut().enumerate() {
        if n.op_type == "ReduceMean"
            && let Some(k) = n.attribute.iter().position(|a| a.name == "axes")
        {
            let axes = n.attribute.remove(k).ints;
            let name = format!("{}_axes", display_name(n, i));
            extra.push(crate::onnx::builder::tensor_i64(
                &name,
                &[axes.len()],
                &axes,
            ));
            n.input.truncate(1);
            n.input.push(name);
        }
    }
    graph.initializer.extend(extra);
    Ok(())
}

/// Quantization parameters chosen for each activation point.
pub type PointParams = HashMap<String, QParams>;

/// How the student's weights are stored and scaled.
#[derive(Debug, Clone, Copy)]
pub struct WeightOptions {
    pub scheme: WeightScheme,
    pub scales: Scales,
    /// INT4 storage (opset 21) for weights of 4 bits or fewer.
    pub int4: bool,
}

/// A built student and the layers whose arithmetic is not provably exact in f32 (all of them
/// with `Scales::Free`; with `Scales::Exact` those whose input is not quantized or whose
/// accumulation cannot fit 24 bits).
pub struct Student {
    pub model: ModelProto,
    pub inexact_layers: Vec<String>,
}

/// Builds the QDQ student from a (BN-folded) float model, a plan and activation parameters.
pub fn build_student(
    model: &LoadedModel,
    plan: &Plan,
    params: &PointParams,
    weights: WeightOptions,
    metadata: &[(String, String)],
) -> Result<Student> {
    let WeightOptions {
        scheme,
        scales: scale_mode,
        int4: int4_weights,
    } = weights;
    let mut inexact_layers = Vec::new();
    let opset = model.opset;
    if opset < 13 {
        bail!(
            "per-channel QuantizeLinear/DequantizeLinear needs opset 13 or newer, the model has {opset}; re-export it with opset_version >= 13"
        );
    }
    let dir = Some(model.dir());
    let mut out = model.proto.clone();
    let graph = out.graph.as_mut().expect("validated");
    let mut weight_nodes: Vec<NodeProto> = Vec::new();
    let mut inits: Vec<TensorProto> = Vec::new();
    let mut rename_input: HashMap<(String, usize), String> = HashMap::new();
    {
        let g = GraphIndex::new(graph);
        for l in &plan.layers {
            let wt = g
                .initializer(&l.weight)
                .context("weight initializer vanished")?;
            let w = tensor::decode(wt, dir).map_err(anyhow::Error::msg)?;
            let dims = w.dims.clone();
            let channels = dims[l.weight_axis];
            // Channel-major copy for per-channel quantization (axis 1 of a 2-D weight = columns).
            let rows = crate::quant::channel_major(&w.to_f32(), &dims, l.weight_axis);
            let bias: Option<Vec<f32>> = l
                .bias
                .as_ref()
                .map(|b| -> Result<Vec<f32>> {
                    let bv =
                        tensor::decode(g.initializer(b).context("bias initializer vanished")?, dir)
                            .map_err(anyhow::Error::msg)?
                            .to_f32();
                    ensure!(
                        bv.len() == channels,
                        "bias '{b}' of '{}' has {} values for {channels} channels",
                        l.node,
                        bv.len()
                    );
                    Ok(bv)
                })
                .transpose()?;
            let q = match (scale_mode, params.get(&l.input)) {
                (Scales::Exact, Some(pin)) => {
                    let (q, exact) = quantize_weight_exact(
                        &rows,
                        channels,
                        l.weight_bits,
                        scheme,
                        pin,
                        bias.as_deref(),
                    );
                    if !exact {
                        inexact_layers.push(format!(
                            "{} ({}): its sums cannot stay below 2^24 units at these scales",
                            l.node, l.op
                        ));
                    }
                    q
                }
                (Scales::Exact, None) => {
                    inexact_layers.push(format!(
                        "{} ({}): its input is not quantized, so its float sums depend on the engine's order",
                        l.node, l.op
                    ));
                    quantize_weight(&rows, channels, l.weight_bits, scheme)
                }
                (Scales::Free, _) => {
                    inexact_layers.push(format!(
                        "{} ({}): --scales free (float rounding differs between engines)",
                        l.node, l.op
                    ));
                    quantize_weight(&rows, channels, l.weight_bits, scheme)
                }
            };
            let values = crate::quant::from_channel_major(&q.values, &dims, l.weight_axis);
            let base = l.weight.clone();
            let (qn, sn, zn, dq) = (
                format!("{base}_quantized"),
                format!("{base}_scale"),
                format!("{base}_zero_point"),
                format!("{base}_dequantized"),
            );
            if int4_weights && l.weight_bits <= 4 {
                inits.push(tensor_raw(&qn, &dims, DataType::Int4, pack_int4(&values)));
                inits.push(tensor_raw(
                    &zn,
                    &[channels],
                    DataType::Int4,
                    pack_int4(&q.zero_points),
                ));
            } else {
                inits.push(tensor_raw(
                    &qn,
                    &dims,
                    DataType::Int8,
                    values.iter().map(|&v| v as u8).collect(),
                ));
                inits.push(tensor_raw(
                    &zn,
                    &[channels],
                    DataType::Int8,
                    q.zero_points.iter().map(|&v| v as u8).collect(),
                ));
            }
            inits.push(tensor_f32(&sn, &[channels], &q.scales));
            weight_nodes.push(node_proto(
                "DequantizeLinear",
                &format!("{base}_DequantizeLinear"),
                &[&qn, &sn, &zn],
                &[&dq],
                vec![crate::onnx::builder::attr_int("axis", l.weight_axis as i64)],
            ));
            rename_input.insert((l.node.clone(), 1), dq);
            // int32 bias with scale s_in * s_w, when the layer input is quantized.
            if let (Some(b), Some(bv), Some(pin)) = (&l.bias, &bias, params.get(&l.input)) {
                let scales: Vec<f32> = q.scales.iter().map(|&s| s * pin.scale).collect();
                let bq: Vec<i32> = bv
                    .iter()
                    .zip(&scales)
                    .map(|(&v, &s)| quantize_bias(v, s))
                    .collect();
                let (qn, sn, zn, dq) = (
                    format!("{b}_quantized"),
                    format!("{b}_scale"),
                    format!("{b}_zero_point"),
                    format!("{b}_dequantized"),
                );
                inits.push(tensor_raw(
                    &qn,
                    &[channels],
                    DataType::Int32,
                    bq.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ));
                inits.push(tensor_f32(&sn, &[channels], &scales));
                inits.push(tensor_raw(
                    &zn,
                    &[channels],
                    DataType::Int32,
                    vec![0; 4 * channels],
                ));
                weight_nodes.push(node_proto(
                    "DequantizeLinear",
                    &format!("{b}_DequantizeLinear"),
                    &[&qn, &sn, &zn],
                    &[&dq],
                    vec![crate::onnx::builder::attr_int("axis", 0)],
                ));
                rename_input.insert((l.node.clone(), 2), dq);
            }
        }
    }
    // Activation Q/DQ, inserted right after the producer of each tensor (or first, for inputs).
    let mut after: HashMap<String, Vec<NodeProto>> = HashMap::new();
    let mut renamed: HashMap<String, String> = HashMap::new();
    for p in &plan.points {
        let qp = params
            .get(&p.tensor)
            .with_context(|| format!("no range for tensor '{}'", p.tensor))?;
        let t = &p.tensor;
        let (sn, zn, qn, dq) = (
            format!("{t}_scale"),
            format!("{t}_zero_point"),
            format!("{t}_quantized"),
            format!("{t}_dequantized"),
        );
        inits.push(scalar_f32(&sn, qp.scale));
        inits.push(tensor_raw(
            &zn,
            &[],
            DataType::Uint8,
            vec![qp.zero_point as u8],
        ));
        let mut nodes = Vec::new();
        let mut src = t.clone();
        if p.bits < 8 {
            // QuantizeLinear saturates only to the uint8 container: a k-bit grid needs a Clip.
            let (lo, hi) = qp.bounds();
            let (ln, hn, cn) = (
                format!("{t}_clip_min"),
                format!("{t}_clip_max"),
                format!("{t}_clipped"),
            );
            inits.push(scalar_f32(&ln, lo));
            inits.push(scalar_f32(&hn, hi));
            nodes.push(node_proto(
                "Clip",
                &format!("{t}_Clip"),
                &[t, &ln, &hn],
                &[&cn],
                vec![],
            ));
            src = cn;
        }
        nodes.push(node_proto(
            "QuantizeLinear",
            &format!("{t}_QuantizeLinear"),
            &[&src, &sn, &zn],
            &[&qn],
            vec![],
        ));
        nodes.push(node_proto(
            "DequantizeLinear",
            &format!("{t}_DequantizeLinear"),
            &[&qn, &sn, &zn],
            &[&dq],
            vec![],
        ));
        after.entry(t.clone()).or_default().extend(nodes);
        renamed.insert(t.clone(), dq);
    }
    let inputs: HashSet<String> = graph.input.iter().map(|v| v.name.clone()).collect();
    let mut nodes: Vec<NodeProto> = weight_nodes;
    for t in inputs.iter() {
        if let Some(ns) = after.remove(t) {
            nodes.extend(ns);
        }
    }
    for (i, n) in graph.node.iter().enumerate() {
        let mut n = n.clone();
        let name = display_name(&n, i);
        for (k, inp) in n.input.iter_mut().enumerate() {
            if let Some(r) = rename_input.get(&(name.clone(), k)) {
                *inp = r.clone();
            } else if let Some(r) = renamed.get(inp.as_str()) {
                *inp = r.clone();
            }
        }
        let outs = n.output.clone();
        nodes.push(n);
        for o in outs {
            if let Some(ns) = after.remove(&o) {
                nodes.extend(ns);
            }
        }
    }
    ensure!(
        after.is_empty(),
        "planned tensors not found in the graph: {:?}",
        after.keys().collect::<Vec<_>>()
    );
    graph.node = nodes;
    graph.initializer.extend(inits);
    prune_initializers(graph);
    // The student is written elsewhere: what the teacher kept in external files travels inline.
    for t in graph
        .initializer
        .iter_mut()
        .filter(|t| tensor::is_external(t))
    {
        t.raw_data = tensor::read_external(t, model.dir()).map_err(anyhow::Error::msg)?;
        t.data_location = None;
        t.external_data.clear();
    }
    if int4_weights && plan.layers.iter().any(|l| l.weight_bits <= 4) {
        raise_to_opset21(&mut out)?;
    }
    out.metadata_props
        .extend(metadata.iter().map(|(k, v)| StringStringEntryProto {
            key: k.clone(),
            value: v.clone(),
        }));
    out.producer_name = "datafree".into();
    out.producer_version = env!("CARGO_PKG_VERSION").into();
    Ok(Student {
        model: out,
        inexact_layers,
    })
}

/// The model with the planned layers' weights clamped per output channel to their least-error
/// symmetric clips ([`crate::quant::clip_weight`]): by the output error where `inputs` describes
/// the layer's input, else by the weight's own; min/max quantization then uses the clipped grids.
pub fn clip_weights(
    model: &LoadedModel,
    plan: &crate::quant::placement::Plan,
    inputs: Option<&HashMap<String, crate::quant::moments::LayerInput>>,
) -> Result<ModelProto> {
    let graph = model.graph();
    let mut values = HashMap::new();
    for l in &plan.layers {
        let input = inputs.and_then(|m| m.get(&l.input)).map(|m| m.as_input());
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name == l.weight)
            .with_context(|| {
                format!(
                    "layer {}: weight {} is not an initializer",
                    l.node, l.weight
                )
            })?;
        let mut v = tensor::decode(t, Some(model.dir()))
            .map_err(anyhow::Error::msg)?
            .to_f32();
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        crate::quant::clip_weight(&mut v, &dims, l.weight_axis, l.weight_bits, None, input);
        values.insert(l.weight.clone(), v);
    }
    with_initializers(&model.proto, &values)
}

/// The model with the float initializers named in `values` replaced (same shapes).
pub fn with_initializers(
    model: &ModelProto,
    values: &HashMap<String, Vec<f32>>,
) -> Result<ModelProto> {
    let mut out = model.clone();
    let graph = out.graph.as_mut().expect("validated");
    let mut done = 0;
    for t in &mut graph.initializer {
        if let Some(v) = values.get(&t.name) {
            ensure!(
                tensor::numel(t) == v.len() && t.data_type == DataType::Float as i32,
                "initializer '{}' cannot take {} float values",
                t.name,
                v.len()
            );
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            *t = tensor_f32(&t.name, &dims, v);
            done += 1;
        }
    }
    ensure!(
        done == values.len(),
        "{} of {} values matched no float initializer",
        values.len() - done,
        values.len()
    );
    Ok(out)
}

/// Nodes of a QDQ student that compute in float between quantized tensors where engines may
/// round differently (transcendental and piecewise-linear activations with float constants,
/// products, divisions, averages over areas that are not powers of two, BatchNormalization
/// kept), each with the reason. `area` gives, by node name, the spatial size a
/// GlobalAveragePool or ReduceMean averages over.
pub fn inexact_float_ops(
    student: &ModelProto,
    area: &dyn Fn(&str) -> Option<usize>,
) -> Vec<String> {
    let graph = student.graph.as_ref().expect("validated");
    let mut out = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        let why = match n.op_type.as_str() {
            "HardSwish" | "HardSigmoid" | "Sigmoid" | "Tanh" | "Softmax" | "LogSoftmax" | "Elu"
            | "Selu" | "Softplus" | "Mish" | "Erf" | "Exp" | "Log" | "Pow" | "Sqrt" => {
                Some("a float activation; engines may round it differently")
            }
            "Mul" | "Div" => Some("a float product; engines may round it differently"),
            "BatchNormalization" => Some("BatchNormalization kept in float"),
            "AveragePool" => {
                let k: i64 = crate::onnx::graph::attr_ints(n, "kernel_shape")
                    .unwrap_or_default()
                    .iter()
                    .product();
                (k <= 0 || !(k as u64).is_power_of_two())
                    .then_some("averages over an area that is not a power of two")
            }
            "GlobalAveragePool" | "ReduceMean" => match area(&display_name(n, i)) {
                Some(a) if a.is_power_of_two() => None,
                _ => Some("averages over an area that is not a power of two"),
            },
            _ => None,
        };
        if let Some(why) = why {
            out.push(format!("{} ({}): {why}", display_name(n, i), n.op_type));
        }
    }
    out
}
