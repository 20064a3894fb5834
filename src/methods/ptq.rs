//! The calibration-only methods, the baselines every generator must beat:
//! - `ptq-bn`: ranges derived analytically from BatchNormalization statistics
//!   ([`crate::quant::calibrate::bn_ranges`]); points they do not reach are observed on noise;
//! - `ptq-noise`: min/max (or a percentile) over Gaussian-noise inputs;
//! - `zeroq`: inputs optimised until the teacher's BN batch statistics match its running ones
//!   (ZeroQ), then observed.

use std::collections::HashMap;

use anyhow::{Result, ensure};
use candle_core::{DType, Tensor, Var};
use candle_nn::Optimizer;

use super::{Context, MethodOutput, RangeOrigin};
use crate::lower::{Program, lower};
use crate::quant::calibrate::{self, Ranges};
use crate::quant::placement::{Plan, Role};

/// The tensors of the planned activation points whose ranges a method finds (the network
/// input's comes from its domain).
fn point_tensors(plan: &Plan) -> Vec<String> {
    plan.points
        .iter()
        .filter(|p| p.role != Role::NetworkInput)
        .map(|p| p.tensor.clone())
        .collect()
}

/// The method's ranges with the network input's added.
fn output(
    ctx: &Context,
    mut ranges: Ranges,
    mut origins: HashMap<String, RangeOrigin>,
) -> MethodOutput {
    let (r, o) = super::input_ranges(ctx);
    ranges.extend(r);
    origins.extend(o);
    MethodOutput {
        ranges,
        origins,
        trained: None,
        report: None,
    }
}

/// Seeded noise images in the teacher's input domain, on the method's device.
fn domain_noise(ctx: &Context, n: usize) -> Result<Tensor> {
    let shape = ctx.teacher.input_shape(n);
    Ok(Tensor::from_vec(
        ctx.teacher.domain.noise(&shape, ctx.seed),
        shape.to_vec(),
        ctx.device,
    )?)
}

/// Ranges observed on seeded noise in the teacher's domain through the float graph.
fn observe_noise(ctx: &Context, tensors: &[String]) -> Result<Ranges> {
    let p = lower(ctx.float, ctx.device, DType::F32)?;
    let x = domain_noise(ctx, ctx.ptq.calib_images)?;
    calibrate::observe(&p, &x, tensors, ctx.ptq.percentile)
}

/// BN-analytic ranges (mean +- k std of the BN output) of the points BN statistics reach.
pub fn bn_statistics_ranges(ctx: &Context) -> (Ranges, HashMap<String, RangeOrigin>) {
    let with_k: Vec<(String, f64)> = ctx
        .plan
        .points
        .iter()
        .filter(|p| p.role != Role::NetworkInput)
        .map(|p| {
            (
                p.tensor.clone(),
                ctx.ptq
                    .bn_k
                    .unwrap_or_else(|| calibrate::default_bn_k(p.bits)),
            )
        })
        .collect();
    let (mean, var) = ctx.domain_moments();
    let r = calibrate::bn_ranges(
        &ctx.teacher.model.proto,
        ctx.teacher.bn(),
        (&mean, &var),
        &with_k,
    );
    let origins = with_k
        .iter()
        .filter(|(t, _)| r.contains_key(t))
        .map(|(t, k)| (t.clone(), RangeOrigin::BnStatistics { k: *k }))
        .collect();
    (r, origins)
}

/// `ptq-bn`.
pub fn bn(ctx: &Context) -> Result<MethodOutput> {
    let (mut r, mut origins) = bn_statistics_ranges(ctx);
    let missing: Vec<String> = point_tensors(ctx.plan)
        .into_iter()
        .filter(|t| !r.contains_key(t))
        .collect();
    if !missing.is_empty() {
        // Points the BN statistics do not reach (e.g. outputs of convs without BN) are observed
        // on inputs synthesized to match the statistics that exist, else on noise.
        let (observed, origin) = if ctx.teacher.has_bn_statistics() {
            let s = crate::verify::synth::synthesize(
                ctx.teacher,
                crate::verify::synth::SynthConfig {
                    images: ctx.ptq.calib_images,
                    seed: ctx.seed,
                    ..Default::default()
                },
            )?;
            let x = Tensor::from_vec(
                s.x.clone(),
                ctx.teacher.input_shape(s.images).to_vec(),
                ctx.device,
            )?;
            let p = lower(ctx.float, ctx.device, DType::F32)?;
            (
                calibrate::observe(&p, &x, &missing, ctx.ptq.percentile)?,
                RangeOrigin::SynthesizedFallback {
                    images: s.images,
                    steps: s.config.steps,
                },
            )
        } else {
            (observe_noise(ctx, &missing)?, RangeOrigin::NoiseFallback)
        };
        for (t, v) in observed {
            origins.insert(t.clone(), origin.clone());
            r.insert(t, v);
        }
    }
    Ok(output(ctx, r, origins))
}

/// `ptq-noise`.
pub fn noise(ctx: &Context) -> Result<MethodOutput> {
    let r = observe_noise(ctx, &point_tensors(ctx.plan))?;
    let origins = r
        .keys()
        .map(|t| {
            (
                t.clone(),
                RangeOrigin::Noise {
                    images: ctx.ptq.calib_images,
                },
            )
        })
        .collect();
    Ok(output(ctx, r, origins))
}

/// `zeroq`.
pub fn zeroq(ctx: &Context, log: &mut dyn FnMut(&str)) -> Result<MethodOutput> {
    let s = ctx.ptq;
    let tp = ctx.teacher.program(ctx.device)?;
    let pb = crate::progress::progress(s.zeroq_iters, "zeroq distillation");
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, eta {eta}")
            .expect("valid template"),
    );
    let (x, loss) = distill_inputs(
        &tp,
        domain_noise(ctx, s.calib_images)?,
        s.zeroq_iters,
        s.zeroq_lr,
        |i, l| {
            pb.set_position(i as u64 + 1);
            pb.set_message(format!("zeroq distillation, BNS {l:.4}"));
        },
    )?;
    pb.finish_and_clear();
    log(&format!(
        "zeroq: {} inputs distilled in {} steps, final BNS loss {loss:.4}",
        s.calib_images, s.zeroq_iters
    ));
    let p = lower(ctx.float, ctx.device, DType::F32)?;
    let r = calibrate::observe(&p, &x, &point_tensors(ctx.plan), s.percentile)?;
    let origins = r
        .keys()
        .map(|t| {
            (
                t.clone(),
                RangeOrigin::Zeroq {
                    images: s.calib_images,
                    steps: s.zeroq_iters,
                    bns: loss,
                },
            )
        })
        .collect();
    Ok(output(ctx, r, origins))
}

/// ZeroQ: optimises the inputs `start` so the BN batch statistics match the running
/// statistics. Returns the distilled batch and the final BNS loss.
pub fn distill_inputs(
    teacher: &Program,
    start: Tensor,
    iters: usize,
    lr: f64,
    mut on_step: impl FnMut(usize, f32),
) -> Result<(Tensor, f32)> {
    ensure!(
        !teacher.bn_taps().is_empty(),
        "zeroq needs BatchNormalization statistics, and the teacher has none (BN folded?)"
    );
    let x = Var::from_tensor(&start)?;
    let mut opt = candle_nn::AdamW::new(
        vec![x.clone()],
        candle_nn::ParamsAdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let mut last = f32::NAN;
    for i in 0..iters {
        let f = teacher.forward_taps(x.as_tensor())?;
        let loss = crate::train::losses::bns(&f.bn_inputs, teacher.bn_taps())?;
        last = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        ensure!(
            last.is_finite(),
            "ZeroQ distillation diverged at step {i} (loss {last})"
        );
        opt.backward_step(&loss)?;
        on_step(i, last);
    }
    Ok((x.as_tensor().detach(), last))
}
