//! One model evaluation at a time (docs/algorithm.md §2): the state machine behind both the sampling loop
//! (`twinflow.UnifiedSampler.sample`, in Python) and the diffusers scheduler, so the two
//! cannot drift apart. The caller calls the model and draws the noise; `step` does the rest.
//!
//! Order 1 evaluates once per interval. Order 2 evaluates twice on every interval but the
//! last (predictor at t_c, corrector at t_n), like diffusers' FlowMatchHeun schedule.

use tch::Tensor;

use crate::config::SamplerConfig;
use crate::error::{all_finite, Error, Result};
use crate::fused::Mix;
use crate::sampler::SamplerSettings;
use crate::update::{self, empty_like, MixBuffers};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// First evaluation of an interval, at x_c and t_c.
    Predict,
    /// Order 2: the evaluation at the predicted x and t_n.
    Correct,
}

/// One model evaluation: which interval, which phase, and the (t, tt) the model is called with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Eval {
    pub interval: usize,
    pub phase: Phase,
    pub t: f64,
    pub tt: f64,
    /// Whether `step` needs fresh N(0, 1) noise for this evaluation (a predictor with s > 0).
    pub noise: bool,
}

/// The evaluation schedule of a configuration over its grid.
pub fn evaluations(cfg: &SamplerConfig, grid: &[f64]) -> Vec<Eval> {
    let n = grid.len() - 1;
    let style = cfg.sampling_style;
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        let (t_c, t_n) = (grid[i], grid[i + 1]);
        let noise = cfg.stochast_ratio.at(t_c, t_n) > 0.0;
        out.push(Eval { interval: i, phase: Phase::Predict, t: t_c, tt: style.target(t_c, t_n), noise });
        if cfg.sampling_order == 2 && i + 1 < n {
            out.push(Eval { interval: i, phase: Phase::Correct, t: t_n, tt: style.target(t_n, t_n), noise: false });
        }
    }
    out
}

pub struct Stepper {
    cfg: SamplerConfig,
    grid: Vec<f64>,
    evals: Vec<Eval>,
    pub fused: bool,
    /// Report a NaN/Inf result as `Error::NonFinite` naming the evaluation.
    pub check_finite: bool,
    next: usize,
    /// Un-extrapolated (x̂, ẑ) of the previous interval, kept only when extrapolating.
    prev: Option<(Tensor, Tensor)>,
    /// Order 2: (x_c, F_c) of the interval being corrected.
    heun: Option<(Tensor, Tensor)>,
}

impl Stepper {
    pub fn new(sampler: &SamplerSettings) -> Self {
        let cfg = sampler.config().clone();
        let grid = sampler.timesteps().to_vec();
        let evals = evaluations(&cfg, &grid);
        let (fused, check_finite) = (cfg.use_fused_kernel, cfg.check_finite);
        Self { cfg, grid, evals, fused, check_finite, next: 0, prev: None, heun: None }
    }

    /// A stepper over a given grid t_0 > … > t_{n−1} > 0 (a pipeline's own sigmas) instead of
    /// the configuration's; t_n = 0 is appended. The sampler's other settings apply.
    pub fn with_grid(sampler: &SamplerSettings, times: &[f64]) -> Result<Self> {
        if times.is_empty() {
            return Err(Error::Value("sigmas: need at least one time".into()));
        }
        if times.iter().any(|t| !t.is_finite() || *t <= 0.0 || *t > 1.0) {
            return Err(Error::Value(format!("sigmas: every time must be in (0, 1], got {times:?}")));
        }
        if times.windows(2).any(|w| w[1] >= w[0]) {
            return Err(Error::Value(format!("sigmas: times must be strictly decreasing, got {times:?}")));
        }
        let mut st = Self::new(sampler);
        st.grid = times.iter().copied().chain(std::iter::once(0.0)).collect();
        st.evals = evaluations(&st.cfg, &st.grid);
        Ok(st)
    }

    pub fn evals(&self) -> &[Eval] {
        &self.evals
    }

    pub fn grid(&self) -> &[f64] {
        &self.grid
    }

    /// Index of the next evaluation.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Start at evaluation `k` (forgetting extrapolation and corrector state).
    pub fn set_position(&mut self, k: usize) -> Result<()> {
        if k > self.evals.len() {
            return Err(Error::Value(format!("position {k} is past the {} evaluations", self.evals.len())));
        }
        self.next = k;
        self.prev = None;
        self.heun = None;
        Ok(())
    }

    /// The evaluation the next `step` expects, if any is left.
    pub fn current(&self) -> Option<&Eval> {
        self.evals.get(self.next)
    }

    /// Advance by one evaluation: `f = model(x, e.t, e.tt)` for `e = self.current()`, and
    /// `eps` ~ N(0, 1) shaped like x when `e.noise` (else None). Returns the next x; after the
    /// last evaluation the sample x̂. On a predictor evaluation x̂ (before extrapolation) is
    /// also written into `xhat_out` when given.
    pub fn step(&mut self, x: &Tensor, f: &Tensor, eps: Option<&Tensor>, xhat_out: Option<&Tensor>) -> Result<Tensor> {
        let e = *self.current().ok_or_else(|| {
            Error::Value(format!("all {} evaluations are done: set the timesteps again", self.evals.len()))
        })?;
        let k = self.next;
        match (e.noise, eps.is_some()) {
            (true, false) => {
                return Err(Error::Value(format!(
                    "noise: evaluation {} of {} is stochastic (stochast_ratio > 0) and needs N(0, 1) noise shaped like x",
                    k + 1,
                    self.evals.len()
                )))
            }
            (false, true) => {
                return Err(Error::Value(format!(
                    "noise: evaluation {} of {} draws no noise (pass None)",
                    k + 1,
                    self.evals.len()
                )))
            }
            _ => {}
        }
        self.next += 1;
        self.advance(e, x, f, eps, xhat_out).map_err(|err| match err {
            Error::NonFinite(_) => self.non_finite(k, &e, x, f),
            other => other,
        })
    }

    /// Which input made evaluation `k`'s result non-finite (a cold path: runs only then).
    fn non_finite(&self, k: usize, e: &Eval, x: &Tensor, f: &Tensor) -> Error {
        let at = format!("at evaluation {} of {} (t = {}, tt = {})", k + 1, self.evals.len(), e.t, e.tt);
        let culprit = if !all_finite(f).unwrap_or(false) {
            "the model output (velocity) contains NaN or Inf"
        } else if !all_finite(x).unwrap_or(false) {
            "the input x contains NaN or Inf"
        } else {
            "the update overflowed to NaN or Inf (extreme extrapol_ratio or model output?)"
        };
        Error::NonFinite(format!("non-finite sample {at}: {culprit}"))
    }

    fn advance(&mut self, e: Eval, x: &Tensor, f: &Tensor, eps: Option<&Tensor>, xhat_out: Option<&Tensor>) -> Result<Tensor> {
        let check = self.check_finite;
        let (i, n) = (e.interval, self.grid.len() - 1);
        let (t_c, t_n) = (self.grid[i], self.grid[i + 1]);
        let (r, fused) = (self.cfg.extrapol_ratio, self.fused);
        if e.phase == Phase::Correct {
            let (x_c, f_c) = self.heun.take().ok_or_else(|| {
                Error::Value("a corrector evaluation needs the predictor of the same interval first".into())
            })?;
            return update::heun(&x_c, &f_c, f, t_c, t_n, fused, check);
        }
        let s = self.cfg.stochast_ratio.at(t_c, t_n);
        if i + 1 == n {
            // The sample is x̂ of the last interval, before extrapolation; the caller still drew
            // ε to keep the generator's stream as the spec has it.
            return update::axpy(x, f, -t_c, None, xhat_out, fused, check);
        }
        let extrapolate = if r > 0.0 && i >= 2 { self.prev.as_ref() } else { None };
        let keep = r > 0.0 && i >= 1;
        let x_new = if s == 0.0 && extrapolate.is_none() && !keep {
            update::axpy(x, f, -(t_c - t_n), xhat_out.map(|t| (t, -t_c)), None, fused, check)?
        } else {
            let xh_out = match (xhat_out, keep) {
                (Some(t), _) => Some(t.shallow_clone()),
                (None, true) => Some(empty_like(x)?),
                (None, false) => None,
            };
            let zh_out = if keep { Some(empty_like(x)?) } else { None };
            let y = update::mix(
                x,
                f,
                Mix { t_cur: t_c, t_next: t_n, s },
                MixBuffers {
                    eps,
                    extrapolate: extrapolate.map(|(a, b)| (r, a, b)),
                    xh_out: xh_out.as_ref(),
                    zh_out: zh_out.as_ref(),
                    out: None,
                },
                fused,
                check,
            )?;
            if let (Some(a), Some(b)) = (xh_out, zh_out) {
                self.prev = Some((a, b));
            }
            y
        };
        if self.cfg.sampling_order == 2 {
            self.heun = Some((x.shallow_clone(), f.shallow_clone()));
        }
        Ok(x_new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SamplingStyle, StochastRatio};
    use tch::{Device, Kind};

    /// The sampling loop as `UnifiedSampler.sample` runs it (in Python), over a Rust model
    /// and noise source. Returns the sample, or with `trajectory` [noise, x̂_0, …, x̂_{n−1}].
    fn sample(
        sampler: &SamplerSettings,
        model: &mut dyn FnMut(&Tensor, &Tensor, &Tensor) -> Tensor,
        draw: &mut dyn FnMut(&[i64], Kind) -> Tensor,
        noise: &Tensor,
        trajectory: bool,
    ) -> Result<Tensor> {
        crate::sampler::check_noise(noise, sampler.config().check_finite)?;
        let mut st = Stepper::new(sampler);
        let (shape, kind) = (noise.size(), noise.kind());
        let n = st.grid().len() as i64 - 1;
        let traj = trajectory.then(|| Tensor::empty([&[n + 1], &shape[..]].concat(), (kind, Device::Cpu)));
        if let Some(t) = &traj {
            t.get(0).copy_(noise);
        }
        let mut x = noise.shallow_clone();
        for e in st.evals().to_vec() {
            let t = Tensor::full([shape[0]], e.t, (kind, Device::Cpu));
            let tt = Tensor::full([shape[0]], e.tt, (kind, Device::Cpu));
            let f = crate::sampler::velocity_like(model(&x, &t, &tt), &x)?;
            let eps = e.noise.then(|| draw(&shape, kind));
            let row = match (&traj, e.phase) {
                (Some(t), Phase::Predict) => Some(t.get(e.interval as i64 + 1)),
                _ => None,
            };
            x = st.step(&x, &f, eps.as_ref(), row.as_ref())?;
        }
        Ok(traj.unwrap_or(x))
    }

    fn global_randn(shape: &[i64], kind: Kind) -> Tensor {
        Tensor::randn(shape, (kind, Device::Cpu))
    }

    /// Data concentrated at one point μ: the exact velocity is (x_t − μ)/t.
    fn point_mass(mu: f64, calls: &mut Vec<(f64, f64)>) -> impl FnMut(&Tensor, &Tensor, &Tensor) -> Tensor + '_ {
        move |x, t, tt| {
            let tv = t.double_value(&[0]);
            calls.push((tv, tt.double_value(&[0])));
            (x - mu) / tv
        }
    }

    /// A field that depends on x, t and tt.
    fn wavy(x: &Tensor, t: &Tensor, tt: &Tensor) -> Tensor {
        x.sin() * (t.view([-1, 1]) + 1.0) + tt.view([-1, 1]) * 0.3 + x * 0.1
    }

    fn noise(kind: Kind) -> Tensor {
        let i = Tensor::arange(15, (kind, Device::Cpu)).view([5, 3]);
        (i * 1.7 + 0.3).cos() * 1.2
    }

    fn all_modes() -> Vec<SamplerConfig> {
        let mut v = vec![];
        for style in [SamplingStyle::Few, SamplingStyle::Mul, SamplingStyle::Any] {
            for order in [1, 2] {
                for s in [StochastRatio::Fixed(0.0), StochastRatio::Fixed(0.7), StochastRatio::Sde] {
                    for r in [0.0, 0.3] {
                        v.push(SamplerConfig {
                            sampling_steps: 7,
                            stochast_ratio: s,
                            extrapol_ratio: r,
                            sampling_order: order,
                            time_dist_ctrl: [1.17, 0.8, 1.1],
                            rfba_gap_steps: [0.001, 0.1],
                            sampling_style: style,
                            ..Default::default()
                        });
                    }
                }
            }
        }
        v
    }

    #[test]
    fn exact_field_lands_on_the_point_in_every_mode() {
        for cfg in all_modes() {
            let sampler = SamplerSettings::new(cfg.clone()).unwrap();
            let mut calls = vec![];
            let x = sample(&sampler, &mut point_mass(1.5, &mut calls), &mut global_randn, &noise(Kind::Double), false).unwrap();
            let err = (x - 1.5).abs().max().double_value(&[]);
            assert!(err < 1e-12, "{cfg:?}: {err}");
            assert_eq!(calls.len(), cfg.nfe(), "{cfg:?}");
        }
    }

    #[test]
    fn model_sees_the_grid_and_style_targets() {
        for (style, order) in [(SamplingStyle::Few, 1), (SamplingStyle::Mul, 2), (SamplingStyle::Any, 2)] {
            let cfg = SamplerConfig { sampling_steps: 6, sampling_order: order, sampling_style: style, ..Default::default() };
            let sampler = SamplerSettings::new(cfg).unwrap();
            let g = sampler.timesteps().to_vec();
            let mut calls = vec![];
            let _ = sample(&sampler, &mut point_mass(0.0, &mut calls), &mut global_randn, &noise(Kind::Double), false).unwrap();
            let mut want = vec![];
            for i in 0..g.len() - 1 {
                want.push((g[i], style.target(g[i], g[i + 1])));
                if order == 2 && i + 2 < g.len() {
                    want.push((g[i + 1], style.target(g[i + 1], g[i + 1])));
                }
            }
            assert_eq!(calls, want);
        }
    }

    #[test]
    fn euler_matches_a_hand_written_loop_and_trajectory_layout() {
        let sampler = SamplerSettings::new(SamplerConfig { sampling_steps: 5, ..Default::default() }).unwrap();
        let z = noise(Kind::Double);
        let traj = sample(&sampler, &mut wavy, &mut global_randn, &z, true).unwrap();
        assert_eq!(traj.size(), vec![6, 5, 3]);
        assert_eq!((traj.get(0) - &z).abs().max().double_value(&[]), 0.0);
        let g = sampler.timesteps();
        let mut x = z.copy();
        for i in 0..5 {
            let t = Tensor::full([5], g[i], (Kind::Double, Device::Cpu));
            let f = wavy(&x, &t, &Tensor::zeros([5], (Kind::Double, Device::Cpu)));
            let xh = &x - &f * g[i];
            assert!((traj.get(i as i64 + 1) - &xh).abs().max().double_value(&[]) < 1e-13);
            x = &x - &f * (g[i] - g[i + 1]);
        }
        let last = sample(&sampler, &mut wavy, &mut global_randn, &z, false).unwrap();
        assert!((last - traj.get(5)).abs().max().double_value(&[]) < 1e-15);
    }

    #[test]
    fn noise_is_needed_once_per_stochastic_interval_and_paths_agree() {
        for cfg in all_modes() {
            let n = cfg.intervals();
            let g = SamplerSettings::new(cfg.clone()).unwrap().timesteps().to_vec();
            let want = (0..n).filter(|&i| cfg.stochast_ratio.at(g[i], g[i + 1]) > 0.0).count();
            for kind in [Kind::Float, Kind::Double] {
                let mut out = vec![];
                let z = noise(kind);
                for fused in [true, false] {
                    let sampler = SamplerSettings::new(SamplerConfig { use_fused_kernel: fused, ..cfg.clone() }).unwrap();
                    // Deterministic pseudo-noise (tests run in parallel and would race on the global RNG).
                    let mut draws = 0;
                    let mut draw = |shape: &[i64], kind| {
                        draws += 1;
                        let i = Tensor::arange(shape.iter().product::<i64>(), (kind, Device::Cpu)).view(shape);
                        (i * (0.37 + draws as f64)).sin() * 1.5
                    };
                    out.push(sample(&sampler, &mut wavy, &mut draw, &z, true).unwrap());
                    assert_eq!(draws, want, "{cfg:?}");
                }
                let tol = if kind == Kind::Float { 1e-5 } else { 1e-12 };
                let d = (&out[0] - &out[1]).abs().max().double_value(&[]);
                assert!(d < tol, "{cfg:?} {kind:?}: {d}");
            }
        }
    }

    #[test]
    fn bad_model_output_and_noise_are_errors() {
        let sampler = SamplerSettings::new(SamplerConfig::default()).unwrap();
        let err = sample(&sampler, &mut |x, _, _| x.view([-1]), &mut global_randn, &noise(Kind::Float), false).unwrap_err();
        assert!(matches!(&err, Error::Value(m) if m.contains("shape")), "{err}");
        let ints = Tensor::zeros([2, 2], (Kind::Int64, Device::Cpu));
        assert!(matches!(sample(&sampler, &mut wavy, &mut global_randn, &ints, false), Err(Error::Type(_))));
        let scalar = Tensor::scalar_tensor(1.0, (Kind::Float, Device::Cpu));
        assert!(matches!(sample(&sampler, &mut wavy, &mut global_randn, &scalar, false), Err(Error::Value(_))));
    }

    #[test]
    fn noise_must_be_given_exactly_when_the_evaluation_draws() {
        let sampler = SamplerSettings::new(SamplerConfig { sampling_steps: 2, stochast_ratio: StochastRatio::Fixed(0.5), ..Default::default() }).unwrap();
        let mut st = Stepper::new(&sampler);
        let x = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        assert!(st.evals()[0].noise);
        assert!(matches!(st.step(&x, &x, None, None), Err(Error::Value(m)) if m.contains("noise")));
        assert_eq!(st.position(), 0, "a refused step does not advance");
        let x = st.step(&x, &x, Some(&x), None).unwrap();
        let det = SamplerSettings::new(SamplerConfig { sampling_steps: 2, ..Default::default() }).unwrap();
        let mut st = Stepper::new(&det);
        assert!(st.step(&x, &x, Some(&x), None).is_err());
    }

    #[test]
    fn schedules() {
        let s = |steps, order, style| {
            let cfg = SamplerConfig { sampling_steps: steps, sampling_order: order, sampling_style: style, ..Default::default() };
            let sampler = SamplerSettings::new(cfg).unwrap();
            evaluations(sampler.config(), sampler.timesteps())
        };
        let e = s(4, 1, SamplingStyle::Any);
        assert_eq!(e.iter().map(|e| (e.t, e.tt)).collect::<Vec<_>>(), vec![(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]);
        let e = s(6, 2, SamplingStyle::Mul);
        let ts: Vec<(f64, Phase)> = e.iter().map(|e| (e.t, e.phase)).collect();
        let third = 1.0 / 3.0;
        assert_eq!(e.len(), 5);
        assert_eq!(ts[0], (1.0, Phase::Predict));
        assert!((ts[1].0 - 2.0 * third).abs() < 1e-15 && ts[1].1 == Phase::Correct);
        assert!(e.iter().all(|e| e.tt == e.t), "mul asks for the instantaneous velocity");
        assert_eq!(e[4].phase, Phase::Predict);
    }

    #[test]
    fn custom_grids_are_checked() {
        let sampler = SamplerSettings::new(SamplerConfig { sampling_order: 2, ..Default::default() }).unwrap();
        let st = Stepper::with_grid(&sampler, &[1.0, 0.6, 0.2]).unwrap();
        assert_eq!(st.grid(), &[1.0, 0.6, 0.2, 0.0]);
        assert_eq!(st.evals().len(), 5);
        for bad in [&[][..], &[0.5, 0.5], &[1.5, 0.2], &[0.4, 0.0], &[0.3, f64::NAN]] {
            assert!(Stepper::with_grid(&sampler, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stepping_past_the_end_is_an_error() {
        let sampler = SamplerSettings::new(SamplerConfig { sampling_steps: 1, ..Default::default() }).unwrap();
        let mut st = Stepper::new(&sampler);
        let x = Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let _ = st.step(&x, &x, None, None).unwrap();
        assert!(st.step(&x, &x, None, None).is_err());
        st.set_position(0).unwrap();
        assert!(st.step(&x, &x, None, None).is_ok());
    }

    #[test]
    fn a_nan_model_output_names_the_evaluation() {
        let sampler = SamplerSettings::new(SamplerConfig { sampling_steps: 3, ..Default::default() }).unwrap();
        for fused in [true, false] {
            let mut st = Stepper::new(&sampler);
            st.fused = fused;
            let x = Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu));
            let x = st.step(&x, &x, None, None).unwrap();
            let bad = Tensor::full([2, 2], f64::NAN, (tch::Kind::Float, tch::Device::Cpu));
            let err = st.step(&x, &bad, None, None).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::NonFinite(_)) && msg.contains("evaluation 2 of 3") && msg.contains("model output"), "{msg}");
            st.check_finite = false;
            st.set_position(1).unwrap();
            assert!(st.step(&x, &bad, None, None).is_ok());
        }
    }
}
