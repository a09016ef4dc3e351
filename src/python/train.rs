//! `TwinFlowObjective` (the Rust half of `twinflow.TwinFlowLoss`) and the loss functions.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString, PyTuple};
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::args::{float_arg, floats_arg, int_arg, tensor_arg, to_pyerr, type_name};
use super::step::PyPlan;
use crate::error::all_finite;
use crate::sampler::is_float;
use crate::train::config::{loss_setting, LossKind, ObjectiveConfig, Setting, SettingType, LOSS_SETTINGS};
use crate::train::ema::{ema_update, EmaSchedule};
use crate::train::{loss, split, Plan, STAT_NAMES};

const RUNS: [&str; 4] = split::RUN_NAMES;

/// A setting's value as given in Python, parsed by its declared type.
enum Value {
    Float(f64),
    Int(i64),
    Bool(bool),
    Choice(String),
    Floats(Vec<f64>),
    Weights([f64; 4]),
}

/// Parses `v` as the type [`LOSS_SETTINGS`] declares for `s` (TypeError/ValueError naming it).
fn parse(s: &Setting, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    let name = s.name;
    Ok(match s.ty {
        SettingType::Float => Value::Float(float_arg(v, name)?),
        SettingType::Int => Value::Int(int_arg(v, name)?),
        SettingType::Bool => Value::Bool(
            v.downcast::<PyBool>()
                .map_err(|_| PyTypeError::new_err(format!("{name} must be a bool, got {}", type_name(v))))?
                .is_true(),
        ),
        SettingType::Choice => {
            let c = v.downcast::<PyString>().map_err(|_| PyTypeError::new_err(format!("{name} must be a str, got {}", type_name(v))))?;
            let c = c.to_str()?.to_ascii_lowercase();
            if !s.choices.contains(&c.as_str()) {
                let expected = s.choices.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(" or ");
                return Err(PyValueError::new_err(format!("{name}: unknown {name} {c:?}, expected {expected}")));
            }
            Value::Choice(c)
        }
        SettingType::Floats(2) => Value::Floats(floats_arg::<2>(v, name)?.to_vec()),
        SettingType::Floats(_) => Value::Floats(floats_arg::<3>(v, name)?.to_vec()),
        SettingType::RunWeights => Value::Weights(weights_arg(v)?),
    })
}

/// Applies the keyword settings over `cfg` (a recipe), then validates it.
fn apply_settings(cfg: &mut ObjectiveConfig, settings: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
    let (a0, c0) = match cfg.loss {
        LossKind::Barron { alpha, c } => (alpha, c),
        LossKind::L2 => (1.0, 1e-3),
    };
    let (mut loss, mut alpha, mut c) = (None, a0, c0);
    for (k, v) in settings.into_iter().flat_map(|d| d.iter()) {
        let key = k.extract::<String>()?;
        let s = loss_setting(&key).ok_or_else(|| PyTypeError::new_err(format!("unknown TwinFlowLoss setting {key:?}")))?;
        if v.is_none() {
            continue;
        }
        match (s.name, parse(s, &v)?) {
            ("consistc_ratio", Value::Float(x)) => cfg.consistc_ratio = x,
            ("ema_decay_rate", Value::Float(x)) => cfg.ema_decay_rate = x,
            ("enhanced_ratio", Value::Float(x)) => cfg.enhanced_ratio = x,
            ("enhanced_range", Value::Floats(x)) => cfg.enhanced_range = [x[0], x[1]],
            ("time_dist_ctrl", Value::Floats(x)) => cfg.time_dist_ctrl = [x[0], x[1], x[2]],
            ("estimate_order", Value::Int(x)) => cfg.estimate_order = x,
            ("loss", Value::Choice(x)) => loss = Some(x),
            ("barron_alpha", Value::Float(x)) => alpha = x,
            ("barron_c", Value::Float(x)) => c = x,
            ("dist_match_cof", Value::Float(x)) => cfg.dist_match_cof = x,
            ("use_image_free", Value::Bool(x)) => cfg.use_image_free = x,
            ("sub_batches", Value::Weights(x)) => cfg.sub_batches = x,
            (name, _) => unreachable!("LOSS_SETTINGS declares {name} with another type"),
        }
    }
    let barron = match loss.as_deref() {
        None => !matches!(cfg.loss, LossKind::L2),
        Some(name) => name == "barron",
    };
    cfg.loss = if barron { LossKind::Barron { alpha, c } } else { LossKind::L2 };
    cfg.validate().map_err(to_pyerr)
}

/// The value of setting `name` in `cfg` as a Python object (None for the Barron parameters
/// under the L2 loss).
fn setting_value<'py>(py: Python<'py>, cfg: &ObjectiveConfig, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let n = cfg.numbers(name);
    Ok(match name {
        "estimate_order" => cfg.estimate_order.into_pyobject(py)?.into_any(),
        "use_image_free" => PyBool::new(py, cfg.use_image_free).to_owned().into_any(),
        "loss" => PyString::new(py, if matches!(cfg.loss, LossKind::L2) { "l2" } else { "barron" }).into_any(),
        "sub_batches" => {
            let w = PyDict::new(py);
            for (run, v) in RUNS.iter().zip(cfg.sub_batches) {
                w.set_item(run, v)?;
            }
            w.into_any()
        }
        _ if n.is_empty() => py.None().into_bound(py),
        _ if n.len() == 1 => n[0].into_pyobject(py)?.into_any(),
        _ => PyTuple::new(py, n)?.into_any(),
    })
}

fn config_dict<'py>(py: Python<'py>, cfg: &ObjectiveConfig) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for s in &LOSS_SETTINGS {
        let v = setting_value(py, cfg, s.name)?;
        if !v.is_none() {
            d.set_item(s.name, v)?;
        }
    }
    Ok(d)
}

/// `LOSS_SETTINGS`: one dict per objective setting — name, type (a Python annotation),
/// default (the TwinFlow recipe's), bounds (lo, lo_open, hi) or None, choices, doc.
fn loss_settings_table<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
    let d = ObjectiveConfig::default();
    let rows = LOSS_SETTINGS.iter().map(|s| {
        let row = PyDict::new(py);
        row.set_item("name", s.name)?;
        row.set_item("type", s.ty.python())?;
        row.set_item("default", setting_value(py, &d, s.name)?)?;
        let b = s.bounds;
        let bounded = !matches!(s.ty, SettingType::Bool | SettingType::Choice) && (b.lo.is_finite() || b.hi.is_finite());
        row.set_item("bounds", if bounded { Some((b.lo, b.lo_open, b.hi)) } else { None })?;
        row.set_item("choices", PyTuple::new(py, s.choices)?)?;
        row.set_item("doc", s.doc)?;
        Ok(row)
    });
    PyTuple::new(py, rows.collect::<PyResult<Vec<_>>>()?)
}

fn weights_arg(v: &Bound<'_, PyAny>) -> PyResult<[f64; 4]> {
    let d = v.downcast::<PyDict>().map_err(|_| {
        PyTypeError::new_err(format!("sub_batches must be a dict like {{\"e2e\": 1, \"mul\": 1, \"any\": 1, \"adv\": 1}}, got {}", type_name(v)))
    })?;
    let mut w = [0.0; 4];
    for (k, val) in d.iter() {
        let name = k.extract::<String>()?;
        let i = RUNS.iter().position(|r| *r == name).ok_or_else(|| {
            PyValueError::new_err(format!("sub_batches: unknown run {name:?}, expected e2e, mul, any, adv"))
        })?;
        w[i] = float_arg(&val, "sub_batches")?;
    }
    Ok(w)
}

fn cond_arg(obj: Option<&Bound<'_, PyAny>>, field: &str, batch: i64) -> PyResult<Option<Vec<Tensor>>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!("{field} must be a list of tensors, got str")));
    }
    let items: Vec<Bound<'_, PyAny>> = obj
        .try_iter()
        .and_then(|it| it.collect())
        .map_err(|_| PyTypeError::new_err(format!("{field} must be a list of tensors, got {}", type_name(obj))))?;
    items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let t = tensor_arg(it, &format!("{field}[{i}]"))?;
            if t.size().first() != Some(&batch) {
                return Err(PyValueError::new_err(format!(
                    "{field}[{i}] must have the batch size {batch} as its first dimension, got shape {:?}",
                    t.size()
                )));
            }
            Ok(t)
        })
        .collect::<PyResult<Vec<_>>>()
        .map(Some)
}

/// The batch `x` of a step: a finite floating-point tensor with a batch dimension.
fn batch_arg(x: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let xt = tensor_arg(x, "x")?;
    let kind = xt.f_kind().map_err(|e| to_pyerr(e.into()))?;
    if !is_float(kind) {
        return Err(PyTypeError::new_err(format!("x must be a floating-point tensor, got {kind:?}")));
    }
    if xt.dim() == 0 {
        return Err(PyValueError::new_err("x must have a batch dimension (got a 0-dim tensor)"));
    }
    if !all_finite(&xt).map_err(to_pyerr)? {
        return Err(PyValueError::new_err("x contains NaN or Inf"));
    }
    Ok(xt)
}

/// The TwinFlow objective (the Rust half of ``twinflow.TwinFlowLoss``).
///
/// Args:
///     recipe: ``"twinflow"``, ``"rcgm"`` or ``"flow_matching"``.
///     **settings: overrides, any of ``LOSS_SETTINGS`` (None keeps the recipe's value).
///
/// ``obj.plan(x, cond, uncond)`` gives the parts of one step (:class:`Plan`);
/// ``twinflow.objective.training_step`` runs them, making the model calls and the random draws
/// between them (docs/training.md).
///
/// Example:
///     >>> obj = TwinFlowObjective("rcgm", estimate_order=3)
///     >>> obj.to_dict()["estimate_order"], obj.needs_teacher
///     (3, True)
#[pyclass(name = "TwinFlowObjective", module = "twinflow._core")]
pub struct PyObjective {
    cfg: ObjectiveConfig,
}

#[pymethods]
impl PyObjective {
    #[new]
    #[pyo3(signature = (recipe="twinflow", **settings), text_signature = "(recipe=\"twinflow\", **settings)")]
    fn new(recipe: &str, settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut cfg = ObjectiveConfig::recipe(recipe).map_err(to_pyerr)?;
        apply_settings(&mut cfg, settings)?;
        Ok(Self { cfg })
    }

    /// The parts of one step on batch ``x`` (validated: floating point, finite, a batch
    /// dimension; ``cond``/``uncond``: lists of batch-first tensors or None), for
    /// ``twinflow.objective.training_step``, which makes the model calls and draws between them.
    #[pyo3(signature = (x, cond=None, uncond=None), text_signature = "(self, x, cond=None, uncond=None)")]
    fn plan(&self, x: &Bound<'_, PyAny>, cond: Option<&Bound<'_, PyAny>>, uncond: Option<&Bound<'_, PyAny>>) -> PyResult<PyPlan> {
        let xt = batch_arg(x)?;
        let b = xt.size()[0];
        cond_arg(cond, "cond", b)?;
        cond_arg(uncond, "uncond", b)?;
        Ok(PyPlan { inner: Plan::new(&self.cfg, &xt).map_err(to_pyerr)? })
    }

    /// Whether a step calls the teacher at all (else no teacher copy is needed).
    #[getter]
    fn needs_teacher(&self) -> bool {
        self.cfg.needs_teacher()
    }

    /// The target EMA decay emd of the teacher.
    #[getter]
    fn ema_decay_rate(&self) -> f64 {
        self.cfg.ema_decay_rate
    }

    /// The settings as a dict of TwinFlowLoss keywords.
    ///
    /// Example:
    ///     >>> TwinFlowObjective("rcgm").to_dict()["sub_batches"]["adv"]
    ///     0.0
    #[pyo3(text_signature = "(self)")]
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        config_dict(py, &self.cfg)
    }
}

/// The EMA teacher's decay schedule (warm-up d ← d + (1 − d)(rate − d)/2 from d = 0) and its
/// in-place update ``ema ← d·ema + (1 − d)·θ``; ``twinflow.EmaTeacher`` owns one.
///
/// Args:
///     rate: the target decay emd in [0, 1].
///
/// Example:
///     >>> model, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
///     >>> s = EmaSchedule(0.99)
///     >>> s.update(list(teacher.parameters()), list(model.parameters()))  # copies θ
///     0.0
///     >>> s.decay, s.updates
///     (0.495, 1)
#[pyclass(name = "EmaSchedule", module = "twinflow._core")]
pub struct PyEmaSchedule {
    inner: EmaSchedule,
}

#[pymethods]
impl PyEmaSchedule {
    #[new]
    #[pyo3(text_signature = "(rate)")]
    fn new(rate: &Bound<'_, PyAny>) -> PyResult<Self> {
        let rate = float_arg(rate, "rate")?;
        if !(0.0..=1.0).contains(&rate) {
            return Err(PyValueError::new_err(format!("rate: must be in [0, 1], got {rate}")));
        }
        Ok(Self { inner: EmaSchedule::new(rate) })
    }

    /// One EMA update of ``ema_params`` towards ``params`` (in place, no autograd) with the
    /// schedule's current decay, which then advances. Returns the decay used.
    ///
    /// Args:
    ///     ema_params: the teacher's tensors.
    ///     params: the online tensors, same shapes, same order.
    #[pyo3(text_signature = "(self, ema_params, params)")]
    fn update(&mut self, ema_params: Vec<Bound<'_, PyAny>>, params: Vec<Bound<'_, PyAny>>) -> PyResult<f64> {
        if ema_params.len() != params.len() {
            return Err(PyValueError::new_err(format!(
                "ema_update: {} EMA tensors for {} parameters",
                ema_params.len(),
                params.len()
            )));
        }
        let gate = |v: &[Bound<'_, PyAny>], what: &str| -> PyResult<Vec<Tensor>> {
            v.iter().enumerate().map(|(i, t)| tensor_arg(t, &format!("{what}[{i}]"))).collect()
        };
        let (e, p) = (gate(&ema_params, "ema_params")?, gate(&params, "params")?);
        for (i, (e, p)) in e.iter().zip(&p).enumerate() {
            if e.size() != p.size() {
                return Err(PyValueError::new_err(format!("ema_update: tensor {i} has shape {:?}, parameter {:?}", e.size(), p.size())));
            }
        }
        let d = self.inner.advance();
        ema_update(&e, &p, d).map_err(to_pyerr)?;
        Ok(d)
    }

    /// The target decay.
    #[getter]
    fn rate(&self) -> f64 {
        self.inner.rate
    }

    /// The decay the next update uses.
    #[getter]
    fn decay(&self) -> f64 {
        self.inner.decay
    }

    /// Updates made so far.
    #[getter]
    fn updates(&self) -> u64 {
        self.inner.updates
    }

    /// Restores a saved (decay, updates) pair.
    ///
    /// Example:
    ///     >>> s = EmaSchedule(0.99)
    ///     >>> s.load_state(0.495, 1)
    ///     >>> s.decay, s.updates
    ///     (0.495, 1)
    #[pyo3(text_signature = "(self, decay, updates)")]
    fn load_state(&mut self, decay: f64, updates: u64) -> PyResult<()> {
        if !(0.0..=1.0).contains(&decay) {
            return Err(PyValueError::new_err(format!("ema_state: decay must be in [0, 1], got {decay}")));
        }
        self.inner.decay = decay;
        self.inner.updates = updates;
        Ok(())
    }
}

/// Adds the objective's classes, functions and tables to ``twinflow._core``.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyObjective>()?;
    m.add_class::<PyPlan>()?;
    m.add_class::<super::step::PyRcgm>()?;
    m.add_class::<PyEmaSchedule>()?;
    m.add_function(wrap_pyfunction!(l2_loss, m)?)?;
    m.add_function(wrap_pyfunction!(barron_loss, m)?)?;
    m.add_function(wrap_pyfunction!(time_weight, m)?)?;
    m.add_function(wrap_pyfunction!(split_sub_batches, m)?)?;
    m.add("LOSS_SETTINGS", loss_settings_table(m.py())?)?;
    m.add("STAT_NAMES", PyTuple::new(m.py(), STAT_NAMES)?)?;
    m.add("RUN_NAMES", PyTuple::new(m.py(), RUNS)?)?;
    Ok(())
}

fn pair(pred: &Bound<'_, PyAny>, target: &Bound<'_, PyAny>) -> PyResult<(Tensor, Tensor)> {
    let (p, t) = (tensor_arg(pred, "pred")?, tensor_arg(target, "target")?);
    if p.size() != t.size() || p.dim() == 0 {
        return Err(PyValueError::new_err(format!(
            "pred and target must have the same shape with a batch dimension, got {:?} and {:?}",
            p.size(),
            t.size()
        )));
    }
    Ok((p, t))
}

/// Per-row mean squared error: ``mean((pred − target)²)`` over all but the batch dimension.
///
/// Args:
///     pred, target: tensors of the same shape, rows first.
///
/// Returns:
///     a tensor of shape [B] (float32; float64 stays).
///
/// Example:
///     >>> l2_loss(torch.ones(2, 3), torch.zeros(2, 3))
///     tensor([1., 1.])
#[pyfunction]
#[pyo3(text_signature = "(pred, target)")]
pub fn l2_loss(pred: &Bound<'_, PyAny>, target: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
    let (p, t) = pair(pred, target)?;
    Ok(PyTensor(loss::l2_loss(&p, &t).map_err(to_pyerr)?))
}

/// Per-row Barron robust loss on m = per-row MSE, with a stop-gradient on its scale:
/// ``m·sg(((m/(c² + 1e-8))/|α − 2| + 1)^((α − 2)/2))/c``; α = 2 gives ``m/c``.
///
/// Args:
///     pred, target: tensors of the same shape, rows first.
///     alpha: shape α (finite). c: scale (> 0).
///
/// Returns:
///     a tensor of shape [B].
///
/// Example:
///     >>> barron_loss(torch.ones(2, 3), torch.zeros(2, 3), alpha=2.0, c=0.5)
///     tensor([2., 2.])
#[pyfunction]
#[pyo3(signature = (pred, target, alpha=1.0, c=1e-3), text_signature = "(pred, target, alpha=1.0, c=0.001)")]
pub fn barron_loss(pred: &Bound<'_, PyAny>, target: &Bound<'_, PyAny>, alpha: f64, c: f64) -> PyResult<PyTensor> {
    let (p, t) = pair(pred, target)?;
    if !alpha.is_finite() || !c.is_finite() || c <= 0.0 {
        return Err(PyValueError::new_err(format!("barron_loss: need finite alpha and c > 0, got alpha={alpha}, c={c}")));
    }
    Ok(PyTensor(loss::barron_loss(&p, &t, alpha, c).map_err(to_pyerr)?))
}

/// The loss weight of each row: ``w = tan((1 − (|t| − |tt|))·π/2.5) + 1``.
///
/// Args:
///     t, tt: tensors of the same shape [B].
///
/// Example:
///     >>> time_weight(torch.tensor([1.0]), torch.tensor([0.0]))
///     tensor([1.])
#[pyfunction]
#[pyo3(text_signature = "(t, tt)")]
pub fn time_weight(t: &Bound<'_, PyAny>, tt: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
    let (a, b) = (tensor_arg(t, "t")?, tensor_arg(tt, "tt")?);
    if a.size() != b.size() {
        return Err(PyValueError::new_err(format!("t and tt must have the same shape, got {:?} and {:?}", a.size(), b.size())));
    }
    Ok(PyTensor(loss::time_weight(&a, &b).map_err(to_pyerr)?))
}

/// The contiguous row ranges of the four runs for a batch of ``batch_size`` rows.
///
/// Args:
///     batch_size: rows in the batch (at least the number of active runs).
///     weights: ``{"e2e": w, "mul": w, "any": w, "adv": w}`` (>= 0; a missing run is 0).
///
/// Returns:
///     ``{"e2e": (start, stop), "mul": …, "any": …, "adv": …}``.
///
/// Example:
///     >>> split_sub_batches(10, {"e2e": 1, "mul": 1, "any": 1, "adv": 1})
///     {'e2e': (0, 3), 'mul': (3, 6), 'any': (6, 8), 'adv': (8, 10)}
#[pyfunction]
#[pyo3(text_signature = "(batch_size, weights)")]
pub fn split_sub_batches<'py>(py: Python<'py>, batch_size: &Bound<'py, PyAny>, weights: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let b = int_arg(batch_size, "batch_size")?;
    if b < 0 {
        return Err(PyValueError::new_err(format!("batch_size: must be >= 0, got {b}")));
    }
    let runs = split::split_sub_batches(b as usize, &weights_arg(weights)?).map_err(to_pyerr)?;
    let d = PyDict::new(py);
    for (name, r) in RUNS.iter().zip(runs) {
        d.set_item(name, (r.start, r.end))?;
    }
    Ok(d)
}
