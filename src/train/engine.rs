//! The training engine: the durable parts every training run shares, so a method supplies only
//! its step (a [`Step`]). The engine runs iterations `start..total`, resumes from a checkpoint
//! folder (the step's tensors and optimiser moments plus `state.json`, written as a folder swap
//! so a kill at any moment leaves a complete one), appends one JSON line per logged iteration
//! to the run's log (kept up to the checkpoint on resume), refuses non-finite losses (the
//! divergence guard, through [`finite`]), stops after N iterations on request (tests simulate
//! a crash), shows a progress bar, and redraws `curves.png` beside the log at every checkpoint.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// One line of a run's log.
pub trait LogLine: Serialize + DeserializeOwned + Clone {
    /// The iteration (0-based) the line describes.
    fn iter(&self) -> usize;
    /// Sets the run's wall seconds at the end of the iteration.
    fn set_seconds(&mut self, s: f64);
    /// The progress bar's message.
    fn summary(&self) -> String;
    /// Values drawn in curves.png: (panel, series, value).
    fn curves(&self) -> Vec<crate::plot::CurvePoint>;
    /// Top-1 (%) on the measuring data, when the line was evaluated.
    fn eval_top1(&self) -> Option<f64> {
        None
    }
}

/// (iterations done, top-1 %) of every evaluated line: a run's accuracy curve.
pub fn eval_curve<L: LogLine>(history: &[L]) -> Vec<(usize, f64)> {
    history
        .iter()
        .filter_map(|l| l.eval_top1().map(|a| (l.iter() + 1, a)))
        .collect()
}

/// A method's training step and the state it owns.
pub trait Step {
    type Log: LogLine;
    /// Runs iteration `iter`.
    fn step(&mut self, iter: usize) -> Result<Self::Log>;
    /// Runs after iteration `done` - 1 is logged (sample grids).
    fn after(&mut self, _done: usize, _total: usize) -> Result<()> {
        Ok(())
    }
    /// Writes the step's tensors and optimiser moments into a checkpoint folder.
    fn save(&self, dir: &Path) -> Result<()>;
    /// The step's part of state.json: its settings (checked on resume) and RNG position.
    fn state(&self) -> Result<serde_json::Map<String, serde_json::Value>>;
    /// Restores the step from a checkpoint folder and state.json, `iter` iterations done.
    fn load(
        &mut self,
        dir: &Path,
        state: serde_json::Map<String, serde_json::Value>,
        iter: usize,
    ) -> Result<()>;
}

/// Where a run reads and writes.
pub struct RunIo<'a> {
    pub out: &'a Path,
    /// Continue the run whose output folder (with its checkpoint/) is this.
    pub resume: Option<&'a Path>,
    /// The JSONL log's file name in `out`.
    pub log_name: &'a str,
    /// Log every N iterations (and the last).
    pub log_every: usize,
    pub checkpoint_every: usize,
    /// Fail after N iterations, as if killed.
    pub stop_after: Option<usize>,
    /// The progress bar's label.
    pub label: &'a str,
}

/// What a run did.
pub struct Outcome<L> {
    /// Every logged line, resumed ones included.
    pub history: Vec<L>,
    /// The iteration the run resumed at.
    pub resumed_from: Option<usize>,
    /// Wall seconds of the whole run (before a resume included).
    pub seconds: f64,
}

#[derive(Serialize, serde::Deserialize)]
struct EngineState {
    iter: usize,
    elapsed_seconds: f64,
}

/// `v` when finite, else the divergence error (the last good checkpoint stays).
pub fn finite(v: f64, what: &str, iter: usize) -> Result<f64> {
    if !v.is_finite() {
        bail!(
            "{what} became {v} at iteration {iter}: training diverged; the last good checkpoint is kept (resume with --resume and a lower learning rate)"
        );
    }
    Ok(v)
}

/// Runs `step` for `total` iterations.
pub fn run<S: Step>(step: &mut S, total: usize, io: &RunIo) -> Result<Outcome<S::Log>> {
    let log_path = io.out.join(io.log_name);
    let (mut start, mut elapsed0, mut resumed_from) = (0, 0.0, None);
    let (mut kept, mut history) = (Vec::new(), Vec::new());
    if let Some(from) = io.resume {
        let dir = crate::io::find_checkpoint(from).with_context(|| {
            format!(
                "{}: no checkpoint to resume from (expected {}/checkpoint/state.json)",
                from.display(),
                from.display()
            )
        })?;
        let mut state: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)
                .with_context(|| format!("{}: unreadable checkpoint state", dir.display()))?;
        let e: EngineState = serde_json::from_value(serde_json::Value::Object(state.clone()))
            .with_context(|| format!("{}: unreadable checkpoint state", dir.display()))?;
        state.remove("iter");
        state.remove("elapsed_seconds");
        step.load(&dir, state, e.iter)?;
        (start, elapsed0, resumed_from) = (e.iter, e.elapsed_seconds, Some(e.iter));
        // Keep the log up to the checkpoint; later lines are about to be recomputed.
        (kept, history) =
            crate::io::kept_log_lines(&from.join(io.log_name), |l: &S::Log| l.iter() < start)?;
    }
    crate::io::write_atomic(&log_path, &kept)?;
    let mut log = std::fs::OpenOptions::new().append(true).open(&log_path)?;
    let pb = crate::progress::progress_iters(total, io.label);
    pb.set_position(start as u64);
    let t0 = Instant::now();
    let elapsed = || elapsed0 + t0.elapsed().as_secs_f64();
    for iter in start..total {
        let mut line = step.step(iter)?;
        line.set_seconds(elapsed());
        let done = iter + 1;
        pb.set_position(done as u64);
        pb.set_message(line.summary());
        if done == total || (io.log_every > 0 && done.is_multiple_of(io.log_every)) {
            writeln!(log, "{}", serde_json::to_string(&line)?)?;
            history.push(line);
        }
        step.after(done, total)?;
        if io.checkpoint_every > 0 && (done.is_multiple_of(io.checkpoint_every) || done == total) {
            save(step, io.out, done, elapsed())?;
            let points: Vec<_> = history.iter().map(|l| (l.iter() + 1, l.curves())).collect();
            crate::plot::curves(&io.out.join("curves.png"), io.label, &points)?;
        }
        if io.stop_after == Some(done) {
            bail!("stopped after iteration {done} (--stop-after)");
        }
    }
    pb.finish_and_clear();
    Ok(Outcome {
        history,
        resumed_from,
        seconds: elapsed(),
    })
}

fn save<S: Step>(step: &S, out: &Path, iter: usize, elapsed: f64) -> Result<()> {
    crate::io::write_checkpoint_dir(out, |tmp| {
        step.save(tmp)?;
        let mut state = step.state()?;
        state.insert("iter".into(), iter.into());
        state.insert("elapsed_seconds".into(), elapsed.into());
        crate::io::write_atomic(
            &tmp.join("state.json"),
            &serde_json::to_vec_pretty(&serde_json::Value::Object(state))?,
        )?;
        Ok(())
    })
}

/// A step's settings and RNG position as the JSON object its part of state.json is.
pub fn state_object<T: Serialize>(s: &T) -> Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(s)? {
        serde_json::Value::Object(m) => Ok(m),
        other => bail!("a step's state must be a JSON object, got {other}"),
    }
}

/// Deserializes a step's state and refuses it when its settings (`config`) differ from
/// `expected`: resuming must continue the same run. The refusal names each setting that
/// differs with both values (a changed default shows up as one line, not as a dump).
pub fn checked_state<T: DeserializeOwned, C: PartialEq + Serialize>(
    dir: &Path,
    state: serde_json::Map<String, serde_json::Value>,
    expected: &C,
    config: impl Fn(&T) -> &C,
) -> Result<T> {
    let s: T = serde_json::from_value(serde_json::Value::Object(state))
        .with_context(|| format!("{}: unreadable checkpoint state", dir.display()))?;
    if config(&s) != expected {
        bail!(
            "{}: the checkpoint was made with different settings ({}); resume with the checkpoint's settings",
            dir.display(),
            setting_differences(config(&s), expected)?.join("; ")
        );
    }
    Ok(s)
}

/// `name: checkpoint A, this run B` for every top-level field where the two settings differ.
fn setting_differences<C: Serialize>(saved: &C, now: &C) -> Result<Vec<String>> {
    let (saved, now) = (serde_json::to_value(saved)?, serde_json::to_value(now)?);
    let null = serde_json::Value::Null;
    let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) else {
        return Ok(vec![format!("checkpoint {saved}, this run {now}")]);
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
            (x != y).then(|| format!("{k}: checkpoint {x}, this run {y}"))
        })
        .collect())
}
