//! An index over a `GraphProto`: who produces and who consumes each tensor, typed attribute access,
//! and resolution of constant tensors through `Constant` nodes and `Identity` chains (real exporters
//! route parameters that way).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::pb::{AttributeProto, GraphProto, NodeProto, TensorProto, tensor_proto::DataType};
use super::tensor::{self, TensorData, Values};

/// Where a constant tensor's value came from, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub data: TensorData,
    /// e.g. `initializer 'w'` or `Identity 'id1' <- Constant 'c3'`.
    pub source: String,
}

pub struct GraphIndex<'a> {
    pub graph: &'a GraphProto,
    initializers: HashMap<&'a str, &'a TensorProto>,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
    graph_inputs: HashSet<&'a str>,
    graph_outputs: HashSet<&'a str>,
}

/// Ops that pass a tensor through unchanged in value.
pub fn is_passthrough(op: &str) -> bool {
    matches!(op, "Identity" | "Dropout")
}

impl<'a> GraphIndex<'a> {
    pub fn new(graph: &'a GraphProto) -> Self {
        let initializers = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                producer.insert(o.as_str(), i);
            }
            for inp in n.input.iter().filter(|s| !s.is_empty()) {
                consumers.entry(inp.as_str()).or_default().push(i);
            }
        }
        let graph_inputs = graph.input.iter().map(|v| v.name.as_str()).collect();
        let graph_outputs = graph.output.iter().map(|v| v.name.as_str()).collect();
        Self {
            graph,
            initializers,
            producer,
            consumers,
            graph_inputs,
            graph_outputs,
        }
    }

    pub fn node(&self, i: usize) -> &'a NodeProto {
        &self.graph.node[i]
    }

    pub fn initializer(&self, name: &str) -> Option<&'a TensorProto> {
        self.initializers.get(name).copied()
    }

    pub fn is_initializer(&self, name: &str) -> bool {
        self.initializers.contains_key(name)
    }

    /// Graph inputs that are real inputs (older IRs also list initializers as inputs).
    pub fn is_graph_input(&self, name: &str) -> bool {
        self.graph_inputs.contains(name) && !self.is_initializer(name)
    }

    pub fn is_graph_output(&self, name: &str) -> bool {
        self.graph_outputs.contains(name)
    }

    /// Index of the node producing `name`.
    pub fn producer(&self, name: &str) -> Option<usize> {
        self.producer.get(name).copied()
    }

    /// Indices of nodes consuming `name`.
    pub fn consumers(&self, name: &str) -> &[usize] {
        self.consumers.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The initializer `name` is, or that a chain of `Identity` nodes passes on to it (some
    /// exporters route parameters through them); None for any other tensor.
    pub fn initializer_behind(&self, name: &str) -> Option<&'a str> {
        let mut current = name;
        // Bounded walk: a malformed graph could contain an Identity cycle.
        for _ in 0..=self.graph.node.len() {
            if let Some(t) = self.initializer(current) {
                return Some(t.name.as_str());
            }
            let n = self.node(self.producer(current)?);
            if !(n.op_type == "Identity" && is_default_domain(n)) {
                return None;
            }
            current = n.input.first()?;
        }
        None
    }

    /// Resolves `name` to a constant value: an initializer (a graph input of the same name may
    /// override it at run time, but exporters use this for parameters), a `Constant` node, or a chain
    /// of `Identity` nodes ending in either. Ok(None) when the tensor is not constant.
    pub fn resolve_constant(
        &self,
        name: &str,
        model_dir: Option<&Path>,
    ) -> Result<Option<Resolved>, String> {
        let mut hops: Vec<String> = Vec::new();
        let mut current = name.to_string();
        // Bounded walk: a malformed graph could contain an Identity cycle.
        for _ in 0..=self.graph.node.len() {
            if let Some(t) = self.initializer(&current) {
                let data = tensor::decode(t, model_dir)
                    .map_err(|e| format!("initializer '{current}': {e}"))?;
                hops.push(format!("initializer '{current}'"));
                return Ok(Some(Resolved {
                    data,
                    source: hops.join(" <- "),
                }));
            }
            let Some(i) = self.producer(&current) else {
                return Ok(None);
            };
            let n = self.node(i);
            match n.op_type.as_str() {
                "Identity" if is_default_domain(n) => {
                    hops.push(format!("Identity '{}'", n.name));
                    current = n.input.first().cloned().unwrap_or_default();
                }
                "Constant" if is_default_domain(n) => {
                    let data = constant_node_value(n, model_dir)
                        .map_err(|e| format!("Constant node '{}': {e}", n.name))?;
                    hops.push(format!("Constant '{}'", n.name));
                    return Ok(Some(Resolved {
                        data,
                        source: hops.join(" <- "),
                    }));
                }
                _ => return Ok(None),
            }
        }
        Err(format!("Identity chain from '{name}' does not end (cycle)"))
    }
}

pub fn is_default_domain(n: &NodeProto) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// The value of a `Constant` node, from any of its attribute forms.
pub fn constant_node_value(n: &NodeProto, model_dir: Option<&Path>) -> Result<TensorData, String> {
    let a = n.attribute.first().ok_or("has no value attribute")?;
    let (dims, values, data_type) = match a.name.as_str() {
        "value" => {
            let t = a.t.as_ref().ok_or("'value' attribute holds no tensor")?;
            return tensor::decode(t, model_dir);
        }
        "value_float" => (vec![], Values::F32(vec![a.f]), DataType::Float),
        "value_floats" => (
            vec![a.floats.len()],
            Values::F32(a.floats.clone()),
            DataType::Float,
        ),
        "value_int" => (vec![], Values::I64(vec![a.i]), DataType::Int64),
        "value_ints" => (
            vec![a.ints.len()],
            Values::I64(a.ints.clone()),
            DataType::Int64,
        ),
        other => return Err(format!("attribute '{other}' is not supported")),
    };
    Ok(TensorData {
        dims,
        data_type,
        values,
    })
}

/// Attribute lookup by name.
pub fn attr<'n>(n: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// An INT attribute, or `default` when absent (prost omits zero-valued `i`, which reads back as 0).
pub fn attr_int(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

pub fn attr_float(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}

pub fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

pub fn attr_string(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

/// A node's name for messages: its name, or `#index op` when unnamed.
pub fn display_name(n: &NodeProto, index: usize) -> String {
    if n.name.is_empty() {
        format!("#{index} {}", n.op_type)
    } else {
        n.name.clone()
    }
}
