//! Labelled image data, only for MEASURING a model (compression never sees data): CIFAR-10/100
//! binary batch files and image folders (class = index of the sub-folder in sorted order). Images
//! are held as 8-bit RGB planes at the model's resolution; [`Preprocess`] turns a batch into the
//! model's input space.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

pub mod synthetic;

/// A labelled set of RGB images, planar (C, H, W) u8.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub source: String,
    pub format: &'static str,
    pub height: usize,
    pub width: usize,
    /// N x 3 x H x W bytes.
    pub pixels: Vec<u8>,
    pub labels: Vec<usize>,
    pub class_names: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn classes(&self) -> usize {
        self.class_names.len()
    }

    /// Keeps the first `n` images.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * 3 * self.height * self.width);
    }
}

/// x = (pixel / scale - mean[c]) / std[c].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Preprocess {
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub scale: f32,
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            mean: [0.0; 3],
            std: [1.0; 3],
            scale: 255.0,
        }
    }
}

impl Preprocess {
    /// Images `range` of `data` as a flat N x 3 x H x W float batch.
    pub fn batch(&self, data: &Dataset, range: std::ops::Range<usize>) -> Vec<f32> {
        let plane = data.height * data.width;
        let px = &data.pixels[range.start * 3 * plane..range.end * 3 * plane];
        px.iter()
            .enumerate()
            .map(|(i, &p)| {
                let c = (i / plane) % 3;
                (p as f32 / self.scale - self.mean[c]) / self.std[c]
            })
            .collect()
    }
}

/// Parses "a,b,c" into three floats.
pub fn parse_triple(s: &str) -> Result<[f32; 3]> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f32>()
                .with_context(|| format!("'{x}' is not a number"))
        })
        .collect::<Result<_>>()?;
    ensure!(
        v.len() == 3,
        "expected three comma-separated values (r,g,b), got {}",
        v.len()
    );
    Ok([v[0], v[1], v[2]])
}

/// `synthetic:shapes10|shapes2:SPLIT[:N]` (N defaults to 2000), drawn at the model's side.
fn open_synthetic(rest: &str, height: usize, width: usize) -> Result<Dataset> {
    let parts: Vec<&str> = rest.split(':').collect();
    let usage = "synthetic data is written synthetic:shapes10|shapes2:train|test[:N]";
    ensure!(
        parts.len() >= 2 && parts.len() <= 3 && synthetic::task(parts[0]).is_some(),
        "{usage}, got 'synthetic:{rest}'"
    );
    let n = match parts.get(2) {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("{usage}: '{v}' is not a positive count"))?,
        None => 2000,
    };
    ensure!(
        height == width && height >= 8,
        "{} images are square (8 px or more) but the model takes {height}x{width}",
        parts[0]
    );
    synthetic::generate_task(parts[0], parts[1], n, height)
        .with_context(|| format!("{usage}: unknown split '{}'", parts[1]))
}

/// Opens `--data SPEC`: `synthetic:shapes10|shapes2:SPLIT[:N]`, `cifar10:FILE`, `cifar100:FILE`, a CIFAR binary file (10 or 100 classes
/// told apart by record size), or a folder of class sub-folders. Images are resized to
/// `height` x `width` where they differ.
pub fn open(spec: &str, height: usize, width: usize) -> Result<Dataset> {
    if let Some(rest) = spec.strip_prefix("synthetic:") {
        return open_synthetic(rest, height, width);
    }
    let (kind, path) = match spec.split_once(':') {
        Some(("cifar10", p)) => (Some("cifar10"), PathBuf::from(p)),
        Some(("cifar100", p)) => (Some("cifar100"), PathBuf::from(p)),
        _ => (None, PathBuf::from(spec)),
    };
    let meta = std::fs::metadata(&path)
        .with_context(|| format!("{}: cannot open data", path.display()))?;
    if meta.is_dir() {
        ensure!(
            kind.is_none(),
            "{}: {} data must be a binary file, this is a folder",
            path.display(),
            kind.unwrap_or_default()
        );
        return image_folder(&path, height, width);
    }
    let bytes =
        std::fs::read(&path).with_context(|| format!("{}: cannot read data", path.display()))?;
    let kind = match kind {
        Some(k) => k,
        None if !bytes.is_empty() && bytes.len().is_multiple_of(3073) => "cifar10",
        None if !bytes.is_empty() && bytes.len().is_multiple_of(3074) => "cifar100",
        None => bail!(
            "{}: {} bytes is neither a whole number of CIFAR-10 records (3073 bytes) nor of CIFAR-100 records (3074 bytes), nor a folder of class sub-folders",
            path.display(),
            bytes.len()
        ),
    };
    cifar_binary(&path, &bytes, kind, height, width)
}

fn cifar_binary(
    path: &Path,
    bytes: &[u8],
    kind: &'static str,
    height: usize,
    width: usize,
) -> Result<Dataset> {
    let (record, label_at, classes) = if kind == "cifar10" {
        (3073, 0, 10)
    } else {
        (3074, 1, 100)
    };
    ensure!(
        !bytes.is_empty() && bytes.len().is_multiple_of(record),
        "{}: {} bytes is not a whole number of {kind} records ({record} bytes each)",
        path.display(),
        bytes.len()
    );
    ensure!(
        (height, width) == (32, 32),
        "{}: CIFAR images are 32x32 but the model takes {height}x{width}",
        path.display()
    );
    let n = bytes.len() / record;
    let mut pixels = Vec::with_capacity(n * 3072);
    let mut labels = Vec::with_capacity(n);
    for (i, r) in bytes.chunks_exact(record).enumerate() {
        let label = r[label_at] as usize;
        ensure!(
            label < classes,
            "{}: record {i} has label {label}, but {kind} has {classes} classes",
            path.display()
        );
        labels.push(label);
        pixels.extend_from_slice(&r[record - 3072..]);
    }
    // CIFAR-10 ships class names beside the batches.
    let meta = path.with_file_name("batches.meta.txt");
    let names: Vec<String> = std::fs::read_to_string(&meta)
        .map(|s| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let class_names = if names.len() == classes {
        names
    } else {
        (0..classes).map(|c| c.to_string()).collect()
    };
    Ok(Dataset {
        source: path.display().to_string(),
        format: kind,
        height: 32,
        width: 32,
        pixels,
        labels,
        class_names,
    })
}

fn image_folder(root: &Path, height: usize, width: usize) -> Result<Dataset> {
    let mut classes: Vec<(String, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| format!("{}: cannot list folder", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    classes.sort();
    ensure!(
        !classes.is_empty(),
        "{}: no class sub-folders (expected ROOT/<class>/<image>)",
        root.display()
    );
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (label, (_, dir)) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list folder", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        files.sort();
        for f in files {
            let img = image::open(&f)
                .with_context(|| format!("{}: unreadable image", f.display()))?
                .to_rgb8();
            let img = if img.dimensions() == (width as u32, height as u32) {
                img
            } else {
                image::imageops::resize(
                    &img,
                    width as u32,
                    height as u32,
                    image::imageops::FilterType::Triangle,
                )
            };
            for c in 0..3 {
                pixels.extend(img.pixels().map(|p| p.0[c]));
            }
            labels.push(label);
        }
    }
    ensure!(
        !labels.is_empty(),
        "{}: no PNG/JPEG images found in its class sub-folders",
        root.display()
    );
    Ok(Dataset {
        source: root.display().to_string(),
        format: "image-folder",
        height,
        width,
        pixels,
        labels,
        class_names: classes.into_iter().map(|(n, _)| n).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cifar10_records_and_preprocessing() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        for label in [3u8, 7] {
            bytes.push(label);
            bytes.extend((0..3072).map(|i| (i % 256) as u8));
        }
        let p = dir.path().join("b.bin");
        std::fs::write(&p, &bytes).unwrap();
        let d = open(p.to_str().unwrap(), 32, 32).unwrap();
        assert_eq!((d.len(), d.format, d.classes()), (2, "cifar10", 10));
        assert_eq!(d.labels, vec![3, 7]);
        let pre = Preprocess {
            mean: [0.5, 0.0, 0.0],
            std: [0.5, 1.0, 1.0],
            scale: 255.0,
        };
        let x = pre.batch(&d, 1..2);
        assert_eq!(x.len(), 3072);
        assert!((x[255] - ((255.0 / 255.0 - 0.5) / 0.5)).abs() < 1e-6);
        assert!(
            (x[1024] - 0.0).abs() < 1e-6,
            "green plane starts at 1024 with pixel 0"
        );
    }

    #[test]
    fn bad_binary_data_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.bin");
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        let e = open(p.to_str().unwrap(), 32, 32).unwrap_err().to_string();
        assert!(e.contains("neither a whole number"), "{e}");
        let mut rec = vec![11u8];
        rec.extend(vec![0u8; 3072]);
        std::fs::write(&p, &rec).unwrap();
        let e = open(&format!("cifar10:{}", p.display()), 32, 32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 11"), "{e}");
    }

    #[test]
    fn image_folder_classes_sorted_and_resized() {
        let dir = tempfile::tempdir().unwrap();
        for (cls, v) in [("b_dog", 200u8), ("a_cat", 10u8)] {
            std::fs::create_dir(dir.path().join(cls)).unwrap();
            let img = image::RgbImage::from_pixel(8, 8, image::Rgb([v, v, v]));
            img.save(dir.path().join(cls).join("x.png")).unwrap();
        }
        let d = open(dir.path().to_str().unwrap(), 4, 4).unwrap();
        assert_eq!(d.class_names, vec!["a_cat", "b_dog"]);
        assert_eq!(d.labels, vec![0, 1]);
        assert_eq!(d.pixels.len(), 2 * 3 * 16);
        assert_eq!(d.pixels[0], 10);
        std::fs::write(dir.path().join("a_cat").join("broken.png"), b"not a png").unwrap();
        let e = format!(
            "{:#}",
            open(dir.path().to_str().unwrap(), 4, 4).unwrap_err()
        );
        assert!(
            e.contains("broken.png") && e.contains("unreadable image"),
            "{e}"
        );
    }
}
