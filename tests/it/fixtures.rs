//! Small, deterministic ONNX models the project makes itself: the architecture of the quick-start
//! teacher (trained into `onnx/quickstart.onnx` by `examples/train_quickstart.rs`) and BN variants
//! (folded, partially folded, parameters behind Constant/Identity, pre-activation, unresolvable) that
//! tests build in memory. Weights are random but fixed by the seed (ChaCha8), so files are
//! reproducible bit for bit.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use datafree::onnx::builder::{
    Dim, ModelBuilder, attr_float, attr_int, attr_ints, attr_tensor, tensor_f32,
};
use datafree::onnx::pb::{ModelProto, tensor_proto::DataType};

/// Seed of the committed quick-start model.
pub const QUICKSTART_SEED: u64 = 20261121;
/// BatchNormalization epsilon used by the fixtures (PyTorch's default).
pub const BN_EPS: f32 = 1e-5;

/// How BatchNormalization appears in a [`resnet_like`] model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnVariant {
    /// Every conv followed by a BN with initializer parameters.
    Kept,
    /// Every BN folded into its conv (the exporter's default): no BN left.
    Folded,
    /// `bn3` folded into `conv3`, the others kept.
    PartiallyFolded,
    /// BN parameters routed through Constant nodes and Identity chains, as real exports do.
    ConstantParams,
    /// `bn2`'s running mean is a graph input: not a constant, so its statistics are unknown.
    ParamFromInput,
}

struct Rand(ChaCha8Rng);

impl Rand {
    fn normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        let d = Normal::new(0.0f32, std).expect("std is positive");
        (0..n).map(|_| d.sample(&mut self.0)).collect()
    }
    fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.random_range(lo..hi)).collect()
    }
}

/// A conv layer with its BN parameters (drawn once, used kept or folded).
struct ConvBn {
    name: String,
    /// Square kernel size (3, or 1 for projection shortcuts).
    k: usize,
    cin: usize,
    cout: usize,
    stride: i64,
    w: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
}

impl ConvBn {
    fn new(r: &mut Rand, name: &str, cin: usize, cout: usize, stride: i64) -> Self {
        Self::with_kernel(r, name, 3, cin, cout, stride)
    }

    fn with_kernel(
        r: &mut Rand,
        name: &str,
        k: usize,
        cin: usize,
        cout: usize,
        stride: i64,
    ) -> Self {
        let std = (2.0 / (cin * k * k) as f32).sqrt();
        Self {
            name: name.to_string(),
            k,
            cin,
            cout,
            stride,
            w: r.normal(cout * cin * k * k, std),
            gamma: r.uniform(cout, 0.8, 1.2),
            beta: r.normal(cout, 0.1),
            mean: r.normal(cout, 0.3),
            var: r.uniform(cout, 0.5, 1.5),
        }
    }

    fn conv_attrs(&self) -> Vec<datafree::onnx::pb::AttributeProto> {
        vec![
            attr_ints("kernel_shape", &[self.k as i64; 2]),
            attr_ints("pads", &[self.k as i64 / 2; 4]),
            attr_ints("strides", &[self.stride, self.stride]),
        ]
    }

    /// Conv weights and bias with the BN folded in: w' = w*g/sqrt(v+eps), b' = beta - mean*g/sqrt(v+eps).
    fn folded(&self) -> (Vec<f32>, Vec<f32>) {
        let k = self.cin * self.k * self.k;
        let mut w = self.w.clone();
        let mut b = vec![0.0; self.cout];
        for o in 0..self.cout {
            let s = self.gamma[o] / (self.var[o] + BN_EPS).sqrt();
            w[o * k..(o + 1) * k].iter_mut().for_each(|x| *x *= s);
            b[o] = self.beta[o] - self.mean[o] * s;
        }
        (w, b)
    }

    /// Emits Conv (+ BN unless folded); returns the output tensor name.
    fn emit(&self, m: &mut ModelBuilder, x: &str, fold: bool, params: BnParams) -> String {
        let conv_out = format!("{}_out", self.name);
        let wname = format!("{}.weight", self.name);
        if fold {
            let (w, b) = self.folded();
            m.init_f32(&wname, &[self.cout, self.cin, self.k, self.k], &w);
            let bname = m.init_f32(&format!("{}.bias", self.name), &[self.cout], &b);
            m.node(
                "Conv",
                &self.name,
                &[x, &wname, &bname],
                &[&conv_out],
                self.conv_attrs(),
            );
            return conv_out;
        }
        m.init_f32(&wname, &[self.cout, self.cin, self.k, self.k], &self.w);
        m.node(
            "Conv",
            &self.name,
            &[x, &wname],
            &[&conv_out],
            self.conv_attrs(),
        );
        let bn = self.name.replace("conv", "bn");
        let out = format!("{bn}_out");
        let c = self.cout;
        let names: Vec<String> = [
            ("weight", &self.gamma),
            ("bias", &self.beta),
            ("running_mean", &self.mean),
            ("running_var", &self.var),
        ]
        .iter()
        .enumerate()
        .map(|(i, (what, v))| {
            let name = format!("{bn}.{what}");
            match params {
                BnParams::Initializers => m.init_f32(&name, &[c], v),
                BnParams::Constants => {
                    // Constant -> Identity -> Identity for one parameter, a plain Constant for the rest.
                    let cname = format!("{name}.const");
                    m.node(
                        "Constant",
                        &format!("{bn}_const{i}"),
                        &[],
                        &[&cname],
                        vec![attr_tensor("value", tensor_f32(&cname, &[c], v))],
                    );
                    if i == 0 {
                        let mid = format!("{name}.id1");
                        m.node(
                            "Identity",
                            &format!("{bn}_id{i}a"),
                            &[&cname],
                            &[&mid],
                            vec![],
                        );
                        m.node(
                            "Identity",
                            &format!("{bn}_id{i}b"),
                            &[&mid],
                            &[&name],
                            vec![],
                        );
                        name
                    } else {
                        cname
                    }
                }
                BnParams::IdentityBias => {
                    let n = m.init_f32(&name, &[c], v);
                    if *what == "bias" {
                        let id = format!("{name}.identity");
                        m.node(
                            "Identity",
                            &format!("{bn}_bias_identity"),
                            &[&n],
                            &[&id],
                            vec![],
                        );
                        id
                    } else {
                        n
                    }
                }
                BnParams::MeanFromInput if *what == "running_mean" => {
                    m.input(&name, DataType::Float, &[Dim::Fixed(c as i64)]);
                    name
                }
                BnParams::MeanFromInput => m.init_f32(&name, &[c], v),
            }
        })
        .collect();
        m.node(
            "BatchNormalization",
            &bn,
            &[&conv_out, &names[0], &names[1], &names[2], &names[3]],
            &[&out],
            vec![attr_float("epsilon", BN_EPS), attr_float("momentum", 0.9)],
        );
        out
    }
}

#[derive(Clone, Copy, PartialEq)]
enum BnParams {
    Initializers,
    Constants,
    IdentityBias,
    MeanFromInput,
}

fn relu(m: &mut ModelBuilder, name: &str, x: &str) -> String {
    let out = format!("{name}_out");
    m.node("Relu", name, &[x], &[&out], vec![]);
    out
}

/// GlobalAveragePool -> Flatten -> Gemm head, output `logits` [N, classes].
fn head(m: &mut ModelBuilder, r: &mut Rand, x: &str, c: usize, classes: usize) {
    m.node("GlobalAveragePool", "pool", &[x], &["pool_out"], vec![]);
    m.node(
        "Flatten",
        "flatten",
        &["pool_out"],
        &["flat"],
        vec![attr_int("axis", 1)],
    );
    let w = r.normal(classes * c, (1.0 / c as f32).sqrt());
    let b = r.normal(classes, 0.01);
    m.init_f32("fc.weight", &[classes, c], &w);
    m.init_f32("fc.bias", &[classes], &b);
    m.node(
        "Gemm",
        "fc",
        &["flat", "fc.weight", "fc.bias"],
        &["logits"],
        vec![attr_int("transB", 1)],
    );
    m.output(
        "logits",
        DataType::Float,
        &[Dim::from("N"), Dim::Fixed(classes as i64)],
    );
}

/// A small residual CNN for 3x32x32 inputs and 10 classes: stem conv, a stride-2 conv, one basic
/// residual block, global pooling and a linear classifier (opset 17, dynamic batch `N`).
pub fn resnet_like(variant: BnVariant, seed: u64) -> ModelProto {
    let mut r = Rand(ChaCha8Rng::seed_from_u64(seed));
    let layers = [
        ConvBn::new(&mut r, "conv1", 3, 16, 1),
        ConvBn::new(&mut r, "conv2", 16, 32, 2),
        ConvBn::new(&mut r, "conv3", 32, 32, 1),
        ConvBn::new(&mut r, "conv4", 32, 32, 1),
    ];
    let mut m = ModelBuilder::new("datafree_quickstart", 17);
    m.input(
        "input",
        DataType::Float,
        &[Dim::from("N"), 3.into(), 32.into(), 32.into()],
    );
    let fold = |i: usize| match variant {
        BnVariant::Folded => true,
        BnVariant::PartiallyFolded => i == 2,
        _ => false,
    };
    let params = |i: usize| match variant {
        BnVariant::ConstantParams if i == 0 => BnParams::Constants,
        BnVariant::ConstantParams if i == 3 => BnParams::IdentityBias,
        BnVariant::ParamFromInput if i == 1 => BnParams::MeanFromInput,
        _ => BnParams::Initializers,
    };
    let x = layers[0].emit(&mut m, "input", fold(0), params(0));
    let x = relu(&mut m, "relu1", &x);
    let x = layers[1].emit(&mut m, &x, fold(1), params(1));
    let block_in = relu(&mut m, "relu2", &x);
    let x = layers[2].emit(&mut m, &block_in, fold(2), params(2));
    let x = relu(&mut m, "relu3", &x);
    let x = layers[3].emit(&mut m, &x, fold(3), params(3));
    m.node("Add", "add", &[&x, &block_in], &["add_out"], vec![]);
    let x = relu(&mut m, "relu4", "add_out");
    head(&mut m, &mut r, &x, 32, 10);
    m.build()
}

/// The quick-start teacher's architecture with its initial (untrained) weights.
pub fn quickstart() -> ModelProto {
    resnet_like(BnVariant::Kept, QUICKSTART_SEED)
}

/// A pre-activation residual net (BN -> ReLU -> Conv), where BN inputs come from a conv or an Add.
pub fn preactivation(seed: u64) -> ModelProto {
    let mut r = Rand(ChaCha8Rng::seed_from_u64(seed));
    let mut m = ModelBuilder::new("datafree_preact", 17);
    m.input(
        "input",
        DataType::Float,
        &[Dim::from("N"), 3.into(), 32.into(), 32.into()],
    );
    let conv =
        |m: &mut ModelBuilder, r: &mut Rand, name: &str, x: &str, cin: usize, cout: usize| {
            let w = r.normal(cout * cin * 9, (2.0 / (cin * 9) as f32).sqrt());
            let wn = m.init_f32(&format!("{name}.weight"), &[cout, cin, 3, 3], &w);
            let out = format!("{name}_out");
            m.node(
                "Conv",
                name,
                &[x, &wn],
                &[&out],
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                ],
            );
            out
        };
    let bn = |m: &mut ModelBuilder, r: &mut Rand, name: &str, x: &str, c: usize| {
        let p = [
            r.uniform(c, 0.8, 1.2),
            r.normal(c, 0.1),
            r.normal(c, 0.3),
            r.uniform(c, 0.5, 1.5),
        ];
        let names: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .zip(&p)
            .map(|(w, v)| m.init_f32(&format!("{name}.{w}"), &[c], v))
            .collect();
        let out = format!("{name}_out");
        m.node(
            "BatchNormalization",
            name,
            &[x, &names[0], &names[1], &names[2], &names[3]],
            &[&out],
            vec![attr_float("epsilon", BN_EPS)],
        );
        out
    };
    let stem = conv(&mut m, &mut r, "stem", "input", 3, 16);
    let x = bn(&mut m, &mut r, "bnA", &stem, 16);
    let x = relu(&mut m, "reluA", &x);
    let x = conv(&mut m, &mut r, "convA", &x, 16, 16);
    let x = bn(&mut m, &mut r, "bnB", &x, 16);
    let x = relu(&mut m, "reluB", &x);
    let x = conv(&mut m, &mut r, "convB", &x, 16, 16);
    m.node("Add", "add", &[&x, &stem], &["add_out"], vec![]);
    let x = bn(&mut m, &mut r, "bnF", "add_out", 16);
    let x = relu(&mut m, "reluF", &x);
    head(&mut m, &mut r, &x, 16, 10);
    m.build()
}

/// A linear classifier on raw pixels (Flatten -> Gemm, 3x32x32 -> 10 classes): unlike a random
/// conv net, whose pooled ReLU features make it predict one class for almost every input, its
/// predictions depend strongly on the input, so tests of data paths can tell right from wrong.
pub fn linear_classifier(seed: u64) -> ModelProto {
    let mut r = Rand(ChaCha8Rng::seed_from_u64(seed));
    let mut m = ModelBuilder::new("datafree_linear", 17);
    m.input(
        "input",
        DataType::Float,
        &[Dim::from("N"), 3.into(), 32.into(), 32.into()],
    );
    m.node(
        "Flatten",
        "flatten",
        &["input"],
        &["flat"],
        vec![attr_int("axis", 1)],
    );
    let w = r.normal(10 * 3072, (1.0 / 3072f32).sqrt());
    m.init_f32("fc.weight", &[10, 3072], &w);
    m.node(
        "Gemm",
        "fc",
        &["flat", "fc.weight"],
        &["logits"],
        vec![attr_int("transB", 1)],
    );
    m.output("logits", DataType::Float, &[Dim::from("N"), Dim::Fixed(10)]);
    m.build()
}

/// The CIFAR ResNet-20 of He et al. (3 stages of 3 basic blocks, 16/32/64 channels, 1x1
/// conv + BN projection shortcuts where the shape changes) with random weights and BN
/// statistics: the benchmark's network, same layers as the PyTorch model it is timed against.
pub fn resnet20(classes: usize, seed: u64) -> ModelProto {
    let mut r = Rand(ChaCha8Rng::seed_from_u64(seed));
    let mut m = ModelBuilder::new("resnet20", 17);
    m.input(
        "input",
        DataType::Float,
        &[Dim::from("N"), 3.into(), 32.into(), 32.into()],
    );
    let stem = ConvBn::new(&mut r, "conv1", 3, 16, 1);
    let x = stem.emit(&mut m, "input", false, BnParams::Initializers);
    let mut x = relu(&mut m, "relu", &x);
    let mut cin = 16;
    for (stage, cout) in [16usize, 32, 64].into_iter().enumerate() {
        for block in 0..3 {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            let p = format!("layer{}.{block}", stage + 1);
            let a = ConvBn::new(&mut r, &format!("{p}.conv1"), cin, cout, stride);
            let b = ConvBn::new(&mut r, &format!("{p}.conv2"), cout, cout, 1);
            let y = a.emit(&mut m, &x, false, BnParams::Initializers);
            let y = relu(&mut m, &format!("{p}.relu1"), &y);
            let y = b.emit(&mut m, &y, false, BnParams::Initializers);
            let short = if stride != 1 || cin != cout {
                let proj = ConvBn::with_kernel(
                    &mut r,
                    &format!("{p}.shortcut.conv"),
                    1,
                    cin,
                    cout,
                    stride,
                );
                proj.emit(&mut m, &x, false, BnParams::Initializers)
            } else {
                x.clone()
            };
            let sum = format!("{p}.add_out");
            m.node("Add", &format!("{p}.add"), &[&y, &short], &[&sum], vec![]);
            x = relu(&mut m, &format!("{p}.relu2"), &sum);
            cin = cout;
        }
    }
    head(&mut m, &mut r, &x, 64, classes);
    m.build()
}
