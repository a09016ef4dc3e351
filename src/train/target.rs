//! Training targets (docs/algorithm.md §3.3–3.4): guidance-enhanced target and the N-th order RCGM target.
//! Everything here runs without gradient; tensors are in the compute kind (f32/f64).

use tch::Tensor;

use crate::error::Result;

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

/// docs/algorithm.md §3.4. `teacher(x', s_k, s_{k+1})` returns the teacher's velocity in the compute kind.
/// Rows with t − tt = 0 use 1/(t − tt) = 0, so no row produces NaN or Inf.
pub fn rcgm_target(
    teacher: &mut dyn FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    x_t: &Tensor,
    target: &Tensor,
    f: &Tensor,
    t: &Tensor,
    tt: &Tensor,
    order: i64,
) -> Result<Tensor> {
    let dim = x_t.dim();
    let t_m = t.f_sub_scalar(0.01)?.f_maximum(tt)?;
    let mut x = x_t.f_sub(&target.f_mul_scalar(0.01)?)?;
    let mut p = x_t.f_zeros_like()?;
    let n = order as f64;
    let grid = |k: i64| -> Result<Tensor> {
        let a = k as f64 / n;
        Ok(t_m.f_mul_scalar(1.0 - a)?.f_add(&tt.f_mul_scalar(a)?)?)
    };
    for k in 0..order {
        let (s, s_next) = (grid(k)?, grid(k + 1)?);
        let fk = teacher(&x, &s, &s_next)?;
        let (sb, sn) = (rows(&s, dim)?, rows(&s_next, dim)?);
        let x_hat = x.f_sub(&sb.f_abs()?.f_mul(&fk)?)?;
        let z_hat = x.f_add(&sb.f_abs()?.f_neg()?.f_add_scalar(1.0)?.f_mul(&fk)?)?;
        x = sn.f_mul(&z_hat)?.f_add(&sn.f_neg()?.f_add_scalar(1.0)?.f_mul(&x_hat)?)?;
        p = p.f_add(&fk.f_mul(&sb.f_sub(&sn)?)?)?;
    }
    let diff = t.f_sub(tt)?;
    let near = t.f_lt_tensor(&tt.f_add_scalar(0.01)?)?;
    let inv = diff.f_reciprocal()?.f_where_self(&diff.f_ne(0.0)?, &diff.f_zeros_like()?)?;
    let cl = diff.f_ones_like()?.f_where_self(&near, &diff.f_mul_scalar(100.0)?)?;
    let cr = inv.f_where_self(&near, &diff.f_full_like(100.0)?)?;
    let r = f.f_mul(&rows(&cl, dim)?)?.f_sub(&p.f_mul(&rows(&cr, dim)?)?)?.f_sub(target)?;
    Ok(f.f_sub(&r.f_clamp(-1.0, 1.0)?)?)
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
        let mut calls = 0;
        let mut teacher = |x: &Tensor, _: &Tensor, _: &Tensor| -> Result<Tensor> {
            calls += 1;
            Ok(x.full_like(c))
        };
        let out = rcgm_target(&mut teacher, &x, &f, &f, &t, &tt, 3).unwrap();
        assert_eq!(calls, 3);
        assert_eq!(out.isfinite().all().int64_value(&[]), 1);
        // Row 0 (far): cl = 90, cr = 100, P = 0.89·c, so R = 90c − 89c − c = 0.
        let want0 = c - (100.0 * 0.9 * c - 100.0 * c * (0.89 - 0.0) - c);
        assert!((out.double_value(&[0, 0]) - want0).abs() < 1e-9);
        // Row 2 (t = tt): cl = 1, cr = 0 → R = c − c = 0 → target = c.
        assert!((out.double_value(&[2, 0]) - c).abs() < 1e-12);
    }
}
