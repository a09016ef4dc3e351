//! The TwinFlow training objective (docs/algorithm.md §3): sub-batches, times, targets, losses, EMA and
//! the step's parts on a [`Plan`]; Python (`twinflow.objective.training_step`) drives them.

pub mod config;
pub mod ema;
pub mod loss;
pub mod split;
pub mod objective;
pub mod target;
pub mod time;

pub use config::{LossKind, ObjectiveConfig};
pub use split::{split_sub_batches, RUN_NAMES};
pub use objective::{Net, Plan, STAT_NAMES};
