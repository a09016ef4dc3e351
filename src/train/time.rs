//! Training times (docs/algorithm.md §3.1): t ~ Beta(β1, β2)·scale, tt and t_min.

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Rounds a Gamma(a) draw may take before it is an error (each accepts a row with
/// probability > 0.95 for a ≥ 1).
pub const GAMMA_MAX_ROUNDS: usize = 1000;

/// The start of a Gamma(a ≥ 1) draw of `n` values: the output (zeros) and the rows pending.
pub fn gamma_start(n: i64, opts: (Kind, Device)) -> Result<(Tensor, Tensor)> {
    Ok((Tensor::f_zeros([n], opts)?, Tensor::f_arange(n, (Kind::Int64, opts.1))?))
}

/// One round of Marsaglia–Tsang rejection for Gamma(a ≥ 1), vectorised: `x` (normal) and `u`
/// (uniform) hold one draw per pending row; the accepted rows' values are written into `out`
/// and the rows still pending are returned.
pub fn gamma_round(out: &Tensor, pending: &Tensor, x: &Tensor, u: &Tensor, a: f64) -> Result<Tensor> {
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    let v = x.f_mul_scalar(c)?.f_add_scalar(1.0)?.f_pow_tensor_scalar(3.0)?;
    // log u < x²/2 + d − d·v + d·log v (v > 0 also keeps the log finite)
    let rhs = x.f_square()?.f_mul_scalar(0.5)?.f_add_scalar(d)?.f_sub(&v.f_mul_scalar(d)?)?
        .f_add(&v.f_clamp_min(1e-30)?.f_log()?.f_mul_scalar(d)?)?;
    let ok = v.f_gt(0.0)?.f_logical_and(&u.f_log()?.f_lt_tensor(&rhs)?)?;
    let idx = pending.f_masked_select(&ok)?;
    let mut o = out.shallow_clone();
    let _ = o.f_index_put_(&[Some(idx)], &v.f_masked_select(&ok)?.f_mul_scalar(d)?, false)?;
    Ok(pending.f_masked_select(&ok.f_logical_not()?)?)
}

/// Gamma(a < 1) from a Gamma(a + 1) draw `g` and a uniform `u`: g·u^(1/a).
pub fn gamma_boost(g: &Tensor, u: &Tensor, a: f64) -> Result<Tensor> {
    Ok(g.f_mul(&u.f_pow_tensor_scalar(1.0 / a)?)?)
}

/// Beta(β1, β2) = X/(X + Y) from X ~ Gamma(β1), Y ~ Gamma(β2).
pub fn beta_ratio(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(x.f_div(&x.f_add(&y)?.f_clamp_min(1e-30)?)?)
}

pub struct Times {
    pub t: Tensor,
    /// t − U·cor·t
    pub tt: Tensor,
    /// t − U'·t·min(0.05, cor)
    pub t_min: Tensor,
}

/// §3.1 from the draws: `raw` (U(0, 1), or Beta(β1, β2) when `time_dist_ctrl[:2] != (1, 1)`)
/// clamped to [0, 1] and scaled, then tt and t_min from the uniforms `u`, `u2`.
pub fn times_from(raw: &Tensor, u: &Tensor, u2: &Tensor, scale: f64, cor: f64) -> Result<Times> {
    let t = raw.f_clamp(0.0, 1.0)?.f_mul_scalar(scale)?;
    let tt = t.f_sub(&u.f_mul_scalar(cor)?.f_mul(&t)?)?;
    let t_min = t.f_sub(&u2.f_mul(&t)?.f_mul_scalar(cor.min(0.05))?)?;
    Ok(Times { t, tt, t_min })
}

#[cfg(test)]
mod tests {
    use super::*;

    const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

    /// The driver Python runs (twinflow/objective.py, `_gamma`), on libtorch's generator.
    fn gamma(n: i64, a: f64) -> Tensor {
        if a < 1.0 {
            let g = gamma(n, a + 1.0);
            return gamma_boost(&g, &Tensor::rand([n], F64), a).unwrap();
        }
        let (out, mut pending) = gamma_start(n, F64).unwrap();
        for _ in 0..GAMMA_MAX_ROUNDS {
            let m = pending.size()[0];
            if m == 0 {
                return out;
            }
            pending = gamma_round(&out, &pending, &Tensor::randn([m], F64), &Tensor::rand([m], F64), a).unwrap();
        }
        panic!("did not converge")
    }

    #[test]
    fn beta_moments() {
        for (a, b) in [(2.0, 5.0), (0.5, 0.5), (1.0, 3.0)] {
            let raw = beta_ratio(&gamma(40_000, a), &gamma(40_000, b)).unwrap();
            let t = times_from(&raw, &raw.zeros_like(), &raw.zeros_like(), 1.0, 1.0).unwrap().t;
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
        let r = || Tensor::rand([1000], F64);
        let s = times_from(&r(), &r(), &r(), 0.8, 1.0).unwrap();
        assert!(s.t.max().double_value(&[]) <= 0.8);
        assert_eq!(s.tt.le_tensor(&s.t).all().int64_value(&[]), 1);
        assert_eq!(s.tt.ge(0.0).all().int64_value(&[]), 1);
        let gap = (&s.t - &s.t_min).max().double_value(&[]);
        assert!(gap <= 0.05 * 0.8 + 1e-12);
    }
}
