//! datafree: compress an ONNX image classifier without its training data.
//!
//! Stages, one module each, data flowing one way:
//! [`onnx`] (read, BN statistics, write) -> [`lower`] (ONNX graph to candle) -> generators / search ->
//! quantization -> training -> export -> [`verify`] (ONNX Runtime, tract); [`report`] renders results.
//! The binary in `main.rs` is a thin clap front end over [`cli`].

pub mod cli;
pub mod compress;
pub mod data;
pub mod export;
pub mod generator;
pub mod io;
pub mod kernels;
pub mod lower;
pub mod onnx;
pub mod pipeline;
pub mod quant;
pub mod report;
pub mod search;
pub mod train;
pub mod verify;
