//! twinflow core: the UCGM UnifiedSampler (and, later, the TwinFlow losses) on libtorch.
//!
//! Plain Rust modules hold the algorithms; `python` (feature `python`) only converts and
//! validates at the Python boundary.

pub mod config;
pub mod error;
pub mod fused;
pub mod grid;
pub mod pool;
pub mod rng;
pub mod sampler;
pub mod step;
pub mod stepper;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use config::{SamplerConfig, SamplingStyle, StochastRatio};
pub use error::{Error, Result};
pub use rng::{GlobalRng, Rng};
pub use sampler::{Sampler, VelocityModel};
