//! The teacher, analysed once per run: the model file (proto and folder), its inspection
//! (signature, op histogram, BatchNormalization statistics and verdict, what the lowering
//! supports), its interface (input layout, output kind) and core, its input geometry and class
//! count, and its input domain. Every later stage takes a `&Teacher` instead of re-deriving
//! these from the file.

pub mod domain;
mod infer;
pub mod inspect;

use std::path::Path;

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device};

use crate::data::Preprocess;
use crate::device::HOST;
use crate::lower::Program;
use crate::onnx::bn::BnReport;
use crate::onnx::interface::Interface;
use crate::onnx::pb::ModelProto;
use crate::onnx::{self, LoadedModel};
pub use domain::InputDomain;
use inspect::InspectReport;

/// A classifier ready for the data-free stages.
pub struct Teacher {
    /// The core: NCHW input, logits out (see [`Interface`]); path, size and hash are the file's.
    pub model: LoadedModel,
    /// What the file adds around the core (input layout, final Softmax), put back on students.
    pub interface: Interface,
    pub info: InspectReport,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
    pub domain: InputDomain,
}

impl Teacher {
    /// Reads and analyses `path`; `given` is the user's preprocessing, if any.
    pub fn open(path: &Path, given: Option<Preprocess>) -> Result<Teacher> {
        Teacher::new(onnx::load_model(path)?, given)
    }

    /// Analyses a loaded model: refuses broken parameters, non-image inputs and outputs without
    /// a class axis, and resolves the input domain.
    pub fn new(file: LoadedModel, given: Option<Preprocess>) -> Result<Teacher> {
        onnx::check::parameters(&file)?;
        let interface = Interface::of(&file)?;
        // The report describes the file as the user knows it (layout, output kind); its BN
        // statistics are traced from the core's input, where the domain is read.
        let mut info = inspect::inspect(&file);
        let model = LoadedModel {
            proto: interface.core(&file.proto),
            ..file
        };
        if !interface.is_plain() {
            info.batch_norm = crate::onnx::bn::analyse(&model);
        }
        let (channels, height, width) = geometry(&model, &info)?;
        let domain = InputDomain::resolve(&model, &info.batch_norm, given, (height, width));
        let classes = match info.classes {
            Some(c) => c,
            None => {
                // No declared class axis: one forward pass says it.
                let p = crate::lower::lower(&model, &HOST, DType::F32)?;
                let x = candle_core::Tensor::from_vec(
                    domain.noise(&[2, channels, height, width], 0),
                    (2, channels, height, width),
                    &HOST,
                )?;
                p.forward(&x)?.dim(1)?
            }
        };
        Ok(Teacher {
            model,
            interface,
            info,
            channels,
            height,
            width,
            classes,
            domain,
        })
    }

    pub fn path(&self) -> &Path {
        &self.model.path
    }

    /// The file name for messages.
    pub fn name(&self) -> String {
        self.model.path.display().to_string()
    }

    pub fn bn(&self) -> &BnReport {
        &self.info.batch_norm
    }

    pub fn has_bn_statistics(&self) -> bool {
        self.bn().resolved_count > 0
    }

    /// (channels, height, width) of the images a generator makes for it.
    pub fn image(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }

    /// N x C x H x W of a batch of `n` inputs.
    pub fn input_shape(&self, n: usize) -> [usize; 4] {
        [n, self.channels, self.height, self.width]
    }

    /// The teacher lowered to candle (frozen parameters).
    pub fn program(&self, device: &Device) -> Result<Program> {
        crate::lower::lower(&self.model, device, DType::F32)
    }

    /// Another graph of the teacher's (BN folded, fine-tuned weights) that keeps its file name
    /// for messages and its folder for external data.
    pub fn derived(&self, proto: ModelProto) -> LoadedModel {
        let m = &self.model;
        LoadedModel {
            path: m.path.clone(),
            size_bytes: m.size_bytes,
            sha256: m.sha256.clone(),
            proto,
            opset: m.opset,
        }
    }

    /// The preprocessing to feed measuring data through.
    pub fn preprocess(&self) -> &Preprocess {
        &self.domain.preprocess
    }
}

/// C x H x W of the image input (in either layout) with 3 channels.
fn geometry(model: &LoadedModel, info: &InspectReport) -> Result<(usize, usize, usize)> {
    let res = info.input_resolution.as_ref().with_context(|| {
        format!(
            "{}: the input has no fixed C x H x W shape",
            model.path.display()
        )
    })?;
    ensure!(
        res.channels == 3,
        "{}: expects {} input channels; the data is RGB",
        model.path.display(),
        res.channels
    );
    Ok((
        res.channels as usize,
        res.height as usize,
        res.width as usize,
    ))
}
