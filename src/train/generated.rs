//! What every generator-and-student training step shares: the checkpoint files of the pair
//! (generator, student, their optimisers) and the sample grids of generated images.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::optim::{Adam, Sgd, State};
use crate::generator::Generator;
use crate::generator::params::{load_tensors, save_tensors};
use crate::lower::Program;
use crate::teacher::InputDomain;

/// Writes generator.safetensors, student.safetensors (the student's trainable tensors plus
/// `extra`), generator-adam.safetensors and student-sgd.safetensors into `dir`.
pub fn save_pair(
    dir: &Path,
    generator: &dyn Generator,
    student: &Program,
    extra: Vec<(String, Tensor)>,
    (gen_opt, student_opt): (&Adam, &Sgd),
) -> Result<()> {
    generator
        .params()
        .save(&dir.join("generator.safetensors"))?;
    let mut tensors: Vec<(String, Tensor)> = student
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    tensors.extend(extra);
    save_tensors(&dir.join("student.safetensors"), tensors)?;
    save_tensors(&dir.join("generator-adam.safetensors"), gen_opt.state()?)?;
    save_tensors(&dir.join("student-sgd.safetensors"), student_opt.state()?)
}

/// Restores what [`save_pair`] wrote; returns every saved student tensor (the extras
/// included) by name.
pub fn load_pair(
    dir: &Path,
    generator: &mut dyn Generator,
    student: &Program,
    (gen_opt, student_opt): (&mut Adam, &mut Sgd),
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    generator
        .params_mut()
        .load(&dir.join("generator.safetensors"))?;
    let saved = load_tensors(&dir.join("student.safetensors"), device)?;
    for (name, var) in student.vars() {
        let t = saved
            .get(name)
            .with_context(|| format!("{}: student parameter {name} missing", dir.display()))?;
        var.set(t)?;
    }
    gen_opt.load_state(&load_tensors(
        &dir.join("generator-adam.safetensors"),
        device,
    )?)?;
    student_opt.load_state(&load_tensors(&dir.join("student-sgd.safetensors"), device)?)?;
    Ok(saved)
}

/// Writes `samples-DONE.png` into `out` when `done` is a multiple of `every` (> 0) or the
/// last iteration.
pub fn samples_when_due(
    g: &dyn Generator,
    out: &Path,
    (every, done, total): (usize, usize, usize),
    classes: usize,
    domain: &InputDomain,
    device: &Device,
) -> Result<()> {
    if every > 0 && (done.is_multiple_of(every) || done == total) {
        let p = out.join(format!("samples-{done:06}.png"));
        save_samples(g, &p, classes, domain, device)?;
    }
    Ok(())
}

/// Samples a grid: one row per class (up to 10 classes), 8 images each, from fixed latents,
/// shown as the pixels the teacher's domain maps them back to.
pub fn save_samples(
    g: &dyn Generator,
    path: &Path,
    classes: usize,
    domain: &InputDomain,
    device: &Device,
) -> Result<()> {
    let (rows, cols) = (classes.min(10), 8);
    let mut r = ChaCha8Rng::seed_from_u64(0x9d1d);
    let n = rows * cols;
    let z: Vec<f32> = (0..n * g.latent())
        .map(|_| StandardNormal.sample(&mut r))
        .collect();
    let y: Vec<u32> = (0..n).map(|i| (i / cols) as u32).collect();
    let x = crate::generator::to_domain(
        &g.forward(
            &Tensor::from_vec(z, (n, g.latent()), device)?,
            &Tensor::from_vec(y, n, device)?,
        )?,
        domain,
    )?;
    let (c, h, w) = g.image();
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let images: Vec<Vec<u8>> = v
        .chunks(c * h * w)
        .map(|img| {
            (0..3)
                .flat_map(|k| {
                    img[(k % c) * h * w..][..h * w]
                        .iter()
                        .map(move |&x| domain.to_pixel(x, k).clamp(0.0, 255.0).round() as u8)
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    crate::plot::save_grid(path, &refs, h, w, cols, 3)
}
