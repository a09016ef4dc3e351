//! The sampler's native classes: `SamplerSettings` (validated settings and their time grid),
//! `Stepper` (one model evaluation at a time), `Evaluation`, the settings table
//! `SAMPLER_SETTINGS`, and `ucgm_step`. The Python class `twinflow.UnifiedSampler` drives
//! them; no model is called from here.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::args::{float_arg, tensor_arg, tensor_like, to_pyerr, type_name};
use crate::config::{Range, SamplerConfig, Value, SAMPLER_SETTINGS};
use crate::error::{all_finite, Error};
use crate::sampler::{check_noise, check_sample, is_float, velocity_like, SamplerSettings};
use crate::stepper::{Phase, Stepper};
use crate::update;

/// Longest sequence read from a Python iterable setting (the longest setting is a 3-tuple):
/// an endless iterator cannot hang the constructor.
const MAX_SEQ: usize = 16;

/// A Python object as a setting [`Value`] (the core converts and range-checks it).
fn to_value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    Ok(if obj.is_instance_of::<PyBool>() {
        Value::Bool(obj.is_truthy()?)
    } else if obj.is_instance_of::<PyInt>() {
        match obj.extract::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::BigInt(obj.str()?.to_string()),
        }
    } else if obj.is_instance_of::<PyFloat>() {
        Value::Float(obj.extract::<f64>()?)
    } else if let Ok(s) = obj.downcast::<PyString>() {
        Value::Str(s.to_str()?.to_owned())
    } else if let Ok(it) = obj.try_iter() {
        let mut items = vec![];
        for item in it.take(MAX_SEQ + 1) {
            items.push(to_value(&item?)?);
        }
        Value::Seq(items)
    } else {
        Value::Other(type_name(obj))
    })
}

/// A setting [`Value`] as a Python object (sequences as tuples).
fn from_value<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::Float(f) => f.into_pyobject(py)?.into_any(),
        Value::Str(s) | Value::BigInt(s) | Value::Other(s) => s.into_pyobject(py)?.into_any(),
        Value::Seq(items) => PyTuple::new(py, items.iter().map(|i| from_value(py, i)).collect::<PyResult<Vec<_>>>()?)?.into_any(),
    })
}

/// Apply keyword settings to `cfg` (a `None` value leaves the setting as it is).
fn apply(cfg: &mut SamplerConfig, settings: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
    for (k, v) in settings.into_iter().flat_map(|d| d.iter()) {
        if !v.is_none() {
            cfg.set(&k.extract::<String>()?, &to_value(&v)?).map_err(to_pyerr)?;
        }
    }
    Ok(())
}

/// `SAMPLER_SETTINGS`: one dict per setting, in declaration order.
pub fn settings_table(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let defaults = SamplerConfig::default();
    let rows = SAMPLER_SETTINGS
        .iter()
        .map(|s| {
            let d = PyDict::new(py);
            d.set_item("name", s.name)?;
            d.set_item("type", s.type_name)?;
            d.set_item("default", from_value(py, &defaults.get(s.name).expect("declared"))?)?;
            d.set_item("range", s.range_text())?;
            let (lo, hi, lo_open, hi_open, choices) = match s.range {
                Range::Num { lo, lo_open, hi, hi_open } => (Some(lo), Some(hi), lo_open, hi_open, None),
                Range::Choices(c) => (None, None, false, false, Some(c.to_vec())),
                Range::Any => (None, None, false, false, None),
            };
            d.set_item("min", lo)?;
            d.set_item("max", hi)?;
            d.set_item("min_inclusive", lo.is_some() && !lo_open)?;
            d.set_item("max_inclusive", hi.is_some() && !hi_open)?;
            d.set_item("choices", choices)?;
            d.set_item("rule", s.rule)?;
            d.set_item("doc", s.doc.lines().map(str::trim).collect::<Vec<_>>().join(" ").trim())?;
            d.set_item("saved", s.saved)?;
            Ok(d)
        })
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, rows)
}

/// Validated sampler settings and their time grid (the state of a `twinflow.UnifiedSampler`).
///
/// Every setting is declared once in the Rust core; ``twinflow._core.SAMPLER_SETTINGS`` lists
/// each with its type, default, range and doc. A value of the wrong type raises TypeError, one
/// outside its range ValueError naming the setting.
///
/// Args:
///     **settings: any of the names in ``SAMPLER_SETTINGS``; ``None`` keeps the default.
///
/// Example:
///     >>> from twinflow._core import SamplerSettings
///     >>> s = SamplerSettings(sampling_steps=2, rfba_gap_steps=(0.001, 0.6))
///     >>> s.timesteps.tolist(), s.nfe
///     ([0.999, 0.6, 0.0], 2)
#[pyclass(name = "SamplerSettings", module = "twinflow._core", frozen)]
pub struct PySamplerSettings {
    inner: SamplerSettings,
}

impl PySamplerSettings {
    fn build(cfg: SamplerConfig) -> PyResult<Self> {
        Ok(Self { inner: SamplerSettings::new(cfg).map_err(to_pyerr)? })
    }
}

#[pymethods]
impl PySamplerSettings {
    #[new]
    #[pyo3(signature = (**settings), text_signature = "(**settings)")]
    fn new(settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut cfg = SamplerConfig::default();
        apply(&mut cfg, settings)?;
        Self::build(cfg)
    }

    /// A published preset, optionally with settings overridden.
    ///
    /// Args:
    ///     name: "1-nfe", "2-nfe", "4-nfe", "any-step" or "multi-step".
    ///     **overrides: settings to change (as for the constructor).
    ///
    /// Example:
    ///     >>> SamplerSettings.preset("4-nfe", sampling_steps=8).sampling_steps
    ///     8
    #[staticmethod]
    #[pyo3(signature = (name, **overrides), text_signature = "(name, **overrides)")]
    fn preset(name: &str, overrides: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut cfg = SamplerConfig::preset(name).map_err(to_pyerr)?;
        apply(&mut cfg, overrides)?;
        Self::build(cfg)
    }

    /// A copy with some settings changed (this object is immutable).
    ///
    /// Args:
    ///     **overrides: settings to change (as for the constructor).
    ///
    /// Example:
    ///     >>> SamplerSettings().replace(use_fused_kernel=False).get("use_fused_kernel")
    ///     False
    #[pyo3(signature = (**overrides), text_signature = "($self, **overrides)")]
    fn replace(&self, overrides: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut cfg = self.inner.config().clone();
        apply(&mut cfg, overrides)?;
        Self::build(cfg)
    }

    /// The value of one setting (tuples for the tuple settings).
    ///
    /// Args:
    ///     name: a name from ``SAMPLER_SETTINGS``.
    ///
    /// Example:
    ///     >>> SamplerSettings().get("time_dist_ctrl")
    ///     (1.0, 1.0, 1.0)
    #[pyo3(text_signature = "($self, name)")]
    fn get<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let v = self.inner.config().get(name).ok_or_else(|| {
            PyValueError::new_err(format!("unknown sampler setting {name:?}"))
        })?;
        from_value(py, &v)
    }

    /// The settings as a dict: the configuration (the constructor's keywords that shape the
    /// samples), plus the run-time switches with ``all=True``.
    ///
    /// Args:
    ///     all: include ``use_fused_kernel`` and ``check_finite``.
    ///
    /// Example:
    ///     >>> SamplerSettings.preset("1-nfe").to_dict()["stochast_ratio"]
    ///     0.8
    #[pyo3(signature = (all = false), text_signature = "($self, all=False)")]
    fn to_dict<'py>(&self, py: Python<'py>, all: bool) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for s in SAMPLER_SETTINGS.iter().filter(|s| all || s.saved) {
            d.set_item(s.name, self.get(py, s.name)?)?;
        }
        Ok(d)
    }

    /// The time grid t_0 > … > t_n = 0 (float64, CPU).
    #[getter]
    fn timesteps(&self) -> PyResult<PyTensor> {
        Ok(PyTensor(Tensor::f_from_slice(self.inner.timesteps()).map_err(|e| to_pyerr(e.into()))?))
    }

    /// Network evaluations per sample (n, or 2n − 1 with order 2).
    #[getter]
    fn nfe(&self) -> usize {
        self.inner.nfe()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let parts = self
            .to_dict(py, true)?
            .iter()
            .map(|(k, v)| Ok(format!("{}={}", k, v.repr()?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(format!("SamplerSettings({})", parts.join(", ")))
    }
}

/// One model evaluation of a `Stepper`'s schedule.
///
/// Attributes:
///     t: the time x is at (the model's ``t``).
///     tt: the target time (the model's ``tt``).
///     interval: index i of the grid interval t_i → t_{i+1}.
///     corrector: True for the second (Heun) evaluation of an interval with order 2.
///     noise: True when ``Stepper.step`` needs N(0, 1) noise for this evaluation.
///
/// Example:
///     >>> Stepper(SamplerSettings(sampling_steps=4, sampling_order=2)).evals[1]
///     Evaluation(t=0.5, tt=0, interval=0, corrector=True, noise=False)
#[pyclass(name = "Evaluation", module = "twinflow._core", frozen, get_all)]
pub struct PyEvaluation {
    /// The time x is at (the model's ``t``).
    t: f64,
    /// The target time (the model's ``tt``).
    tt: f64,
    /// Index i of the grid interval t_i → t_{i+1}.
    interval: usize,
    /// True for the second (Heun) evaluation of an interval with order 2.
    corrector: bool,
    /// True when ``Stepper.step`` needs N(0, 1) noise for this evaluation.
    noise: bool,
}

#[pymethods]
impl PyEvaluation {
    fn __repr__(&self) -> String {
        format!(
            "Evaluation(t={}, tt={}, interval={}, corrector={}, noise={})",
            self.t,
            self.tt,
            self.interval,
            if self.corrector { "True" } else { "False" },
            if self.noise { "True" } else { "False" }
        )
    }
}

/// One model evaluation at a time: the sampler's update between model calls. The caller
/// calls the model and draws the noise (``twinflow.UnifiedSampler.sample`` and
/// ``twinflow.TwinFlowScheduler`` do).
///
/// Args:
///     settings: a ``SamplerSettings``.
///     grid: times t_0 > … > t_{n−1} > 0 to use instead of the settings' grid (t_n = 0 is
///         appended); the other settings apply.
///
/// Example:
///     >>> import torch
///     >>> from twinflow._core import SamplerSettings, Stepper
///     >>> st = Stepper(SamplerSettings(sampling_steps=2, stochast_ratio=1.0))
///     >>> x = torch.randn(4, 8)
///     >>> model = lambda x, t, tt: x  # any velocity model
///     >>> for e in st.evals:
///     ...     v = model(x, t=torch.full((4,), e.t), tt=torch.full((4,), e.tt))
///     ...     x = st.step(x, v, torch.randn(4, 8) if e.noise else None)
///     >>> x.shape
///     torch.Size([4, 8])
#[pyclass(name = "Stepper", module = "twinflow._core")]
pub struct PyStepper {
    // Tensors are Send but not Sync; the mutex makes the class shareable.
    inner: std::sync::Mutex<Stepper>,
    /// The tensor object `check_noise` accepted or `step` returned last: passed back as x,
    /// it needs no second check (a sampling loop saves that cost on every evaluation).
    checked: std::sync::Mutex<Option<PyObject>>,
}

impl PyStepper {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Stepper>> {
        self.inner.lock().map_err(|_| PyRuntimeError::new_err("stepper state is poisoned"))
    }

    fn remember(&self, x: Option<PyObject>) {
        if let Ok(mut c) = self.checked.lock() {
            *c = x;
        }
    }
}

/// Refuse an output buffer that shares memory with an input (the kernels write it while
/// reading them).
fn check_disjoint(out: &Tensor, field: &str, inputs: &[&Tensor]) -> PyResult<()> {
    let (a0, a1) = byte_range(out);
    for input in inputs {
        let (b0, b1) = byte_range(input);
        if a0 < b1 && b0 < a1 {
            return Err(PyValueError::new_err(format!("{field}: shares memory with an input")));
        }
    }
    Ok(())
}

#[pymethods]
impl PyStepper {
    #[new]
    #[pyo3(signature = (settings, grid=None), text_signature = "(settings, grid=None)")]
    fn new(settings: PyRef<'_, PySamplerSettings>, grid: Option<Vec<f64>>) -> PyResult<Self> {
        let st = match grid {
            Some(g) => Stepper::with_grid(&settings.inner, &g).map_err(to_pyerr)?,
            None => Stepper::new(&settings.inner),
        };
        Ok(Self { inner: std::sync::Mutex::new(st), checked: std::sync::Mutex::new(None) })
    }

    /// Every model evaluation in order, as ``Evaluation`` objects.
    #[getter]
    fn evals(&self) -> PyResult<Vec<PyEvaluation>> {
        Ok(self
            .lock()?
            .evals()
            .iter()
            .map(|e| PyEvaluation { t: e.t, tt: e.tt, interval: e.interval, corrector: e.phase == Phase::Correct, noise: e.noise })
            .collect())
    }

    /// The time grid t_0 > … > t_n = 0.
    #[getter]
    fn grid(&self) -> PyResult<Vec<f64>> {
        Ok(self.lock()?.grid().to_vec())
    }

    /// Index of the next evaluation; setting it restarts there (forgetting the extrapolation
    /// and corrector state).
    #[getter]
    fn position(&self) -> PyResult<usize> {
        Ok(self.lock()?.position())
    }

    #[setter]
    fn set_position(&self, k: usize) -> PyResult<()> {
        self.lock()?.set_position(k).map_err(to_pyerr)
    }

    /// Check the initial noise: a floating-point tensor with a batch dimension, and finite
    /// when the settings' ``check_finite`` is on.
    ///
    /// Args:
    ///     noise: the initial x (torch.Tensor).
    ///
    /// Example:
    ///     >>> Stepper(SamplerSettings()).check_noise(torch.randn(2, 4))
    #[pyo3(text_signature = "($self, noise)")]
    fn check_noise(&self, noise: &Bound<'_, PyAny>) -> PyResult<()> {
        let t = tensor_arg(noise, "noise")?;
        let finite = self.lock()?.check_finite;
        check_noise(&t, finite).map_err(to_pyerr)?;
        self.remember(Some(noise.clone().unbind()));
        Ok(())
    }

    /// Advance by one evaluation: the model's output at x for ``evals[position]``.
    ///
    /// Args:
    ///     x: the current sample (floating point, with a batch dimension).
    ///     velocity: the model's output at (x, t, tt); shaped like x and on its device (another
    ///         float dtype is cast to x's).
    ///     noise: N(0, 1) draws shaped like x when this evaluation's ``noise`` is True, else None.
    ///     xhat_out: a tensor shaped like x that receives x̂ = x − t·velocity on a predictor
    ///         evaluation (the trajectory row), or None.
    ///
    /// Returns:
    ///     the next x; after the last evaluation, the sample.
    ///
    /// Example:
    ///     >>> st = Stepper(SamplerSettings(sampling_steps=1))
    ///     >>> x = torch.randn(2, 3)
    ///     >>> e = st.evals[st.position]
    ///     >>> sample = st.step(x, x, torch.randn_like(x) if e.noise else None)
    ///     >>> torch.allclose(sample, x - e.t * x)  # one Euler jump from t_0 to 0
    ///     True
    #[pyo3(signature = (x, velocity, noise=None, xhat_out=None), text_signature = "($self, x, velocity, noise=None, xhat_out=None)")]
    fn step(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        velocity: &Bound<'_, PyAny>,
        noise: Option<&Bound<'_, PyAny>>,
        xhat_out: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyObject> {
        let known = self.checked.lock().ok().and_then(|c| c.as_ref().map(|c| c.bind(py).is(x))).unwrap_or(false);
        let xt = if known {
            x.extract::<PyTensor>()?.0
        } else {
            let t = tensor_arg(x, "x")?;
            check_sample(&t, "x").map_err(to_pyerr)?;
            t
        };
        let f = velocity_like(tensor_arg(velocity, "model output")?, &xt).map_err(to_pyerr)?;
        let eps = noise.filter(|n| !n.is_none()).map(|n| tensor_like(n, "noise", &xt)).transpose()?;
        let out = xhat_out.filter(|o| !o.is_none()).map(|o| tensor_like(o, "xhat_out", &xt)).transpose()?;
        if let Some(o) = &out {
            let inputs: Vec<&Tensor> = [Some(&xt), Some(&f), eps.as_ref()].into_iter().flatten().collect();
            check_disjoint(o, "xhat_out", &inputs)?;
        }
        let small = xt.numel() < crate::pool::MIN_PARALLEL;
        let inner = &self.inner;
        // Tensors are Send but not Sync: the closure owns its handles.
        let run = move || match inner.lock() {
            Ok(mut st) => st.step(&xt, &f, eps.as_ref(), out.as_ref()),
            Err(_) => Err(Error::Value("stepper state is poisoned".into())),
        };
        // Below the kernels' threading threshold the update takes a few µs: keep the GIL.
        let y = if small { run() } else { py.allow_threads(run) };
        let y = PyTensor(y.map_err(to_pyerr)?).into_pyobject(py)?.unbind();
        self.remember(Some(y.clone_ref(py)));
        Ok(y)
    }
}

// ---------------------------------------------------------------- ucgm_step

fn byte_range(t: &Tensor) -> (usize, usize) {
    let start = t.data_ptr() as usize;
    let len = t.numel() * t.f_kind().map(|k| k.elt_size_in_bytes()).unwrap_or(1);
    (start, start + len)
}

/// One sampler interval without extrapolation: for s = 0 ``x − (t_cur − t_next)·v``, else
/// ``(1 − t_next)·x̂ + t_next·(√(1 − s)·ẑ + √s·noise)`` with x̂ = x − t_cur·v, ẑ = x + (1 − t_cur)·v.
///
/// Args:
///     x: the sample at t_cur (floating point).
///     velocity: the model's output at x, shaped like x (same dtype and device).
///     t_cur: the interval's start time.
///     t_next: its end time.
///     stochast_ratio: s in [0, 1] (None: 0).
///     noise: N(0, 1) draws shaped like x, required when s > 0.
///     out: write the result here (may be x itself, for an in-place step).
///     check_finite: raise FloatingPointError naming the input when the result holds NaN or Inf.
///
/// Returns:
///     the sample at t_next (``out`` when given).
///
/// Example:
///     >>> import torch, twinflow
///     >>> x, v = torch.randn(2, 4), torch.randn(2, 4)
///     >>> y = twinflow.ucgm_step(x, v, 0.8, 0.5)            # x − 0.3·v
///     >>> y = twinflow.ucgm_step(x, v, 0.8, 0.5, 1.0, torch.randn(2, 4))
#[pyfunction]
#[pyo3(signature = (x, velocity, t_cur, t_next, stochast_ratio=None, noise=None, out=None, check_finite=true),
       text_signature = "(x, velocity, t_cur, t_next, stochast_ratio=None, noise=None, out=None, check_finite=True)")]
#[allow(clippy::too_many_arguments)]
pub fn ucgm_step(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    velocity: &Bound<'_, PyAny>,
    t_cur: &Bound<'_, PyAny>,
    t_next: &Bound<'_, PyAny>,
    stochast_ratio: Option<&Bound<'_, PyAny>>,
    noise: Option<&Bound<'_, PyAny>>,
    out: Option<&Bound<'_, PyAny>>,
    check_finite: bool,
) -> PyResult<PyObject> {
    let xt = tensor_arg(x, "x")?;
    let kind = xt.f_kind().map_err(|e| to_pyerr(e.into()))?;
    if !is_float(kind) {
        return Err(PyTypeError::new_err(format!("x must be a floating-point tensor, got {kind:?}")));
    }
    let f = tensor_like(velocity, "velocity", &xt)?;
    let (tc, tn) = (float_arg(t_cur, "t_cur")?, float_arg(t_next, "t_next")?);
    let s = match stochast_ratio {
        Some(v) if !v.is_none() => float_arg(v, "stochast_ratio")?,
        _ => 0.0,
    };
    for (name, v) in [("t_cur", tc), ("t_next", tn), ("stochast_ratio", s)] {
        if !v.is_finite() {
            return Err(PyValueError::new_err(format!("{name}: must be finite, got {v}")));
        }
    }
    if !(0.0..=1.0).contains(&s) {
        return Err(PyValueError::new_err(format!("stochast_ratio: must be in [0, 1], got {s}")));
    }
    let eps = match noise.filter(|n| !n.is_none()) {
        Some(n) => Some(tensor_like(n, "noise", &xt)?),
        None if s > 0.0 => {
            return Err(PyValueError::new_err("noise: required when stochast_ratio > 0"));
        }
        None => None,
    };
    let out_t = match out.filter(|o| !o.is_none()) {
        Some(o) => {
            let t = tensor_like(o, "out", &xt)?;
            let (a0, a1) = byte_range(&t);
            for input in [Some(&xt), Some(&f), eps.as_ref()].into_iter().flatten() {
                let (b0, b1) = byte_range(input);
                if a0 < b1 && b0 < a1 && (a0 != b0 || t.is_contiguous() != input.is_contiguous()) {
                    return Err(PyValueError::new_err("out: partially overlaps an input (only exact in-place use is allowed)"));
                }
            }
            Some(t)
        }
        None => None,
    };
    let has_out = out_t.is_some();
    let y = py
        .allow_threads(move || {
            update::ucgm_step(&xt, &f, tc, tn, s, eps.as_ref(), out_t.as_ref(), true, check_finite).map_err(|e| match e {
                Error::NonFinite(_) => {
                    let bad = [("velocity", Some(&f)), ("x", Some(&xt)), ("noise", eps.as_ref())]
                        .into_iter()
                        .find(|(_, t)| t.is_some_and(|t| !all_finite(t).unwrap_or(false)));
                    Error::NonFinite(match bad {
                        Some((name, _)) => format!("ucgm_step: the result is not finite: {name} contains NaN or Inf"),
                        None => "ucgm_step: the result overflowed to NaN or Inf".into(),
                    })
                }
                other => other,
            })
        })
        .map_err(to_pyerr)?;
    match out {
        Some(o) if has_out => Ok(o.clone().unbind()),
        _ => Ok(PyTensor(y).into_pyobject(py)?.unbind()),
    }
}

