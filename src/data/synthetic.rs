//! `shapes10`: a procedural, labelled RGB dataset the project makes itself, so a teacher can be
//! trained and measured without shipping third-party data. Ten classes of shapes and textures
//! (disk, square, triangle, ring, cross, horizontal / vertical / diagonal stripes, checkerboard,
//! dot grid) in random colours, positions and sizes on gradient backgrounds with noise. Each
//! image is a pure function of (split, index, side): splits are generated on demand, never
//! stored. Drawn at 32 x 32 by default and at any other side with the same scene scaled (more
//! pixels, not a resized picture). `shapes2` is the same images labelled object (the five shapes)
//! or texture (the five patterns): a two-class task like the person / no-person detectors
//! embedded vendors ship.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Dataset;

pub const CLASSES: [&str; 10] = [
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "h-stripes",
    "v-stripes",
    "checkerboard",
    "diagonal",
    "dots",
];
pub const SIZE: usize = 32;

/// The two classes of `shapes2`: shapes10 classes below 5 are objects, the others textures.
pub const CLASSES2: [&str; 2] = ["object", "texture"];

/// The labelled tasks on these images: (name, class names).
pub fn task(name: &str) -> Option<&'static [&'static str]> {
    match name {
        "shapes10" => Some(&CLASSES),
        "shapes2" => Some(&CLASSES2),
        _ => None,
    }
}

/// Seeds of the splits: different streams, so train and test never share an image.
pub fn split_seed(split: &str) -> Option<u64> {
    match split {
        "train" => Some(0x5eed_0001),
        "test" => Some(0x5eed_0002),
        _ => None,
    }
}

fn color(r: &mut ChaCha8Rng) -> [f32; 3] {
    [
        r.random_range(0.0..255.0),
        r.random_range(0.0..255.0),
        r.random_range(0.0..255.0),
    ]
}

/// Renders image `index` of the split with seed `seed` at 32 x 32; returns (planar CHW pixels,
/// shapes10 label).
pub fn render(seed: u64, index: u64) -> (Vec<u8>, usize) {
    render_sized(seed, index, SIZE)
}

/// [`render`] at `side` x `side`: the same scene (shape, colours, angle, noise level) with every
/// length scaled by side / 32; at 32 the very same bytes.
pub fn render_sized(seed: u64, index: u64, side: usize) -> (Vec<u8>, usize) {
    // Multiplying by exactly 1.0 keeps the 32 px images bit for bit.
    let k = side as f32 / SIZE as f32;
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let label = r.random_range(0..CLASSES.len());
    // Foreground far enough from both background colours to be visible.
    let (bg0, bg1) = (color(&mut r), color(&mut r));
    let fg = loop {
        let c = color(&mut r);
        let dist = |b: [f32; 3]| (0..3).map(|k| (c[k] - b[k]).powi(2)).sum::<f32>().sqrt();
        if dist(bg0) > 120.0 && dist(bg1) > 120.0 {
            break c;
        }
    };
    let angle: f32 = r.random_range(0.0..std::f32::consts::TAU);
    let (cx, cy) = (r.random_range(10.0..22.0f32), r.random_range(10.0..22.0f32));
    let size: f32 = r.random_range(5.0..10.0);
    let period: f32 = r.random_range(4.0..7.0);
    let phase: f32 = r.random_range(0.0..period);
    let (cx, cy, size, period, phase) = (cx * k, cy * k, size * k, period * k, phase * k);
    let noise: f32 = r.random_range(0.0..20.0);
    let inside = |x: f32, y: f32| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match label {
            0 => dx * dx + dy * dy <= size * size,
            1 => dx.abs() <= size * 0.85 && dy.abs() <= size * 0.85,
            2 => dy <= size * 0.8 && dy >= -size && dx.abs() <= (dy + size) * 0.6,
            3 => {
                let d = (dx * dx + dy * dy).sqrt();
                d <= size && d >= size * 0.55
            }
            4 => {
                (dx.abs() <= size * 0.3 && dy.abs() <= size)
                    || (dy.abs() <= size * 0.3 && dx.abs() <= size)
            }
            5 => ((y + phase) / period).floor() as i64 % 2 == 0,
            6 => ((x + phase) / period).floor() as i64 % 2 == 0,
            7 => {
                (((x + phase) / period).floor() as i64 + ((y + phase) / period).floor() as i64) % 2
                    == 0
            }
            8 => ((x + y + phase) / period).floor() as i64 % 2 == 0,
            _ => {
                let (mx, my) = (
                    (x + phase).rem_euclid(period * 1.5) - period * 0.75,
                    (y + phase).rem_euclid(period * 1.5) - period * 0.75,
                );
                mx * mx + my * my <= (period * 0.35).powi(2)
            }
        }
    };
    let (ca, sa) = (angle.cos(), angle.sin());
    let (centre, spread) = (16.0 * k, 45.0 * k);
    let plane = side * side;
    let mut px = vec![0u8; 3 * plane];
    for y in 0..side {
        for x in 0..side {
            // 2x2 supersampling for soft edges.
            let mut cover = 0.0f32;
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                cover += inside(x as f32 + ox, y as f32 + oy) as u8 as f32 / 4.0;
            }
            let t = (((x as f32 - centre) * ca + (y as f32 - centre) * sa) / spread + 0.5)
                .clamp(0.0, 1.0);
            for c in 0..3 {
                let bg = bg0[c] * (1.0 - t) + bg1[c] * t;
                let v = bg * (1.0 - cover) + fg[c] * cover + r.random_range(-noise..=noise);
                px[c * plane + y * side + x] = v.clamp(0.0, 255.0).round() as u8;
            }
        }
    }
    (px, label)
}

/// The label of a shapes10 image in `task`.
pub fn relabel(task: &str, label: usize) -> usize {
    if task == "shapes2" {
        usize::from(label >= 5)
    } else {
        label
    }
}

/// `n` shapes10 images of a split at 32 x 32.
pub fn generate(split: &str, n: usize) -> Option<Dataset> {
    generate_task("shapes10", split, n, SIZE)
}

/// `n` images of a split at `side` x `side`, labelled for `task` (`shapes10` or `shapes2`).
pub fn generate_task(task_name: &str, split: &str, n: usize, side: usize) -> Option<Dataset> {
    let classes = task(task_name)?;
    let seed = split_seed(split)?;
    let mut pixels = Vec::with_capacity(n * 3 * side * side);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let (p, l) = render_sized(seed, i, side);
        pixels.extend(p);
        labels.push(relabel(task_name, l));
    }
    Some(Dataset {
        source: format!("synthetic:{task_name}:{split}:{n}"),
        format: "synthetic",
        height: side,
        width: side,
        pixels,
        labels,
        class_names: classes.iter().map(|s| s.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_split_apart() {
        let a = generate("test", 400).unwrap();
        let b = generate("test", 400).unwrap();
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.labels, b.labels);
        let t = generate("train", 400).unwrap();
        assert_ne!(a.pixels[..3072], t.pixels[..3072]);
        let mut counts = [0usize; 10];
        a.labels.iter().for_each(|&l| counts[l] += 1);
        assert!(
            counts.iter().all(|&c| c >= 20),
            "classes are roughly balanced: {counts:?}"
        );
        // Image i does not depend on how many images are generated.
        let c = generate("test", 10).unwrap();
        assert_eq!(c.pixels[..], a.pixels[..10 * 3072]);
    }

    #[test]
    fn larger_sides_draw_the_same_scene_and_shapes2_splits_objects_from_textures() {
        let small = generate("test", 50).unwrap();
        let big = generate_task("shapes2", "test", 50, 96).unwrap();
        assert_eq!((big.height, big.width), (96, 96));
        assert_eq!(big.pixels.len(), 50 * 3 * 96 * 96);
        for (i, (&l10, &l2)) in small.labels.iter().zip(&big.labels).enumerate() {
            assert_eq!(l2, usize::from(l10 >= 5), "image {i}");
        }
        // The 96 px image, averaged over 3 x 3 blocks, is close to the 32 px one: same scene.
        let (img32, img96) = (&small.pixels[..3072], &big.pixels[..3 * 96 * 96]);
        let mut err = 0.0f64;
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let mut s = 0.0f64;
                    for dy in 0..3 {
                        for dx in 0..3 {
                            s += img96[c * 9216 + (3 * y + dy) * 96 + 3 * x + dx] as f64;
                        }
                    }
                    err += (s / 9.0 - img32[c * 1024 + y * 32 + x] as f64).abs();
                }
            }
        }
        let mean_err = err / 3072.0;
        assert!(mean_err < 25.0, "mean |difference| {mean_err}");
    }
}
