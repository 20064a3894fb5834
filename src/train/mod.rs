//! Training: losses shared by every data-free method (BN-statistics matching, distillation),
//! optimisers, the run engine every training loop goes through, and the GDFQ, CPSC-DFKD and
//! supervised training steps.

pub mod classifier;
pub mod cpsc;
pub mod engine;
pub mod gdfq;
pub mod generated;
pub mod losses;
pub mod optim;
