//! Training targets (docs/algorithm.md §3.3–3.4): guidance-enhanced target and the N-th order RCGM target.
//! Everything here runs without gradient; tensors are in the compute kind (f32/f64).

use tch::Tensor;

use crate::error::{Error, Result};

/// [n] → [n, 1, …, 1] to broadcast a per-row value over a sample of `dim` dimensions.
pub fn rows(v: &Tensor, dim: usize) -> Result<Tensor> {
    let mut shape = vec![-1i64];
    shape.resize(dim.max(1), 1);
    Ok(v.f_view(shape.as_slice())?)
}

/// docs/algorithm.md §3.3 on the rows given: where lo < t < hi, target + enr·(v_c − v_u), or with
/// `replace` (emd = 1 and use_image_free) v_u + enr·(v_c − v_u).
pub fn enhanced_target(
    target: &Tensor,
    v_c: &Tensor,
    v_u: &Tensor,
    t: &Tensor,
    enr: f64,
    (lo, hi): (f64, f64),
    replace: bool,
) -> Result<Tensor> {
    let mask = rows(&t.f_gt(lo)?.f_logical_and(&t.f_lt(hi)?)?, target.dim())?;
    let guide = v_c.f_sub(v_u)?.f_mul_scalar(enr)?;
    let new = if replace { v_u.f_add(&guide)? } else { target.f_add(&guide)? };
    Ok(new.f_where_self(&mask, target)?)
}

/// docs/algorithm.md §3.4 as a walk over the teacher's N calls: [`Rcgm::next`] gives the
/// inputs (x', s_k, s_{k+1}) of call k, [`Rcgm::give`] takes the teacher's velocity there (in
/// the compute kind), and after N calls [`Rcgm::finish`] gives the target. Rows with
/// t − tt = 0 use 1/(t − tt) = 0, so no row produces NaN or Inf.
pub struct Rcgm {
    x_t: Tensor,
    target: Tensor,
    f: Tensor,
    t: Tensor,
    tt: Tensor,
    t_m: Tensor,
    x: Tensor,
    p: Tensor,
    order: i64,
    k: i64,
}

impl Rcgm {
    pub fn new(x_t: &Tensor, target: &Tensor, f: &Tensor, t: &Tensor, tt: &Tensor, order: i64) -> Result<Self> {
        Ok(Self {
            t_m: t.f_sub_scalar(0.01)?.f_maximum(tt)?,
            x: x_t.f_sub(&target.f_mul_scalar(0.01)?)?,
            p: x_t.f_zeros_like()?,
            x_t: x_t.shallow_clone(),
            target: target.shallow_clone(),
            f: f.shallow_clone(),
            t: t.shallow_clone(),
            tt: tt.shallow_clone(),
            order,
            k: 0,
        })
    }

    /// s_k = (1 − k/N)·t_m + (k/N)·tt.
    fn grid(&self, k: i64) -> Result<Tensor> {
        let a = k as f64 / self.order as f64;
        Ok(self.t_m.f_mul_scalar(1.0 - a)?.f_add(&self.tt.f_mul_scalar(a)?)?)
    }

    /// The next teacher call's inputs (x', s_k, s_{k+1}); None after the N-th.
    pub fn next(&self) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        if self.k >= self.order {
            return Ok(None);
        }
        Ok(Some((self.x.shallow_clone(), self.grid(self.k)?, self.grid(self.k + 1)?)))
    }

    /// The teacher's velocity `fk` at the inputs [`Rcgm::next`] gave.
    pub fn give(&mut self, fk: &Tensor) -> Result<()> {
        if self.k >= self.order {
            return Err(Error::Value(format!("RCGM: all {} teacher calls were already given", self.order)));
        }
        let dim = self.x_t.dim();
        let (s, s_next) = (self.grid(self.k)?, self.grid(self.k + 1)?);
        let (sb, sn) = (rows(&s, dim)?, rows(&s_next, dim)?);
        let x = &self.x;
        let x_hat = x.f_sub(&sb.f_abs()?.f_mul(fk)?)?;
        let z_hat = x.f_add(&sb.f_abs()?.f_neg()?.f_add_scalar(1.0)?.f_mul(fk)?)?;
        self.x = sn.f_mul(&z_hat)?.f_add(&sn.f_neg()?.f_add_scalar(1.0)?.f_mul(&x_hat)?)?;
        self.p = self.p.f_add(&fk.f_mul(&sb.f_sub(&sn)?)?)?;
        self.k += 1;
        Ok(())
    }

    /// The RCGM target, once the N teacher calls were given.
    pub fn finish(&self) -> Result<Tensor> {
        if self.k < self.order {
            return Err(Error::Value(format!("RCGM: {} of {} teacher calls given", self.k, self.order)));
        }
        let (f, p, t, tt, target) = (&self.f, &self.p, &self.t, &self.tt, &self.target);
        let dim = self.x_t.dim();
        let diff = t.f_sub(tt)?;
        let near = t.f_lt_tensor(&tt.f_add_scalar(0.01)?)?;
        let inv = diff.f_reciprocal()?.f_where_self(&diff.f_ne(0.0)?, &diff.f_zeros_like()?)?;
        let cl = diff.f_ones_like()?.f_where_self(&near, &diff.f_mul_scalar(100.0)?)?;
        let cr = inv.f_where_self(&near, &diff.f_full_like(100.0)?)?;
        let r = f.f_mul(&rows(&cl, dim)?)?.f_sub(&p.f_mul(&rows(&cr, dim)?)?)?.f_sub(target)?;
        Ok(f.f_sub(&r.f_clamp(-1.0, 1.0)?)?)
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn v(x: &[f64]) -> Tensor {
        Tensor::from_slice(x)
    }

    #[test]
    fn enhanced_only_inside_the_range() {
        let target = Tensor::zeros([3, 2], (Kind::Double, Device::Cpu));
        let vc = Tensor::ones([3, 2], (Kind::Double, Device::Cpu));
        let vu = vc.zeros_like();
        let t = v(&[0.0, 0.5, 1.0]);
        let out = enhanced_target(&target, &vc, &vu, &t, 2.0, (0.0, 1.0), false).unwrap();
        let got: Vec<f64> = Vec::try_from(out.select(1, 0)).unwrap();
        assert_eq!(got, vec![0.0, 2.0, 0.0]);
    }

    #[test]
    fn rcgm_is_finite_when_t_equals_tt_and_exact_for_a_constant_field() {
        // Constant field c: P = c·(t_m − tt), F = c, target = c.
        let c = 0.3;
        let x = Tensor::zeros([4, 2], (Kind::Double, Device::Cpu));
        let f = x.full_like(c);
        let t = v(&[0.9, 0.5, 0.2, 0.4]);
        let tt = v(&[0.0, 0.495, 0.2, 0.1]);
        let mut r = Rcgm::new(&x, &f, &f, &t, &tt, 3).unwrap();
        assert!(r.finish().is_err(), "finish before the N calls");
        let mut calls = 0;
        while let Some((xk, _, _)) = r.next().unwrap() {
            calls += 1;
            r.give(&xk.full_like(c)).unwrap();
        }
        assert!(r.give(&x).is_err(), "a call too many");
        let out = r.finish().unwrap();
        assert_eq!(calls, 3);
        assert_eq!(out.isfinite().all().int64_value(&[]), 1);
        // Row 0 (far): cl = 90, cr = 100, P = 0.89·c, so R = 90c − 89c − c = 0.
        let want0 = c - (100.0 * 0.9 * c - 100.0 * c * (0.89 - 0.0) - c);
        assert!((out.double_value(&[0, 0]) - want0).abs() < 1e-9);
        // Row 2 (t = tt): cl = 1, cr = 0 → R = c − c = 0 → target = c.
        assert!((out.double_value(&[2, 0]) - c).abs() < 1e-12);
    }
}
