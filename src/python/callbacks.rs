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
use crate::train::{Call, CondKind, Net, Part, TrainModel};

/// The tensor a model call returned (TypeError otherwise).
fn model_output(out: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
    let t = out
        .extract::<PyTensor>()
        .map_err(|_| PyTypeError::new_err(format!("model must return a torch.Tensor, got {}", type_name(out))))?;
    check_plain_tensor(out, "model output")?;
    Ok(t)
}

/// Draws through `twinflow._random.random_tensor` (diffusers' generator semantics: a CPU
/// generator serves any device): the same numbers as a plain PyTorch loop with the same
/// generator (the global RNG when None).
pub struct PyRng {
    pub generator: Option<Py<PyAny>>,
    pub err: Option<PyErr>,
}

impl PyRng {
    pub fn new(generator: Option<Bound<'_, PyAny>>) -> Self {
        Self { generator: generator.filter(|g| !g.is_none()).map(|g| g.unbind()), err: None }
    }

    fn draw(&self, py: Python<'_>, normal: bool, shape: &[i64], (kind, device): (Kind, Device)) -> PyResult<Tensor> {
        // dtype and device objects come from an empty tensor of the wanted kind.
        let proto = PyTensor(Tensor::f_empty([0], (kind, device)).map_err(|e| to_pyerr(e.into()))?).into_pyobject(py)?;
        let kw = PyDict::new(py);
        kw.set_item("dtype", proto.getattr("dtype")?)?;
        kw.set_item("device", proto.getattr("device")?)?;
        kw.set_item("normal", normal)?;
        let generator = self.generator.as_ref().map(|g| g.bind(py).clone());
        let e = py.import("twinflow._random")?.getattr("random_tensor")?.call((PyTuple::new(py, shape)?, generator), Some(&kw))?;
        Ok(e.extract::<PyTensor>()?.0)
    }

    fn run(&mut self, normal: bool, shape: &[i64], opts: (Kind, Device)) -> crate::Result<Tensor> {
        Python::with_gil(|py| self.draw(py, normal, shape, opts)).map_err(|e| {
            self.err = Some(e);
            Error::Callback("rng".into())
        })
    }
}

impl Rng for PyRng {
    fn rand(&mut self, shape: &[i64], opts: (Kind, Device)) -> crate::Result<Tensor> {
        self.run(false, shape, opts)
    }
    fn randn(&mut self, shape: &[i64], opts: (Kind, Device)) -> crate::Result<Tensor> {
        self.run(true, shape, opts)
    }
}


/// The user's model (and teacher) behind [`TrainModel`]: `net(x_t, t=t, tt=tt, c=rows_of_cond)`.
pub struct PyTrainModel {
    pub model: Py<PyAny>,
    pub teacher: Option<Py<PyAny>>,
    pub cond: Option<Vec<Tensor>>,
    pub uncond: Option<Vec<Tensor>>,
    pub err: Option<PyErr>,
    /// Python calls made (a batched call whose conditioning could not be joined makes several).
    pub calls: usize,
}

/// The parts' conditioning lists joined row-wise; `None` when they cannot be (one part has a
/// list and another not, or their tensors differ in count, trailing shape, dtype or device).
fn join_cond(pieces: &[Option<Vec<Tensor>>]) -> Option<Option<Vec<Tensor>>> {
    if pieces.iter().all(Option::is_none) {
        return Some(None);
    }
    let lists: Vec<&Vec<Tensor>> = pieces.iter().map(Option::as_ref).collect::<Option<_>>()?;
    let n = lists[0].len();
    if lists.iter().any(|l| l.len() != n) {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let first = &lists[0][i];
        let same = |t: &Tensor| t.size()[1..] == first.size()[1..] && t.kind() == first.kind() && t.device() == first.device();
        if lists.iter().any(|l| l[i].dim() == 0 || !same(&l[i])) {
            return None;
        }
        out.push(Tensor::f_cat(&lists.iter().map(|l| &l[i]).collect::<Vec<_>>(), 0).ok()?);
    }
    Some(Some(out))
}

impl PyTrainModel {
    /// The conditioning a part sees: its list with every tensor sliced to the part's rows.
    fn part_cond(&self, part: &Part) -> PyResult<Option<Vec<Tensor>>> {
        let list = match part.cond {
            CondKind::Cond => &self.cond,
            CondKind::Uncond => &self.uncond,
        };
        let len = part.rows.end - part.rows.start;
        list.as_ref()
            .map(|l| l.iter().map(|c| c.f_narrow(0, part.rows.start, len).map_err(|e| to_pyerr(e.into()))).collect())
            .transpose()
    }

    fn invoke(&mut self, py: Python<'_>, net: &Py<PyAny>, x: &Tensor, t: &Tensor, tt: &Tensor, c: Option<Vec<Tensor>>) -> PyResult<Tensor> {
        let c = match c {
            None => py.None().into_bound(py),
            Some(list) => PyList::new(py, list.into_iter().map(PyTensor))?.into_any(),
        };
        let kwargs = PyDict::new(py);
        kwargs.set_item("t", PyTensor(t.shallow_clone()))?;
        kwargs.set_item("tt", PyTensor(tt.shallow_clone()))?;
        kwargs.set_item("c", c)?;
        self.calls += 1;
        let out = net.bind(py).call((PyTensor(x.shallow_clone()),), Some(&kwargs))?;
        Ok(model_output(&out)?.0)
    }

    /// One Python call for the whole `call` when its parts' conditioning joins, else one per
    /// part (outputs concatenated, so the caller sees one tensor either way).
    fn call_py(&mut self, py: Python<'_>, x: &Tensor, t: &Tensor, tt: &Tensor, call: &Call) -> PyResult<Tensor> {
        let net = match (call.net, &self.teacher) {
            (Net::Teacher, Some(teacher)) => teacher.clone_ref(py),
            _ => self.model.clone_ref(py),
        };
        let pieces = call.parts.iter().map(|p| self.part_cond(p)).collect::<PyResult<Vec<_>>>()?;
        if let Some(c) = join_cond(&pieces) {
            return self.invoke(py, &net, x, t, tt, c);
        }
        let sizes: Vec<i64> = call.parts.iter().map(|p| p.rows.end - p.rows.start).collect();
        let split = |v: &Tensor| v.f_split_with_sizes(&sizes, 0).map_err(|e| to_pyerr(e.into()));
        let (xs, ts, tts) = (split(x)?, split(t)?, split(tt)?);
        let mut outs = Vec::with_capacity(sizes.len());
        for (i, c) in pieces.into_iter().enumerate() {
            let f = self.invoke(py, &net, &xs[i], &ts[i], &tts[i], c)?;
            if f.size() != xs[i].size() {
                return Ok(f); // the caller reports the shape mismatch
            }
            outs.push(f);
        }
        Tensor::f_cat(&outs, 0).map_err(|e| to_pyerr(e.into()))
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
