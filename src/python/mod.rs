//! PyO3 bindings: convert and validate Python arguments, call into the core, map errors.
//! No algorithm lives here.

mod args;
mod sampler;
mod step;
mod train;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::pool;

/// Choose the thread pool of the fused CPU kernels.
///
/// Args:
///     name: "openmp" (libtorch's pool, the default) or "rayon".
///
/// Returns:
///     the previous choice.
///
/// Example:
///     >>> from twinflow._core import set_cpu_pool
///     >>> set_cpu_pool("rayon")
///     'openmp'
#[pyfunction]
#[pyo3(text_signature = "(name)")]
fn set_cpu_pool(name: &str) -> PyResult<&'static str> {
    let new = match name.to_ascii_lowercase().as_str() {
        "openmp" => pool::Pool::OpenMp,
        "rayon" => pool::Pool::Rayon,
        _ => return Err(PyValueError::new_err(format!("pool: expected \"openmp\" or \"rayon\", got {name:?}"))),
    };
    let old = pool::pool();
    pool::set_pool(new);
    Ok(if old == pool::Pool::OpenMp { "openmp" } else { "rayon" })
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<sampler::PySamplerSettings>()?;
    m.add_class::<sampler::PyStepper>()?;
    m.add_class::<sampler::PyEvaluation>()?;
    m.add("SAMPLER_SETTINGS", sampler::settings_table(m.py())?)?;
    m.add_function(wrap_pyfunction!(sampler::ucgm_step, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_pool, m)?)?;
    train::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_SAMPLING_STEPS", crate::config::MAX_SAMPLING_STEPS)?;
    m.add("GAMMA_MAX_ROUNDS", crate::train::time::GAMMA_MAX_ROUNDS)?;
    Ok(())
}
