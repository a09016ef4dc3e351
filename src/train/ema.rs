//! EMA teacher (docs/algorithm.md §3.2): warm-up decay schedule and the in-place update.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::Result;

/// d starts at 0 and moves halfway towards the target rate after each update:
/// d ← d + (1 − d)(emd − d)/2 (so the first update copies the weights).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmaSchedule {
    pub rate: f64,
    /// The decay the next update uses.
    pub decay: f64,
    pub updates: u64,
}

impl EmaSchedule {
    pub fn new(rate: f64) -> Self {
        Self { rate, decay: 0.0, updates: 0 }
    }

    /// The decay for this update; advances the schedule.
    pub fn advance(&mut self) -> f64 {
        let d = self.decay;
        self.decay = d + (1.0 - d) * (self.rate - d) / 2.0;
        self.updates += 1;
        d
    }
}

/// ema ← d·ema + (1 − d)·θ for each pair, in place, outside autograd.
pub fn ema_update(ema: &[Tensor], online: &[Tensor], d: f64) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (e, p) in ema.iter().zip(online) {
        let mut e = e.shallow_clone();
        let _ = e.f_mul_scalar_(d)?;
        let _ = e.f_add_(&p.f_mul_scalar(1.0 - d)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn warmup_sequence() {
        let mut s = EmaSchedule::new(0.99);
        let d: Vec<f64> = (0..4).map(|_| s.advance()).collect();
        assert_eq!(d[0], 0.0);
        assert!((d[1] - 0.495).abs() < 1e-12);
        assert!((d[2] - 0.619_987_5).abs() < 1e-9, "{d:?}");
        assert!(d[3] > d[2] && d[3] < 0.99);
    }

    #[test]
    fn update_in_place() {
        let e = Tensor::full([3], 2.0, (Kind::Float, Device::Cpu));
        let p = Tensor::full([3], 4.0, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        ema_update(&[e.shallow_clone()], &[p.shallow_clone()], 0.75).unwrap();
        assert_eq!(e.double_value(&[1]), 2.5);
        ema_update(&[e.shallow_clone()], &[p], 0.0).unwrap();
        assert_eq!(e.double_value(&[0]), 4.0);
        assert!(!e.requires_grad());
    }
}
