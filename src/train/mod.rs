//! Training: losses shared by every data-free method (BN-statistics matching, distillation),
//! optimisation loops and checkpoints.

pub mod losses;
