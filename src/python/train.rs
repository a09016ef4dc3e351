//! `TwinFlowObjective` (the Rust half of `twinflow.TwinFlowLoss`) and the loss functions.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString};
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::args::{float_arg, floats_arg, int_arg, tensor_arg, to_pyerr, type_name};
use super::callbacks::{PyRng, PyTrainModel};
use crate::error::{all_finite, Error};
use crate::sampler::is_float;
use crate::train::config::{LossKind, TrainConfig};
use crate::train::ema::{ema_update, EmaSchedule};
use crate::train::{loss, split, training_step};

const RUNS: [&str; 4] = split::RUN_NAMES;

/// Keyword settings accepted by TwinFlowLoss, applied over a recipe.
fn apply(cfg: &mut TrainConfig, key: &str, v: &Bound<'_, PyAny>) -> PyResult<()> {
    match key {
        "consistc_ratio" => cfg.consistc_ratio = float_arg(v, key)?,
        "ema_decay_rate" => cfg.ema_decay_rate = float_arg(v, key)?,
        "enhanced_ratio" => cfg.enhanced_ratio = float_arg(v, key)?,
        "enhanced_range" => cfg.enhanced_range = floats_arg::<2>(v, key)?,
        "time_dist_ctrl" => cfg.time_dist_ctrl = floats_arg::<3>(v, key)?,
        "estimate_order" => cfg.estimate_order = int_arg(v, key)?,
        "dist_match_cof" => cfg.dist_match_cof = float_arg(v, key)?,
        "use_image_free" => {
            cfg.use_image_free = v
                .downcast::<PyBool>()
                .map_err(|_| PyTypeError::new_err(format!("use_image_free must be a bool, got {}", type_name(v))))?
                .is_true()
        }
        "sub_batches" => cfg.sub_batches = weights_arg(v)?,
        "loss" | "barron_alpha" | "barron_c" => unreachable!("handled by the caller"),
        _ => return Err(PyTypeError::new_err(format!("unknown TwinFlowLoss setting {key:?}"))),
    }
    Ok(())
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

/// The TwinFlow objective with its EMA schedule; `twinflow.TwinFlowLoss` wraps it.
#[pyclass(name = "TwinFlowObjective", module = "twinflow._core")]
pub struct PyObjective {
    cfg: TrainConfig,
    ema: EmaSchedule,
}

#[pymethods]
impl PyObjective {
    #[new]
    #[pyo3(signature = (recipe="twinflow", **settings))]
    fn new(recipe: &str, settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut cfg = TrainConfig::recipe(recipe).map_err(to_pyerr)?;
        let (mut loss_name, mut alpha, mut c) = (None, None, None);
        if let Some(s) = settings {
            for (k, v) in s.iter() {
                if v.is_none() {
                    continue;
                }
                let key = k.extract::<String>()?;
                match key.as_str() {
                    "loss" => {
                        loss_name = Some(v.downcast::<PyString>().map_err(|_| {
                            PyTypeError::new_err(format!("loss must be a str, got {}", type_name(&v)))
                        })?.to_str()?.to_ascii_lowercase())
                    }
                    "barron_alpha" => alpha = Some(float_arg(&v, "barron_alpha")?),
                    "barron_c" => c = Some(float_arg(&v, "barron_c")?),
                    _ => apply(&mut cfg, &key, &v)?,
                }
            }
        }
        let (a0, c0) = match cfg.loss {
            LossKind::Barron { alpha, c } => (alpha, c),
            LossKind::L2 => (1.0, 1e-3),
        };
        cfg.loss = match loss_name.as_deref() {
            None | Some("barron") => LossKind::Barron { alpha: alpha.unwrap_or(a0), c: c.unwrap_or(c0) },
            Some("l2") => LossKind::L2,
            Some(other) => {
                return Err(PyValueError::new_err(format!("loss: unknown loss {other:?}, expected \"barron\" or \"l2\"")))
            }
        };
        cfg.validate().map_err(to_pyerr)?;
        let ema = EmaSchedule::new(cfg.ema_decay_rate);
        Ok(Self { cfg, ema })
    }

    /// One step's loss: returns (loss, stats tensor [loss, base, dist_match, e2e, mul, any, adv], model calls).
    #[pyo3(signature = (model, x, cond=None, uncond=None, teacher=None, generator=None))]
    #[allow(clippy::too_many_arguments)]
    fn __call__(
        &self,
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        x: &Bound<'_, PyAny>,
        cond: Option<&Bound<'_, PyAny>>,
        uncond: Option<&Bound<'_, PyAny>>,
        teacher: Option<&Bound<'_, PyAny>>,
        generator: Option<Bound<'_, PyAny>>,
    ) -> PyResult<(PyTensor, PyTensor, usize)> {
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
        if !model.is_callable() {
            return Err(PyTypeError::new_err(format!("model must be callable, got {}", type_name(model))));
        }
        let teacher = teacher.filter(|t| !t.is_none());
        if let Some(t) = teacher {
            if !t.is_callable() {
                return Err(PyTypeError::new_err(format!("teacher must be callable, got {}", type_name(t))));
            }
        }
        let b = xt.size()[0];
        let mut m = PyTrainModel {
            model: model.clone().unbind(),
            teacher: teacher.map(|t| t.clone().unbind()),
            cond: cond_arg(cond, "cond", b)?,
            uncond: cond_arg(uncond, "uncond", b)?,
            err: None,
        };
        let has_uncond = m.uncond.is_some();
        let mut rng = PyRng::new(generator);
        let cfg = &self.cfg;
        let (res, m, rng) = py.allow_threads(move || {
            let res = training_step(cfg, &mut m, &mut rng, &xt, has_uncond);
            (res, m, rng)
        });
        match res {
            Ok(out) if !all_finite(&out.loss).map_err(to_pyerr)? => Err(to_pyerr(Error::NonFinite(
                "TwinFlowLoss: the loss is NaN or Inf (a model output is not finite, or the values overflowed)".into(),
            ))),
            Ok(out) => Ok((PyTensor(out.loss), PyTensor(out.stats), out.model_calls)),
            Err(Error::Callback(_)) => Err(m.err.or(rng.err).unwrap_or_else(|| PyRuntimeError::new_err("a callback failed"))),
            Err(e) => Err(to_pyerr(e)),
        }
    }

    /// EMA update of `ema_params` towards `params` (in place, no autograd) with the warm-up
    /// decay; returns the decay used.
    fn ema_update(&mut self, ema_params: Vec<Bound<'_, PyAny>>, params: Vec<Bound<'_, PyAny>>) -> PyResult<f64> {
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
        let d = self.ema.advance();
        ema_update(&e, &p, d).map_err(to_pyerr)?;
        Ok(d)
    }

    /// (next decay, number of updates so far)
    #[getter]
    fn ema_state(&self) -> (f64, u64) {
        (self.ema.decay, self.ema.updates)
    }

    #[setter]
    fn set_ema_state(&mut self, state: (f64, u64)) -> PyResult<()> {
        let (decay, updates) = state;
        if !(0.0..=1.0).contains(&decay) {
            return Err(PyValueError::new_err(format!("ema_state: decay must be in [0, 1], got {decay}")));
        }
        self.ema.decay = decay;
        self.ema.updates = updates;
        Ok(())
    }

    /// Whether a step calls the teacher at all (else no teacher copy is needed).
    #[getter]
    fn needs_teacher(&self) -> bool {
        self.cfg.needs_teacher()
    }

    #[getter]
    fn ema_decay_rate(&self) -> f64 {
        self.cfg.ema_decay_rate
    }

    /// The settings as a dict of TwinFlowLoss keywords.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.cfg;
        let d = PyDict::new(py);
        d.set_item("consistc_ratio", c.consistc_ratio)?;
        d.set_item("ema_decay_rate", c.ema_decay_rate)?;
        d.set_item("enhanced_ratio", c.enhanced_ratio)?;
        d.set_item("enhanced_range", (c.enhanced_range[0], c.enhanced_range[1]))?;
        d.set_item("time_dist_ctrl", (c.time_dist_ctrl[0], c.time_dist_ctrl[1], c.time_dist_ctrl[2]))?;
        d.set_item("estimate_order", c.estimate_order)?;
        match c.loss {
            LossKind::L2 => d.set_item("loss", "l2")?,
            LossKind::Barron { alpha, c } => {
                d.set_item("loss", "barron")?;
                d.set_item("barron_alpha", alpha)?;
                d.set_item("barron_c", c)?;
            }
        }
        d.set_item("dist_match_cof", c.dist_match_cof)?;
        d.set_item("use_image_free", c.use_image_free)?;
        let w = PyDict::new(py);
        for (name, v) in RUNS.iter().zip(c.sub_batches) {
            w.set_item(name, v)?;
        }
        d.set_item("sub_batches", w)?;
        Ok(d)
    }
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

/// Per-row mean squared error [B].
#[pyfunction]
pub fn l2_loss(pred: &Bound<'_, PyAny>, target: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
    let (p, t) = pair(pred, target)?;
    Ok(PyTensor(loss::l2_loss(&p, &t).map_err(to_pyerr)?))
}

/// Per-row Barron loss [B] (SPEC §3.5).
#[pyfunction]
#[pyo3(signature = (pred, target, alpha=1.0, c=1e-3))]
pub fn barron_loss(pred: &Bound<'_, PyAny>, target: &Bound<'_, PyAny>, alpha: f64, c: f64) -> PyResult<PyTensor> {
    let (p, t) = pair(pred, target)?;
    if !alpha.is_finite() || !c.is_finite() || c <= 0.0 {
        return Err(PyValueError::new_err(format!("barron_loss: need finite alpha and c > 0, got alpha={alpha}, c={c}")));
    }
    Ok(PyTensor(loss::barron_loss(&p, &t, alpha, c).map_err(to_pyerr)?))
}

/// w = tan((1 − (|t| − |tt|))·π/2.5) + 1.
#[pyfunction]
pub fn time_weight(t: &Bound<'_, PyAny>, tt: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
    let (a, b) = (tensor_arg(t, "t")?, tensor_arg(tt, "tt")?);
    if a.size() != b.size() {
        return Err(PyValueError::new_err(format!("t and tt must have the same shape, got {:?} and {:?}", a.size(), b.size())));
    }
    Ok(PyTensor(loss::time_weight(&a, &b).map_err(to_pyerr)?))
}

/// {"e2e": (start, stop), "mul": …, "any": …, "adv": …} for a batch of `batch_size` rows.
#[pyfunction]
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
