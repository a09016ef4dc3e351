//! One model evaluation at a time (SPEC §2): the state machine behind both the sampling loop
//! (`sampler.rs`) and the diffusers scheduler, so the two cannot drift apart.
//!
//! Order 1 evaluates once per interval. Order 2 evaluates twice on every interval but the
//! last (predictor at t_c, corrector at t_n), like diffusers' FlowMatchHeun schedule.

use tch::Tensor;

use crate::config::SamplerConfig;
use crate::error::{all_finite, Error, Result};
use crate::fused::Mix;
use crate::rng::Rng;
use crate::sampler::Sampler;
use crate::step::{self, empty_like, MixBuffers};

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
}

/// The evaluation schedule of a configuration over its grid.
pub fn evaluations(cfg: &SamplerConfig, grid: &[f64]) -> Vec<Eval> {
    let n = grid.len() - 1;
    let style = cfg.sampling_style;
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        let (t_c, t_n) = (grid[i], grid[i + 1]);
        out.push(Eval { interval: i, phase: Phase::Predict, t: t_c, tt: style.target(t_c, t_n) });
        if cfg.sampling_order == 2 && i + 1 < n {
            out.push(Eval { interval: i, phase: Phase::Correct, t: t_n, tt: style.target(t_n, t_n) });
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
    pub fn new(sampler: &Sampler) -> Self {
        let cfg = sampler.config().clone();
        let grid = sampler.timesteps().to_vec();
        let evals = evaluations(&cfg, &grid);
        Self { cfg, grid, evals, fused: sampler.fused, check_finite: sampler.check_finite, next: 0, prev: None, heun: None }
    }

    /// A stepper over a given grid t_0 > … > t_{n−1} > 0 (a pipeline's own sigmas) instead of
    /// the configuration's; t_n = 0 is appended. The sampler's other settings apply.
    pub fn with_grid(sampler: &Sampler, times: &[f64]) -> Result<Self> {
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

    /// Advance by one evaluation: `f = model(x, e.t, e.tt)` for `e = self.current()`.
    /// Returns the next x; after the last evaluation the sample x̂. On a predictor
    /// evaluation x̂ (before extrapolation) is also written into `xhat_out` when given.
    pub fn step(&mut self, x: &Tensor, f: &Tensor, rng: &mut dyn Rng, xhat_out: Option<&Tensor>) -> Result<Tensor> {
        let e = *self.current().ok_or_else(|| {
            Error::Value(format!("all {} evaluations are done: set the timesteps again", self.evals.len()))
        })?;
        let k = self.next;
        self.next += 1;
        self.advance(e, x, f, rng, xhat_out).map_err(|err| match err {
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

    fn advance(&mut self, e: Eval, x: &Tensor, f: &Tensor, rng: &mut dyn Rng, xhat_out: Option<&Tensor>) -> Result<Tensor> {
        let check = self.check_finite;
        let (i, n) = (e.interval, self.grid.len() - 1);
        let (t_c, t_n) = (self.grid[i], self.grid[i + 1]);
        let (r, fused) = (self.cfg.extrapol_ratio, self.fused);
        if e.phase == Phase::Correct {
            let (x_c, f_c) = self.heun.take().ok_or_else(|| {
                Error::Value("a corrector evaluation needs the predictor of the same interval first".into())
            })?;
            return step::heun(&x_c, &f_c, f, t_c, t_n, fused, check);
        }
        let s = self.cfg.stochast_ratio.at(t_c, t_n);
        let eps = if s > 0.0 { Some(rng.randn(&x.size(), (x.f_kind()?, x.device()))?) } else { None };
        if i + 1 == n {
            // The sample is x̂ of the last interval, before extrapolation; ε was still drawn to
            // keep the generator's stream as the spec has it.
            return step::axpy(x, f, -t_c, None, xhat_out, fused, check);
        }
        let extrapolate = if r > 0.0 && i >= 2 { self.prev.as_ref() } else { None };
        let keep = r > 0.0 && i >= 1;
        let x_new = if s == 0.0 && extrapolate.is_none() && !keep {
            step::axpy(x, f, -(t_c - t_n), xhat_out.map(|t| (t, -t_c)), None, fused, check)?
        } else {
            let xh_out = match (xhat_out, keep) {
                (Some(t), _) => Some(t.shallow_clone()),
                (None, true) => Some(empty_like(x)?),
                (None, false) => None,
            };
            let zh_out = if keep { Some(empty_like(x)?) } else { None };
            let y = step::mix(
                x,
                f,
                Mix { t_cur: t_c, t_next: t_n, s },
                MixBuffers {
                    eps: eps.as_ref(),
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
    use crate::config::SamplingStyle;

    #[test]
    fn schedules() {
        let s = |steps, order, style| {
            let cfg = SamplerConfig { sampling_steps: steps, sampling_order: order, sampling_style: style, ..Default::default() };
            let sampler = Sampler::new(cfg).unwrap();
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
        let sampler = Sampler::new(SamplerConfig { sampling_order: 2, ..Default::default() }).unwrap();
        let st = Stepper::with_grid(&sampler, &[1.0, 0.6, 0.2]).unwrap();
        assert_eq!(st.grid(), &[1.0, 0.6, 0.2, 0.0]);
        assert_eq!(st.evals().len(), 5);
        for bad in [&[][..], &[0.5, 0.5], &[1.5, 0.2], &[0.4, 0.0], &[0.3, f64::NAN]] {
            assert!(Stepper::with_grid(&sampler, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stepping_past_the_end_is_an_error() {
        let sampler = Sampler::new(SamplerConfig { sampling_steps: 1, ..Default::default() }).unwrap();
        let mut st = Stepper::new(&sampler);
        let x = Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let _ = st.step(&x, &x, &mut crate::rng::GlobalRng, None).unwrap();
        assert!(st.step(&x, &x, &mut crate::rng::GlobalRng, None).is_err());
        st.set_position(0).unwrap();
        assert!(st.step(&x, &x, &mut crate::rng::GlobalRng, None).is_ok());
    }

    #[test]
    fn a_nan_model_output_names_the_evaluation() {
        let sampler = Sampler::new(SamplerConfig { sampling_steps: 3, ..Default::default() }).unwrap();
        for fused in [true, false] {
            let mut st = Stepper::new(&sampler);
            st.fused = fused;
            let x = Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu));
            let x = st.step(&x, &x, &mut crate::rng::GlobalRng, None).unwrap();
            let bad = Tensor::full([2, 2], f64::NAN, (tch::Kind::Float, tch::Device::Cpu));
            let err = st.step(&x, &bad, &mut crate::rng::GlobalRng, None).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::NonFinite(_)) && msg.contains("evaluation 2 of 3") && msg.contains("model output"), "{msg}");
            st.check_finite = false;
            st.set_position(1).unwrap();
            assert!(st.step(&x, &bad, &mut crate::rng::GlobalRng, None).is_ok());
        }
    }
}
