//! Training times (docs/algorithm.md §3.1): t ~ Beta(β1, β2)·scale, tt and t_min.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Gamma(a) variates by Marsaglia–Tsang rejection, vectorised: each round draws a normal and
/// a uniform for every row still pending, in that order.
pub fn gamma(rng: &mut dyn Rng, n: i64, a: f64, opts: (Kind, Device)) -> Result<Tensor> {
    if a < 1.0 {
        // Gamma(a) = Gamma(a + 1)·U^(1/a)
        let g = gamma(rng, n, a + 1.0, opts)?;
        let u = rng.rand(&[n], opts)?;
        return Ok(g.f_mul(&u.f_pow_tensor_scalar(1.0 / a)?)?);
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    let out = Tensor::f_zeros([n], opts)?;
    let mut pending = Tensor::f_arange(n, (Kind::Int64, opts.1))?;
    for _ in 0..1000 {
        let m = pending.size()[0];
        if m == 0 {
            return Ok(out);
        }
        let x = rng.randn(&[m], opts)?;
        let u = rng.rand(&[m], opts)?;
        let v = x.f_mul_scalar(c)?.f_add_scalar(1.0)?.f_pow_tensor_scalar(3.0)?;
        // log u < x²/2 + d − d·v + d·log v (v > 0 also keeps the log finite)
        let rhs = x.f_square()?.f_mul_scalar(0.5)?.f_add_scalar(d)?.f_sub(&v.f_mul_scalar(d)?)?
            .f_add(&v.f_clamp_min(1e-30)?.f_log()?.f_mul_scalar(d)?)?;
        let ok = v.f_gt(0.0)?.f_logical_and(&u.f_log()?.f_lt_tensor(&rhs)?)?;
        let idx = pending.f_masked_select(&ok)?;
        let mut o = out.shallow_clone();
        let _ = o.f_index_put_(&[Some(idx)], &v.f_masked_select(&ok)?.f_mul_scalar(d)?, false)?;
        pending = pending.f_masked_select(&ok.f_logical_not()?)?;
    }
    Err(Error::Value("Gamma sampling did not converge (check time_dist_ctrl)".into()))
}

/// t ~ Beta(β1, β2) clamped to [0, 1], times `scale`; U(0, 1) draws when β1 = β2 = 1.
pub fn sample_t(rng: &mut dyn Rng, n: i64, [b1, b2, scale]: [f64; 3], opts: (Kind, Device)) -> Result<Tensor> {
    let beta = if b1 == 1.0 && b2 == 1.0 {
        rng.rand(&[n], opts)?
    } else {
        let x = gamma(rng, n, b1, opts)?;
        let y = gamma(rng, n, b2, opts)?;
        x.f_div(&x.f_add(&y)?.f_clamp_min(1e-30)?)?
    };
    Ok(beta.f_clamp(0.0, 1.0)?.f_mul_scalar(scale)?)
}

pub struct Times {
    pub t: Tensor,
    /// t − U·cor·t
    pub tt: Tensor,
    /// t − U'·t·min(0.05, cor)
    pub t_min: Tensor,
}

/// Draws t, then U, then U' (docs/training.md, draws 1–3).
pub fn sample_times(rng: &mut dyn Rng, n: i64, ctrl: [f64; 3], cor: f64, opts: (Kind, Device)) -> Result<Times> {
    let t = sample_t(rng, n, ctrl, opts)?;
    let u = rng.rand(&[n], opts)?;
    let u2 = rng.rand(&[n], opts)?;
    let tt = t.f_sub(&u.f_mul_scalar(cor)?.f_mul(&t)?)?;
    let t_min = t.f_sub(&u2.f_mul(&t)?.f_mul_scalar(cor.min(0.05))?)?;
    Ok(Times { t, tt, t_min })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::GlobalRng;

    const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

    #[test]
    fn beta_moments() {
        tch::manual_seed(3);
        for (a, b) in [(2.0, 5.0), (0.5, 0.5), (1.0, 3.0)] {
            let t = sample_t(&mut GlobalRng, 40_000, [a, b, 1.0], F64).unwrap();
            let mean = t.mean(Kind::Double).double_value(&[]);
            let var = t.var(false).double_value(&[]);
            let (m, v) = (a / (a + b), a * b / ((a + b).powi(2) * (a + b + 1.0)));
            assert!((mean - m).abs() < 0.01, "{a},{b}: mean {mean} vs {m}");
            assert!((var - v).abs() < 0.01, "{a},{b}: var {var} vs {v}");
            assert!(t.min().double_value(&[]) >= 0.0 && t.max().double_value(&[]) <= 1.0);
        }
    }

    #[test]
    fn tt_and_tmin_stay_below_t() {
        tch::manual_seed(4);
        let s = sample_times(&mut GlobalRng, 1000, [1.0, 1.0, 0.8], 1.0, F64).unwrap();
        assert!(s.t.max().double_value(&[]) <= 0.8);
        assert_eq!(s.tt.le_tensor(&s.t).all().int64_value(&[]), 1);
        assert_eq!(s.tt.ge(0.0).all().int64_value(&[]), 1);
        let gap = (&s.t - &s.t_min).max().double_value(&[]);
        assert!(gap <= 0.05 * 0.8 + 1e-12);
    }
}
