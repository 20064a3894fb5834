//! A classifier's outer interface, told apart from its core: the input layout (NCHW, or NHWC
//! as TensorFlow/Keras exports write it, with a Transpose to NCHW inside the graph) and what its
//! output means (logits, or probabilities / log-probabilities from a final Softmax /
//! LogSoftmax). Every stage works on the core (NCHW in, logits out); export puts the interface
//! back on the student, so it keeps the teacher's signature; data fed to a file goes through
//! [`Interface::feed`].

use serde::Serialize;

use super::builder::{attr_int, attr_ints, node_proto};
use super::graph::{GraphIndex, attr_int as node_attr_int};
use super::pb::{
    GraphProto, ModelProto, ValueInfoProto, tensor_shape_proto::dimension, type_proto,
};
use super::{LoadedModel, OnnxError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Layout {
    #[serde(rename = "NCHW")]
    Nchw,
    #[serde(rename = "NHWC")]
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    Logits,
    /// A final Softmax.
    Probabilities,
    /// A final LogSoftmax.
    LogProbabilities,
}

impl OutputKind {
    fn op(self) -> Option<&'static str> {
        match self {
            OutputKind::Logits => None,
            OutputKind::Probabilities => Some("Softmax"),
            OutputKind::LogProbabilities => Some("LogSoftmax"),
        }
    }
}

impl std::fmt::Display for OutputKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.op() {
            None => f.write_str("logits"),
            Some(op) => write!(
                f,
                "{} (a final {op}; losses use the logits before it)",
                if *self == OutputKind::Probabilities {
                    "probabilities"
                } else {
                    "log-probabilities"
                }
            ),
        }
    }
}

/// What [`Interface::core`] takes off a model and [`Interface::wrap`] puts back.
#[derive(Debug, Clone, Serialize)]
pub struct Interface {
    pub layout: Layout,
    pub output: OutputKind,
    /// The image input as the file declares it.
    pub input: String,
    /// The core's (NCHW) input: `input` itself for an NCHW model.
    pub core_input: String,
    /// The graph's first output as the file declares it.
    pub output_name: String,
    /// The core's output (the logits): `output_name` itself for a logits model.
    pub core_output: String,
    #[serde(skip)]
    input_info: ValueInfoProto,
    #[serde(skip)]
    output_info: ValueInfoProto,
}

fn dims(v: &ValueInfoProto) -> Option<Vec<Option<i64>>> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    Some(
        t.shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(dimension::Value::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect(),
    )
}

fn show(d: &[Option<i64>]) -> String {
    let s: Vec<String> = d
        .iter()
        .map(|v| v.map_or("?".into(), |v| v.to_string()))
        .collect();
    format!("[{}]", s.join(", "))
}

/// A tensor name not used in `g`, starting from `base`.
fn fresh(g: &GraphProto, base: &str) -> String {
    let used = |n: &str| {
        g.input.iter().any(|v| v.name == n)
            || g.initializer.iter().any(|t| t.name == n)
            || g.node.iter().any(|x| x.output.iter().any(|o| o == n))
    };
    let mut name = base.to_string();
    while used(&name) {
        name.push('_');
    }
    name
}

/// `v` under another name with its dims permuted by `perm` (`None`: as they are).
fn renamed(v: &ValueInfoProto, name: &str, perm: Option<[usize; 4]>) -> ValueInfoProto {
    let mut out = v.clone();
    out.name = name.into();
    if let (Some(perm), Some(type_proto::Value::TensorType(t))) =
        (perm, out.r#type.as_mut().and_then(|t| t.value.as_mut()))
        && let Some(s) = t.shape.as_mut()
        && s.dim.len() == 4
    {
        let d = s.dim.clone();
        for (i, &p) in perm.iter().enumerate() {
            s.dim[i] = d[p].clone();
        }
    }
    out
}

const TO_NCHW: [i64; 4] = [0, 3, 1, 2];
const TO_NHWC: [i64; 4] = [0, 2, 3, 1];

impl Interface {
    /// Reads the interface of `model`: refuses models without exactly one image input, and a
    /// 4-D input that is neither N x C x H x W nor N x H x W x C with 1 or 3 channels.
    pub fn of(model: &LoadedModel) -> Result<Interface, OnnxError> {
        let g = model.graph();
        let bad = |reason: String| OnnxError::NotAModel {
            path: model.path.clone(),
            reason,
        };
        let inputs: Vec<&ValueInfoProto> = g
            .input
            .iter()
            .filter(|v| !g.initializer.iter().any(|t| t.name == v.name))
            .collect();
        let input = match inputs.as_slice() {
            [one] => *one,
            [] => return Err(bad("the graph has no input".into())),
            many => {
                let names: Vec<String> = many.iter().map(|v| format!("'{}'", v.name)).collect();
                return Err(bad(format!(
                    "{} inputs ({}); datafree compresses classifiers of one image input",
                    many.len(),
                    names.join(", ")
                )));
            }
        };
        let d = dims(input).unwrap_or_default();
        let is_ch = |v: Option<i64>| matches!(v, Some(1 | 3));
        let layout = match d.as_slice() {
            [_, c, _, _] if is_ch(*c) => Layout::Nchw,
            [_, _, _, c] if is_ch(*c) => Layout::Nhwc,
            // Not a fixed 4-D shape: the teacher's geometry check says what is missing.
            d if d.len() != 4 => Layout::Nchw,
            _ => {
                return Err(bad(format!(
                    "input '{}' has shape {}: not N x C x H x W nor N x H x W x C with 1 or 3 channels",
                    input.name,
                    show(&d)
                )));
            }
        };
        let output = g
            .output
            .first()
            .ok_or_else(|| bad("the graph has no output".into()))?;
        let idx = GraphIndex::new(g);
        let (kind, core_output) = match idx.producer(&output.name).map(|i| idx.node(i)) {
            Some(n)
                if matches!(n.op_type.as_str(), "Softmax" | "LogSoftmax")
                    && n.input.len() == 1
                    && Self::over_classes(n, output, model.opset) =>
            {
                let kind = if n.op_type == "Softmax" {
                    OutputKind::Probabilities
                } else {
                    OutputKind::LogProbabilities
                };
                (kind, n.input[0].clone())
            }
            _ => (OutputKind::Logits, output.name.clone()),
        };
        let core_input = match layout {
            Layout::Nchw => input.name.clone(),
            Layout::Nhwc => fresh(g, &format!("{}_nchw", input.name)),
        };
        Ok(Interface {
            layout,
            output: kind,
            input: input.name.clone(),
            core_input,
            output_name: output.name.clone(),
            core_output,
            input_info: input.clone(),
            output_info: output.clone(),
        })
    }

    /// The interface a TensorFlow-style file around the plain (NCHW, logits) `model` would
    /// have: what [`Interface::wrap`] needs to write one (the project's fixtures).
    pub fn around(model: &ModelProto, layout: Layout, output: OutputKind) -> Interface {
        let g = model.graph.as_ref().expect("validated");
        let input_info = g
            .input
            .iter()
            .find(|v| !g.initializer.iter().any(|t| t.name == v.name))
            .expect("an image input")
            .clone();
        let output_info = g.output[0].clone();
        let (input, file_input) = match layout {
            Layout::Nchw => (input_info.name.clone(), input_info.clone()),
            Layout::Nhwc => {
                let name = fresh(g, &format!("{}_nhwc", input_info.name));
                let v = renamed(&input_info, &name, Some([0, 2, 3, 1]));
                (name, v)
            }
        };
        let (output_name, file_output) = match output {
            OutputKind::Logits => (output_info.name.clone(), output_info.clone()),
            _ => {
                let base = if output == OutputKind::Probabilities {
                    "probabilities"
                } else {
                    "log_probabilities"
                };
                let name = fresh(g, base);
                (name.clone(), renamed(&output_info, &name, None))
            }
        };
        Interface {
            layout,
            output,
            input,
            core_input: input_info.name.clone(),
            output_name,
            core_output: output_info.name.clone(),
            input_info: file_input,
            output_info: file_output,
        }
    }

    /// Whether a final (Log)Softmax normalizes over the class axis of an N x classes output.
    fn over_classes(n: &super::pb::NodeProto, output: &ValueInfoProto, opset: i64) -> bool {
        let rank = dims(output).map_or(2, |d| d.len()) as i64;
        let axis = node_attr_int(n, "axis", if opset >= 13 { -1 } else { 1 });
        rank == 2 && (axis == 1 || axis == -1)
    }

    /// Whether the core differs from the file.
    pub fn is_plain(&self) -> bool {
        self.layout == Layout::Nchw && self.output == OutputKind::Logits
    }

    /// The core of `model`: NCHW input named `core_input`, the logits as the first output.
    pub fn core(&self, model: &ModelProto) -> ModelProto {
        let mut m = model.clone();
        let g = m.graph.as_mut().expect("validated");
        if self.layout == Layout::Nhwc {
            let pos = g
                .input
                .iter()
                .position(|v| v.name == self.input)
                .expect("read by Interface::of");
            g.input[pos] = renamed(&self.input_info, &self.core_input, Some([0, 3, 1, 2]));
            // The file's own Transpose to NCHW, right after the input, cancels the one put in
            // front of it; other consumers keep seeing NHWC through the new Transpose.
            let cancelled: Vec<String> = g
                .node
                .iter()
                .filter(|n| {
                    n.op_type == "Transpose"
                        && n.input.first() == Some(&self.input)
                        && super::graph::attr_ints(n, "perm").as_deref() == Some(&TO_NCHW)
                })
                .map(|n| n.output[0].clone())
                .collect();
            g.node
                .retain(|n| !(n.op_type == "Transpose" && cancelled.contains(&n.output[0])));
            for n in g.node.iter_mut() {
                for i in n.input.iter_mut() {
                    if cancelled.contains(i) {
                        *i = self.core_input.clone();
                    }
                }
            }
            g.value_info.retain(|v| !cancelled.contains(&v.name));
            for o in g.output.iter_mut() {
                if cancelled.contains(&o.name) {
                    o.name = self.core_input.clone();
                }
            }
            if g.node.iter().any(|n| n.input.contains(&self.input)) {
                let t = node_proto(
                    "Transpose",
                    &format!("{}_to_nhwc", self.core_input),
                    &[&self.core_input],
                    &[&self.input],
                    vec![attr_ints("perm", &TO_NHWC)],
                );
                g.node.insert(0, t);
            }
        }
        if self.output != OutputKind::Logits {
            g.node.retain(|n| !n.output.contains(&self.output_name));
            g.output[0] = renamed(&self.output_info, &self.core_output, None);
        }
        m
    }

    /// Puts the interface back on a model of the core's signature (the student).
    pub fn wrap(&self, core: ModelProto) -> ModelProto {
        let mut m = core;
        let g = m.graph.as_mut().expect("built from the core");
        if self.layout == Layout::Nhwc {
            if let Some(v) = g.input.iter_mut().find(|v| v.name == self.core_input) {
                *v = self.input_info.clone();
            }
            let t = node_proto(
                "Transpose",
                &format!("{}_to_nchw", self.input),
                &[&self.input],
                &[&self.core_input],
                vec![attr_ints("perm", &TO_NCHW)],
            );
            g.node.insert(0, t);
        }
        if let Some((name, op)) = self.output_node() {
            g.node.push(node_proto(
                op,
                &name,
                &[&self.core_output],
                &[&self.output_name],
                vec![attr_int("axis", -1)],
            ));
            g.output[0] = self.output_info.clone();
        }
        m
    }

    /// The name and op of the (Log)Softmax that [`Interface::wrap`] appends, if any.
    pub fn output_node(&self) -> Option<(String, &'static str)> {
        let op = self.output.op()?;
        Some((format!("{}_{}", self.core_output, op.to_lowercase()), op))
    }

    /// A batch of N x C x H x W images as the file takes them, with its shape.
    pub fn feed(&self, x: &[f32], shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
        match self.layout {
            Layout::Nchw => (x.to_vec(), shape.to_vec()),
            Layout::Nhwc => {
                let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
                let mut out = vec![0f32; x.len()];
                for b in 0..n {
                    for ch in 0..c {
                        for y in 0..h {
                            for xx in 0..w {
                                out[((b * h + y) * w + xx) * c + ch] =
                                    x[((b * c + ch) * h + y) * w + xx];
                            }
                        }
                    }
                }
                (out, vec![n, h, w, c])
            }
        }
    }

    /// The file's outputs (one row per image) as logits up to a per-row shift, which is all
    /// that softmax-based comparisons see.
    pub fn logits(&self, y: &[f32]) -> Vec<f32> {
        match self.output {
            OutputKind::Probabilities => y.iter().map(|&p| p.max(f32::MIN_POSITIVE).ln()).collect(),
            _ => y.to_vec(),
        }
    }
}
