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

/// A config error naming `field` unless every value is finite.
pub(crate) fn check_finite(field: &'static str, v: &[f64]) -> Result<()> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::config(field, format!("must be finite, got {v:?}")))
    }
}
