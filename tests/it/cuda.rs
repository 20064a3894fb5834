//! CUDA against the CPU: every kernel of `datafree::kernels` (on the CPU our custom ops, on CUDA
//! candle's ops or the composed fallbacks) forward and backward, a fake-quantized activation,
//! and a whole teacher's logits, BN taps and input gradient. These run where the build has the
//! `cuda` feature and a GPU answers (scripts/gpu-check.sh); anywhere else each test prints why
//! it skipped. Tolerances are relative to the largest CPU value: f32 sums in another order.

use candle_core::{DType, Device, Tensor, Var};
use datafree::device::DeviceArg;
use datafree::kernels::{
    Conv2dSpec, Pool2dSpec, UpMode, channel_affine, channel_moments, channel_sum, clamp, conv2d,
    leaky_relu, pool2d, relu, upsample2d,
};
use datafree::quant::fake::{LearnedRange, fake_quant_activation, fake_quant_learned};
use datafree::quant::{QParams, Scales};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::say;

/// The first CUDA device, or None with the reason printed.
fn gpu(test: &str) -> Option<Device> {
    match DeviceArg::Cuda(0).open() {
        Ok(d) => Some(d),
        Err(e) => {
            say(&format!("{test}: skipped, no CUDA device: {e}"));
            None
        }
    }
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Max |a - b| relative to 1 + max |a|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    let scale = 1.0 + a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max)
        / scale
}

/// ||a - b|| / ||a||.
fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (values(a), values(b));
    let d: f32 = a.iter().zip(&b).map(|(p, q)| (p - q).powi(2)).sum();
    let n: f32 = a.iter().map(|p| p * p).sum();
    (d / n.max(f32::MIN_POSITIVE)).sqrt()
}

/// How gradients are compared: element by element, or (through a whole network, where a unit
/// within rounding of a ReLU's kink may switch sides between devices and change its receptive
/// field's gradient) by the relative norm of the difference.
#[derive(Clone, Copy)]
enum Grad {
    Max(f32),
    RelL2(f32),
}

/// Runs `f` on the CPU and on `gpu` with the same inputs; compares the outputs (max difference
/// relative to the largest value: `tol`) and the gradients of `sum(f(x) * r)` (r random) with
/// respect to every input (`grad`).
fn parity(
    gpu: &Device,
    what: &str,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Tensor,
    tol: f32,
    grad: Grad,
) {
    let run = |dev: &Device, r: Option<&Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let r = r.map_or_else(
            || random(&mut ChaCha8Rng::seed_from_u64(5), y.dims()),
            Clone::clone,
        );
        let grads = (&y * r.to_device(dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| grads.get(v).expect("every input gets a gradient").clone())
            .collect();
        (y, g, r)
    };
    let (yc, gc, r) = run(&Device::Cpu, None);
    let (yg, gg, _) = run(gpu, Some(&r));
    let d = rel_diff(&yc, &yg);
    assert!(d <= tol, "{what}: forward differs by {d:e} (> {tol:e})");
    for (i, (a, b)) in gc.iter().zip(&gg).enumerate() {
        let (d, tol) = match grad {
            Grad::Max(t) => (rel_diff(a, b), t),
            Grad::RelL2(t) => (rel_l2(a, b), t),
        };
        assert!(
            d <= tol,
            "{what}: gradient of input {i} differs by {d:e} (> {tol:e})"
        );
    }
}

#[test]
fn cuda_convolutions_match_the_cpu_kernels() {
    let Some(dev) = gpu("cuda_convolutions_match_the_cpu_kernels") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Keras 'same' at stride 2: padding only at the bottom and right.
    let asym_depthwise = Conv2dSpec {
        stride: [2, 2],
        pad: [0, 0, 1, 1],
        dilation: [1, 1],
        groups: 16,
    };
    let cases: Vec<([usize; 4], [usize; 4], Conv2dSpec)> = vec![
        (
            [4, 16, 16, 16],
            [32, 16, 3, 3],
            Conv2dSpec::uniform(1, 1, 1, 1),
        ),
        (
            [4, 16, 16, 16],
            [32, 16, 3, 3],
            Conv2dSpec::uniform(1, 2, 1, 1),
        ),
        (
            [4, 3, 32, 32],
            [16, 3, 3, 3],
            Conv2dSpec::uniform(1, 1, 1, 1),
        ),
        (
            [4, 16, 16, 16],
            [16, 1, 3, 3],
            Conv2dSpec::uniform(1, 1, 1, 16),
        ),
        ([4, 16, 17, 17], [16, 1, 3, 3], asym_depthwise),
        (
            [4, 16, 16, 16],
            [32, 4, 3, 3],
            Conv2dSpec::uniform(2, 1, 2, 4),
        ),
        (
            [4, 32, 8, 8],
            [64, 32, 1, 1],
            Conv2dSpec::uniform(0, 2, 1, 1),
        ),
    ];
    for (x, w, spec) in cases {
        let inputs = [random(&mut rng, &x), random(&mut rng, &w)];
        parity(
            &dev,
            &format!("conv {x:?} * {w:?} {spec:?}"),
            &inputs,
            &|t| conv2d(&t[0], &t[1], spec).unwrap(),
            1e-4,
            Grad::Max(1e-4),
        );
    }
}

#[test]
fn cuda_pooling_and_upsampling_match_the_cpu_kernels() {
    let Some(dev) = gpu("cuda_pooling_and_upsampling_match_the_cpu_kernels") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let spec = |kernel, stride, pad, ceil_mode, max, count_include_pad| Pool2dSpec {
        kernel,
        stride,
        pad,
        ceil_mode,
        max,
        count_include_pad,
    };
    let pools = [
        spec([3, 3], [2, 2], [1, 1, 1, 1], false, true, false),
        spec([2, 2], [2, 2], [0; 4], false, true, false),
        spec([2, 2], [2, 2], [0; 4], false, false, false),
        spec([3, 3], [1, 1], [1, 1, 1, 1], false, false, false),
        spec([3, 3], [2, 2], [1, 1, 1, 1], true, false, true),
        spec([8, 8], [1, 1], [0; 4], false, false, false),
    ];
    let x = random(&mut rng, &[4, 8, 15, 15]);
    for p in pools {
        parity(
            &dev,
            &format!("pool {p:?}"),
            std::slice::from_ref(&x),
            &|t| pool2d(&t[0], p).unwrap(),
            1e-5,
            Grad::Max(1e-5),
        );
    }
    let x = random(&mut rng, &[4, 8, 8, 8]);
    for (factor, mode) in [
        (2, UpMode::Nearest),
        (2, UpMode::Bilinear),
        (4, UpMode::Nearest),
    ] {
        parity(
            &dev,
            &format!("upsample x{factor} {mode:?}"),
            std::slice::from_ref(&x),
            &|t| upsample2d(&t[0], factor, mode).unwrap(),
            1e-5,
            Grad::Max(1e-5),
        );
    }
}

#[test]
fn cuda_channel_ops_and_activations_match_the_cpu_kernels() {
    let Some(dev) = gpu("cuda_channel_ops_and_activations_match_the_cpu_kernels") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random(&mut rng, &[8, 16, 12, 12]);
    let (a, b) = (random(&mut rng, &[16]), random(&mut rng, &[16]));
    parity(
        &dev,
        "channel_affine",
        &[x.clone(), a, b],
        &|t| channel_affine(&t[0], &t[1], &t[2]).unwrap(),
        1e-5,
        Grad::Max(1e-5),
    );
    parity(
        &dev,
        "channel_sum",
        std::slice::from_ref(&x),
        &|t| channel_sum(&t[0]).unwrap(),
        1e-5,
        Grad::Max(1e-5),
    );
    parity(
        &dev,
        "channel_moments",
        std::slice::from_ref(&x),
        &|t| {
            let (m, v) = channel_moments(&t[0]).unwrap();
            Tensor::cat(&[m, v], 0).unwrap()
        },
        1e-5,
        Grad::Max(1e-5),
    );
    parity(
        &dev,
        "relu",
        std::slice::from_ref(&x),
        &|t| relu(&t[0]).unwrap(),
        0.0,
        Grad::Max(0.0),
    );
    parity(
        &dev,
        "leaky_relu",
        std::slice::from_ref(&x),
        &|t| leaky_relu(&t[0], 0.2).unwrap(),
        1e-6,
        Grad::Max(1e-6),
    );
    parity(
        &dev,
        "clamp",
        std::slice::from_ref(&x),
        &|t| clamp(&t[0], -0.5, 0.25).unwrap(),
        0.0,
        Grad::Max(0.0),
    );
    // Fake quantization: the same codes on both devices, the straight-through gradient.
    let q = QParams::activation(-0.8, 0.9, 4, Scales::Exact);
    parity(
        &dev,
        "fake_quant_activation",
        std::slice::from_ref(&x),
        &|t| fake_quant_activation(&t[0], q).unwrap(),
        0.0,
        Grad::Max(0.0),
    );
}

#[test]
fn cuda_learned_ranges_match_the_cpu() {
    let Some(dev) = gpu("cuda_learned_ranges_match_the_cpu") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x = random(&mut rng, &[8, 16, 6, 6]);
    let r = random(&mut rng, &[8, 16, 6, 6]);
    // Output and the gradients of sum(y * r) for the input and both ends of the range.
    let run = |d: &Device| {
        let xv = Var::from_tensor(&x.to_device(d).unwrap()).unwrap();
        let range = LearnedRange::new(-0.7, 0.8, d).unwrap();
        let y = fake_quant_learned(xv.as_tensor(), &range, 4, Scales::Exact).unwrap();
        let g = (&y * r.to_device(d).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![y, g.get(&xv).unwrap().clone()];
        out.extend(range.vars().iter().map(|v| g.get(v).unwrap().clone()));
        out
    };
    let (cpu, cuda) = (run(&Device::Cpu), run(&dev));
    assert!(cuda[0].device().same_device(&dev));
    for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
        let d = rel_diff(a, b);
        assert!(d <= 1e-5, "learned range: output {i} differs by {d:e}");
    }
}

#[test]
fn cuda_teacher_forward_taps_and_input_gradient_match_the_cpu() {
    let Some(dev) = gpu("cuda_teacher_forward_taps_and_input_gradient_match_the_cpu") else {
        return;
    };
    let path = std::path::PathBuf::from(crate::common::QUICKSTART);
    let model = datafree::onnx::load_model(&path).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, &[16, 3, 32, 32]);
    let cpu = datafree::lower::lower(&model, &Device::Cpu, DType::F32).unwrap();
    let cuda = datafree::lower::lower(&model, &dev, DType::F32).unwrap();
    // The BNS loss's ingredients (every BN input's batch mean and variance) and the logits.
    let f = |p: &datafree::lower::Program, t: &[Tensor]| {
        let out = p.forward_taps(&t[0]).unwrap();
        let mut parts = vec![out.logits.flatten_all().unwrap()];
        for b in &out.bn_inputs {
            let (m, v) = channel_moments(b).unwrap();
            parts.push(m);
            parts.push(v);
        }
        Tensor::cat(&parts, 0).unwrap()
    };
    let both = |t: &[Tensor]| {
        if t[0].device().is_cpu() {
            f(&cpu, t)
        } else {
            f(&cuda, t)
        }
    };
    parity(
        &dev,
        "quick-start teacher",
        &[x],
        &both,
        1e-4,
        Grad::RelL2(1e-2),
    );
}
