//! AutoReCon as a method: the generator's genotype (given, or searched first into OUT/search,
//! resumable), optionally the search's supernet weights to start from, then GDFQ's stage with
//! that generator.

use std::path::Path;

use anyhow::{Context as _, Result, ensure};

use super::{Context, MethodOutput};
use crate::generator::Genotype;
use crate::search::{SearchConfig, SearchIo, SearchReport};
use crate::teacher::Teacher;
use crate::train::gdfq::GeneratorFamily;

/// Searches (unless a genotype is given), then runs GDFQ with the derived generator.
pub fn run(ctx: &Context, log: &mut dyn FnMut(&str)) -> Result<MethodOutput> {
    let a = ctx.autorecon;
    let mut search_report = None;
    let mut genotype = match &a.genotype {
        Some(f) => {
            let g = Genotype::load(f)?;
            log(&format!("autorecon: genotype from {}", f.display()));
            g
        }
        None => {
            let dir = ctx.out.join("search");
            std::fs::create_dir_all(&dir)?;
            let resume = ctx
                .run
                .resume
                .as_ref()
                .map(|r| r.join("search"))
                .filter(|d| crate::io::find_checkpoint(d).is_some());
            let io = SearchIo {
                out: &dir,
                resume: resume.as_deref(),
                checkpoint_every: a.search_checkpoint_every,
                log_every: 10,
                stop_after: a.search_stop_after,
            };
            let (g, rep) = search(ctx.teacher, a.search.clone(), &io, ctx.device, log)?;
            search_report = Some(rep);
            g
        }
    };
    let mut cfg = ctx.train.clone();
    if a.inherit_weights {
        let dir = match &a.genotype {
            Some(f) => f.parent().map(Path::to_path_buf).unwrap_or_default(),
            None => ctx.out.join("search"),
        };
        let ckpt = crate::io::find_checkpoint(&dir).with_context(|| {
            format!(
                "--inherit-weights: no search checkpoint next to the genotype (expected {}/checkpoint/supernet.safetensors)",
                dir.display()
            )
        })?;
        ensure!(
            a.generator_width.is_none_or(|w| w == genotype.width),
            "--inherit-weights needs the search width ({}); drop --generator-width",
            genotype.width
        );
        cfg.generator_init = Some(ckpt.join("supernet.safetensors"));
    }
    if let Some(w) = a.generator_width {
        genotype.width = w;
    }
    cfg.generator = GeneratorFamily::Autorecon;
    cfg.genotype = Some(genotype);
    super::gdfq::run(ctx, Some((cfg, search_report)), log)
}

/// Runs an AutoReCon search into `io.out`; returns the genotype and the search's report.
pub fn search(
    teacher: &Teacher,
    cfg: SearchConfig,
    io: &SearchIo,
    device: &candle_core::Device,
    log: &mut dyn FnMut(&str),
) -> Result<(Genotype, SearchReport)> {
    ensure!(
        teacher.height == teacher.width,
        "{}: the AutoReCon generator makes square images, the input is {}x{}",
        teacher.name(),
        teacher.height,
        teacher.width
    );
    log(&format!(
        "search: {} epochs x {} iterations, batch {}, width {}, {:?} sampling, tau {} -> {}{}",
        cfg.epochs,
        cfg.iters_per_epoch,
        cfg.batch,
        cfg.width,
        cfg.sampling,
        cfg.tau.0,
        cfg.tau.1,
        io.resume
            .map_or(String::new(), |r| format!(" (resuming {})", r.display()))
    ));
    let tp = teacher.program(device)?;
    let cfg = SearchConfig {
        bns_units: cfg.bns_units.resolve(&teacher.domain),
        ..cfg
    };
    let r = crate::search::search(
        &tp,
        &teacher.name(),
        teacher.classes,
        (teacher.channels, teacher.height),
        &teacher.domain,
        cfg,
        io,
    )?;
    log(&format!(
        "search: genotype in {} ({:.0} s, peak {} MB)",
        io.out.join("genotype.json").display(),
        r.1.seconds,
        r.1.peak_rss_mb.map_or("?".into(), |m| format!("{m:.0}"))
    ));
    Ok(r)
}
