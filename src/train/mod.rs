//! Training: losses shared by every data-free method (BN-statistics matching, distillation),
//! optimisers, and training loops.

pub mod classifier;
pub mod gdfq;
pub mod losses;
pub mod optim;
