//! twinflow core: the UCGM sampler's arithmetic and the TwinFlow objective on libtorch.
//!
//! Sampling: `config` declares the settings, `grid` the time grid, `stepper` walks the model
//! evaluations one at a time and `update` holds the tensor update of each. The loop that
//! calls the model is Python's (`twinflow.UnifiedSampler.sample`). Plain Rust modules hold
//! the algorithms; `python` (feature `python`) only converts and validates at the boundary.

pub mod config;
pub mod error;
pub mod fused;
pub mod grid;
pub mod lanes;
pub mod pool;
pub mod sampler;
pub mod stepper;
pub mod train;
pub mod update;

#[cfg(feature = "python")]
mod python;

pub use config::{SamplerConfig, SamplingStyle, StochastRatio, SAMPLER_SETTINGS};
pub use error::{Error, Result};
pub use sampler::SamplerSettings;
pub use stepper::Stepper;
