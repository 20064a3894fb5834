//! Every op of the lowering registry, in small single-op graphs with awkward attributes: the
//! candle forward must match ONNX Runtime (f32), and the gradient with respect to the input must
//! match central finite differences (f64). This is what guards against candle's silent gradient
//! bugs (max-pool, nearest upsampling, ...).

use candle_core::{DType, Device, Tensor, Var};
use datafree::lower::lower;
use datafree::onnx::builder::{
    Dim, ModelBuilder, attr_float, attr_int, attr_ints, tensor_f32, tensor_i64,
};
use datafree::onnx::pb::{AttributeProto, ModelProto, TensorProto, tensor_proto::DataType};
use datafree::onnx::{from_bytes, load_model};
use datafree::verify::ort_runtime;
use prost::Message;
use rand::{Rng, SeedableRng};

/// One test case: an op with attributes and constant extra inputs, on an input of `dims`.
struct Case {
    name: &'static str,
    op: &'static str,
    attrs: Vec<AttributeProto>,
    /// Extra inputs after X (None = omitted optional input).
    extra: Vec<Option<TensorProto>>,
    dims: Vec<usize>,
    opset: i64,
}

fn case(name: &'static str, op: &'static str, dims: &[usize]) -> Case {
    Case {
        name,
        op,
        attrs: vec![],
        extra: vec![],
        dims: dims.to_vec(),
        opset: 17,
    }
}

impl Case {
    fn attrs(mut self, a: Vec<AttributeProto>) -> Self {
        self.attrs = a;
        self
    }
    fn inputs(mut self, e: Vec<Option<TensorProto>>) -> Self {
        self.extra = e;
        self
    }
    fn opset(mut self, o: i64) -> Self {
        self.opset = o;
        self
    }

    fn model(&self) -> ModelProto {
        let mut m = ModelBuilder::new(self.name, self.opset);
        let dims: Vec<Dim> = self.dims.iter().map(|&d| Dim::Fixed(d as i64)).collect();
        m.input("x", DataType::Float, &dims);
        let mut names = vec!["x".to_string()];
        for (i, e) in self.extra.iter().enumerate() {
            match e {
                Some(t) => {
                    let mut t = t.clone();
                    t.name = format!("in{i}");
                    names.push(m.initializer(t));
                }
                None => names.push(String::new()),
            }
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        m.node(self.op, "op", &refs, &["y"], self.attrs.clone());
        m.output_any_shape("y");
        m.build()
    }
}

fn randn(n: usize, seed: u64) -> Vec<f64> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-2.0..2.0)).collect()
}

fn weights(dims: &[usize], seed: u64) -> TensorProto {
    let v: Vec<f32> = randn(dims.iter().product(), seed)
        .iter()
        .map(|&x| x as f32 * 0.5)
        .collect();
    tensor_f32("w", dims, &v)
}

fn ints(v: &[i64]) -> Option<TensorProto> {
    Some(tensor_i64("i", &[v.len()], v))
}

fn floats(v: &[f32]) -> Option<TensorProto> {
    Some(tensor_f32("f", &[v.len()], v))
}

fn run_case(c: &Case) {
    let model = c.model();
    let (_dir, path) = crate::common::write_temp(&model, "op.onnx");
    let loaded = load_model(&path).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let n: usize = c.dims.iter().product();
    let x64 = randn(n, 42);
    let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();

    // Forward against ONNX Runtime.
    let prog =
        lower(&loaded, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{}: {e:#}", c.name));
    let ours = prog
        .forward(&Tensor::from_slice(&x32, c.dims.as_slice(), &Device::Cpu).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e:#}", c.name));
    let mut s = ort_runtime::session(&path, 1).unwrap_or_else(|e| panic!("{}: ORT: {e:#}", c.name));
    let (oshape, theirs) = ort_runtime::run_f32(&mut s, &c.dims, &x32)
        .unwrap_or_else(|e| panic!("{}: ORT run: {e:#}", c.name));
    assert_eq!(ours.dims(), oshape.as_slice(), "{}: output shape", c.name);
    let ours: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
    let scale = theirs.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        diff <= 2e-6 * scale.max(1.0) * 4.0,
        "{}: max |candle - ORT| = {diff:e} (scale {scale})",
        c.name
    );

    // Input gradient against central finite differences, in f64.
    let prog = lower(&loaded, &Device::Cpu, DType::F64).unwrap();
    let x = Var::from_vec(x64.clone(), c.dims.as_slice(), &Device::Cpu).unwrap();
    let y = prog.forward(x.as_tensor()).unwrap();
    let w = Tensor::from_vec(randn(y.elem_count(), 7), y.dims(), &Device::Cpu).unwrap();
    let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
    let grads = loss(&y).backward().unwrap();
    let g: Vec<f64> = grads
        .get(&x)
        .unwrap_or_else(|| panic!("{}: no gradient reached the input", c.name))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let eps = 1e-6;
    // Up to 64 probed coordinates, spread over the input.
    let stride = (n / 64).max(1);
    for i in (0..n).step_by(stride) {
        let f = |d: f64| {
            let mut v = x64.clone();
            v[i] += d;
            let t = Tensor::from_vec(v, c.dims.as_slice(), &Device::Cpu).unwrap();
            loss(&prog.forward(&t).unwrap()).to_scalar::<f64>().unwrap()
        };
        let fd = (f(eps) - f(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() <= 1e-5 * (1.0 + fd.abs()),
            "{}: d/dx[{i}] autograd {} vs finite difference {fd}",
            c.name,
            g[i]
        );
    }
}

macro_rules! op_tests {
    ($($name:ident => $case:expr;)*) => {
        $(
            #[test]
            fn $name() {
                run_case(&$case);
            }
        )*
    };
}

op_tests! {
    conv_stride2_bias => case("conv_stride2_bias", "Conv", &[2, 3, 9, 9])
        .attrs(vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1]), attr_ints("strides", &[2, 2])])
        .inputs(vec![Some(weights(&[4, 3, 3, 3], 1)), Some(weights(&[4], 2))]);
    conv_non_square_asymmetric_pads => case("conv_asym", "Conv", &[1, 2, 7, 10])
        .attrs(vec![attr_ints("pads", &[0, 1, 2, 0]), attr_ints("strides", &[1, 1])])
        .inputs(vec![Some(weights(&[3, 2, 3, 2], 3))]);
    conv_non_square_stride2 => case("conv_ns_s2", "Conv", &[2, 2, 7, 10])
        .attrs(vec![attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1])])
        .inputs(vec![Some(weights(&[3, 2, 3, 3], 18))]);
    conv_non_square_asymmetric_stride2 => case("conv_ns_asym_s2", "Conv", &[1, 2, 6, 9])
        .attrs(vec![attr_ints("strides", &[2, 2]), attr_ints("pads", &[0, 1, 1, 0])])
        .inputs(vec![Some(weights(&[2, 2, 3, 3], 19))]);
    conv_per_axis_strides => case("conv_strides", "Conv", &[1, 2, 8, 9])
        .attrs(vec![attr_ints("strides", &[2, 1]), attr_ints("pads", &[1, 1, 1, 1])])
        .inputs(vec![Some(weights(&[2, 2, 3, 3], 4))]);
    conv_dilated_grouped => case("conv_dil_group", "Conv", &[2, 4, 9, 9])
        .attrs(vec![attr_ints("dilations", &[2, 2]), attr_int("group", 2), attr_ints("pads", &[2, 2, 2, 2])])
        .inputs(vec![Some(weights(&[6, 2, 3, 3], 5))]);
    conv_depthwise_same_upper => case("conv_depthwise", "Conv", &[1, 3, 8, 8])
        .attrs(vec![attr_int("group", 3), attr_ints("strides", &[2, 2]), auto_pad("SAME_UPPER")])
        .inputs(vec![Some(weights(&[3, 1, 3, 3], 6))]);
    conv_1d => case("conv_1d", "Conv", &[2, 3, 11])
        .attrs(vec![attr_ints("pads", &[1, 1]), attr_ints("strides", &[2])])
        .inputs(vec![Some(weights(&[4, 3, 3], 7))]);
    conv_transpose_stride2_output_padding => case("convt", "ConvTranspose", &[1, 4, 5, 5])
        .attrs(vec![attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1]), attr_ints("output_padding", &[1, 1]), attr_int("group", 2)])
        .inputs(vec![Some(weights(&[4, 3, 3, 3], 8)), Some(weights(&[6], 9))]);
    batch_norm => case("bn", "BatchNormalization", &[2, 3, 4, 5])
        .attrs(vec![attr_float("epsilon", 1e-3)])
        .inputs(vec![floats(&[1.5, 0.5, -1.0]), floats(&[0.1, -0.2, 0.3]), floats(&[0.5, -0.5, 0.0]), floats(&[2.0, 0.5, 1.0])]);
    max_pool_3x3_s2_pad_ceil => case("maxpool", "MaxPool", &[1, 2, 8, 9])
        .attrs(vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1]), attr_int("ceil_mode", 1)]);
    max_pool_2x2 => case("maxpool2", "MaxPool", &[2, 3, 6, 6])
        .attrs(vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])]);
    avg_pool_exclude_pad => case("avgpool", "AveragePool", &[1, 2, 7, 7])
        .attrs(vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1])]);
    avg_pool_include_pad_ceil => case("avgpool_inc", "AveragePool", &[1, 2, 8, 8])
        .attrs(vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1]), attr_int("count_include_pad", 1), attr_int("ceil_mode", 1)]);
    avg_pool_kernel_eq_stride => case("avgpool_fast", "AveragePool", &[2, 3, 8, 8])
        .attrs(vec![attr_ints("kernel_shape", &[4, 4]), attr_ints("strides", &[4, 4])]);
    global_average_pool => case("gap", "GlobalAveragePool", &[2, 3, 5, 4]);
    global_max_pool => case("gmp", "GlobalMaxPool", &[2, 3, 5, 4]);
    gemm_trans_alpha_beta => case("gemm", "Gemm", &[5, 3])
        .attrs(vec![attr_int("transA", 1), attr_int("transB", 1), attr_float("alpha", 0.5), attr_float("beta", 2.0)])
        .inputs(vec![Some(weights(&[4, 5], 10)), Some(weights(&[4], 11))]);
    matmul_batched => case("matmul", "MatMul", &[2, 3, 4]).inputs(vec![Some(weights(&[4, 5], 12))]);
    softmax_axis1 => case("softmax", "Softmax", &[2, 5, 3]).attrs(vec![attr_int("axis", 1)]);
    softmax_opset11_coerces_2d => case("softmax11", "Softmax", &[2, 3, 4]).attrs(vec![attr_int("axis", 1)]).opset(11);
    log_softmax => case("logsoftmax", "LogSoftmax", &[3, 7]);
    resize_nearest_x2 => case("resize_nearest", "Resize", &[1, 2, 3, 4])
        .attrs(vec![attr_str("mode", "nearest")])
        .inputs(vec![None, floats(&[1.0, 1.0, 2.0, 2.0])]);
    resize_nearest_asymmetric_floor_sizes => case("resize_nearest_sizes", "Resize", &[1, 2, 5, 4])
        .attrs(vec![attr_str("mode", "nearest"), attr_str("coordinate_transformation_mode", "asymmetric"), attr_str("nearest_mode", "floor")])
        .inputs(vec![None, None, ints(&[1, 2, 7, 9])]);
    resize_linear_half_pixel => case("resize_linear", "Resize", &[1, 2, 3, 5])
        .attrs(vec![attr_str("mode", "linear")])
        .inputs(vec![None, floats(&[1.0, 1.0, 2.0, 2.0])]);
    resize_linear_align_corners => case("resize_ac", "Resize", &[1, 1, 4, 4])
        .attrs(vec![attr_str("mode", "linear"), attr_str("coordinate_transformation_mode", "align_corners")])
        .inputs(vec![None, None, ints(&[1, 1, 7, 5])]);
    upsample_opset9 => case("upsample", "Upsample", &[1, 2, 3, 3])
        .opset(9)
        .inputs(vec![floats(&[1.0, 1.0, 2.0, 2.0])]);
    relu => case("relu", "Relu", &[2, 3, 4]);
    leaky_relu => case("leaky", "LeakyRelu", &[2, 3, 4]).attrs(vec![attr_float("alpha", 0.2)]);
    prelu => case("prelu", "PRelu", &[2, 3, 2, 2]).inputs(vec![Some(weights(&[3, 1, 1], 13))]);
    clip_inputs => case("clip", "Clip", &[2, 3, 4]).inputs(vec![Some(tensor_f32("lo", &[], &[-0.5])), Some(tensor_f32("hi", &[], &[1.0]))]);
    clip_attrs_opset6 => case("clip6", "Clip", &[2, 3, 4]).opset(7).attrs(vec![attr_float("min", 0.0), attr_float("max", 6.0)]);
    sigmoid => case("sigmoid", "Sigmoid", &[2, 3, 4]);
    hard_sigmoid => case("hardsigmoid", "HardSigmoid", &[2, 3, 4]).attrs(vec![attr_float("alpha", 0.3)]);
    hard_swish => case("hardswish", "HardSwish", &[2, 3, 4]);
    tanh => case("tanh", "Tanh", &[2, 3, 4]);
    add_broadcast => case("add", "Add", &[2, 3, 4]).inputs(vec![Some(weights(&[3, 1], 14))]);
    sub_broadcast => case("sub", "Sub", &[2, 3, 4]).inputs(vec![Some(weights(&[4], 15))]);
    mul_broadcast => case("mul", "Mul", &[2, 3, 4]).inputs(vec![Some(weights(&[1, 3, 1], 16))]);
    div_broadcast => case("div", "Div", &[2, 3, 4]).inputs(vec![floats(&[2.0, -4.0, 0.5, 1.5])]);
    reduce_mean_axes_attr => case("reducemean", "ReduceMean", &[2, 3, 4]).attrs(vec![attr_ints("axes", &[1, -1]), attr_int("keepdims", 0)]);
    reduce_mean_axes_input => case("reducemean18", "ReduceMean", &[2, 3, 4]).opset(18).inputs(vec![ints(&[2])]);
    reduce_max_axes_attr => case("reducemax", "ReduceMax", &[2, 3, 4]).attrs(vec![attr_ints("axes", &[1])]);
    reduce_min_all_axes => case("reducemin", "ReduceMin", &[2, 3, 4]).attrs(vec![attr_int("keepdims", 0)]);
    reduce_sum_axes_input => case("reducesum", "ReduceSum", &[2, 3, 4]).opset(13).inputs(vec![ints(&[0, -1])]);
    cast_to_float => case("cast", "Cast", &[2, 3]).attrs(vec![attr_int("to", 1)]);
    flatten_axis2 => case("flatten", "Flatten", &[2, 3, 4, 5]).attrs(vec![attr_int("axis", 2)]);
    reshape_zero_and_minus_one => case("reshape", "Reshape", &[2, 3, 4]).inputs(vec![ints(&[0, -1, 2])]);
    transpose => case("transpose", "Transpose", &[2, 3, 4]).attrs(vec![attr_ints("perm", &[2, 0, 1])]);
    squeeze_input => case("squeeze", "Squeeze", &[2, 1, 4, 1]).inputs(vec![ints(&[1, -1])]);
    unsqueeze_attr_opset11 => case("unsqueeze", "Unsqueeze", &[2, 3]).opset(11).attrs(vec![attr_ints("axes", &[0, 3])]);
    concat_with_constant => case("concat", "Concat", &[2, 3]).attrs(vec![attr_int("axis", 1)]).inputs(vec![Some(weights(&[2, 2], 17))]);
    slice_steps_negative => case("slice", "Slice", &[3, 8, 6])
        .inputs(vec![ints(&[-1, 1]), ints(&[i64::MIN, 100]), ints(&[1, 2]), ints(&[-2, 2])]);
    slice_option_a_shortcut => case("slice_a", "Slice", &[2, 4, 8, 8])
        .inputs(vec![ints(&[0, 0]), ints(&[i64::MAX, i64::MAX]), ints(&[2, 3]), ints(&[2, 2])]);
    pad_constant_value => case("pad_const", "Pad", &[1, 2, 3, 3]).inputs(vec![ints(&[0, 1, 1, 0, 0, 2, 0, 1]), Some(tensor_f32("v", &[], &[0.5]))]);
    pad_negative_crops => case("pad_crop", "Pad", &[1, 2, 5, 5]).inputs(vec![ints(&[0, 0, -1, 2, 0, 0, 1, -2])]);
    pad_reflect => case("pad_reflect", "Pad", &[1, 2, 4, 5]).attrs(vec![attr_str("mode", "reflect")]).inputs(vec![ints(&[0, 0, 2, 1, 0, 0, 1, 3])]);
    pad_edge => case("pad_edge", "Pad", &[1, 2, 4, 5]).attrs(vec![attr_str("mode", "edge")]).inputs(vec![ints(&[0, 0, 1, 2, 0, 0, 2, 1])]);
    gather_negative_indices => case("gather", "Gather", &[4, 3, 2]).attrs(vec![attr_int("axis", 1)]).inputs(vec![ints(&[2, -3, 2])]);
    expand => case("expand", "Expand", &[3, 1]).inputs(vec![ints(&[2, 3, 4])]);
    identity => case("identity", "Identity", &[2, 3]);
    dropout_inference => case("dropout", "Dropout", &[2, 3]);
}

fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: datafree::onnx::pb::attribute_proto::AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn auto_pad(v: &str) -> AttributeProto {
    attr_str("auto_pad", v)
}

/// Split has several outputs and the shape ops produce integers: a small graph covers them,
/// including the dynamic-batch Shape -> Gather -> Unsqueeze -> Concat -> Reshape sub-graph that
/// PyTorch exports, plus ConstantOfShape, Cast and Constant.
#[test]
fn shape_subgraph_split_and_constants_match_ort() {
    let mut m = ModelBuilder::new("shapes", 17);
    m.input("x", DataType::Float, &[Dim::from("N"), 6.into(), 2.into()]);
    m.node("Shape", "shape", &["x"], &["s"], vec![]);
    m.node(
        "Constant",
        "c0",
        &[],
        &["zero"],
        vec![datafree::onnx::builder::attr_tensor(
            "value",
            tensor_i64("z", &[], &[0]),
        )],
    );
    m.node(
        "Gather",
        "g",
        &["s", "zero"],
        &["n"],
        vec![attr_int("axis", 0)],
    );
    m.node("Unsqueeze", "u", &["n", "ax0"], &["n1"], vec![]);
    m.initializer(tensor_i64("ax0", &[1], &[0]));
    m.initializer(tensor_i64("minus1", &[1], &[-1]));
    m.node(
        "Concat",
        "cat",
        &["n1", "minus1"],
        &["shape2"],
        vec![attr_int("axis", 0)],
    );
    m.node("Reshape", "r", &["x", "shape2"], &["flat"], vec![]);
    m.node(
        "Split",
        "split",
        &["flat", "sizes"],
        &["a", "b"],
        vec![attr_int("axis", 1)],
    );
    m.initializer(tensor_i64("sizes", &[2], &[5, 7]));
    m.node(
        "ConstantOfShape",
        "cos",
        &["shape_b"],
        &["fill"],
        vec![datafree::onnx::builder::attr_tensor(
            "value",
            tensor_f32("v", &[1], &[0.25]),
        )],
    );
    m.initializer(tensor_i64("shape_b", &[1], &[7]));
    m.node("Mul", "mul", &["b", "fill"], &["b2"], vec![]);
    m.node("Cast", "cast", &["n"], &["nf"], vec![attr_int("to", 1)]);
    m.node("Add", "add", &["b2", "nf"], &["b3"], vec![]);
    m.node(
        "Concat",
        "cat2",
        &["b3", "a"],
        &["y"],
        vec![attr_int("axis", 1)],
    );
    m.output_any_shape("y");
    let model = m.build();
    let bytes = model.encode_to_vec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shapes.onnx");
    std::fs::write(&path, &bytes).unwrap();
    let loaded = from_bytes(&path, &bytes).expect("valid test model");
    let prog = lower(&loaded, &Device::Cpu, DType::F32).unwrap();
    let mut s = ort_runtime::session(&path, 1).unwrap();
    for n in [1usize, 3] {
        let x: Vec<f32> = randn(n * 12, n as u64).iter().map(|&v| v as f32).collect();
        let ours: Vec<f32> = prog
            .forward(&Tensor::from_slice(&x, (n, 6, 2), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (shape, theirs) = ort_runtime::run_f32(&mut s, &[n, 6, 2], &x).unwrap();
        assert_eq!(shape, vec![n, 12]);
        let d = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-6, "batch {n}: {d}");
    }
}

/// The error lowering `model` gives (written to bad.onnx), as one line.
fn lower_error(model: &ModelProto) -> String {
    let (_dir, path) = crate::common::write_temp(model, "bad.onnx");
    format!(
        "{:#}",
        lower(&load_model(&path).unwrap(), &Device::Cpu, DType::F32)
            .err()
            .expect("lowering must fail")
    )
}

#[test]
fn unsupported_op_is_an_error_naming_node_and_op() {
    let mut m = ModelBuilder::new("bad", 17);
    m.input("x", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(4)]);
    m.node("LpNormalization", "norm1", &["x"], &["y"], vec![]);
    m.output_any_shape("y");
    let e = lower_error(&m.build());
    assert!(
        e.contains("bad.onnx")
            && e.contains("node 'norm1' (LpNormalization)")
            && e.contains("not supported"),
        "{e}"
    );
}

#[test]
fn bad_attribute_is_an_error_naming_node_and_op() {
    let mut m = ModelBuilder::new("bad", 17);
    m.input(
        "x",
        DataType::Float,
        &[Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(4)],
    );
    m.node(
        "Resize",
        "up",
        &["x", "", "sc"],
        &["y"],
        vec![attr_str("mode", "cubic")],
    );
    m.initializer(tensor_f32("sc", &[4], &[1.0, 1.0, 2.0, 2.0]));
    m.output_any_shape("y");
    let e = lower_error(&m.build());
    assert!(
        e.contains("node 'up' (Resize)") && e.contains("mode 'cubic'"),
        "{e}"
    );
}

#[test]
fn an_attribute_of_the_wrong_declared_type_is_an_error_naming_it() {
    let mut m = ModelBuilder::new("bad", 17);
    m.input(
        "x",
        DataType::Float,
        &[Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(4), Dim::Fixed(4)],
    );
    // `group` declared FLOAT: taking its (absent) int would silently read 0.
    let group = AttributeProto {
        name: "group".into(),
        r#type: datafree::onnx::pb::attribute_proto::AttributeType::Float as i32,
        f: 2.0,
        ..Default::default()
    };
    m.initializer(weights(&[2, 1, 3, 3], 1));
    m.node("Conv", "conv1", &["x", "w"], &["y"], vec![group]);
    m.output_any_shape("y");
    let e = lower_error(&m.build());
    assert!(
        e.contains("node 'conv1' (Conv)") && e.contains("attribute 'group' is FLOAT, expected INT"),
        "{e}"
    );
}
