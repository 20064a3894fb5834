//! The CPU kernels against candle's built-in forward ops (and direct loops where candle has
//! none), against central finite differences in f64, and across thread counts.

use candle_core::{DType, Device, Tensor, Var};
use datafree::kernels::{
    Conv2dSpec, Pool2dSpec, UpMode, channel_affine, channel_moments, channel_sum, clamp, conv2d,
    pool2d, upsample2d,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let worst = values(a)
        .iter()
        .zip(values(b))
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max);
    assert!(worst <= tol, "{what}: max difference {worst:e} > {tol:e}");
}

/// Checks the autograd gradients of `sum(f(vars) * r)` (r random) against central finite
/// differences at up to 24 random coordinates of every variable.
fn check_gradients(what: &str, vars: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vs: Vec<Var> = vars.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vs.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = random(&mut rng, y.dims());
    let loss = |ts: &[Tensor]| -> f64 {
        (f(ts) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vs.iter().enumerate() {
        let g = values(grads.get(v).expect("every variable gets a gradient"));
        let base = values(v.as_tensor());
        for _ in 0..24 {
            let at = rng.random_range(0..base.len());
            let eps = 1e-6;
            let shifted = |d: f64| -> f64 {
                let mut p = base.clone();
                p[at] += d;
                let mut args = ts.clone();
                args[i] = Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap();
                loss(&args)
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[at]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{what}: d/d(arg {i})[{at}]: autograd {} vs finite difference {fd}",
                g[at]
            );
        }
    }
}

/// Direct-loop convolution in f64 (the definition).
fn naive_conv(x: &Tensor, w: &Tensor, s: Conv2dSpec) -> Tensor {
    let (n, c, h, wd) = x.dims4().unwrap();
    let (o, cg, kh, kw) = w.dims4().unwrap();
    let (xv, wv) = (values(x), values(w));
    let [pt, pl, pb, pr] = s.pad;
    let oh = (h + pt + pb - s.dilation[0] * (kh - 1) - 1) / s.stride[0] + 1;
    let ow = (wd + pl + pr - s.dilation[1] * (kw - 1) - 1) / s.stride[1] + 1;
    let og = o / s.groups;
    let mut y = vec![0.0; n * o * oh * ow];
    for ni in 0..n {
        for oc in 0..o {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0;
                    for ci in 0..cg {
                        let ic = (oc / og) * cg + ci;
                        for i in 0..kh {
                            for j in 0..kw {
                                let iy =
                                    (oy * s.stride[0] + i * s.dilation[0]) as isize - pt as isize;
                                let ix =
                                    (ox * s.stride[1] + j * s.dilation[1]) as isize - pl as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                acc += xv[((ni * c + ic) * h + iy as usize) * wd + ix as usize]
                                    * wv[((oc * cg + ci) * kh + i) * kw + j];
                            }
                        }
                    }
                    y[((ni * o + oc) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    Tensor::from_vec(y, (n, o, oh, ow), &Device::Cpu).unwrap()
}

struct ConvCase {
    x: [usize; 4],
    w: [usize; 4],
    spec: Conv2dSpec,
}

fn conv_cases() -> Vec<ConvCase> {
    let spec = |stride: [usize; 2], pad: [usize; 4], dilation: [usize; 2], groups| Conv2dSpec {
        stride,
        pad,
        dilation,
        groups,
    };
    vec![
        // odd, non-square, dense 3x3
        ConvCase {
            x: [2, 3, 7, 5],
            w: [4, 3, 3, 3],
            spec: spec([1, 1], [1; 4], [1, 1], 1),
        },
        // stride 2 on a non-square input
        ConvCase {
            x: [2, 3, 9, 6],
            w: [5, 3, 3, 3],
            spec: spec([2, 2], [1; 4], [1, 1], 1),
        },
        // asymmetric pads, per-axis strides, groups, non-square kernel
        ConvCase {
            x: [2, 4, 9, 6],
            w: [6, 2, 3, 2],
            spec: spec([2, 1], [1, 0, 2, 1], [1, 1], 2),
        },
        // dilation 2, stride 2
        ConvCase {
            x: [1, 2, 11, 10],
            w: [4, 2, 3, 3],
            spec: spec([2, 2], [2; 4], [2, 2], 1),
        },
        // depthwise
        ConvCase {
            x: [3, 4, 6, 7],
            w: [4, 1, 3, 3],
            spec: spec([1, 1], [1; 4], [1, 1], 4),
        },
        // depthwise, channel multiplier 2, stride 2
        ConvCase {
            x: [2, 3, 7, 7],
            w: [6, 1, 3, 3],
            spec: spec([2, 2], [1; 4], [1, 1], 3),
        },
        // depthwise 5x5, per-axis dilation, asymmetric pads
        ConvCase {
            x: [2, 2, 8, 9],
            w: [2, 1, 5, 5],
            spec: spec([1, 2], [2, 4, 1, 3], [1, 2], 2),
        },
        // pointwise (no im2col)
        ConvCase {
            x: [2, 4, 5, 6],
            w: [3, 4, 1, 1],
            spec: spec([1, 1], [0; 4], [1, 1], 1),
        },
        // pointwise with stride (im2col path)
        ConvCase {
            x: [5, 4, 5, 6],
            w: [3, 4, 1, 1],
            spec: spec([2, 2], [0; 4], [1, 1], 1),
        },
        // "same" width at stride 1 (one shifted copy per tap): pads all on one side
        ConvCase {
            x: [2, 3, 6, 5],
            w: [4, 3, 3, 3],
            spec: spec([1, 1], [0, 2, 2, 0], [1, 1], 1),
        },
        // same width, dilation 2; and a 7x7 kernel on a 3-wide input (taps entirely off)
        ConvCase {
            x: [2, 2, 8, 7],
            w: [3, 2, 3, 3],
            spec: spec([1, 1], [2; 4], [2, 2], 1),
        },
        ConvCase {
            x: [2, 2, 4, 3],
            w: [3, 2, 7, 7],
            spec: spec([1, 1], [3; 4], [1, 1], 1),
        },
    ]
}

#[test]
fn conv_forward_matches_the_definition_and_candle() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (i, case) in conv_cases().iter().enumerate() {
        let (x, w) = (random(&mut rng, &case.x), random(&mut rng, &case.w));
        let ours = conv2d(&x, &w, case.spec).unwrap();
        assert_close(
            &ours,
            &naive_conv(&x, &w, case.spec),
            1e-12,
            &format!("case {i}"),
        );
        let s = case.spec;
        if s.pad.iter().all(|&p| p == s.pad[0])
            && s.stride[0] == s.stride[1]
            && s.dilation[0] == s.dilation[1]
        {
            let candle = x
                .conv2d(&w, s.pad[0], s.stride[0], s.dilation[0], s.groups)
                .unwrap();
            assert_close(&ours, &candle, 1e-12, &format!("case {i} vs candle"));
        }
        // f32 agrees with f64 to float precision.
        let f32 = conv2d(
            &x.to_dtype(DType::F32).unwrap(),
            &w.to_dtype(DType::F32).unwrap(),
            case.spec,
        )
        .unwrap();
        assert_close(&f32, &ours, 1e-5, &format!("case {i} in f32"));
    }
}

#[test]
fn conv_gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (i, case) in conv_cases().iter().enumerate() {
        let (x, w) = (random(&mut rng, &case.x), random(&mut rng, &case.w));
        let spec = case.spec;
        check_gradients(&format!("conv case {i}"), &[x, w], &|t| {
            conv2d(&t[0], &t[1], spec).unwrap()
        });
    }
}

#[test]
fn frozen_conv_weights_get_no_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = Var::from_tensor(&random(&mut rng, &[2, 4, 7, 7])).unwrap();
    let frozen = random(&mut rng, &[6, 2, 3, 3]);
    let y = conv2d(x.as_tensor(), &frozen, Conv2dSpec::uniform(1, 2, 1, 2)).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&frozen).is_none());
    assert!(grads.get(&x).is_some());
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, &[9, 6, 10, 10])
        .to_dtype(DType::F32)
        .unwrap();
    let run = |threads: usize| -> Vec<Vec<f64>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut out = Vec::new();
            for (w, spec) in [
                ([8, 6, 3, 3], Conv2dSpec::uniform(1, 1, 1, 1)),
                ([6, 1, 3, 3], Conv2dSpec::uniform(1, 2, 1, 6)),
            ] {
                let mut r = ChaCha8Rng::seed_from_u64(5);
                let xv = Var::from_tensor(&x).unwrap();
                let wv =
                    Var::from_tensor(&random(&mut r, &w).to_dtype(DType::F32).unwrap()).unwrap();
                let y = conv2d(xv.as_tensor(), wv.as_tensor(), spec).unwrap();
                let y = channel_affine(
                    &y,
                    &Tensor::ones(y.dim(1).unwrap(), DType::F32, &Device::Cpu).unwrap(),
                    &Tensor::zeros(y.dim(1).unwrap(), DType::F32, &Device::Cpu).unwrap(),
                )
                .unwrap();
                let (m, v) = channel_moments(&y).unwrap();
                let loss = (y.sqr().unwrap().sum_all().unwrap()
                    + m.sum_all().unwrap()
                    + v.sum_all().unwrap())
                .unwrap();
                let g = loss.backward().unwrap();
                out.push(values(&y));
                out.push(values(g.get(&xv).unwrap()));
                out.push(values(g.get(&wv).unwrap()));
            }
            out
        })
    };
    let one = run(1);
    assert_eq!(one, run(2), "1 vs 2 threads");
    assert_eq!(one, run(3), "1 vs 3 threads");
}

fn pool_cases() -> Vec<([usize; 4], Pool2dSpec)> {
    let spec = |kernel, stride, pad, ceil_mode, max, count_include_pad| Pool2dSpec {
        kernel,
        stride,
        pad,
        ceil_mode,
        max,
        count_include_pad,
    };
    vec![
        (
            [2, 3, 8, 8],
            spec([2, 2], [2, 2], [0; 4], false, true, false),
        ),
        (
            [2, 3, 7, 9],
            spec([3, 3], [2, 2], [1; 4], false, true, false),
        ),
        (
            [1, 2, 7, 6],
            spec([3, 2], [2, 1], [1, 0, 1, 1], true, true, false),
        ),
        (
            [2, 3, 8, 8],
            spec([2, 2], [2, 2], [0; 4], false, false, false),
        ),
        (
            [2, 2, 7, 9],
            spec([3, 3], [2, 2], [1; 4], true, false, false),
        ),
        (
            [2, 2, 7, 9],
            spec([3, 3], [2, 2], [1; 4], false, false, true),
        ),
    ]
}

/// Direct-loop pooling in f64 (the definition, ONNX divisor rules).
fn naive_pool(x: &Tensor, s: Pool2dSpec) -> Tensor {
    let (n, c, h, w) = x.dims4().unwrap();
    let (oh, ow) = (s.out_len(h, 0).unwrap(), s.out_len(w, 1).unwrap());
    let xv = values(x);
    let mut y = Vec::new();
    for p in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let (y0, x0) = (
                    (oy * s.stride[0]) as isize - s.pad[0] as isize,
                    (ox * s.stride[1]) as isize - s.pad[1] as isize,
                );
                let (mut m, mut sum, mut cnt) = (f64::NEG_INFINITY, 0.0, 0.0);
                for iy in y0..y0 + s.kernel[0] as isize {
                    for ix in x0..x0 + s.kernel[1] as isize {
                        let inside = iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize;
                        let in_pad = iy < (h + s.pad[2]) as isize && ix < (w + s.pad[3]) as isize;
                        if inside {
                            let v = xv[(p * h + iy as usize) * w + ix as usize];
                            m = m.max(v);
                            sum += v;
                        }
                        if inside || (s.count_include_pad && in_pad) {
                            cnt += 1.0;
                        }
                    }
                }
                y.push(if s.max { m } else { sum / cnt });
            }
        }
    }
    Tensor::from_vec(y, (n, c, oh, ow), &Device::Cpu).unwrap()
}

#[test]
fn pooling_matches_the_definition_and_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for (i, (shape, spec)) in pool_cases().into_iter().enumerate() {
        let x = random(&mut rng, &shape);
        let ours = pool2d(&x, spec).unwrap();
        assert_close(
            &ours,
            &naive_pool(&x, spec),
            1e-12,
            &format!("pool case {i}"),
        );
        if spec.kernel == spec.stride && spec.pad == [0; 4] {
            let candle = if spec.max {
                x.max_pool2d((2, 2)).unwrap()
            } else {
                x.avg_pool2d((2, 2)).unwrap()
            };
            assert_close(&ours, &candle, 1e-12, &format!("pool case {i} vs candle"));
        }
        check_gradients(&format!("pool case {i}"), &[x], &|t| {
            pool2d(&t[0], spec).unwrap()
        });
    }
}

#[test]
fn upsampling_matches_candle_and_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = random(&mut rng, &[2, 3, 5, 4]);
    for (mode, factor) in [
        (UpMode::Nearest, 2),
        (UpMode::Bilinear, 2),
        (UpMode::Nearest, 3),
        (UpMode::Bilinear, 3),
    ] {
        let ours = upsample2d(&x, factor, mode).unwrap();
        let (h, w) = (5 * factor, 4 * factor);
        let candle = match mode {
            UpMode::Nearest => x.upsample_nearest2d(h, w).unwrap(),
            UpMode::Bilinear => x.upsample_bilinear2d(h, w, false).unwrap(),
        };
        assert_close(&ours, &candle, 1e-12, &format!("{mode:?} x{factor}"));
        // The input also feeds another op: its gradient must accumulate (candle's nearest
        // backward overwrites it).
        check_gradients(
            &format!("{mode:?} x{factor}"),
            std::slice::from_ref(&x),
            &|t| {
                let up = upsample2d(&t[0], factor, mode).unwrap();
                (up.sum_keepdim(3)
                    .unwrap()
                    .sum_keepdim(2)
                    .unwrap()
                    .broadcast_add(&t[0]))
                .unwrap()
            },
        );
    }
}

#[test]
fn channel_ops_match_broadcasting_and_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let x = random(&mut rng, &[3, 5, 4, 3]);
    let (a, b) = (random(&mut rng, &[5]), random(&mut rng, &[5]));
    let view = |v: &Tensor| v.reshape((1, 5, 1, 1)).unwrap();
    let reference = x
        .broadcast_mul(&view(&a))
        .unwrap()
        .broadcast_add(&view(&b))
        .unwrap();
    assert_close(
        &channel_affine(&x, &a, &b).unwrap(),
        &reference,
        1e-12,
        "affine",
    );
    let sum = x
        .sum_keepdim(0)
        .unwrap()
        .sum_keepdim(2)
        .unwrap()
        .sum_keepdim(3)
        .unwrap();
    assert_close(
        &channel_sum(&x).unwrap(),
        &sum.flatten_all().unwrap(),
        1e-12,
        "sum",
    );
    let (m, v) = channel_moments(&x).unwrap();
    let mean = (sum.flatten_all().unwrap() / 36.0).unwrap();
    assert_close(&m, &mean, 1e-12, "mean");
    let centered = x.broadcast_sub(&view(&mean)).unwrap().sqr().unwrap();
    let var = (centered
        .sum_keepdim(0)
        .unwrap()
        .sum_keepdim(2)
        .unwrap()
        .sum_keepdim(3)
        .unwrap()
        / 36.0)
        .unwrap();
    assert_close(&v, &var.flatten_all().unwrap(), 1e-12, "variance");
    check_gradients("affine", &[x.clone(), a, b], &|t| {
        channel_affine(&t[0], &t[1], &t[2]).unwrap()
    });
    check_gradients("moments", &[x], &|t| {
        let (m, v) = channel_moments(&t[0]).unwrap();
        Tensor::cat(&[m, v], 0).unwrap()
    });
}

#[test]
fn clamp_matches_candle_and_finite_differences_and_is_flat_outside() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x = random(&mut rng, &[2, 3, 5, 4]);
    for (lo, hi) in [
        (-0.5, 0.5),
        (0.0, 6.0),
        (f64::NEG_INFINITY, 0.2),
        (0.3, -0.3),
    ] {
        // ONNX's Clip is max then min (lo > hi gives hi everywhere).
        let reference = x.maximum(lo).unwrap().minimum(hi).unwrap();
        assert_close(&clamp(&x, lo, hi).unwrap(), &reference, 0.0, "clamp");
    }
    check_gradients("clamp", std::slice::from_ref(&x), &|t| {
        clamp(&t[0], -0.5, 0.5).unwrap()
    });
    // Gradient 1 strictly inside, 0 outside and on the bounds (PyTorch's hardtanh).
    let v = Var::from_tensor(&Tensor::new(&[-1.0f64, -0.5, 0.0, 0.5, 1.0], &Device::Cpu).unwrap())
        .unwrap();
    let g = clamp(v.as_tensor(), -0.5, 0.5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(values(g.get(&v).unwrap()), vec![0.0, 0.0, 1.0, 0.0, 0.0]);
}
