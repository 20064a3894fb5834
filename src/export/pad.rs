//! Zero Pads folded into the Convs they feed. Exporters that write 'same' padding as an explicit
//! Pad (Keras, TensorFlow) put it between the activation's DequantizeLinear and the Conv, where
//! ONNX Runtime no longer sees the DQ -> Conv pattern it fuses into an integer QLinearConv.
//! Padding with zeros before a Conv is what the Conv's own `pads` do, so the fold is exact.

use std::collections::HashSet;

use anyhow::Result;

use crate::onnx::LoadedModel;
use crate::onnx::builder::attr_ints;
use crate::onnx::graph::{GraphIndex, attr_ints as node_ints, attr_string};
use crate::onnx::pb::ModelProto;

/// The spatial (begin h, begin w, end h, end w) padding of a constant-zero Pad of a 4-D tensor,
/// or None when it is anything else (other modes, values, axes, or padding N or C).
fn zero_spatial_pads(
    g: &GraphIndex,
    pad: &crate::onnx::pb::NodeProto,
    opset: i64,
    model: &LoadedModel,
) -> Option<[i64; 4]> {
    let mode = attr_string(pad, "mode").unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return None;
    }
    let constant = |i: usize| {
        pad.input
            .get(i)
            .filter(|n| !n.is_empty())
            .map(|n| g.resolve_constant(n, Some(model.dir())).ok().flatten())
    };
    let pads: Vec<i64> = if opset >= 11 {
        let value_is_zero = match constant(2) {
            None => true,
            Some(Some(v)) => v.data.to_f32().iter().all(|&x| x == 0.0),
            Some(None) => false,
        };
        // Opset 18's `axes` input: only the plain all-axes form is folded.
        if !value_is_zero || constant(3).is_some() {
            return None;
        }
        constant(1)??.data.as_i64()?.to_vec()
    } else {
        if crate::onnx::graph::attr_float(pad, "value", 0.0) != 0.0 {
            return None;
        }
        node_ints(pad, "pads")?
    };
    match pads.as_slice() {
        [0, 0, hb, wb, 0, 0, he, we] if [hb, wb, he, we].iter().all(|&&p| p >= 0) => {
            Some([*hb, *wb, *he, *we])
        }
        _ => None,
    }
}

/// Folds every constant-zero spatial Pad whose output feeds only Convs (as their data input,
/// with explicit padding) into those Convs. Returns the new model and the number folded.
pub fn fold_pads(model: &LoadedModel) -> Result<(ModelProto, usize)> {
    let graph = model.graph();
    let g = GraphIndex::new(graph);
    let mut out = model.proto.clone();
    let mut remove: HashSet<usize> = HashSet::new();
    let mut edits: Vec<(usize, String, [i64; 4])> = Vec::new();
    for (i, pad) in graph.node.iter().enumerate() {
        if pad.op_type != "Pad" || !crate::onnx::graph::is_default_domain(pad) {
            continue;
        }
        let y = &pad.output[0];
        let consumers = g.consumers(y);
        let foldable = !g.is_graph_output(y)
            && !consumers.is_empty()
            && consumers.iter().all(|&c| {
                let conv = g.node(c);
                conv.op_type == "Conv"
                    && conv.input.first() == Some(y)
                    && conv.input.iter().skip(1).all(|x| x != y)
                    && matches!(
                        attr_string(conv, "auto_pad").as_deref(),
                        None | Some("NOTSET") | Some("")
                    )
                    && node_ints(conv, "pads").is_none_or(|p| p.len() == 4)
            });
        if !foldable {
            continue;
        }
        let Some(p) = zero_spatial_pads(&g, pad, model.opset, model) else {
            continue;
        };
        remove.insert(i);
        for &c in consumers {
            edits.push((c, pad.input[0].clone(), p));
        }
    }
    let graph = out.graph.as_mut().expect("validated");
    for (c, input, [hb, wb, he, we]) in edits {
        let conv = &mut graph.node[c];
        let old = node_ints(conv, "pads").unwrap_or_else(|| vec![0; 4]);
        let pads = [old[0] + hb, old[1] + wb, old[2] + he, old[3] + we];
        conv.attribute.retain(|a| a.name != "pads");
        conv.attribute.push(attr_ints("pads", &pads));
        conv.input[0] = input;
    }
    let folded = remove.len();
    let mut i = 0;
    graph.node.retain(|_| {
        i += 1;
        !remove.contains(&(i - 1))
    });
    Ok((out, folded))
}
