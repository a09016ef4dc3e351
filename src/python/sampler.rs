//! `UnifiedSampler` and `ucgm_step`.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::args::{float_arg, floats_arg, int_arg, tensor_arg, tensor_like, to_pyerr, type_name};
use super::callbacks::{PyModel, PyRng};
use crate::config::{SamplerConfig, SamplingStyle, StochastRatio, MAX_SAMPLING_STEPS};
use crate::error::{all_finite, Error};
use crate::sampler::{is_float, Sampler};
use crate::step;
use crate::stepper::{Phase, Stepper};

const SETTINGS: [&str; 7] = [
    "sampling_steps",
    "stochast_ratio",
    "extrapol_ratio",
    "sampling_order",
    "time_dist_ctrl",
    "rfba_gap_steps",
    "sampling_style",
];

/// Apply one Python setting to a config (validation of ranges happens in `validate`).
fn set_field(cfg: &mut SamplerConfig, key: &str, v: &Bound<'_, PyAny>) -> PyResult<()> {
    match key {
        "sampling_steps" => {
            let n = int_arg(v, key)?;
            if !(1..=MAX_SAMPLING_STEPS as i64).contains(&n) {
                return Err(PyValueError::new_err(format!(
                    "sampling_steps: must be in [1, {MAX_SAMPLING_STEPS}], got {n}"
                )));
            }
            cfg.sampling_steps = n as usize;
        }
        "stochast_ratio" => {
            cfg.stochast_ratio = if let Ok(s) = v.downcast::<PyString>() {
                let s = s.to_str()?;
                if !s.eq_ignore_ascii_case("sde") {
                    return Err(PyValueError::new_err(format!(
                        "stochast_ratio: must be a number in [0, 1] or \"SDE\", got {s:?}"
                    )));
                }
                StochastRatio::Sde
            } else {
                StochastRatio::Fixed(float_arg(v, key)?)
            }
        }
        "extrapol_ratio" => cfg.extrapol_ratio = float_arg(v, key)?,
        "sampling_order" => {
            let o = int_arg(v, key)?;
            if !(1..=2).contains(&o) {
                return Err(PyValueError::new_err(format!("sampling_order: must be 1 or 2, got {o}")));
            }
            cfg.sampling_order = o as u32;
        }
        "time_dist_ctrl" => cfg.time_dist_ctrl = floats_arg::<3>(v, key)?,
        "rfba_gap_steps" => cfg.rfba_gap_steps = floats_arg::<2>(v, key)?,
        "sampling_style" => {
            let s = v.downcast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!("sampling_style must be a str, got {}", type_name(v)))
            })?;
            cfg.sampling_style = SamplingStyle::parse(s.to_str()?).map_err(to_pyerr)?;
        }
        _ => return Err(PyTypeError::new_err(format!("unknown sampler setting {key:?}"))),
    }
    Ok(())
}


/// UCGM unified sampler (SPEC §2). See the package docs for the parameters.
#[pyclass(name = "UnifiedSampler", module = "twinflow")]
pub struct PySampler {
    inner: Sampler,
}

fn build(cfg: SamplerConfig) -> PyResult<Sampler> {
    Sampler::new(cfg).map_err(to_pyerr)
}

impl PySampler {
    /// Run the loop with the GIL released; the callbacks take it back for Python calls.
    #[allow(clippy::too_many_arguments)]
    fn run(
        py: Python<'_>,
        sampler: &Sampler,
        model: &Bound<'_, PyAny>,
        noise: &Bound<'_, PyAny>,
        generator: Option<Bound<'_, PyAny>>,
        progress: bool,
        trajectory: bool,
        model_kwargs: Option<Bound<'_, PyDict>>,
    ) -> PyResult<PyObject> {
        let x0 = tensor_arg(noise, "noise")?;
        Sampler::check_noise(&x0).map_err(to_pyerr)?;
        if !model.is_callable() {
            return Err(PyTypeError::new_err(format!("model must be callable, got {}", type_name(model))));
        }
        let pbar = if progress {
            let kw = PyDict::new(py);
            kw.set_item("total", sampler.nfe())?;
            kw.set_item("desc", "sampling")?;
            kw.set_item("unit", "nfe")?;
            Some(py.import("tqdm.auto")?.getattr("tqdm")?.call((), Some(&kw))?.unbind())
        } else {
            None
        };
        let mut m = PyModel {
            model: model.clone().unbind(),
            kwargs: model_kwargs.map(|k| k.unbind()),
            progress: pbar.as_ref().map(|p| p.clone_ref(py)),
            err: None,
        };
        let mut rng = PyRng::new(generator);
        // Tensors are Send but not Sync: move owned handles in and the callbacks back out.
        let (res, m, rng) = py.allow_threads(move || {
            let res = sampler.sample(&mut m, &mut rng, &x0, trajectory);
            (res, m, rng)
        });
        if let Some(p) = pbar {
            p.bind(py).call_method0("close")?;
        }
        match res {
            Ok(t) => Ok(PyTensor(t).into_pyobject(py)?.unbind()),
            Err(Error::Callback(_)) => Err(m.err.or(rng.err).unwrap_or_else(|| {
                PyRuntimeError::new_err("a callback failed without an error")
            })),
            Err(e) => Err(to_pyerr(e)),
        }
    }
}

#[pymethods]
impl PySampler {
    #[new]
    #[pyo3(signature = (sampling_steps=None, stochast_ratio=None, extrapol_ratio=None, sampling_order=None,
                        time_dist_ctrl=None, rfba_gap_steps=None, sampling_style=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        sampling_steps: Option<&Bound<'_, PyAny>>,
        stochast_ratio: Option<&Bound<'_, PyAny>>,
        extrapol_ratio: Option<&Bound<'_, PyAny>>,
        sampling_order: Option<&Bound<'_, PyAny>>,
        time_dist_ctrl: Option<&Bound<'_, PyAny>>,
        rfba_gap_steps: Option<&Bound<'_, PyAny>>,
        sampling_style: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mut cfg = SamplerConfig::default();
        let given = [
            sampling_steps,
            stochast_ratio,
            extrapol_ratio,
            sampling_order,
            time_dist_ctrl,
            rfba_gap_steps,
            sampling_style,
        ];
        for (key, v) in SETTINGS.iter().zip(given) {
            if let Some(v) = v.filter(|v| !v.is_none()) {
                set_field(&mut cfg, key, v)?;
            }
        }
        Ok(Self { inner: build(cfg)? })
    }

    /// A published preset ("1-nfe", "2-nfe", "4-nfe", "any-step", "multi-step"),
    /// optionally with settings overridden by keyword.
    #[classmethod]
    #[pyo3(signature = (name, **overrides))]
    fn preset(_cls: &Bound<'_, pyo3::types::PyType>, name: &str, overrides: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut cfg = SamplerConfig::preset(name).map_err(to_pyerr)?;
        if let Some(o) = overrides {
            for (k, v) in o.iter() {
                set_field(&mut cfg, &k.extract::<String>()?, &v)?;
            }
        }
        Ok(Self { inner: build(cfg)? })
    }

    /// Draw samples: returns x̂ of the last interval (shape and dtype of `noise`), or with
    /// `return_trajectory=True` the stack [noise, x̂_0, …, x̂_{n−1}].
    #[pyo3(signature = (model, noise, generator=None, progress=false, return_trajectory=false, **model_kwargs))]
    fn sample(
        &self,
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        noise: &Bound<'_, PyAny>,
        generator: Option<Bound<'_, PyAny>>,
        progress: bool,
        return_trajectory: bool,
        model_kwargs: Option<Bound<'_, PyDict>>,
    ) -> PyResult<PyObject> {
        Self::run(py, &self.inner, model, noise, generator, progress, return_trajectory, model_kwargs)
    }

    /// The published call shape: `sampling_loop(noise, model, sampling_steps=..., ..., **model_kwargs)`.
    /// Sampler settings given here override this sampler's for this call; returns the trajectory.
    #[pyo3(signature = (inital_noise_z, sampling_model, **kwargs))]
    fn sampling_loop(
        &self,
        py: Python<'_>,
        inital_noise_z: &Bound<'_, PyAny>,
        sampling_model: &Bound<'_, PyAny>,
        kwargs: Option<Bound<'_, PyDict>>,
    ) -> PyResult<PyObject> {
        let mut cfg = self.inner.config().clone();
        let model_kwargs = PyDict::new(py);
        let (mut generator, mut progress) = (None, false);
        if let Some(kw) = &kwargs {
            for (k, v) in kw.iter() {
                let key = k.extract::<String>()?;
                match key.as_str() {
                    "generator" => generator = Some(v),
                    "progress" => progress = v.is_truthy()?,
                    _ if SETTINGS.contains(&key.as_str()) => set_field(&mut cfg, &key, &v)?,
                    _ => model_kwargs.set_item(k, v)?,
                }
            }
        }
        let mut sampler = build(cfg)?;
        sampler.fused = self.inner.fused;
        sampler.check_finite = self.inner.check_finite;
        Self::run(py, &sampler, sampling_model, inital_noise_z, generator, progress, true, Some(model_kwargs))
    }

    /// The time grid t_0 > … > t_n = 0 (float64).
    #[getter]
    fn timesteps(&self) -> PyResult<PyTensor> {
        Ok(PyTensor(Tensor::f_from_slice(self.inner.timesteps()).map_err(|e| to_pyerr(e.into()))?))
    }

    /// Network evaluations per sample.
    #[getter]
    fn nfe(&self) -> usize {
        self.inner.nfe()
    }

    #[getter]
    fn sampling_steps(&self) -> usize {
        self.inner.config().sampling_steps
    }

    #[getter]
    fn stochast_ratio(&self, py: Python<'_>) -> PyResult<PyObject> {
        Ok(match self.inner.config().stochast_ratio {
            StochastRatio::Fixed(s) => s.into_pyobject(py)?.into_any().unbind(),
            StochastRatio::Sde => "SDE".into_pyobject(py)?.into_any().unbind(),
        })
    }

    #[getter]
    fn extrapol_ratio(&self) -> f64 {
        self.inner.config().extrapol_ratio
    }

    #[getter]
    fn sampling_order(&self) -> u32 {
        self.inner.config().sampling_order
    }

    #[getter]
    fn time_dist_ctrl(&self) -> (f64, f64, f64) {
        let [a, b, c] = self.inner.config().time_dist_ctrl;
        (a, b, c)
    }

    #[getter]
    fn rfba_gap_steps(&self) -> (f64, f64) {
        let [a, b] = self.inner.config().rfba_gap_steps;
        (a, b)
    }

    #[getter]
    fn sampling_style(&self) -> &'static str {
        self.inner.config().sampling_style.as_str()
    }

    /// Use the fused CPU kernels where possible (False forces libtorch ops everywhere).
    #[getter]
    fn use_fused_kernel(&self) -> bool {
        self.inner.fused
    }

    #[setter]
    fn set_use_fused_kernel(&mut self, v: bool) {
        self.inner.fused = v;
    }

    /// Refuse NaN/Inf noise and stop with FloatingPointError at the first step whose result
    /// is not finite, naming it (default True; on the fused CPU path the check is free).
    #[getter]
    fn check_finite(&self) -> bool {
        self.inner.check_finite
    }

    #[setter]
    fn set_check_finite(&mut self, v: bool) {
        self.inner.check_finite = v;
    }

    /// The settings as a dict (keyword arguments of the constructor).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("sampling_steps", self.sampling_steps())?;
        d.set_item("stochast_ratio", self.stochast_ratio(py)?)?;
        d.set_item("extrapol_ratio", self.extrapol_ratio())?;
        d.set_item("sampling_order", self.sampling_order())?;
        d.set_item("time_dist_ctrl", self.time_dist_ctrl())?;
        d.set_item("rfba_gap_steps", self.rfba_gap_steps())?;
        d.set_item("sampling_style", self.sampling_style())?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let d = self.to_dict(py)?;
        let parts: Vec<String> = d
            .iter()
            .map(|(k, v)| Ok(format!("{}={}", k, v.repr()?)))
            .collect::<PyResult<_>>()?;
        Ok(format!("UnifiedSampler({})", parts.join(", ")))
    }
}

// ---------------------------------------------------------------- ucgm_step

fn byte_range(t: &Tensor) -> (usize, usize) {
    let start = t.data_ptr() as usize;
    let len = t.numel() * t.f_kind().map(|k| k.elt_size_in_bytes()).unwrap_or(1);
    (start, start + len)
}

/// One sampler interval without extrapolation (SPEC §2): for s = 0 `x − (t_cur − t_next)·v`,
/// else `(1 − t_next)·x̂ + t_next·(√(1 − s)·ẑ + √s·noise)`. Writes into `out` when given.
/// With `check_finite` a result holding NaN or Inf raises FloatingPointError naming the input.
#[pyfunction]
#[pyo3(signature = (x, velocity, t_cur, t_next, stochast_ratio=None, noise=None, out=None, check_finite=true))]
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
            step::ucgm_step(&xt, &f, tc, tn, s, eps.as_ref(), out_t.as_ref(), true, check_finite).map_err(|e| match e {
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

/// One model evaluation at a time (the diffusers scheduler's engine): `step(x, velocity)`
/// advances by the evaluation at `evals[position]`.
#[pyclass(name = "SamplerStepper", module = "twinflow._core")]
pub struct PyStepper {
    // Tensors are Send but not Sync; the mutex makes the class shareable.
    inner: std::sync::Mutex<Stepper>,
}

impl PyStepper {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Stepper>> {
        self.inner.lock().map_err(|_| PyRuntimeError::new_err("stepper state is poisoned"))
    }
}

#[pymethods]
impl PyStepper {
    /// `grid`: the times t_0 > … > t_{n−1} > 0 to use instead of the sampler's grid.
    #[new]
    #[pyo3(signature = (sampler, grid=None))]
    fn new(sampler: PyRef<'_, PySampler>, grid: Option<Vec<f64>>) -> PyResult<Self> {
        let st = match grid {
            Some(g) => Stepper::with_grid(&sampler.inner, &g).map_err(to_pyerr)?,
            None => Stepper::new(&sampler.inner),
        };
        Ok(Self { inner: std::sync::Mutex::new(st) })
    }

    /// [(t, tt, interval, is_corrector)] for every model evaluation, in order.
    #[getter]
    fn evals(&self) -> PyResult<Vec<(f64, f64, usize, bool)>> {
        Ok(self.lock()?.evals().iter().map(|e| (e.t, e.tt, e.interval, e.phase == Phase::Correct)).collect())
    }

    /// The time grid t_0 > … > t_n = 0.
    #[getter]
    fn grid(&self) -> PyResult<Vec<f64>> {
        Ok(self.lock()?.grid().to_vec())
    }

    #[getter]
    fn position(&self) -> PyResult<usize> {
        Ok(self.lock()?.position())
    }

    #[setter]
    fn set_position(&self, k: usize) -> PyResult<()> {
        self.lock()?.set_position(k).map_err(to_pyerr)
    }

    /// Advance by one evaluation with the model's `velocity` at `x`; returns the next x
    /// (after the last evaluation, the sample).
    #[pyo3(signature = (x, velocity, generator=None))]
    fn step(&self, py: Python<'_>, x: &Bound<'_, PyAny>, velocity: &Bound<'_, PyAny>, generator: Option<Bound<'_, PyAny>>) -> PyResult<PyTensor> {
        let xt = tensor_arg(x, "x")?;
        Sampler::check_noise(&xt).map_err(to_pyerr)?;
        let f = tensor_like(velocity, "velocity", &xt)?;
        let mut rng = PyRng::new(generator);
        let inner = &self.inner;
        let (res, rng) = py.allow_threads(move || {
            let res = match inner.lock() {
                Ok(mut st) => st.step(&xt, &f, &mut rng, None),
                Err(_) => Err(Error::Value("stepper state is poisoned".into())),
            };
            (res, rng)
        });
        match res {
            Ok(t) => Ok(PyTensor(t)),
            Err(Error::Callback(_)) => Err(rng.err.unwrap_or_else(|| PyRuntimeError::new_err("the generator failed"))),
            Err(e) => Err(to_pyerr(e)),
        }
    }
}
