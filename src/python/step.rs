//! `Plan` and `Rcgm`: the parts of one training step (`crate::train::objective`), for the
//! Python function that drives the step (`twinflow.objective.training_step`). Tensors in,
//! tensors out; model outputs are checked as such.

use std::ops::Range;
use std::sync::Mutex;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::args::{tensor_arg, to_pyerr, type_name};
use crate::train::target::Rcgm;
use crate::train::time::{beta_ratio, gamma_boost, gamma_round, gamma_start};
use crate::train::{Net, Plan};

/// A tensor the driver made (TypeError otherwise; no further checks).
fn tensor(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<Tensor> {
    obj.extract::<PyTensor>()
        .map(|t| t.0)
        .map_err(|_| PyTypeError::new_err(format!("{field} must be a torch.Tensor, got {}", type_name(obj))))
}

/// A model's output: a plain dense tensor with data.
fn output(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    tensor_arg(obj, "model output")
}

fn span(r: &Range<i64>) -> Option<(i64, i64)> {
    (!r.is_empty()).then_some((r.start, r.end))
}

fn pt(t: Tensor) -> PyTensor {
    PyTensor(t)
}

/// One training step's batch — its runs e2e, mul, any, adv and kinds — and the arithmetic of
/// the step's parts (docs/algorithm.md §3); made by ``TwinFlowObjective.plan``. Row ranges
/// are ``(start, stop)`` pairs, None when empty.
///
/// Example:
///     >>> plan = TwinFlowObjective("twinflow").plan(torch.zeros(8, 2))
///     >>> plan.runs, plan.fake_rows, plan.compute_dtype
///     ([(0, 2), (2, 4), (4, 6), (6, 8)], (6, 8), torch.float32)
#[pyclass(name = "Plan", module = "twinflow._core", frozen)]
pub struct PyPlan {
    pub inner: Plan,
}

#[pymethods]
impl PyPlan {
    /// The batch size.
    #[getter]
    fn rows(&self) -> i64 {
        self.inner.rows()
    }

    /// The four runs (e2e, mul, any, adv) as ``(start, stop)``.
    #[getter]
    fn runs(&self) -> [(i64, i64); 4] {
        self.inner.runs.clone().map(|r| (r.start, r.end))
    }

    /// The dtype of times, targets and losses (float64 for float64 x, else float32).
    #[getter]
    fn compute_dtype(&self, py: Python<'_>) -> PyResult<PyObject> {
        let proto = Tensor::f_empty([0], (self.inner.ck, tch::Device::Cpu)).map_err(|e| to_pyerr(e.into()))?;
        Ok(pt(proto).into_pyobject(py)?.getattr("dtype")?.unbind())
    }

    /// ``time_dist_ctrl`` (β1, β2, scale): t ~ U(0, 1) when β1 = β2 = 1, else Beta(β1, β2).
    #[getter]
    fn time_dist_ctrl(&self) -> [f64; 3] {
        self.inner.cfg.time_dist_ctrl
    }

    /// The start of a Gamma(a ≥ 1) draw of n values: (values, pending rows).
    #[pyo3(text_signature = "(self, n)")]
    fn gamma_start(&self, n: i64) -> PyResult<(PyTensor, PyTensor)> {
        let (out, pending) = gamma_start(n, (self.inner.ck, self.inner.dev)).map_err(to_pyerr)?;
        Ok((pt(out), pt(pending)))
    }

    /// One Marsaglia–Tsang round: writes the accepted rows into ``out``, returns the pending.
    #[pyo3(text_signature = "(self, out, pending, x, u, a)")]
    fn gamma_round(&self, out: &Bound<'_, PyAny>, pending: &Bound<'_, PyAny>, x: &Bound<'_, PyAny>, u: &Bound<'_, PyAny>, a: f64) -> PyResult<PyTensor> {
        let (o, p) = (tensor(out, "out")?, tensor(pending, "pending")?);
        gamma_round(&o, &p, &tensor(x, "x")?, &tensor(u, "u")?, a).map(pt).map_err(to_pyerr)
    }

    /// Gamma(a < 1) = Gamma(a + 1)·U^(1/a).
    #[pyo3(text_signature = "(self, g, u, a)")]
    fn gamma_boost(&self, g: &Bound<'_, PyAny>, u: &Bound<'_, PyAny>, a: f64) -> PyResult<PyTensor> {
        gamma_boost(&tensor(g, "g")?, &tensor(u, "u")?, a).map(pt).map_err(to_pyerr)
    }

    /// Beta(β1, β2) = X/(X + Y).
    #[pyo3(text_signature = "(self, x, y)")]
    fn beta_ratio(&self, x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        beta_ratio(&tensor(x, "x")?, &tensor(y, "y")?).map(pt).map_err(to_pyerr)
    }

    /// §3.1: (t, tt) from the draw of t and the uniforms u, u2.
    #[pyo3(text_signature = "(self, raw, u, u2)")]
    fn times(&self, raw: &Bound<'_, PyAny>, u: &Bound<'_, PyAny>, u2: &Bound<'_, PyAny>) -> PyResult<(PyTensor, PyTensor)> {
        let (t, tt) = self.inner.times(&tensor(raw, "raw")?, &tensor(u, "u")?, &tensor(u2, "u2")?).map_err(to_pyerr)?;
        Ok((pt(t), pt(tt)))
    }

    /// The rows replaced by one-step fakes (call 1), or None.
    #[getter]
    fn fake_rows(&self) -> Option<(i64, i64)> {
        span(&self.inner.fake_rows())
    }

    /// The data in the compute kind, the fake rows replaced by z − f (both None: no fakes).
    #[pyo3(signature = (x, z=None, f=None), text_signature = "(self, x, z=None, f=None)")]
    fn with_fakes(&self, x: &Bound<'_, PyAny>, z: Option<&Bound<'_, PyAny>>, f: Option<&Bound<'_, PyAny>>) -> PyResult<PyTensor> {
        let x = tensor(x, "x")?;
        let fakes = match (z, f) {
            (Some(z), Some(f)) => Some((tensor(z, "z")?, output(f)?)),
            _ => None,
        };
        self.inner.with_fakes(&x, fakes.as_ref().map(|(z, f)| (z, f))).map(pt).map_err(to_pyerr)
    }

    /// (x_t, target) from the noise z; flips the adv rows of t and tt to −t in place.
    #[pyo3(text_signature = "(self, data, z, t, tt)")]
    fn noisy_inputs(&self, data: &Bound<'_, PyAny>, z: &Bound<'_, PyAny>, t: &Bound<'_, PyAny>, tt: &Bound<'_, PyAny>) -> PyResult<(PyTensor, PyTensor)> {
        let (x_t, target) = self
            .inner
            .noisy_inputs(&tensor(data, "data")?, &tensor(z, "z")?, &tensor(t, "t")?, &tensor(tt, "tt")?)
            .map_err(to_pyerr)?;
        Ok((pt(x_t), pt(target)))
    }

    /// The rows of the guidance-enhanced target (teacher calls 3, 4), or None.
    #[pyo3(text_signature = "(self, has_uncond)")]
    fn enhance_rows(&self, has_uncond: bool) -> Option<(i64, i64)> {
        self.inner.enhance_rows(has_uncond).as_ref().and_then(span)
    }

    /// §3.3 in place on ``target`` from the teacher's conditional and unconditional velocities.
    #[pyo3(text_signature = "(self, target, t, v_c, v_u)")]
    fn enhance(&self, target: &Bound<'_, PyAny>, t: &Bound<'_, PyAny>, v_c: &Bound<'_, PyAny>, v_u: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.enhance(&tensor(target, "target")?, &tensor(t, "t")?, &output(v_c)?, &output(v_u)?).map_err(to_pyerr)
    }

    /// §3.4: ``(walk, teacher)`` — the RCGM walk and whether it calls the teacher (else the
    /// online model) — or None when the term does not run; ``f`` detached, compute kind.
    #[pyo3(text_signature = "(self, x_t, target, f, t, tt)")]
    fn rcgm(&self, x_t: &Bound<'_, PyAny>, target: &Bound<'_, PyAny>, f: &Bound<'_, PyAny>, t: &Bound<'_, PyAny>, tt: &Bound<'_, PyAny>) -> PyResult<Option<(PyRcgm, bool)>> {
        let walk = self
            .inner
            .rcgm(&tensor(x_t, "x_t")?, &tensor(target, "target")?, &tensor(f, "f")?, &tensor(t, "t")?, &tensor(tt, "tt")?)
            .map_err(to_pyerr)?;
        Ok(walk.map(|(w, net)| (PyRcgm { inner: Mutex::new(w) }, net == Net::Teacher)))
    }

    /// The rows of the RCGM walk.
    #[getter]
    fn rcgm_rows(&self) -> (i64, i64) {
        let r = self.inner.rcgm_rows();
        (r.start, r.end)
    }

    /// The walk's target into ``target``, in place.
    #[pyo3(text_signature = "(self, target, walk)")]
    fn set_rcgm_target(&self, target: &Bound<'_, PyAny>, walk: PyRef<'_, PyRcgm>) -> PyResult<()> {
        self.inner.set_rcgm_target(&tensor(target, "target")?, &*walk.walk()?).map_err(to_pyerr)
    }

    /// §3.5: (L·w per row, base term); ``f`` the graded prediction in the compute kind.
    #[pyo3(text_signature = "(self, f, target, t, tt)")]
    fn weighted_loss(&self, f: &Bound<'_, PyAny>, target: &Bound<'_, PyAny>, t: &Bound<'_, PyAny>, tt: &Bound<'_, PyAny>) -> PyResult<(PyTensor, PyTensor)> {
        let (lw, base) = self
            .inner
            .weighted_loss(&output(f)?, &tensor(target, "target")?, &tensor(t, "t")?, &tensor(tt, "tt")?)
            .map_err(to_pyerr)?;
        Ok((pt(lw), pt(base)))
    }

    /// Whether §3.6 (distribution matching on the e2e rows) runs.
    #[getter]
    fn dist_matching(&self) -> bool {
        self.inner.dist_matching()
    }

    /// §3.6: x_τ on the e2e rows from τ (draw 6) and the noise (draw 7).
    #[pyo3(text_signature = "(self, x_t, f, t, tau, noise)")]
    fn dist_matching_input(&self, x_t: &Bound<'_, PyAny>, f: &Bound<'_, PyAny>, t: &Bound<'_, PyAny>, tau: &Bound<'_, PyAny>, noise: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.inner
            .dist_matching_input(&tensor(x_t, "x_t")?, &tensor(f, "f")?, &tensor(t, "t")?, &tensor(tau, "tau")?, &tensor(noise, "noise")?)
            .map(pt)
            .map_err(to_pyerr)
    }

    /// §3.6: the term from the model's fake (−τ) and real (+τ) velocities at x_τ.
    #[pyo3(text_signature = "(self, f, v_fake, v_real)")]
    fn dist_matching_term(&self, f: &Bound<'_, PyAny>, v_fake: &Bound<'_, PyAny>, v_real: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.inner.dist_matching_term(&tensor(f, "f")?, &output(v_fake)?, &output(v_real)?).map(pt).map_err(to_pyerr)
    }

    /// (loss, stats): loss = base + dm (dm None: 0); FloatingPointError when it is NaN or Inf.
    #[pyo3(signature = (base, dm, lw), text_signature = "(self, base, dm, lw)")]
    fn finish(&self, base: &Bound<'_, PyAny>, dm: Option<&Bound<'_, PyAny>>, lw: &Bound<'_, PyAny>) -> PyResult<(PyTensor, PyTensor)> {
        let dm = dm.map(|d| tensor(d, "dm")).transpose()?;
        let (loss, stats) = self.inner.finish(&tensor(base, "base")?, dm.as_ref(), &tensor(lw, "lw")?).map_err(to_pyerr)?;
        Ok((pt(loss), pt(stats)))
    }
}

/// The RCGM walk (docs/algorithm.md §3.4): ``next()`` gives the inputs ``(x, s, s_next)`` of
/// the next teacher call (None after the N-th), ``give(velocity)`` takes its output.
///
/// Example:
///     >>> x = torch.zeros(8, 2)
///     >>> plan = TwinFlowObjective("twinflow").plan(x)
///     >>> t = torch.full((8,), 0.5)
///     >>> walk, from_teacher = plan.rcgm(x, x, x, t, t * 0.5)
///     >>> calls = 0
///     >>> while (inputs := walk.next()) is not None:
///     ...     calls += 1
///     ...     walk.give(torch.zeros_like(inputs[0]))
///     >>> calls, from_teacher
///     (2, True)
#[pyclass(name = "Rcgm", module = "twinflow._core")]
pub struct PyRcgm {
    // Tensors are Send but not Sync; the mutex makes the class shareable.
    inner: Mutex<Rcgm>,
}

impl PyRcgm {
    fn walk(&self) -> PyResult<std::sync::MutexGuard<'_, Rcgm>> {
        self.inner.lock().map_err(|_| PyRuntimeError::new_err("Rcgm: a previous call panicked"))
    }
}

#[pymethods]
impl PyRcgm {
    /// The inputs ``(x, s, s_next)`` of the next teacher call; None after the N-th.
    #[pyo3(text_signature = "(self)")]
    fn next(&self) -> PyResult<Option<(PyTensor, PyTensor, PyTensor)>> {
        Ok(self.walk()?.next().map_err(to_pyerr)?.map(|(x, s, sn)| (pt(x), pt(s), pt(sn))))
    }

    /// The teacher's velocity at the inputs ``next()`` gave (compute dtype).
    #[pyo3(text_signature = "(self, velocity)")]
    fn give(&self, velocity: &Bound<'_, PyAny>) -> PyResult<()> {
        self.walk()?.give(&output(velocity)?).map_err(to_pyerr)
    }
}
