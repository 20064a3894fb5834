//! Student architectures written as ONNX: the small classifiers data-free distillation trains
//! from scratch (`datafree student`, `compress --method cpsc --student`). Each is freshly
//! initialised from a seed, keeps its BatchNormalization layers (running statistics 0/1 until
//! a run trains them) and takes NCHW inputs with a dynamic batch:
//! - `resnet8`, `resnet20`: He et al.'s CIFAR ResNets (16-32-64 channels, option-A shortcuts,
//!   global average pool);
//! - `resnet8-small`, `resnet20-small`: the ResNetSmall variant with a 64-channel stem, 1x1
//!   conv + BN projections opening each stage (a ReLU after those blocks only) and a 4x4
//!   average pool before the classifier, as `../shared/teachers/cifar10_resnet8.onnx` has it;
//! - `wrn-D-K`: pre-activation Wide-ResNets (BN -> ReLU -> conv, 1x1 projection from the
//!   pre-activated input where widths change, BN -> ReLU -> global pool at the end);
//! - `mobilenetv2`: the CIFAR variant (stride-1 stem and second stage), ReLU6 as Clip.

mod net;

use anyhow::{Result, ensure};
use serde::Serialize;

use crate::onnx::pb::ModelProto;
use net::Net;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Arch {
    #[value(name = "resnet8")]
    #[serde(rename = "resnet8")]
    Resnet8,
    #[value(name = "resnet20")]
    #[serde(rename = "resnet20")]
    Resnet20,
    #[value(name = "resnet8-small")]
    #[serde(rename = "resnet8-small")]
    Resnet8Small,
    #[value(name = "resnet20-small")]
    #[serde(rename = "resnet20-small")]
    Resnet20Small,
    #[value(name = "wrn-10-1")]
    #[serde(rename = "wrn-10-1")]
    Wrn10_1,
    #[value(name = "wrn-16-1")]
    #[serde(rename = "wrn-16-1")]
    Wrn16_1,
    #[value(name = "wrn-16-2")]
    #[serde(rename = "wrn-16-2")]
    Wrn16_2,
    #[value(name = "wrn-40-1")]
    #[serde(rename = "wrn-40-1")]
    Wrn40_1,
    #[value(name = "mobilenetv2")]
    #[serde(rename = "mobilenetv2")]
    MobilenetV2,
}

impl Arch {
    pub fn name(self) -> String {
        crate::cli_name(&self)
    }
}

/// A freshly initialised `arch` for `classes` classes and inputs of shape `input` (C, H, W).
pub fn build(
    arch: Arch,
    classes: usize,
    input: (usize, usize, usize),
    seed: u64,
) -> Result<ModelProto> {
    let (c, h, w) = input;
    ensure!(
        classes >= 2,
        "a classifier needs at least 2 classes, got {classes}"
    );
    ensure!(
        c >= 1 && h >= 8 && w >= 8,
        "input {c}x{h}x{w}: need at least 1 channel and 8x8 pixels"
    );
    let name = arch.name();
    let net = Net::new(&name, input, seed);
    Ok(match arch {
        Arch::Resnet8 => resnet(net, 1, c, classes, None),
        Arch::Resnet20 => resnet(net, 3, c, classes, None),
        Arch::Resnet8Small | Arch::Resnet20Small => {
            ensure!(
                h.is_multiple_of(16) && w.is_multiple_of(16),
                "{name}: its 4x4 pool after two stride-2 stages needs sides divisible by 16, got {h}x{w}"
            );
            let n = if arch == Arch::Resnet8Small { 1 } else { 3 };
            resnet(net, n, c, classes, Some((h / 16) * (w / 16)))
        }
        Arch::Wrn10_1 => wrn(net, 1, 1, c, classes),
        Arch::Wrn16_1 => wrn(net, 2, 1, c, classes),
        Arch::Wrn16_2 => wrn(net, 2, 2, c, classes),
        Arch::Wrn40_1 => wrn(net, 6, 1, c, classes),
        Arch::MobilenetV2 => mobilenet_v2(net, c, classes),
    })
}

/// The CIFAR ResNets with `n` basic blocks per stage of 16-32-64 channels. `small` = Some(pooled
/// cells): ResNetSmall (64-channel stem, 1x1 conv + BN projections, a ReLU only after projection
/// blocks, a 4x4 average pool leaving `pooled` cells); None: He et al.'s (16-channel stem,
/// option-A shortcuts, a ReLU after every block, global average pool).
fn resnet(mut net: Net, n: usize, c: usize, classes: usize, small: Option<usize>) -> ModelProto {
    let stem = if small.is_some() { 64 } else { 16 };
    let x = net.conv_bn("", ("conv1", "bn1"), "input", (c, stem), 3, 1, 1);
    let mut x = net.relu("relu", &x);
    let mut cin = stem;
    for (s, cout) in [16, 32, 64].into_iter().enumerate() {
        for b in 0..n {
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            let p = format!("layer{}.{b}.", s + 1);
            let y = net.conv_bn(&p, ("conv1", "bn1"), &x, (cin, cout), 3, stride, 1);
            let y = net.relu(&format!("{p}relu1"), &y);
            let y = net.conv_bn(&p, ("conv2", "bn2"), &y, (cout, cout), 3, 1, 1);
            let project = stride != 1 || cin != cout;
            let short = match (project, small) {
                (false, _) => x.clone(),
                (true, Some(_)) => {
                    let sc = ("shortcut.0", "shortcut.1");
                    net.conv_bn(&p, sc, &x, (cin, cout), 1, stride, 1)
                }
                (true, None) => net.subsample_pad(&format!("{p}shortcut"), &x, cout - cin),
            };
            let y = net.add(&format!("{p}add"), &y, &short);
            x = if project || small.is_none() {
                net.relu(&format!("{p}relu2"), &y)
            } else {
                y
            };
            cin = cout;
        }
    }
    match small {
        Some(pooled) => {
            let x = net.average_pool(&x, 4);
            net.head("linear", &x, 64 * pooled, classes)
        }
        None => {
            let x = net.global_pool(&x);
            net.head("linear", &x, 64, classes)
        }
    }
}

/// Pre-activation Wide-ResNet with `n` blocks per stage and widen factor `k`.
fn wrn(mut net: Net, n: usize, k: usize, c: usize, classes: usize) -> ModelProto {
    let mut x = net.conv("conv1", "input", (c, 16), 3, 1, 1);
    let mut cin = 16;
    for (s, cout) in [16 * k, 32 * k, 64 * k].into_iter().enumerate() {
        for b in 0..n {
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            let p = format!("layer{}.{b}.", s + 1);
            let o = net.bn(&format!("{p}bn1"), &x, cin);
            let o = net.relu(&format!("{p}relu1"), &o);
            let y = net.conv_bn(&p, ("conv1", "bn2"), &o, (cin, cout), 3, stride, 1);
            let y = net.relu(&format!("{p}relu2"), &y);
            let y = net.conv(&format!("{p}conv2"), &y, (cout, cout), 3, 1, 1);
            let short = if cin != cout || stride != 1 {
                net.conv(&format!("{p}convShortcut"), &o, (cin, cout), 1, stride, 1)
            } else {
                x.clone()
            };
            x = net.add(&format!("{p}add"), &short, &y);
            cin = cout;
        }
    }
    let x = net.bn("bn1", &x, cin);
    let x = net.relu("relu", &x);
    let x = net.global_pool(&x);
    net.head("linear", &x, cin, classes)
}

/// MobileNetV2 for 32x32 inputs: inverted residuals (t, c, n, s) with the first two strides 1.
fn mobilenet_v2(mut net: Net, c: usize, classes: usize) -> ModelProto {
    const CFG: [(usize, usize, usize, usize); 7] = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let x = net.conv_bn("", ("conv1", "bn1"), "input", (c, 32), 3, 1, 1);
    let mut x = net.relu6("relu", &x);
    let mut cin = 32;
    let mut i = 0;
    for (t, cout, n, s) in CFG {
        for b in 0..n {
            let stride = if b == 0 { s } else { 1 };
            let p = format!("features.{i}.");
            let hidden = cin * t;
            let mut y = x.clone();
            if t != 1 {
                y = net.conv_bn(&p, ("expand", "bn_expand"), &y, (cin, hidden), 1, 1, 1);
                y = net.relu6(&format!("{p}relu_expand"), &y);
            }
            let y = net.conv_bn(&p, ("dw", "bn_dw"), &y, (hidden, hidden), 3, stride, hidden);
            let y = net.relu6(&format!("{p}relu_dw"), &y);
            let y = net.conv_bn(&p, ("project", "bn_project"), &y, (hidden, cout), 1, 1, 1);
            x = if stride == 1 && cin == cout {
                net.add(&format!("{p}add"), &x, &y)
            } else {
                y
            };
            cin = cout;
            i += 1;
        }
    }
    let x = net.conv_bn("", ("conv2", "bn2"), &x, (cin, 1280), 1, 1, 1);
    let x = net.relu6("relu_last", &x);
    let x = net.global_pool(&x);
    net.head("linear", &x, 1280, classes)
}
