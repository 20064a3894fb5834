//! `compress --method cpsc`: the distillation flags and their command (see
//! [`crate::pipeline::distil`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, ensure};

use super::args::CompressArgs;
use crate::data::Dataset;
use crate::methods::Method;
use crate::pipeline::distil::{DistilConfig, StudentInit};
use crate::quant::BitSpec;
use crate::teacher::Teacher;
use crate::train::cpsc::{self, GeneratorNorm, Variant};
use crate::train::gdfq::Preset;

/// `--bits`: wNaM, or fp32 (a float student, `--method cpsc` only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bits {
    Float,
    Quant(BitSpec),
}

impl std::str::FromStr for Bits {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "float" => Ok(Bits::Float),
            _ => Ok(Bits::Quant(s.parse()?)),
        }
    }
}

/// Flags of `--method cpsc` (the budget flags --preset, --epochs, --iters-per-epoch (rounds),
/// --batch, --warmup-epochs, --student-lr/-momentum/-weight-decay, --generator-lr/-betas,
/// --bns-weight (beta), --student-ce-weight are the GDFQ ones).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "CPSC-DFKD (--method cpsc --student S.onnx)")]
pub struct CpscArgs {
    /// The student architecture to distil into (an ONNX classifier, e.g. from `datafree
    /// student`), with the teacher's input shape and classes.
    #[arg(long, value_name = "FILE")]
    pub student: Option<PathBuf>,
    /// Start from the student file's weights, or from fresh random ones.
    #[arg(long, value_enum, default_value_t = StudentInit::Keep)]
    pub student_init: StudentInit,
    /// The loop: `cpsc`, or the baselines at the same budget: `dfad` (adversarial L1 only) and
    /// `bn-prior` (a generator trained on the teacher alone).
    #[arg(long, value_enum, default_value_t = Variant::Cpsc)]
    pub variant: Variant,
    /// Generator normalisation: `cfe` (class-conditional BN) or `bn` (ablation).
    #[arg(long, value_enum, default_value_t = GeneratorNorm::Cfe)]
    pub generator_norm: GeneratorNorm,
    /// alpha: weight of the L2 between logits beside KL (0 = KL only).
    #[arg(long)]
    pub l2_weight: Option<f64>,
    /// Form of the L2 term: `log` (generator -log MSE, student log of the difference's L2
    /// norm: free of the logit scale), `mse`, or `auto` (log up to 10 classes, else mse: the
    /// reference's CIFAR-10 / CIFAR-100 choice) [default: log; auto with --preset paper].
    #[arg(long, value_enum)]
    pub l2_form: Option<crate::train::cpsc::L2Form>,
    /// What the CE with the sampled labels (generator and student) is taken on:
    /// `probabilities` (the reference code's cross_entropy of softmax outputs) or `logits`
    /// (the paper's formula, -log softmax(logits)_y).
    #[arg(long, value_enum)]
    pub ce_form: Option<crate::train::cpsc::CeForm>,
    /// gamma: weight of the teacher/student contrastive loss (0 = off).
    #[arg(long)]
    pub contrastive_weight: Option<f64>,
    /// eta: weight of CE with the sampled labels in the generator's loss.
    #[arg(long)]
    pub ce_weight: Option<f64>,
    /// Generator steps per round.
    #[arg(long)]
    pub generator_steps: Option<usize>,
    /// Student steps per round.
    #[arg(long)]
    pub student_steps: Option<usize>,
    /// Cap on the global L2 norm of the student's gradient [default 5; 0 = none, as the
    /// reference].
    #[arg(long)]
    pub student_grad_clip: Option<f64>,
    /// With --bits wNaM: quantize the distilled student by GDFQ (a generator trained on it,
    /// then fine-tuning of the fake-quantized student; GDFQ's own budget for --preset) instead
    /// of BN-analytic PTQ.
    #[arg(long)]
    pub finetune: bool,
    /// GDFQ epochs of --finetune [default: the preset's]; the warm-up keeps at least one
    /// fine-tuning epoch.
    #[arg(long, value_name = "N")]
    pub finetune_epochs: Option<usize>,
    /// GDFQ iterations per epoch of --finetune [default: the preset's].
    #[arg(long, value_name = "N")]
    pub finetune_iters_per_epoch: Option<usize>,
}

impl CompressArgs {
    /// The CPSC run these flags stand for.
    pub fn distil_config(&self) -> Result<DistilConfig> {
        let c = &self.cpsc;
        let g = &self.gdfq;
        let preset = match g.preset {
            Preset::Paper => cpsc::Preset::Paper,
            Preset::Quick => cpsc::Preset::Quick,
            Preset::Tiny => cpsc::Preset::Tiny,
        };
        let mut t = cpsc::Config::preset(preset, self.seed);
        t.variant = c.variant;
        t.generator_norm = c.generator_norm;
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        set(&mut t.epochs, &g.epochs);
        set(&mut t.rounds_per_epoch, &g.iters_per_epoch);
        set(&mut t.batch, &g.batch);
        set(&mut t.warmup_epochs, &g.warmup_epochs);
        set(&mut t.student_lr, &g.student_lr);
        set(&mut t.student_momentum, &g.student_momentum);
        set(&mut t.student_weight_decay, &g.student_weight_decay);
        set(&mut t.generator_lr, &g.generator_lr);
        set(&mut t.bn_weight, &g.bns_weight);
        set(&mut t.l2_weight, &c.l2_weight);
        set(&mut t.l2_form, &c.l2_form);
        set(&mut t.ce_form, &c.ce_form);
        set(&mut t.contrastive_weight, &c.contrastive_weight);
        set(&mut t.ce_weight, &c.ce_weight);
        t.student_ce_weight = t.ce_weight;
        set(&mut t.student_ce_weight, &g.student_ce_weight);
        set(&mut t.generator_steps, &c.generator_steps);
        set(&mut t.student_steps, &c.student_steps);
        set(&mut t.student_grad_clip, &c.student_grad_clip);
        if let Some(b) = &g.generator_betas {
            ensure!(
                b.len() == 2,
                "--generator-betas takes two values, got {b:?}"
            );
            t.generator_betas = (b[0], b[1]);
        }
        t.validate()?;
        let student = c.student.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "--method cpsc distils into another architecture: give it with --student S.onnx (e.g. from `datafree student --arch resnet8 --classes N`)"
            )
        })?;
        let quantize = match self.bits {
            Bits::Float => {
                ensure!(
                    !c.finetune,
                    "--finetune fine-tunes a quantized student: give --bits wNaM with it"
                );
                None
            }
            Bits::Quant(_) if !c.finetune => {
                ensure!(
                    c.finetune_epochs.is_none() && c.finetune_iters_per_epoch.is_none(),
                    "--finetune-epochs / --finetune-iters-per-epoch size --finetune: give it too"
                );
                let mut q = self.clone();
                q.method = Method::PtqBn;
                Some(q.config()?)
            }
            Bits::Quant(_) => {
                // --finetune: GDFQ at its own budget; the budget flags given here size the
                // distillation, and the distillation's checkpoints are not GDFQ's.
                let mut q = self.clone();
                q.method = Method::Gdfq;
                q.gdfq = self.gdfq.preset_only();
                let mut qc = q.config()?;
                if let Some(e) = c.finetune_epochs {
                    ensure!(
                        e >= 2,
                        "--finetune-epochs must be at least 2 (warm-up + fine-tuning)"
                    );
                    qc.train.epochs = e;
                    qc.train.warmup_epochs = qc.train.warmup_epochs.min(e - 1);
                }
                if let Some(n) = c.finetune_iters_per_epoch {
                    qc.train.iters_per_epoch = n;
                }
                qc.train.validate()?;
                Some(qc)
            }
        };
        let base = self.config_with_bits(BitSpec {
            weights: 8,
            activations: 8,
        })?;
        Ok(DistilConfig {
            student,
            student_init: c.student_init,
            train: t,
            bn: self.bn,
            quantize,
            run: base.run,
            device: base.device,
            verify_images: self.verify_images,
        })
    }
}

/// `datafree compress --method cpsc`.
pub fn run(
    teacher: &Teacher,
    out: &Path,
    force: bool,
    opts: &CompressArgs,
    data: Option<&Dataset>,
    json: bool,
) -> Result<ExitCode> {
    let cfg = opts.distil_config()?;
    let start = crate::pipeline::distil::open_student(teacher, &cfg)?;
    let same = opts.gdfq.resume.as_deref() == Some(out);
    crate::pipeline::prepare_out_dir(out, force || same)?;
    let mut log = |m: &str| {
        if !json {
            eprintln!("{m}");
        }
    };
    let r = crate::pipeline::distil::distil(teacher, start, out, &cfg, data, &mut log)?;
    let path = out.join("report.json");
    crate::io::write_atomic(&path, &serde_json::to_vec_pretty(&r)?)?;
    // The distilled student's own check, then the quantized one's.
    let failed = r
        .self_check
        .as_deref()
        .map(|why| (r.student.as_str(), why))
        .or_else(|| {
            let q = r.quantized.as_ref()?;
            q.self_check.as_deref().map(|why| (q.student.as_str(), why))
        });
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(super::self_check_exit(failed));
    }
    let pct = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}"));
    let mm = |m: Option<u64>| m.map_or("-".into(), |m| format!("{:.2} M", m as f64 / 1e6));
    println!(
        "teacher {}: {} parameters, {} MACs/image",
        r.teacher,
        r.teacher_params,
        mm(r.teacher_macs)
    );
    println!(
        "student {}: {} parameters, {} MACs/image ({}, {:.0} s of training)",
        r.student,
        r.student_params,
        mm(r.student_macs),
        crate::cli_name(&r.config.variant),
        r.train_seconds
    );
    for (what, v) in [
        ("synthesized", Some(&r.verification_synthetic)),
        ("data", r.verification_data.as_ref()),
    ] {
        if let Some(v) = v {
            println!(
                "  on {what} ({} images): agreement {:.2}%, teacher top-1 {}, student top-1 {}",
                v.images,
                100.0 * v.agreement,
                pct(v.reference_top1),
                pct(v.student_top1)
            );
        }
    }
    if let Some(q) = &r.quantized {
        print!("quantized:\n{}", crate::report::render_compress(q));
    }
    println!("report: {}", path.display());
    Ok(super::self_check_exit(failed))
}
