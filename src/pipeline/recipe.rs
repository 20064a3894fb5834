//! Declarative pipeline files (TOML, `pipelines/`): one recipe with every hyper-parameter, run by
//! `datafree run`. The `[compress]` table holds `datafree compress` flags by their long names
//! (`iters_per_epoch` or `iters-per-epoch`); `datafree run` turns the file into exactly the
//! command line `compress` would get, so a pipeline and the flags can never disagree.
//!
//! ```toml
//! name = "gdfq-cifar"
//! teacher = "onnx/quickstart.onnx"   # default teacher; --teacher overrides
//! [compress]
//! method = "gdfq"
//! bits = "w4a4"
//! lr_milestones = [100, 200, 300]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use toml::{Table, Value};

/// A parsed pipeline file.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub path: PathBuf,
    pub name: String,
    pub teacher: Option<PathBuf>,
    pub compress: Table,
}

/// Reads `path` and applies `KEY=VALUE` overrides (`compress.bits=w6a6`, `teacher=...`; VALUE is
/// read as TOML, else taken as a string).
pub fn load(path: &Path, overrides: &[String]) -> Result<Pipeline> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read pipeline file", path.display()))?;
    let mut t: Table = text
        .parse()
        .with_context(|| format!("{}: not a valid TOML pipeline", path.display()))?;
    for o in overrides {
        let (key, raw) = o
            .split_once('=')
            .with_context(|| format!("--set {o}: expected KEY=VALUE"))?;
        let value = format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut v| v.remove("v"))
            .unwrap_or_else(|| Value::String(raw.to_string()));
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().expect("split yields one part");
        let mut cur = &mut t;
        for p in parts {
            cur = cur
                .entry(p)
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .with_context(|| format!("--set {o}: '{p}' is not a table"))?;
        }
        cur.insert(last.to_string(), value);
    }
    let known = ["name", "description", "teacher", "compress"];
    if let Some(k) = t.keys().find(|k| !known.contains(&k.as_str())) {
        bail!(
            "{}: unknown key '{k}' (a pipeline has {})",
            path.display(),
            known.join(", ")
        );
    }
    let name = match t.get("name") {
        Some(Value::String(s)) => s.clone(),
        _ => bail!("{}: missing name = \"...\"", path.display()),
    };
    let teacher = match t.get("teacher") {
        Some(Value::String(s)) => Some(PathBuf::from(s)),
        None => None,
        Some(v) => bail!("{}: teacher must be a path string, got {v}", path.display()),
    };
    let compress = match t.remove("compress") {
        Some(Value::Table(c)) => c,
        None => Table::new(),
        Some(v) => bail!("{}: [compress] must be a table, got {v}", path.display()),
    };
    Ok(Pipeline {
        path: path.to_path_buf(),
        name,
        teacher,
        compress,
    })
}

fn scalar(v: &Value, key: &str, file: &Path) -> Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Integer(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Array(a) => a
            .iter()
            .map(|x| scalar(x, key, file))
            .collect::<Result<Vec<_>>>()?
            .join(","),
        other => bail!(
            "{}: compress.{key}: unsupported value {other}",
            file.display()
        ),
    })
}

impl Pipeline {
    /// The `datafree compress` arguments this pipeline stands for (without the program name).
    pub fn compress_args(&self, teacher: &Path, out: &Path) -> Result<Vec<String>> {
        let mut args = vec![
            "compress".to_string(),
            teacher.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        for (k, v) in &self.compress {
            let flag = format!("--{}", k.replace('_', "-"));
            ensure!(
                !matches!(k.as_str(), "out" | "teacher"),
                "{}: compress.{k}: give it with --{k} on the command line (or as `teacher` at the top level)",
                self.path.display()
            );
            match v {
                Value::Boolean(true) => args.push(flag),
                Value::Boolean(false) => {}
                v => {
                    args.push(flag);
                    args.push(scalar(v, k, &self.path)?);
                }
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn turns_the_file_into_compress_flags_with_overrides() {
        let (_d, p) = write(
            "name = \"t\"\nteacher = \"a.onnx\"\n[compress]\nmethod = \"gdfq\"\nlr_milestones = [1, 2]\nfull_range_weights = true\nint4_weights = false\nstudent_lr = 1e-4\n",
        );
        let pl = load(
            &p,
            &["compress.bits=w6a6".into(), "compress.epochs=3".into()],
        )
        .unwrap();
        assert_eq!(pl.teacher.as_deref(), Some(Path::new("a.onnx")));
        let args = pl
            .compress_args(Path::new("a.onnx"), Path::new("o"))
            .unwrap();
        assert_eq!(
            args.join(" "),
            "compress a.onnx --out o --bits w6a6 --epochs 3 --full-range-weights --lr-milestones 1,2 --method gdfq --student-lr 0.0001"
        );
    }

    #[test]
    fn unknown_sections_and_bad_overrides_are_errors_naming_the_file() {
        let (_d, p) = write("name = \"t\"\n[train]\nx = 1\n");
        let e = load(&p, &[]).unwrap_err().to_string();
        assert!(
            e.contains("p.toml") && e.contains("unknown key 'train'"),
            "{e}"
        );
        let (_d, p) = write("name = \"t\"\n");
        assert!(
            load(&p, &["novalue".into()])
                .unwrap_err()
                .to_string()
                .contains("KEY=VALUE")
        );
        let (_d, p) = write("teacher = \"x\"\n");
        assert!(
            load(&p, &[])
                .unwrap_err()
                .to_string()
                .contains("missing name")
        );
    }
}
