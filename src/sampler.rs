//! A validated sampler configuration with its time grid, and the checks on what a sampling
//! loop hands the core (the initial noise, each model output). The loop itself is Python's
//! (`twinflow.UnifiedSampler.sample`), one [`crate::stepper::Stepper`] step per model call.

use tch::{Device, Kind, Tensor};

use crate::config::SamplerConfig;
use crate::error::{all_finite, device_name, Error, Result};
use crate::grid::time_grid;

/// A validated configuration with its time grid.
#[derive(Clone, Debug)]
pub struct SamplerSettings {
    cfg: SamplerConfig,
    grid: Vec<f64>,
}

impl SamplerSettings {
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        cfg.validate()?;
        let grid = time_grid(&cfg);
        Ok(Self { cfg, grid })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// t_0 > … > t_n = 0 in f64.
    pub fn timesteps(&self) -> &[f64] {
        &self.grid
    }

    pub fn nfe(&self) -> usize {
        self.cfg.nfe()
    }
}

/// Check the initial noise: a float tensor with a batch dimension, and finite with `finite`.
pub fn check_noise(noise: &Tensor, finite: bool) -> Result<()> {
    check_sample(noise, "noise")?;
    if finite && !all_finite(noise)? {
        return Err(Error::Value("noise contains NaN or Inf".into()));
    }
    Ok(())
}

/// A float tensor with a batch dimension (the noise, or a sample being stepped).
pub fn check_sample(x: &Tensor, field: &str) -> Result<()> {
    let kind = x.f_kind()?;
    if !is_float(kind) {
        return Err(Error::Type(format!("{field} must be a floating-point tensor, got dtype {kind:?}")));
    }
    if x.dim() == 0 {
        return Err(Error::Value(format!("{field} must have a batch dimension (got a 0-dim tensor)")));
    }
    Ok(())
}

/// Floating-point element types libtorch can sample in.
pub fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double)
}

/// The model output must be shaped like x_t and on its device; a float of another precision
/// is cast to x_t's.
pub fn velocity_like(f: Tensor, x: &Tensor) -> Result<Tensor> {
    let (shape, kind, device): (Vec<i64>, Kind, Device) = (x.size(), x.f_kind()?, x.device());
    if f.size() != shape {
        return Err(Error::Value(format!(
            "model returned a tensor of shape {:?}, expected {:?} (the shape of x_t)",
            f.size(),
            shape
        )));
    }
    if f.device() != device {
        return Err(Error::Value(format!(
            "model returned a tensor on {}, expected {} (the device of x_t)",
            device_name(f.device()),
            device_name(device)
        )));
    }
    let fk = f.f_kind()?;
    if !is_float(fk) {
        return Err(Error::Type(format!("model returned dtype {fk:?}, expected a floating-point tensor")));
    }
    Ok(if fk == kind { f } else { f.f_to_kind(kind)? })
}
