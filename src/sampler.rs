//! The UnifiedSampler loop (SPEC §2) over a [`VelocityModel`] and an [`Rng`].

use tch::{Kind, Tensor};

use crate::config::SamplerConfig;
use crate::error::{all_finite, device_name, Error, Result};
use crate::grid::time_grid;
use crate::rng::Rng;
use crate::stepper::{Phase, Stepper};

/// A velocity field `F = model(x_t, t, tt)`; `t` and `tt` have shape [B] in x's kind and device.
pub trait VelocityModel {
    fn velocity(&mut self, x: &Tensor, t: &Tensor, tt: &Tensor) -> Result<Tensor>;
}

/// A validated configuration with its time grid.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    grid: Vec<f64>,
    /// Use the fused CPU kernels where the tensors allow it (else always libtorch ops).
    pub fused: bool,
    /// Refuse non-finite noise up front and stop at the first non-finite step, naming it.
    pub check_finite: bool,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        cfg.validate()?;
        let grid = time_grid(&cfg);
        Ok(Self { cfg, grid, fused: true, check_finite: true })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// t_0 > … > t_n = 0 in f64.
    pub fn timesteps(&self) -> &[f64] {
        &self.grid
    }

    pub fn nfe(&self) -> usize {
        self.cfg.nfe()
    }

    /// Check the initial noise: a float tensor with a batch dimension.
    pub fn check_noise(noise: &Tensor) -> Result<()> {
        let kind = noise.f_kind()?;
        if !is_float(kind) {
            return Err(Error::Type(format!("noise must be a floating-point tensor, got dtype {kind:?}")));
        }
        if noise.dim() == 0 {
            return Err(Error::Value("noise must have a batch dimension (got a 0-dim tensor)".into()));
        }
        Ok(())
    }

    /// Run the sampler from `noise`. Returns the final sample x̂_{n−1}, or with `trajectory`
    /// the stack [noise, x̂_0, …, x̂_{n−1}] of shape [n + 1, *noise.shape].
    pub fn sample(
        &self,
        model: &mut dyn VelocityModel,
        rng: &mut dyn Rng,
        noise: &Tensor,
        trajectory: bool,
    ) -> Result<Tensor> {
        Self::check_noise(noise)?;
        if self.check_finite && !all_finite(noise)? {
            return Err(Error::Value("noise contains NaN or Inf".into()));
        }
        let n = self.grid.len() - 1;
        let shape = noise.size();
        let (kind, device) = (noise.f_kind()?, noise.device());
        let batch = shape[0];
        let traj = if trajectory {
            let t = Tensor::f_empty([&[n as i64 + 1], &shape[..]].concat(), (kind, device))?;
            t.f_select(0, 0)?.f_copy_(noise)?;
            Some(t)
        } else {
            None
        };
        let mut stepper = Stepper::new(self);
        let mut x = noise.shallow_clone();
        while let Some(&e) = stepper.current() {
            let tv = Tensor::f_full([batch], e.t, (kind, device))?;
            let ttv = Tensor::f_full([batch], e.tt, (kind, device))?;
            let f = checked_output(model.velocity(&x, &tv, &ttv)?, &shape, kind, device)?;
            let row = match (&traj, e.phase) {
                (Some(t), Phase::Predict) => Some(t.f_select(0, e.interval as i64 + 1)?),
                _ => None,
            };
            x = stepper.step(&x, &f, rng, row.as_ref())?;
        }
        Ok(traj.unwrap_or(x))
    }
}

/// Floating-point element types libtorch can sample in.
pub fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double)
}

/// The model output must be shaped like x_t; a float of another precision is cast.
fn checked_output(f: Tensor, shape: &[i64], kind: Kind, device: tch::Device) -> Result<Tensor> {
    if f.size() != shape {
        return Err(Error::Value(format!(
            "model returned a tensor of shape {:?}, expected {:?} (the shape of x_t)",
            f.size(),
            shape
        )));
    }
    if f.device() != device {
        return Err(Error::Value(format!(
            "model returned a tensor on {}, expected {} (the device of x_t)",
            device_name(f.device()),
            device_name(device)
        )));
    }
    let fk = f.f_kind()?;
    if !is_float(fk) {
        return Err(Error::Type(format!("model returned dtype {fk:?}, expected a floating-point tensor")));
    }
    Ok(if fk == kind { f } else { f.f_to_kind(kind)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SamplingStyle, StochastRatio};
    use crate::rng::GlobalRng;
    use tch::Device;

    /// Data concentrated at one point μ: the exact velocity is (x_t − μ)/t, so every
    /// mode of the sampler must land exactly on μ.
    struct PointMass {
        mu: f64,
        calls: Vec<(f64, f64)>,
    }
    impl VelocityModel for PointMass {
        fn velocity(&mut self, x: &Tensor, t: &Tensor, tt: &Tensor) -> Result<Tensor> {
            let tv = t.double_value(&[0]);
            self.calls.push((tv, tt.double_value(&[0])));
            Ok((x - self.mu) / tv)
        }
    }

    /// A field that depends on x, t and tt, for comparing against a hand-written loop.
    struct Wavy;
    impl VelocityModel for Wavy {
        fn velocity(&mut self, x: &Tensor, t: &Tensor, tt: &Tensor) -> Result<Tensor> {
            let t = t.view([-1, 1]);
            let tt = tt.view([-1, 1]);
            Ok(x.sin() * (&t + 1.0) + tt * 0.3 + x * 0.1)
        }
    }

    /// Deterministic pseudo-noise (tests run in parallel and would race on the global RNG).
    struct Counting(usize);
    impl Rng for Counting {
        fn rand(&mut self, _: &[i64], _: (Kind, Device)) -> Result<Tensor> {
            unreachable!("the sampler draws only normals")
        }
        fn randn(&mut self, shape: &[i64], opts: (Kind, Device)) -> Result<Tensor> {
            self.0 += 1;
            let i = Tensor::arange(shape.iter().product::<i64>(), opts).view(shape);
            Ok((i * (0.37 + self.0 as f64)).sin() * 1.5)
        }
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
            let sampler = Sampler::new(cfg.clone()).unwrap();
            let mut m = PointMass { mu: 1.5, calls: vec![] };
            let x = sampler.sample(&mut m, &mut GlobalRng, &noise(Kind::Double), false).unwrap();
            let err = (x - 1.5).abs().max().double_value(&[]);
            assert!(err < 1e-12, "{cfg:?}: {err}");
            assert_eq!(m.calls.len(), cfg.nfe(), "{cfg:?}");
        }
    }

    #[test]
    fn model_sees_the_grid_and_style_targets() {
        for (style, order) in [(SamplingStyle::Few, 1), (SamplingStyle::Mul, 2), (SamplingStyle::Any, 2)] {
            let cfg = SamplerConfig { sampling_steps: 6, sampling_order: order, sampling_style: style, ..Default::default() };
            let sampler = Sampler::new(cfg).unwrap();
            let g = sampler.timesteps().to_vec();
            let mut m = PointMass { mu: 0.0, calls: vec![] };
            let _ = sampler.sample(&mut m, &mut GlobalRng, &noise(Kind::Double), false).unwrap();
            let mut want = vec![];
            for i in 0..g.len() - 1 {
                want.push((g[i], style.target(g[i], g[i + 1])));
                if order == 2 && i + 2 < g.len() {
                    want.push((g[i + 1], style.target(g[i + 1], g[i + 1])));
                }
            }
            assert_eq!(m.calls, want);
        }
    }

    #[test]
    fn euler_matches_a_hand_written_loop_and_trajectory_layout() {
        let cfg = SamplerConfig { sampling_steps: 5, ..Default::default() };
        let sampler = Sampler::new(cfg).unwrap();
        let z = noise(Kind::Double);
        let traj = sampler.sample(&mut Wavy, &mut GlobalRng, &z, true).unwrap();
        assert_eq!(traj.size(), vec![6, 5, 3]);
        assert_eq!((traj.get(0) - &z).abs().max().double_value(&[]), 0.0);
        let g = sampler.timesteps();
        let mut x = z.copy();
        for i in 0..5 {
            let t = Tensor::full([5], g[i], (Kind::Double, Device::Cpu));
            let f = Wavy.velocity(&x, &t, &Tensor::zeros([5], (Kind::Double, Device::Cpu))).unwrap();
            let xh = &x - &f * g[i];
            assert!((traj.get(i as i64 + 1) - &xh).abs().max().double_value(&[]) < 1e-13);
            x = &x - &f * (g[i] - g[i + 1]);
        }
        let last = sampler.sample(&mut Wavy, &mut GlobalRng, &z, false).unwrap();
        assert!((last - traj.get(5)).abs().max().double_value(&[]) < 1e-15);
    }

    #[test]
    fn noise_draws_once_per_stochastic_interval_and_paths_agree() {
        for cfg in all_modes() {
            let mut sampler = Sampler::new(cfg.clone()).unwrap();
            let n = cfg.intervals();
            let g = sampler.timesteps().to_vec();
            let want = (0..n).filter(|&i| cfg.stochast_ratio.at(g[i], g[i + 1]) > 0.0).count();
            for kind in [Kind::Float, Kind::Double] {
                let mut out = vec![];
                let z = noise(kind);
                for fused in [true, false] {
                    sampler.fused = fused;
                    let mut rng = Counting(0);
                    out.push(sampler.sample(&mut Wavy, &mut rng, &z, true).unwrap());
                    assert_eq!(rng.0, want, "{cfg:?}");
                }
                let tol = if kind == Kind::Float { 1e-5 } else { 1e-12 };
                let d = (&out[0] - &out[1]).abs().max().double_value(&[]);
                assert!(d < tol, "{cfg:?} {kind:?}: {d}");
            }
        }
    }

    #[test]
    fn bad_model_output_and_noise_are_errors() {
        struct Wrong;
        impl VelocityModel for Wrong {
            fn velocity(&mut self, x: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
                Ok(x.view([-1]))
            }
        }
        let sampler = Sampler::new(SamplerConfig::default()).unwrap();
        let err = sampler.sample(&mut Wrong, &mut GlobalRng, &noise(Kind::Float), false).unwrap_err();
        assert!(matches!(&err, Error::Value(m) if m.contains("shape")), "{err}");
        let ints = Tensor::zeros([2, 2], (Kind::Int64, Device::Cpu));
        assert!(matches!(sampler.sample(&mut Wavy, &mut GlobalRng, &ints, false), Err(Error::Type(_))));
        let scalar = Tensor::scalar_tensor(1.0, (Kind::Float, Device::Cpu));
        assert!(matches!(sampler.sample(&mut Wavy, &mut GlobalRng, &scalar, false), Err(Error::Value(_))));
    }
}
