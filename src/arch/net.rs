//! A small graph writer for the student architectures: PyTorch-style parameter names, freshly
//! initialised weights (Kaiming-normal convs, PyTorch's uniform Linear, BN at 1/0 with running
//! statistics 0/1), a dynamic batch dimension `N` and opset 17.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::onnx::builder::{Dim, ModelBuilder, attr_float, attr_int, attr_ints, tensor_i64};
use crate::onnx::pb::{ModelProto, tensor_proto::DataType};

/// BN epsilon of every student (PyTorch's default).
const BN_EPS: f32 = 1e-5;

pub(super) struct Net {
    m: ModelBuilder,
    r: ChaCha8Rng,
    /// Node count, for unique helper-tensor names.
    n: usize,
}

impl Net {
    pub(super) fn new(name: &str, (c, h, w): (usize, usize, usize), seed: u64) -> Self {
        let mut m = ModelBuilder::new(name, 17);
        m.input(
            "input",
            DataType::Float,
            &[
                Dim::from("N"),
                (c as i64).into(),
                (h as i64).into(),
                (w as i64).into(),
            ],
        );
        Net {
            m,
            r: ChaCha8Rng::seed_from_u64(seed),
            n: 0,
        }
    }

    fn node(
        &mut self,
        op: &str,
        scope: &str,
        inputs: &[&str],
        attrs: Vec<crate::onnx::pb::AttributeProto>,
    ) -> String {
        self.n += 1;
        let name = format!("/{scope}/{op}");
        let out = format!("{name}_output_{}", self.n);
        self.m.node(op, &name, inputs, &[&out], attrs);
        out
    }

    /// A `k`x`k` conv without bias, padding k/2, `groups` groups; parameters `{p}.weight`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv(
        &mut self,
        p: &str,
        x: &str,
        (cin, cout): (usize, usize),
        k: usize,
        stride: usize,
        groups: usize,
    ) -> String {
        let fan_in = (cin / groups * k * k) as f32;
        // Kaiming-normal for ReLU networks: std sqrt(2 / fan_in).
        let d = Normal::new(0.0f32, (2.0 / fan_in).sqrt()).expect("positive std");
        let v: Vec<f32> = (0..cout * cin / groups * k * k)
            .map(|_| d.sample(&mut self.r))
            .collect();
        let w = self
            .m
            .init_f32(&format!("{p}.weight"), &[cout, cin / groups, k, k], &v);
        let pad = (k / 2) as i64;
        let mut attrs = vec![
            attr_ints("kernel_shape", &[k as i64; 2]),
            attr_ints("strides", &[stride as i64; 2]),
            attr_ints("pads", &[pad; 4]),
        ];
        if groups > 1 {
            attrs.push(attr_int("group", groups as i64));
        }
        self.node("Conv", p, &[x, &w], attrs)
    }

    pub(super) fn bn(&mut self, p: &str, x: &str, c: usize) -> String {
        let params = [
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ];
        let names: Vec<String> = params
            .iter()
            .map(|(s, v)| self.m.init_f32(&format!("{p}.{s}"), &[c], &vec![*v; c]))
            .collect();
        let refs: Vec<&str> = std::iter::once(x)
            .chain(names.iter().map(String::as_str))
            .collect();
        self.node(
            "BatchNormalization",
            p,
            &refs,
            vec![attr_float("epsilon", BN_EPS)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_bn(
        &mut self,
        p: &str,
        (conv, bn): (&str, &str),
        x: &str,
        ch: (usize, usize),
        k: usize,
        stride: usize,
        groups: usize,
    ) -> String {
        let y = self.conv(&format!("{p}{conv}"), x, ch, k, stride, groups);
        self.bn(&format!("{p}{bn}"), &y, ch.1)
    }

    pub(super) fn relu(&mut self, scope: &str, x: &str) -> String {
        self.node("Relu", scope, &[x], vec![])
    }

    /// ReLU6 as exporters write it: Clip(0, 6).
    pub(super) fn relu6(&mut self, scope: &str, x: &str) -> String {
        let (lo, hi) = (format!("{scope}.clip_min"), format!("{scope}.clip_max"));
        self.m.init_f32(&lo, &[], &[0.0]);
        self.m.init_f32(&hi, &[], &[6.0]);
        self.node("Clip", scope, &[x, &lo, &hi], vec![])
    }

    pub(super) fn add(&mut self, scope: &str, a: &str, b: &str) -> String {
        self.node("Add", scope, &[a, b], vec![])
    }

    /// The option-A shortcut of He et al.'s CIFAR ResNets: every other pixel, channels padded
    /// with zeros on both sides (Slice with steps + Pad, as PyTorch exports it).
    pub(super) fn subsample_pad(&mut self, scope: &str, x: &str, extra: usize) -> String {
        let names = [
            ("starts", vec![0, 0]),
            ("ends", vec![i64::MAX, i64::MAX]),
            ("axes", vec![2, 3]),
            ("steps", vec![2, 2]),
        ];
        let t: Vec<String> = names
            .iter()
            .map(|(n, v)| {
                self.m
                    .initializer(tensor_i64(&format!("{scope}.{n}"), &[2], v))
            })
            .collect();
        let refs: Vec<&str> = std::iter::once(x)
            .chain(t.iter().map(String::as_str))
            .collect();
        let s = self.node("Slice", scope, &refs, vec![]);
        let (lo, hi) = (extra / 2, extra - extra / 2);
        let pads = self.m.initializer(tensor_i64(
            &format!("{scope}.pads"),
            &[8],
            &[0, lo as i64, 0, 0, 0, hi as i64, 0, 0],
        ));
        self.node("Pad", scope, &[&s, &pads], vec![])
    }

    pub(super) fn average_pool(&mut self, x: &str, k: usize) -> String {
        let k = k as i64;
        self.node(
            "AveragePool",
            "pool",
            &[x],
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[k, k]),
            ],
        )
    }

    pub(super) fn global_pool(&mut self, x: &str) -> String {
        self.node("GlobalAveragePool", "pool", &[x], vec![])
    }

    /// Flatten -> Linear(`features`, `classes`) into the graph output `logits`.
    pub(super) fn head(mut self, p: &str, x: &str, features: usize, classes: usize) -> ModelProto {
        let flat = self.node("Flatten", "flatten", &[x], vec![attr_int("axis", 1)]);
        let b = 1.0 / (features as f32).sqrt();
        let d = Uniform::new_inclusive(-b, b).expect("b > 0");
        let w: Vec<f32> = (0..classes * features)
            .map(|_| d.sample(&mut self.r))
            .collect();
        let bias: Vec<f32> = (0..classes).map(|_| d.sample(&mut self.r)).collect();
        let wn = self
            .m
            .init_f32(&format!("{p}.weight"), &[classes, features], &w);
        let bn = self.m.init_f32(&format!("{p}.bias"), &[classes], &bias);
        self.m.node(
            "Gemm",
            &format!("/{p}/Gemm"),
            &[&flat, &wn, &bn],
            &["logits"],
            vec![attr_int("transB", 1)],
        );
        self.m.output(
            "logits",
            DataType::Float,
            &[Dim::from("N"), (classes as i64).into()],
        );
        self.m.build()
    }
}
