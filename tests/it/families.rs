//! Small classifiers of the architecture families real users bring, built with the project's
//! ONNX builder (opset 17, dynamic batch; 3x32x32 inputs and 10 classes unless said) and trained
//! on shapes10 by `examples/train_families.rs` into `onnx/family-*.onnx`. Each carries what its
//! family's exporters write:
//! - `keras`: raw 0..255 pixels and no normalisation layer, Keras 'same' padding as Pad + Conv
//!   (asymmetric at stride 2), conv biases, 1x1 projection shortcuts without BN, MaxPool and a
//!   Flatten head;
//! - `mobilenet`: inputs in [0, 1]; inverted residuals (1x1 expand, depthwise 3x3, linear 1x1
//!   projection) with ReLU6 as Clip, HardSwish, squeeze-excitation (GlobalAveragePool -> 1x1
//!   convs -> HardSigmoid -> Mul), a 1x1 head conv;
//! - `densenet`: inputs in [-1, 1]; dense blocks (BN -> ReLU -> conv, Concat), a transition with
//!   AveragePool, a GlobalAveragePool head;
//! - `preact`: standardized inputs; pre-activation residual blocks (BN -> ReLU -> conv, BN after
//!   the residual Add, projection from the pre-activated input);
//! - `tf-mobilenet`: a TensorFlow/Keras MobileNetV1 as vendors of embedded person detectors
//!   ship it: 96x96 NHWC input in [0, 1] (a Transpose to NCHW inside), 'same' padding as an
//!   asymmetric Pad before each stride-2 conv, depthwise convs with biases, BN eps 1e-3, ReLU6,
//!   two classes (shapes2: object / texture) and a final Softmax (the file outputs
//!   probabilities). The builder makes the NCHW logits core; the training example writes the
//!   interface around it.
//!
//! Weights are random but fixed by the seed; the training example makes them useful.

use datafree::onnx::builder::{Dim, ModelBuilder, attr_float, attr_int, attr_ints};
use datafree::onnx::pb::{ModelProto, tensor_proto::DataType};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// A family fixture and how it was trained.
pub struct Family {
    pub name: &'static str,
    /// The preprocessing its training used: pixels / scale, then (x - mean) / std.
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// The synthetic task (`shapes10` or `shapes2`) and the side its images are drawn at.
    pub task: &'static str,
    pub side: usize,
    /// Written as TensorFlow exports: NHWC input, a final Softmax.
    pub tensorflow: bool,
}

const fn plain(name: &'static str, scale: f32, mean: [f32; 3], std: [f32; 3]) -> Family {
    Family {
        name,
        scale,
        mean,
        std,
        task: "shapes10",
        side: 32,
        tensorflow: false,
    }
}

pub const FAMILIES: &[Family] = &[
    plain("keras", 1.0, [0.0; 3], [1.0; 3]),
    plain("mobilenet", 255.0, [0.0; 3], [1.0; 3]),
    plain("densenet", 255.0, [0.5; 3], [0.5; 3]),
    plain("preact", 255.0, [0.5, 0.45, 0.4], [0.25, 0.24, 0.26]),
    Family {
        name: "tf-mobilenet",
        scale: 255.0,
        mean: [0.0; 3],
        std: [1.0; 3],
        task: "shapes2",
        side: 96,
        tensorflow: true,
    },
];

/// The family `name`'s untrained model (its NCHW logits core for TensorFlow-style families).
pub fn build(name: &str, seed: u64) -> ModelProto {
    match name {
        "keras" => keras(seed),
        "mobilenet" => mobilenet(seed),
        "densenet" => densenet(seed),
        "preact" => preact(seed),
        "tf-mobilenet" => tf_mobilenet(seed),
        other => panic!("no family {other}"),
    }
}

struct B {
    m: ModelBuilder,
    r: ChaCha8Rng,
    n: usize,
}

impl B {
    fn new(name: &str, seed: u64) -> Self {
        Self::sized(name, seed, 32)
    }

    fn sized(name: &str, seed: u64, side: usize) -> Self {
        let mut m = ModelBuilder::new(name, 17);
        m.input(
            "input",
            DataType::Float,
            &[
                Dim::from("N"),
                3.into(),
                (side as i64).into(),
                (side as i64).into(),
            ],
        );
        Self {
            m,
            r: ChaCha8Rng::seed_from_u64(seed),
            n: 0,
        }
    }

    fn normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        let d = Normal::new(0.0f32, std).expect("std is positive");
        (0..n).map(|_| d.sample(&mut self.r)).collect()
    }

    /// A fresh tensor name.
    fn name(&mut self, what: &str) -> String {
        self.n += 1;
        format!("{what}{}", self.n)
    }

    fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<datafree::onnx::pb::AttributeProto>,
    ) -> String {
        let name = self.name(&op.to_lowercase());
        let out = format!("{name}_out");
        self.m.node(op, &name, inputs, &[&out], attrs);
        out
    }

    /// Conv with a `k`x`k` kernel; `pads` None = no padding attribute; `group` for depthwise.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        x: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: i64,
        pad: Option<i64>,
        group: usize,
        bias: bool,
    ) -> String {
        let name = self.name("conv");
        let fan = (cin / group * k * k) as f32;
        let w = self.normal(cout * cin / group * k * k, (2.0 / fan).sqrt());
        let wn = self
            .m
            .init_f32(&format!("{name}.weight"), &[cout, cin / group, k, k], &w);
        let mut inputs = vec![x.to_string(), wn];
        if bias {
            let b = self.normal(cout, 0.01);
            inputs.push(self.m.init_f32(&format!("{name}.bias"), &[cout], &b));
        }
        let mut attrs = vec![
            attr_ints("kernel_shape", &[k as i64; 2]),
            attr_ints("strides", &[stride, stride]),
        ];
        if let Some(p) = pad {
            attrs.push(attr_ints("pads", &[p; 4]));
        }
        if group > 1 {
            attrs.push(attr_int("group", group as i64));
        }
        let out = format!("{name}_out");
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.m.node("Conv", &name, &refs, &[&out], attrs);
        out
    }

    fn bn(&mut self, x: &str, c: usize, eps: f32) -> String {
        let name = self.name("bn");
        let params = [
            ("weight", vec![1.0; c]),
            ("bias", vec![0.0; c]),
            ("running_mean", vec![0.0; c]),
            ("running_var", vec![1.0; c]),
        ];
        let names: Vec<String> = params
            .iter()
            .map(|(w, v)| self.m.init_f32(&format!("{name}.{w}"), &[c], v))
            .collect();
        let out = format!("{name}_out");
        self.m.node(
            "BatchNormalization",
            &name,
            &[x, &names[0], &names[1], &names[2], &names[3]],
            &[&out],
            vec![attr_float("epsilon", eps)],
        );
        out
    }

    fn relu(&mut self, x: &str) -> String {
        self.op("Relu", &[x], vec![])
    }

    fn relu6(&mut self, x: &str) -> String {
        let (lo, hi) = (self.name("clip_min"), self.name("clip_max"));
        self.m.init_f32(&lo, &[], &[0.0]);
        self.m.init_f32(&hi, &[], &[6.0]);
        self.op("Clip", &[x, &lo, &hi], vec![])
    }

    /// Zero padding of the spatial axes: (top, left, bottom, right), as Keras exports 'same'.
    fn pad(&mut self, x: &str, p: [i64; 4]) -> String {
        let pads = self.name("pads");
        self.m.initializer(datafree::onnx::builder::tensor_i64(
            &pads,
            &[8],
            &[0, 0, p[0], p[1], 0, 0, p[2], p[3]],
        ));
        self.op("Pad", &[x, &pads], vec![])
    }

    /// Flatten -> Gemm to 10 logits, the graph's output.
    fn classifier(&mut self, x: &str, features: usize) {
        self.head(x, features, 10)
    }

    /// Flatten -> Gemm to `classes` logits, the graph's output.
    fn head(&mut self, x: &str, features: usize, classes: usize) {
        let flat = self.op("Flatten", &[x], vec![attr_int("axis", 1)]);
        let w = self.normal(classes * features, (1.0 / features as f32).sqrt());
        self.m.init_f32("fc.weight", &[classes, features], &w);
        self.m.init_f32("fc.bias", &[classes], &vec![0.0; classes]);
        self.m.node(
            "Gemm",
            "fc",
            &[&flat, "fc.weight", "fc.bias"],
            &["logits"],
            vec![attr_int("transB", 1)],
        );
        self.m.output(
            "logits",
            DataType::Float,
            &[Dim::from("N"), Dim::Fixed(classes as i64)],
        );
    }

    fn build(self) -> ModelProto {
        self.m.build()
    }
}

/// Keras-style: raw pixels, 'same' padding as Pad + Conv with biases, BN eps 1e-3, projection
/// shortcuts without BN, MaxPool and a Flatten head.
fn keras(seed: u64) -> ModelProto {
    let mut b = B::new("keras_resnet", seed);
    let eps = 1e-3;
    let x = b.pad("input", [1, 1, 1, 1]);
    let x = b.conv(&x, 3, 16, 3, 1, None, 1, true);
    let x = b.bn(&x, 16, eps);
    let mut x = b.relu(&x);
    for (cin, cout) in [(16usize, 32usize), (32, 48)] {
        // Stride 2 'same' on an even size pads one pixel at the end only.
        let y = b.pad(&x, [0, 0, 1, 1]);
        let y = b.conv(&y, cin, cout, 3, 2, None, 1, true);
        let y = b.bn(&y, cout, eps);
        let y = b.relu(&y);
        let y = b.pad(&y, [1, 1, 1, 1]);
        let y = b.conv(&y, cout, cout, 3, 1, None, 1, true);
        let y = b.bn(&y, cout, eps);
        let s = b.conv(&x, cin, cout, 1, 2, None, 1, true);
        let sum = b.op("Add", &[&y, &s], vec![]);
        x = b.relu(&sum);
    }
    let x = b.op(
        "MaxPool",
        &[&x],
        vec![
            attr_ints("kernel_shape", &[2, 2]),
            attr_ints("strides", &[2, 2]),
        ],
    );
    b.classifier(&x, 48 * 4 * 4);
    b.build()
}

/// MobileNetV2/V3-style: inverted residuals with ReLU6 (Clip), depthwise convs, linear
/// bottlenecks, a HardSwish block with squeeze-excitation, a 1x1 head conv.
fn mobilenet(seed: u64) -> ModelProto {
    let mut b = B::new("mobilenet", seed);
    let eps = 1e-3;
    let x = b.conv("input", 3, 16, 3, 1, Some(1), 1, false);
    let x = b.bn(&x, 16, eps);
    let x = b.relu6(&x);
    // Inverted residual, stride 1, with the residual Add.
    let y = b.conv(&x, 16, 48, 1, 1, Some(0), 1, false);
    let y = b.bn(&y, 48, eps);
    let y = b.relu6(&y);
    let y = b.conv(&y, 48, 48, 3, 1, Some(1), 48, false);
    let y = b.bn(&y, 48, eps);
    let y = b.relu6(&y);
    let y = b.conv(&y, 48, 16, 1, 1, Some(0), 1, false);
    let y = b.bn(&y, 16, eps);
    let x = b.op("Add", &[&x, &y], vec![]);
    // Inverted residual, stride 2, HardSwish and squeeze-excitation.
    let y = b.conv(&x, 16, 64, 1, 1, Some(0), 1, false);
    let y = b.bn(&y, 64, eps);
    let y = b.op("HardSwish", &[&y], vec![]);
    let y = b.conv(&y, 64, 64, 3, 2, Some(1), 64, false);
    let y = b.bn(&y, 64, eps);
    let y = b.op("HardSwish", &[&y], vec![]);
    let s = b.op("GlobalAveragePool", &[&y], vec![]);
    let s = b.conv(&s, 64, 16, 1, 1, Some(0), 1, true);
    let s = b.relu(&s);
    let s = b.conv(&s, 16, 64, 1, 1, Some(0), 1, true);
    let s = b.op(
        "HardSigmoid",
        &[&s],
        vec![attr_float("alpha", 1.0 / 6.0), attr_float("beta", 0.5)],
    );
    let y = b.op("Mul", &[&y, &s], vec![]);
    let y = b.conv(&y, 64, 24, 1, 1, Some(0), 1, false);
    let y = b.bn(&y, 24, eps);
    // Head.
    let y = b.conv(&y, 24, 96, 1, 1, Some(0), 1, false);
    let y = b.bn(&y, 96, eps);
    let y = b.op("HardSwish", &[&y], vec![]);
    let y = b.op("GlobalAveragePool", &[&y], vec![]);
    b.classifier(&y, 96);
    b.build()
}

/// DenseNet-style: BN -> ReLU -> conv layers whose outputs are concatenated to their inputs.
fn densenet(seed: u64) -> ModelProto {
    let mut b = B::new("densenet", seed);
    let eps = 1e-5;
    let mut x = b.conv("input", 3, 16, 3, 1, Some(1), 1, false);
    let mut c = 16;
    for (block, layers) in [2usize, 2].iter().enumerate() {
        for _ in 0..*layers {
            let y = b.bn(&x, c, eps);
            let y = b.relu(&y);
            let y = b.conv(&y, c, 12, 3, 1, Some(1), 1, false);
            x = b.op("Concat", &[&x, &y], vec![attr_int("axis", 1)]);
            c += 12;
        }
        if block == 0 {
            // Transition: BN -> ReLU -> 1x1 conv -> 2x2 average pooling.
            let y = b.bn(&x, c, eps);
            let y = b.relu(&y);
            let y = b.conv(&y, c, 24, 1, 1, Some(0), 1, false);
            x = b.op(
                "AveragePool",
                &[&y],
                vec![
                    attr_ints("kernel_shape", &[2, 2]),
                    attr_ints("strides", &[2, 2]),
                ],
            );
            c = 24;
        }
    }
    let y = b.bn(&x, c, eps);
    let y = b.relu(&y);
    let y = b.op("GlobalAveragePool", &[&y], vec![]);
    b.classifier(&y, c);
    b.build()
}

/// Pre-activation residual blocks: BN -> ReLU -> conv, BN after the residual Add, a 1x1
/// projection from the pre-activated input where the shape changes.
fn preact(seed: u64) -> ModelProto {
    let mut b = B::new("preact_resnet", seed);
    let eps = 1e-5;
    let mut x = b.conv("input", 3, 16, 3, 1, Some(1), 1, false);
    let mut c = 16;
    for (cout, stride) in [(16usize, 1i64), (32, 2)] {
        let a = b.bn(&x, c, eps);
        let a = b.relu(&a);
        let y = b.conv(&a, c, cout, 3, stride, Some(1), 1, false);
        let y = b.bn(&y, cout, eps);
        let y = b.relu(&y);
        let y = b.conv(&y, cout, cout, 3, 1, Some(1), 1, false);
        let s = if cout != c || stride != 1 {
            b.conv(&a, c, cout, 1, stride, Some(0), 1, false)
        } else {
            x.clone()
        };
        x = b.op("Add", &[&y, &s], vec![]);
        c = cout;
    }
    let y = b.bn(&x, c, eps);
    let y = b.relu(&y);
    let y = b.op("GlobalAveragePool", &[&y], vec![]);
    b.classifier(&y, c);
    b.build()
}

/// The core of a Keras MobileNetV1 (width 0.25-like) at 96 px for two classes: 'same' padding is
/// a `pads` attribute at stride 1 and an explicit bottom/right Pad at stride 2, as tf2onnx
/// writes it; depthwise convs carry biases.
fn tf_mobilenet(seed: u64) -> ModelProto {
    let mut b = B::sized("tf_mobilenet_v1", seed, 96);
    let eps = 1e-3;
    let x = b.pad("input", [0, 0, 1, 1]);
    let x = b.conv(&x, 3, 8, 3, 2, None, 1, false);
    let x = b.bn(&x, 8, eps);
    let mut x = b.relu6(&x);
    let mut c = 8;
    for (cout, stride) in [
        (16usize, 1i64),
        (32, 2),
        (32, 1),
        (64, 2),
        (64, 1),
        (128, 2),
        (128, 1),
    ] {
        let y = if stride == 2 {
            let y = b.pad(&x, [0, 0, 1, 1]);
            b.conv(&y, c, c, 3, 2, None, c, true)
        } else {
            b.conv(&x, c, c, 3, 1, Some(1), c, true)
        };
        let y = b.bn(&y, c, eps);
        let y = b.relu6(&y);
        let y = b.conv(&y, c, cout, 1, 1, Some(0), 1, false);
        let y = b.bn(&y, cout, eps);
        x = b.relu6(&y);
        c = cout;
    }
    let y = b.op("GlobalAveragePool", &[&x], vec![]);
    b.head(&y, c, 2);
    b.build()
}
