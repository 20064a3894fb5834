//! Durable file writes: everything the tool writes goes through a temporary file in the same folder
//! followed by a rename, so an interrupted run never leaves a half-written file behind.

use std::fs;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a checkpoint folder `dir/checkpoint` as a folder swap: `fill` writes into a fresh
/// `checkpoint.tmp`, which then replaces the old one, so at every moment either `checkpoint` or
/// `checkpoint.old` is complete.
pub fn write_checkpoint_dir(
    dir: &Path,
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = dir.join("checkpoint.tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    let (cur, old) = (dir.join(CHECKPOINT), dir.join("checkpoint.old"));
    let _ = fs::remove_dir_all(&old);
    if cur.exists() {
        fs::rename(&cur, &old)?;
    }
    fs::rename(&tmp, &cur)?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

const CHECKPOINT: &str = "checkpoint";

/// The complete checkpoint folder of a run folder (`checkpoint`, or `checkpoint.old` when a
/// swap was interrupted), recognised by its `state.json`.
pub fn find_checkpoint(dir: &Path) -> Option<std::path::PathBuf> {
    [CHECKPOINT, "checkpoint.old"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.join("state.json").exists())
}

/// The lines of a JSONL log (e.g. `run/metrics.jsonl`) a resumed run keeps: those that parse as
/// `T` and pass `keep`, as written (re-printing parsed floats could change last digits), with
/// their parsed values. A missing file keeps nothing.
pub fn kept_log_lines<T: serde::de::DeserializeOwned>(
    path: &Path,
    keep: impl Fn(&T) -> bool,
) -> std::io::Result<(Vec<u8>, Vec<T>)> {
    let (mut bytes, mut values) = (Vec::new(), Vec::new());
    if let Ok(text) = fs::read_to_string(path) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<T>(line)
                && keep(&v)
            {
                writeln!(bytes, "{line}")?;
                values.push(v);
            }
        }
    }
    Ok((bytes, values))
}

/// Reads a checkpoint's `state.json` and refuses it when its settings (`config` of the state)
/// differ from `expected`: resuming must continue the same run.
pub fn read_checkpoint_state<S, C>(
    dir: &Path,
    expected: &C,
    config: impl Fn(&S) -> &C,
) -> anyhow::Result<S>
where
    S: serde::de::DeserializeOwned,
    C: PartialEq + std::fmt::Debug,
{
    use anyhow::Context;
    let state: S = serde_json::from_slice(&fs::read(dir.join("state.json"))?)
        .with_context(|| format!("{}: unreadable checkpoint state", dir.display()))?;
    anyhow::ensure!(
        config(&state) == expected,
        "{}: the checkpoint was made with different settings ({:?}); resume with the same flags",
        dir.display(),
        config(&state)
    );
    Ok(state)
}

/// Peak resident memory of this process in MB (Linux; None elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "leftover files: {names:?}");
    }

    #[test]
    fn failing_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("x");
        assert!(write_atomic(&p, b"data").is_err());
    }
}
