//! Graph lowering: the ONNX graph to a differentiable candle program. This module owns the op
//! registry (the one list of what can be lowered, which `inspect` reports before a long run) and
//! the [`Program`], which runs the graph on candle tensors with taps for training losses (every
//! BatchNormalization input, the penultimate feature).

pub mod cost;
pub mod ops;
pub mod program;
pub mod value;

pub use program::{Forward, Program, lower, lower_with, penultimate_of};

/// ONNX ops (default domain) the lowering registry covers: CNN classifiers as PyTorch, tf2onnx/Keras
/// and MXNet export them, plus the shape sub-graphs of dynamic-batch exports. A unit test keeps this
/// list and the registry equal.
pub const SUPPORTED_OPS: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Div",
    "Dropout",
    "Expand",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LeakyRelu",
    "LogSoftmax",
    "MatMul",
    "MaxPool",
    "Mul",
    "PRelu",
    "QuantizeLinear",
    "DequantizeLinear",
    "Pad",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Upsample",
];

/// Whether an op (by type and domain) is in the lowering registry.
pub fn is_supported(op_type: &str, domain: &str) -> bool {
    (domain.is_empty() || domain == "ai.onnx") && SUPPORTED_OPS.contains(&op_type)
}
