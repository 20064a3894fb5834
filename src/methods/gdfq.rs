//! GDFQ as a method: the student's starting ranges (ptq-bn's, or none for the reference's EMA),
//! the trainable student in the teacher's own parametrization, the evaluation hook, the
//! training run ([`crate::train::gdfq`]), and the fine-tuned graph folded back for export.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::DType;
use serde::Serialize;

use super::{Context, MethodOutput, MethodReport, RangeOrigin};
use crate::quant::calibrate::Ranges;
use crate::quant::placement::Plan;
use crate::search::SearchReport;
use crate::teacher::Teacher;
use crate::train::gdfq::{
    self, Config as TrainConfig, FoldSource, GeneratorFamily, Metrics, RangeSource, StudentWeight,
};

/// What the generator-and-student stage did (report.json's `training`).
#[derive(Debug, Clone, Serialize)]
pub struct GdfqReport {
    pub config: TrainConfig,
    pub generator_params: usize,
    /// Multiply-accumulates of the generator per image.
    pub generator_macs: u64,
    pub train_seconds: f64,
    pub resumed_from_iter: Option<usize>,
    /// (iteration, top-1 %) of the fake-quantized student on the measuring data.
    pub eval_curve: Vec<(usize, f64)>,
    pub final_losses: Option<Metrics>,
}

/// Runs GDFQ with `cfg` (AutoReCon hands in its generator through `cfg`, with the search's
/// report); the ranges the run did not get in advance come from generated images.
pub fn run(
    ctx: &Context,
    autorecon: Option<(TrainConfig, Option<SearchReport>)>,
    log: &mut dyn FnMut(&str),
) -> Result<MethodOutput> {
    let (mut cfg, search) = match autorecon {
        Some((c, s)) => (c, Some(s)),
        None => (ctx.train.clone(), None),
    };
    let asked = cfg.bns_units;
    cfg.bns_units = asked.resolve(&ctx.teacher.domain);
    if asked != cfg.bns_units {
        log(&format!(
            "gdfq: BNS units {} (the teacher's inputs are {}; --bns-units plain for the references' loss)",
            crate::cli_name(&cfg.bns_units),
            crate::cli_name_of(&ctx.teacher.domain.kind)
        ));
    }
    let (mut fixed, mut origins) = match cfg.range_source {
        RangeSource::Bn => super::ptq::bn_statistics_ranges(ctx),
        RangeSource::Ema => (Ranges::new(), HashMap::new()),
    };
    let (r, o) = super::input_ranges(ctx);
    fixed.extend(r);
    origins.extend(o);
    let method = if search.is_some() {
        super::Method::Autorecon
    } else {
        super::Method::Gdfq
    };
    let (ranges, trained, stage) = train(ctx, cfg.clone(), &fixed, log)?;
    for t in ranges.keys().filter(|t| !fixed.contains_key(*t)) {
        origins.insert(t.clone(), RangeOrigin::Generated { method });
    }
    if cfg.range_lr > 0.0 {
        let learned = ctx
            .plan
            .points
            .iter()
            .filter(|p| p.role != crate::quant::placement::Role::NetworkInput);
        for t in learned.map(|p| &p.tensor) {
            let from = origins
                .remove(t)
                .unwrap_or(RangeOrigin::Generated { method });
            origins.insert(
                t.clone(),
                RangeOrigin::Learned {
                    from: Box::new(from),
                    range_lr: cfg.range_lr,
                },
            );
        }
    }
    let report = match search {
        Some(search) => MethodReport::Autorecon {
            search: search.map(Box::new),
            stage,
        },
        None => MethodReport::Gdfq(stage),
    };
    Ok(MethodOutput {
        ranges,
        origins,
        trained: Some(trained),
        report: Some(report),
    })
}

/// Trains the generator and fine-tunes the student; returns the activation ranges, the
/// fine-tuned float graph (BN folded when the plan's graph is) and what happened.
fn train(
    ctx: &Context,
    cfg: TrainConfig,
    fixed: &Ranges,
    log: &mut dyn FnMut(&str),
) -> Result<(Ranges, crate::onnx::pb::ModelProto, GdfqReport)> {
    let teacher = ctx.teacher;
    let tp = teacher.program(ctx.device)?;
    // The student trains in the teacher's own parametrization (conv weights, BN scale and shift
    // in inference mode, as the reference does) and is folded afterwards: per-channel symmetric
    // quantization commutes with the per-channel BN scale. Training the folded weights directly
    // rescales each channel's effective learning rate by 1/s^2 (s = gamma/sigma) and was measured
    // to lose accuracy (cifar10_resnet20 w4a4: 87.0 -> 83.2 within 200 iterations).
    let unfolded = if ctx.bn_folded {
        teacher_weights(teacher, ctx.plan)
    } else {
        None
    };
    let (mut sp, weight_names) = match &unfolded {
        Some(names) => (
            crate::lower::lower_with(&teacher.model, ctx.device, DType::F32, true)?,
            names.clone(),
        ),
        None => (
            crate::lower::lower_with(ctx.float, ctx.device, DType::F32, true)?,
            ctx.plan
                .layers
                .iter()
                .map(|l| {
                    (
                        l.weight.clone(),
                        StudentWeight {
                            var: l.weight.clone(),
                            fold: None,
                            bias: l.bias.clone(),
                        },
                    )
                })
                .collect(),
        ),
    };
    log(&format!(
        "gdfq: {} epochs x {} iterations, batch {}, warm-up {} epochs, student lr {}, {} student tensors trainable",
        cfg.epochs,
        cfg.iters_per_epoch,
        cfg.batch,
        cfg.warmup_epochs,
        cfg.student_lr,
        sp.vars().len()
    ));
    let eval_fn = |p: &crate::lower::Program| -> Result<f64> {
        super::program_top1(
            p,
            teacher,
            ctx.data.expect("eval only with data"),
            ctx.run.eval_images,
        )
    };
    let eval_ref: &gdfq::EvalFn = &eval_fn;
    let is_autorecon = cfg.generator == GeneratorFamily::Autorecon && cfg.genotype.is_some();
    let io = gdfq::Io {
        out: ctx.out,
        // An AutoReCon run killed during its search has no GDFQ checkpoint yet: its stage
        // starts fresh after the resumed search.
        resume: ctx
            .run
            .resume
            .as_deref()
            .filter(|r| !is_autorecon || crate::io::find_checkpoint(r).is_some()),
        checkpoint_every: ctx.run.checkpoint_every,
        grid_every: ctx.run.grid_every,
        domain: &teacher.domain,
        stop_after: ctx.run.stop_after,
        eval: match (ctx.data, ctx.run.eval_every) {
            (Some(_), Some(every)) => Some((every, eval_ref)),
            _ => None,
        },
    };
    let outcome = gdfq::train(
        &tp,
        &teacher.name(),
        &mut sp,
        ctx.plan,
        &weight_names,
        (ctx.weight_scheme, ctx.scales),
        teacher.classes,
        teacher.image(),
        cfg.clone(),
        fixed,
        ctx.clip_inputs().as_ref(),
        &io,
    )?;
    log(&format!(
        "gdfq: trained in {:.0} s{}",
        outcome.train_seconds,
        outcome
            .resumed_from
            .map_or(String::new(), |i| format!(" (resumed at iteration {i})"))
    ));
    let report = GdfqReport {
        config: cfg,
        generator_params: outcome.generator_params,
        generator_macs: outcome.generator_macs,
        train_seconds: outcome.train_seconds,
        resumed_from_iter: outcome.resumed_from,
        eval_curve: crate::train::engine::eval_curve(&outcome.history),
        final_losses: outcome.history.last().cloned(),
    };
    let trained = match unfolded {
        Some(_) => {
            let m = teacher.derived(crate::export::with_initializers(
                &teacher.model.proto,
                &outcome.values,
            )?);
            crate::export::fold_bn(&m)?.0
        }
        None => crate::export::with_initializers(&ctx.float.proto, &outcome.values)?,
    };
    Ok((outcome.ranges, trained, report))
}

/// The teacher parameters behind each planned layer weight: BN-folded weights are named
/// "<conv>.folded_weight" after the teacher's conv node, whose weight, bias and folded BN train
/// in the teacher's parametrization; other weights keep their names. None when some layer
/// cannot be traced.
fn teacher_weights(teacher: &Teacher, plan: &Plan) -> Option<HashMap<String, StudentWeight>> {
    let graph = teacher.model.graph();
    let g = crate::onnx::graph::GraphIndex::new(graph);
    // Through Identity nodes: cifar100_resnet20's shortcut BNs take their shift through one.
    let source = |t: &String| g.initializer_behind(t).map(str::to_string);
    plan.layers
        .iter()
        .map(|l| {
            let Some(node) = l.weight.strip_suffix(".folded_weight") else {
                return g.is_initializer(&l.weight).then(|| {
                    (
                        l.weight.clone(),
                        StudentWeight {
                            var: l.weight.clone(),
                            fold: None,
                            bias: l.bias.clone(),
                        },
                    )
                });
            };
            let (_, conv) = graph
                .node
                .iter()
                .enumerate()
                .find(|(i, n)| crate::onnx::graph::display_name(n, *i) == node)?;
            let var = source(conv.input.get(1)?)?;
            let bias = conv.input.get(2).filter(|b| !b.is_empty()).and_then(source);
            // The BN fold_bn folded: the one reading the conv's output.
            let bn = g.consumers(conv.output.first()?).iter().find_map(|&b| {
                let n = g.node(b);
                (n.op_type == "BatchNormalization").then_some(b)
            })?;
            let bn_node = g.node(bn);
            let layer = teacher.bn().layers.iter().find(|x| x.node_index == bn)?;
            let stats = layer.stats.as_ref()?;
            let fold = FoldSource {
                gamma: source(bn_node.input.get(1)?)?,
                beta: source(bn_node.input.get(2)?)?,
                mean: stats.running_mean.clone(),
                var: stats.running_var.clone(),
                eps: layer.epsilon,
            };
            Some((
                l.weight.clone(),
                StudentWeight {
                    var,
                    fold: Some(fold),
                    bias,
                },
            ))
        })
        .collect()
}
