//! Sanity of a model's parameters before anything is built on them: a NaN or infinity in any
//! float constant, or a layer whose weight is all zeros, makes every later number meaningless,
//! so it is refused with the tensor's name instead of producing a broken student.

use super::OnnxError;
use super::graph::{GraphIndex, display_name};
use super::load::LoadedModel;
use super::pb::tensor_proto::DataType;
use super::tensor::{self, Values};

/// Refuses non-finite float constants (initializers and Constant nodes) and all-zero weights of
/// Conv, ConvTranspose, Gemm and MatMul.
pub fn parameters(model: &LoadedModel) -> Result<(), OnnxError> {
    let graph = model.graph();
    let g = GraphIndex::new(graph);
    let err = |tensor: &str, reason: String| OnnxError::Tensor {
        path: model.path.clone(),
        tensor: tensor.to_string(),
        reason,
    };
    let constants = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Constant")
        .filter_map(|n| {
            n.attribute
                .iter()
                .find_map(|a| a.t.as_ref())
                .map(|t| (n.output.first().cloned().unwrap_or_default(), t))
        });
    let tensors = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t))
        .chain(constants);
    for (name, t) in tensors {
        let float = matches!(
            DataType::try_from(t.data_type),
            Ok(DataType::Float | DataType::Double | DataType::Float16 | DataType::Bfloat16)
        );
        if !float {
            continue;
        }
        let data = tensor::decode(t, Some(model.dir())).map_err(|e| err(&name, e))?;
        let bad = match &data.values {
            Values::F32(v) => v
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| (i, v[i] as f64)),
            Values::F64(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])),
            Values::I64(_) => None,
        };
        let role = role(&g, &name);
        if let Some((i, v)) = bad {
            let count = data.to_f64().iter().filter(|x| !x.is_finite()).count();
            return Err(err(
                &name,
                format!(
                    "{role}holds {v} at index {i} ({count} of {} values are not finite): the model is broken; re-export it from a healthy checkpoint",
                    data.len()
                ),
            ));
        }
        if is_weight(&g, &name) && !data.is_empty() && data.to_f64().iter().all(|&x| x == 0.0) {
            return Err(err(
                &name,
                format!(
                    "{role}all {} values are zero: the layer computes nothing from its input; the model is broken",
                    data.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `name` is the weight (input 1) of a Conv, ConvTranspose, Gemm or MatMul.
fn is_weight(g: &GraphIndex, name: &str) -> bool {
    g.consumers(name).iter().any(|&c| {
        let n = g.node(c);
        matches!(
            n.op_type.as_str(),
            "Conv" | "ConvTranspose" | "Gemm" | "MatMul"
        ) && n.input.get(1).is_some_and(|w| w == name)
    })
}

/// "input 1 of Conv 'conv1': " for messages (empty when nothing reads the tensor).
fn role(g: &GraphIndex, name: &str) -> String {
    g.consumers(name)
        .first()
        .map(|&c| {
            let n = g.node(c);
            let k = n.input.iter().position(|i| i == name).unwrap_or(0);
            format!("input {k} of {} '{}': ", n.op_type, display_name(n, c))
        })
        .unwrap_or_default()
}
