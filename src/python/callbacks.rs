//! Python callables behind the core's callback traits. Each keeps the first Python error so
//! the binding can re-raise it unchanged after the (GIL-free) Rust loop returns.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use pyo3_tch::PyTensor;
use tch::{Device, Kind, Tensor};

use super::args::{check_plain_tensor, to_pyerr, type_name};
use crate::error::Error;
use crate::rng::Rng;
use crate::train::{Call, CondKind, Net, TrainModel};

/// The tensor a model call returned (TypeError otherwise).
fn model_output(out: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
    let t = out
        .extract::<PyTensor>()
        .map_err(|_| PyTypeError::new_err(format!("model must return a torch.Tensor, got {}", type_name(out))))?;
    check_plain_tensor(out, "model output")?;
    Ok(t)
}

/// Draws through `torch.rand`/`torch.randn(shape, generator=g, dtype=..., device=...)`: the
/// same numbers as a plain PyTorch loop with the same generator (the global RNG when None).
pub struct PyRng {
    pub generator: Option<Py<PyAny>>,
    pub err: Option<PyErr>,
}

impl PyRng {
    pub fn new(generator: Option<Bound<'_, PyAny>>) -> Self {
        Self { generator: generator.filter(|g| !g.is_none()).map(|g| g.unbind()), err: None }
    }

    fn draw(&self, py: Python<'_>, fun: &str, shape: &[i64], (kind, device): (Kind, Device)) -> PyResult<Tensor> {
        // dtype and device objects come from an empty tensor of the wanted kind.
        let proto = PyTensor(Tensor::f_empty([0], (kind, device)).map_err(|e| to_pyerr(e.into()))?).into_pyobject(py)?;
        let kw = PyDict::new(py);
        kw.set_item("generator", self.generator.as_ref().map(|g| g.bind(py)))?;
        kw.set_item("dtype", proto.getattr("dtype")?)?;
        kw.set_item("device", proto.getattr("device")?)?;
        let e = py.import("torch")?.call_method(fun, (PyTuple::new(py, shape)?,), Some(&kw))?;
        Ok(e.extract::<PyTensor>()?.0)
    }

    fn run(&mut self, fun: &str, shape: &[i64], opts: (Kind, Device)) -> crate::Result<Tensor> {
        Python::with_gil(|py| self.draw(py, fun, shape, opts)).map_err(|e| {
            self.err = Some(e);
            Error::Callback("rng".into())
        })
    }
}

impl Rng for PyRng {
    fn rand(&mut self, shape: &[i64], opts: (Kind, Device)) -> crate::Result<Tensor> {
        self.run("rand", shape, opts)
    }
    fn randn(&mut self, shape: &[i64], opts: (Kind, Device)) -> crate::Result<Tensor> {
        self.run("randn", shape, opts)
    }
}


/// The user's model (and teacher) behind [`TrainModel`]: `net(x_t, t=t, tt=tt, c=rows_of_cond)`.
pub struct PyTrainModel {
    pub model: Py<PyAny>,
    pub teacher: Option<Py<PyAny>>,
    pub cond: Option<Vec<Tensor>>,
    pub uncond: Option<Vec<Tensor>>,
    pub err: Option<PyErr>,
}

impl PyTrainModel {
    fn call_py(&self, py: Python<'_>, x: &Tensor, t: &Tensor, tt: &Tensor, call: &Call) -> PyResult<Tensor> {
        let net = match (call.net, &self.teacher) {
            (Net::Teacher, Some(teacher)) => teacher,
            _ => &self.model,
        };
        let cond = match call.cond {
            CondKind::Cond => &self.cond,
            CondKind::Uncond => &self.uncond,
        };
        let c = match cond {
            None => py.None().into_bound(py),
            Some(list) => {
                let len = call.rows.end - call.rows.start;
                let items = list
                    .iter()
                    .map(|c| c.f_narrow(0, call.rows.start, len).map(PyTensor).map_err(|e| to_pyerr(e.into())))
                    .collect::<PyResult<Vec<_>>>()?;
                PyList::new(py, items)?.into_any()
            }
        };
        let kwargs = PyDict::new(py);
        kwargs.set_item("t", PyTensor(t.shallow_clone()))?;
        kwargs.set_item("tt", PyTensor(tt.shallow_clone()))?;
        kwargs.set_item("c", c)?;
        let out = net.bind(py).call((PyTensor(x.shallow_clone()),), Some(&kwargs))?;
        let f = model_output(&out)?;
        Ok(f.0)
    }
}

impl TrainModel for PyTrainModel {
    fn call(&mut self, x: &Tensor, t: &Tensor, tt: &Tensor, call: &Call) -> crate::Result<Tensor> {
        // Grad mode is thread-local in libtorch, so this guard also governs the Python call.
        let _guard = (!call.grad).then(tch::no_grad_guard);
        Python::with_gil(|py| self.call_py(py, x, t, tt, call)).map_err(|e| {
            self.err = Some(e);
            Error::Callback("model".into())
        })
    }
}
