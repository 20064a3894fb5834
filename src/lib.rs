//! datafree: compress an ONNX image classifier without its training data.
//!
//! Stages, one module each, data flowing one way:
//! [`onnx`] (read, check, BN statistics, write) -> [`teacher`] (analysed once: geometry, classes,
//! input domain) -> [`lower`] (ONNX graph to candle, on [`kernels`]) -> [`methods`] (ptq, gdfq,
//! autorecon) using [`generator`], [`search`], [`quant`] and [`train`] (losses, optimisers, the
//! run engine) -> [`export`] (QDQ) -> [`verify`] (ONNX Runtime, tract, our simulation) ->
//! [`pipeline`] (compress, top to bottom) -> [`report`] (human renderings); [`data`], [`plot`],
//! [`io`] and [`device`] beside. The binary in `main.rs` is a thin clap front end over [`cli`].

pub mod arch;
pub mod cli;
pub mod data;
pub mod device;
pub mod export;
pub mod generator;
pub mod io;
pub mod kernels;
pub mod lower;
pub mod methods;
pub mod onnx;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod quant;
pub mod report;
pub mod search;
pub mod teacher;
pub mod train;
pub mod verify;

/// The serde name of a unit enum value (`raw-pixels`-style kebab names where the type says so).
pub fn cli_name_of<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|j| j.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The name a value has on the command line (`ptq-bn`, `symmetric`, `fold`).
pub fn cli_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}
