//! The op registry: one builder per ONNX op, grouped by family (`nn`, `activation`, `math`,
//! `array`). A builder reads and validates the node's attributes once, with the ONNX spec's
//! defaults, and returns an [`Op`] that runs on [`Value`]s. An op missing here is "not supported",
//! which `inspect` reports before anything runs.

use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};

use super::value::{RunCtx, Value};
use crate::onnx::pb::NodeProto;
use crate::onnx::pb::attribute_proto::AttributeType;

pub mod activation;
pub mod array;
mod conv;
pub mod math;
pub mod nn;
pub mod quant;
mod resize;
mod shape;
mod window;

/// A lowered node, ready to run.
pub trait Op: Send + Sync {
    /// `inputs[i]` is None for an omitted optional input (empty name).
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Value>]) -> Result<Vec<Value>>;
}

/// What a builder sees of a node.
pub struct NodeCtx<'a> {
    pub node: &'a NodeProto,
    /// The model's ai.onnx opset (attribute forms changed across opsets).
    pub opset: i64,
    pub ctx: &'a RunCtx,
    /// ONNX element types of the node's constant inputs (initializers, Constant nodes).
    pub input_types: Vec<Option<i32>>,
}

pub type Builder = fn(&NodeCtx) -> Result<Box<dyn Op>>;

/// Op type -> builder.
pub fn registry() -> &'static HashMap<&'static str, Builder> {
    static REG: OnceLock<HashMap<&'static str, Builder>> = OnceLock::new();
    REG.get_or_init(|| {
        let mut reg = HashMap::new();
        nn::register(&mut reg);
        activation::register(&mut reg);
        math::register(&mut reg);
        array::register(&mut reg);
        shape::register(&mut reg);
        quant::register(&mut reg);
        reg
    })
}

impl NodeCtx<'_> {
    fn attr(&self, name: &str) -> Option<&crate::onnx::pb::AttributeProto> {
        crate::onnx::graph::attr(self.node, name)
    }
    /// The attribute `name` when present, refused when its declared type is not `want` (an
    /// undeclared type, as some exporters write, is taken at its word).
    fn typed(
        &self,
        name: &str,
        want: AttributeType,
    ) -> Result<Option<&crate::onnx::pb::AttributeProto>> {
        let Some(a) = self.attr(name) else {
            return Ok(None);
        };
        if a.r#type != AttributeType::Undefined as i32 && a.r#type != want as i32 {
            let got = AttributeType::try_from(a.r#type)
                .map_or_else(|_| format!("type {}", a.r#type), |t| t.as_str_name().into());
            bail!(
                "attribute '{name}' is {got}, expected {}",
                want.as_str_name()
            );
        }
        Ok(Some(a))
    }
    pub fn has(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }
    pub fn int(&self, name: &str, default: i64) -> Result<i64> {
        Ok(self
            .typed(name, AttributeType::Int)?
            .map_or(default, |a| a.i))
    }
    pub fn float(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self
            .typed(name, AttributeType::Float)?
            .map_or(default, |a| a.f))
    }
    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        Ok(self
            .typed(name, AttributeType::Ints)?
            .map(|a| a.ints.clone()))
    }
    pub fn floats(&self, name: &str) -> Result<Option<Vec<f32>>> {
        Ok(self
            .typed(name, AttributeType::Floats)?
            .map(|a| a.floats.clone()))
    }
    pub fn string(&self, name: &str, default: &str) -> Result<String> {
        Ok(self
            .typed(name, AttributeType::String)?
            .map_or(default.to_string(), |a| {
                String::from_utf8_lossy(&a.s).into_owned()
            }))
    }
    pub fn tensor(&self, name: &str) -> Result<Option<&crate::onnx::pb::TensorProto>> {
        Ok(self
            .typed(name, AttributeType::Tensor)?
            .and_then(|a| a.t.as_ref()))
    }
    /// The ONNX element type of input `i`, when it is a constant.
    pub fn input_type(&self, i: usize) -> Option<i32> {
        self.input_types.get(i).copied().flatten()
    }
    /// Number of outputs the node actually uses (trailing empty names do not count).
    pub fn used_outputs(&self) -> usize {
        self.node
            .output
            .iter()
            .rposition(|o| !o.is_empty())
            .map_or(0, |i| i + 1)
    }
}

/// Required input `i`.
pub fn input<'a>(inputs: &[Option<&'a Value>], i: usize) -> Result<&'a Value> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| anyhow!("required input {i} is missing"))
}

/// Optional input `i`.
pub fn opt<'a>(inputs: &[Option<&'a Value>], i: usize) -> Option<&'a Value> {
    inputs.get(i).copied().flatten()
}

/// Normalizes a possibly negative axis against `rank`.
pub fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if !(0..r.max(1)).contains(&v) {
        bail!("axis {a} is out of range for rank {rank}");
    }
    Ok(v as usize)
}

/// Integer values of an optional input (axes, pads, ...), or None.
pub fn opt_ints(inputs: &[Option<&Value>], i: usize) -> Result<Option<Vec<i64>>> {
    opt(inputs, i)
        .map(|v| {
            v.ints()
                .map(|x| x.data)
                .with_context(|| format!("input {i}"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    #[test]
    fn registry_covers_every_op_the_lowering_promises() {
        let reg = super::registry();
        for op in crate::lower::SUPPORTED_OPS {
            assert!(
                reg.contains_key(op),
                "{op} is listed as supported but has no builder"
            );
        }
        assert_eq!(
            reg.len(),
            crate::lower::SUPPORTED_OPS.len(),
            "registry and SUPPORTED_OPS differ"
        );
    }
}
