//! The integration tests, one binary (one link of candle, tract and ort): each module covers one
//! stage end to end on models the project builds itself (`fixtures`) and, where present, on the
//! real teachers in ../shared (skipped with a printed reason when absent).
#![allow(dead_code)]

mod common;
mod families;
mod fixtures;

mod autorecon;
mod cli_errors;
mod compress;
mod cpsc;
mod cuda;
mod family_teachers;
mod gdfq;
mod inspect_fixtures;
mod interfaces;
mod kernels;
mod lowering;
mod lowering_ops;
mod runtime;
mod shared_teachers;
