//! Argument conversion and validation shared by the bindings, and error mapping.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};
use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

use crate::error::Error;

pub fn to_pyerr(e: Error) -> PyErr {
    match e {
        Error::Config { .. } | Error::Value(_) => PyValueError::new_err(e.to_string()),
        Error::Type(m) => PyTypeError::new_err(m),
        Error::Callback(_) | Error::Torch(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

pub fn tensor_arg(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<Tensor> {
    obj.extract::<PyTensor>()
        .map(|t| t.0)
        .map_err(|_| PyTypeError::new_err(format!("{field} must be a torch.Tensor, got {}", type_name(obj))))
}

/// A tensor argument that must match `like` in shape, dtype and device (ValueError otherwise).
pub fn tensor_like(obj: &Bound<'_, PyAny>, field: &str, like: &Tensor) -> PyResult<Tensor> {
    let t = tensor_arg(obj, field)?;
    if t.size() != like.size() || t.device() != like.device() || t.f_kind().ok() != like.f_kind().ok() {
        return Err(PyValueError::new_err(format!(
            "{field} must match x (shape {:?}, {:?}, {:?}), got shape {:?}, {:?}, {:?}",
            like.size(),
            like.f_kind().unwrap_or(Kind::Uint8),
            like.device(),
            t.size(),
            t.f_kind().unwrap_or(Kind::Uint8),
            t.device()
        )));
    }
    Ok(t)
}

pub fn float_arg(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<f64> {
    if obj.is_instance_of::<PyBool>() || !(obj.is_instance_of::<PyFloat>() || obj.is_instance_of::<PyInt>()) {
        return Err(PyTypeError::new_err(format!("{field} must be a number, got {}", type_name(obj))));
    }
    obj.extract::<f64>()
}

pub fn int_arg(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<i64> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!("{field} must be an int, got {}", type_name(obj))));
    }
    obj.extract::<i64>()
        .map_err(|_| PyValueError::new_err(format!("{field}: out of range")))
}

pub fn floats_arg<const N: usize>(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<[f64; N]> {
    let items: Vec<Bound<'_, PyAny>> = if obj.is_instance_of::<PyString>() {
        vec![]
    } else {
        obj.try_iter()
            .and_then(|it| it.collect::<PyResult<Vec<_>>>())
            .map_err(|_| PyTypeError::new_err(format!("{field} must be a sequence of {N} numbers, got {}", type_name(obj))))?
    };
    if items.len() != N {
        return Err(PyValueError::new_err(format!("{field}: expected {N} values, got {}", items.len())));
    }
    let mut out = [0.0; N];
    for (o, it) in out.iter_mut().zip(&items) {
        *o = float_arg(it, field)?;
    }
    Ok(out)
}
