//! Argument conversion and validation shared by the bindings, and error mapping.

use pyo3::exceptions::{PyFloatingPointError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};
use pyo3_tch::PyTensor;
use tch::Tensor;

use crate::error::{device_name, Error};

pub fn to_pyerr(e: Error) -> PyErr {
    match e {
        Error::Config { .. } | Error::Value(_) => PyValueError::new_err(e.to_string()),
        Error::Type(m) => PyTypeError::new_err(m),
        Error::NonFinite(m) => PyFloatingPointError::new_err(m),
        Error::Callback(_) | Error::Torch(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

static STRIDED: GILOnceCell<PyObject> = GILOnceCell::new();
static PLAIN_DISPATCH: GILOnceCell<PyObject> = GILOnceCell::new();
static IS_WRAPPED: GILOnceCell<PyObject> = GILOnceCell::new();

fn torch_attr<'py>(py: Python<'py>, cell: &'static GILOnceCell<PyObject>, path: &[&str]) -> PyResult<&'py Bound<'py, PyAny>> {
    cell.get_or_try_init(py, || {
        let mut o = py.import("torch")?.into_any();
        for name in path {
            o = o.getattr(*name)?;
        }
        Ok(o.unbind())
    })
    .map(|o| o.bind(py))
}

/// Refuse the tensors libtorch cannot hand to the core safely (their shape or memory queries
/// throw, and a throwing query would be a panic): nested, non-strided (sparse, mkldnn), meta,
/// functorch-wrapped (inside vmap/grad) and `__torch_dispatch__` subclasses (FakeTensor,
/// DTensor). Zero tensors and neg/conj views are fine: the core sends them through libtorch ops.
pub fn check_plain_tensor(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<()> {
    let py = obj.py();
    if obj.getattr(intern!(py, "is_nested"))?.is_truthy()? {
        return Err(PyTypeError::new_err(format!("{field}: nested tensors are not supported")));
    }
    let layout = obj.getattr(intern!(py, "layout"))?;
    if !layout.is(torch_attr(py, &STRIDED, &["strided"])?) {
        return Err(PyTypeError::new_err(format!(
            "{field}: {} tensors are not supported, pass a dense (torch.strided) tensor",
            layout.str()?
        )));
    }
    let device = obj.getattr(intern!(py, "device"))?.getattr(intern!(py, "type"))?;
    if device.extract::<String>()? == "meta" {
        return Err(PyValueError::new_err(format!(
            "{field}: a tensor on the meta device has no data; pass a cpu or cuda tensor"
        )));
    }
    let dispatch = obj.get_type().getattr(intern!(py, "__torch_dispatch__"))?;
    if !dispatch.is(torch_attr(py, &PLAIN_DISPATCH, &["Tensor", "__torch_dispatch__"])?) {
        return Err(PyTypeError::new_err(format!(
            "{field}: tensor subclass {} is not supported, pass a plain torch.Tensor",
            type_name(obj)
        )));
    }
    if torch_attr(py, &IS_WRAPPED, &["_C", "_functorch", "is_functorch_wrapped_tensor"])?.call1((obj,))?.is_truthy()? {
        return Err(PyTypeError::new_err(format!(
            "{field}: tensors inside torch.func transforms (vmap, grad, ...) are not supported"
        )));
    }
    Ok(())
}

pub fn tensor_arg(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<Tensor> {
    let t = obj
        .extract::<PyTensor>()
        .map(|t| t.0)
        .map_err(|_| PyTypeError::new_err(format!("{field} must be a torch.Tensor, got {}", type_name(obj))))?;
    check_plain_tensor(obj, field)?;
    Ok(t)
}

/// A tensor argument that must match `like` in shape, dtype and device (ValueError otherwise).
pub fn tensor_like(obj: &Bound<'_, PyAny>, field: &str, like: &Tensor) -> PyResult<Tensor> {
    let t = tensor_arg(obj, field)?;
    if t.size() != like.size() || t.device() != like.device() || t.f_kind().ok() != like.f_kind().ok() {
        return Err(PyValueError::new_err(format!(
            "{field} must match x (shape {:?}, {}, {}), got shape {:?}, {}, {}",
            like.size(),
            kind_name(like),
            device_name(like.device()),
            t.size(),
            kind_name(&t),
            device_name(t.device())
        )));
    }
    Ok(t)
}

fn kind_name(t: &Tensor) -> String {
    t.f_kind().map(|k| format!("{k:?}")).unwrap_or_else(|_| "an unsupported dtype".into())
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
