//! Graph lowering: the ONNX graph to a differentiable candle program. This module owns the op
//! registry, the one list of what can be lowered, so `inspect` can tell a user before a long run
//! which ops of their model are not covered.

/// ONNX ops (default domain) the lowering registry covers: CNN classifiers as PyTorch, tf2onnx/Keras
/// and MXNet export them, plus the shape sub-graphs of dynamic-batch exports.
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
    "MatMul",
    "MaxPool",
    "Mul",
    "PRelu",
    "Pad",
    "ReduceMean",
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
