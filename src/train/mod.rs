//! The TwinFlow training objective (SPEC §3): sub-batches, times, targets, losses, EMA and
//! the step that orchestrates them through a [`step::TrainModel`].

pub mod config;
pub mod ema;
pub mod loss;
pub mod split;
pub mod step;
pub mod target;
pub mod time;

pub use config::{LossKind, TrainConfig};
pub use split::{split_sub_batches, RUN_NAMES};
pub use step::{training_step, Call, CondKind, Net, StepOutput, TrainModel, STAT_NAMES};
