//! The TwinFlow training objective (docs/algorithm.md §3): sub-batches, times, targets, losses, EMA and
//! the step that orchestrates them through a [`step::TrainModel`].

pub mod config;
pub mod ema;
pub mod loss;
pub mod split;
pub mod objective;
pub mod target;
pub mod time;

pub use config::{LossKind, ObjectiveConfig};
pub use split::{split_sub_batches, RUN_NAMES};
pub use objective::{training_step, Call, CondKind, Net, Part, StepOutput, TrainModel, STAT_NAMES};
