//! One error type for the core; the Python binding maps each variant to an exception class.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// An invalid setting: maps to `ValueError`, the message starts with the field name.
    #[error("{field}: {msg}")]
    Config { field: &'static str, msg: String },
    /// A value of the wrong kind (dtype, non-tensor): maps to `TypeError`.
    #[error("{0}")]
    Type(String),
    /// A well-typed value that is out of range or of the wrong shape: maps to `ValueError`.
    #[error("{0}")]
    Value(String),
    /// NaN or Inf where a finite value is needed (model output, a step's result): maps to
    /// `FloatingPointError`; the message names the step and the culprit.
    #[error("{0}")]
    NonFinite(String),
    /// A user callback (model, noise source) failed; the caller keeps the original error.
    #[error("callback failed: {0}")]
    Callback(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub(crate) fn config(field: &'static str, msg: impl Into<String>) -> Self {
        Error::Config { field, msg: msg.into() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The field a [`Error::Config`] names; panics on any other outcome (tests of the settings).
#[cfg(test)]
pub(crate) fn config_field<T: std::fmt::Debug>(r: Result<T>) -> &'static str {
    match r {
        Err(Error::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// A device as torch writes it ("cpu", "cuda:0", "mps"), for messages.
pub fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        tch::Device::Mps => "mps".into(),
        tch::Device::Vulkan => "vulkan".into(),
    }
}

/// Whether every element of `t` is finite (one libtorch reduction).
pub fn all_finite(t: &tch::Tensor) -> Result<bool> {
    Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0)
}

/// A config error naming `field` unless every value is finite.
pub(crate) fn check_finite(field: &'static str, v: &[f64]) -> Result<()> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::config(field, format!("must be finite, got {v:?}")))
    }
}
