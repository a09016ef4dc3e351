//! The sampler's tensor update (docs/algorithm.md §1–§2): x̂/ẑ estimates, stochastic mix, extrapolation and the
//! Heun corrector. Each operation runs either as a fused kernel (`fused.rs`) on contiguous CPU
//! f32/f64 tensors that need no autograd, or as libtorch ops otherwise (GPU, half types,
//! strided inputs, gradients). Both compute the same expression in the same order.
//!
//! With `check`, a result holding NaN or Inf is `Error::NonFinite` (the caller adds which
//! step): the fused kernels report it from the same pass, the ops path with one reduction.

use tch::{Device, Kind, Tensor};

use crate::error::{all_finite, Error, Result};
use crate::fused::{self, In, Mix, MixIo, Out, Real};

/// Whether the kernels may read `t`'s memory directly: a dense CPU tensor with real storage
/// whose elements are what its memory holds. A zero tensor has no memory, and a view with
/// the negative or conjugate bit set stores −x or conj(x): those go through libtorch ops,
/// which apply the bits. (Nested, sparse, mkldnn, meta and functorch-wrapped tensors are
/// refused by the bindings before they get here.)
fn raw_readable(t: &Tensor) -> bool {
    t.device() == Device::Cpu
        && t.f_internal_is_zerotensor().ok() == Some(false)
        && t.f_is_neg().ok() == Some(false)
        && t.f_is_conj().ok() == Some(false)
        && t.is_contiguous()
        && !t.requires_grad()
}

/// The element type shared by `tensors` when all of them can go through a fused kernel.
fn fusable_kind(tensors: &[&Tensor]) -> Option<Kind> {
    let first = tensors.first()?;
    let kind = first.f_kind().ok()?;
    if !matches!(kind, Kind::Float | Kind::Double) {
        return None;
    }
    let numel = first.numel();
    tensors
        .iter()
        .all(|t| t.f_kind().ok() == Some(kind) && raw_readable(t) && t.numel() == numel)
        .then_some(kind)
}

/// `y`, or `Error::NonFinite` when checking and `finite()` says otherwise.
fn checked(y: Tensor, check: bool, finite: impl FnOnce(&Tensor) -> Result<bool>) -> Result<Tensor> {
    if check && !finite(&y)? {
        return Err(Error::NonFinite("the result contains NaN or Inf".into()));
    }
    Ok(y)
}

fn ptr_in<T>(t: &Tensor) -> In<T> {
    In(t.data_ptr() as *const T)
}
fn ptr_out<T>(t: &Tensor) -> Out<T> {
    Out(t.data_ptr() as *mut T)
}

/// A contiguous buffer shaped like `x`.
pub fn empty_like(x: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_empty(x.size(), (x.f_kind()?, x.device()))?)
}

/// Write `src` into `dst` (ops path).
fn store(dst: &Tensor, src: &Tensor) -> Result<()> {
    dst.shallow_clone().f_copy_(src)?;
    Ok(())
}

/// `x + f·alpha`, optionally also writing `x + f·beta` into `xh`.
/// Returns `out` when given (written in place), else a fresh tensor.
pub fn axpy(
    x: &Tensor,
    f: &Tensor,
    alpha: f64,
    xh: Option<(&Tensor, f64)>,
    out: Option<&Tensor>,
    allow_fused: bool,
    check: bool,
) -> Result<Tensor> {
    let mut all = vec![x, f];
    all.extend(xh.map(|(t, _)| t));
    all.extend(out);
    if let (true, Some(kind)) = (allow_fused, fusable_kind(&all)) {
        let y = match out {
            Some(o) => o.shallow_clone(),
            None => empty_like(x)?,
        };
        fn run<T: Real>(x: &Tensor, f: &Tensor, a: f64, xh: Option<(&Tensor, f64)>, y: &Tensor, c: bool) -> bool {
            let xh = xh.map(|(t, b)| (ptr_out::<T>(t), b));
            // SAFETY: same numel, dense CPU memory, checked by fusable_kind.
            unsafe { fused::axpy::<T>(x.numel(), ptr_in(x), ptr_in(f), a, ptr_out(y), xh, c) }
        }
        let ok = match kind {
            Kind::Float => run::<f32>(x, f, alpha, xh, &y, check),
            _ => run::<f64>(x, f, alpha, xh, &y, check),
        };
        return checked(y, check, |_| Ok(ok));
    }
    if let Some((dst, beta)) = xh {
        store(dst, &x.f_add(&f.f_mul_scalar(beta)?)?)?;
    }
    let y = x.f_add(&f.f_mul_scalar(alpha)?)?;
    let y = match out {
        Some(o) => {
            store(o, &y)?;
            o.shallow_clone()
        }
        None => y,
    };
    checked(y, check, all_finite)
}

/// Extra buffers for [`mix`].
#[derive(Default)]
pub struct MixBuffers<'a> {
    pub eps: Option<&'a Tensor>,
    /// (r, previous un-extrapolated x̂, previous un-extrapolated ẑ)
    pub extrapolate: Option<(f64, &'a Tensor, &'a Tensor)>,
    pub xh_out: Option<&'a Tensor>,
    pub zh_out: Option<&'a Tensor>,
    pub out: Option<&'a Tensor>,
}

/// x ← (1 − t_n)·x̂ + t_n·(√(1 − s)·ẑ + √s·ε), with optional extrapolation of x̂ and ẑ.
pub fn mix(x: &Tensor, f: &Tensor, m: Mix, b: MixBuffers, allow_fused: bool, check: bool) -> Result<Tensor> {
    let mut all = vec![x, f];
    all.extend(b.eps);
    if let Some((_, xp, zp)) = b.extrapolate {
        all.extend([xp, zp]);
    }
    all.extend(b.xh_out);
    all.extend(b.zh_out);
    all.extend(b.out);
    if let (true, Some(kind)) = (allow_fused, fusable_kind(&all)) {
        let y = match b.out {
            Some(o) => o.shallow_clone(),
            None => empty_like(x)?,
        };
        fn run<T: Real>(x: &Tensor, f: &Tensor, m: Mix, b: &MixBuffers, y: &Tensor, c: bool) -> bool {
            let io = MixIo::<T> {
                eps: b.eps.map(ptr_in),
                extrapolate: b.extrapolate.map(|(r, xp, zp)| (r, ptr_in(xp), ptr_in(zp))),
                xh_out: b.xh_out.map(ptr_out),
                zh_out: b.zh_out.map(ptr_out),
            };
            // SAFETY: same numel, dense CPU memory, checked by fusable_kind.
            unsafe { fused::mix::<T>(x.numel(), ptr_in(x), ptr_in(f), m, io, ptr_out(y), c) }
        }
        let ok = match kind {
            Kind::Float => run::<f32>(x, f, m, &b, &y, check),
            _ => run::<f64>(x, f, m, &b, &y, check),
        };
        return checked(y, check, |_| Ok(ok));
    }
    let mut xh = x.f_add(&f.f_mul_scalar(-m.t_cur)?)?;
    let mut zh = x.f_add(&f.f_mul_scalar(1.0 - m.t_cur)?)?;
    if let Some(o) = b.xh_out {
        store(o, &xh)?;
    }
    if let Some(o) = b.zh_out {
        store(o, &zh)?;
    }
    if let Some((r, xp, zp)) = b.extrapolate {
        xh = xh.f_add(&xh.f_sub(xp)?.f_mul_scalar(r)?)?;
        zh = zh.f_add(&zh.f_sub(zp)?.f_mul_scalar(r)?)?;
    }
    let (wa, wb, wc) = m.weights();
    let mut y = xh.f_mul_scalar(wa)?.f_add(&zh.f_mul_scalar(wb)?)?;
    if let Some(e) = b.eps {
        y = y.f_add(&e.f_mul_scalar(wc)?)?;
    }
    let y = match b.out {
        Some(o) => {
            store(o, &y)?;
            o.shallow_clone()
        }
        None => y,
    };
    checked(y, check, all_finite)
}

/// Heun corrector x_c − (t_c − t_n)·½·(F_c + F_n), written as x + (F_c + F_n)·(−h).
#[allow(clippy::too_many_arguments)]
pub fn heun(
    x: &Tensor,
    f_cur: &Tensor,
    f_next: &Tensor,
    t_cur: f64,
    t_next: f64,
    allow_fused: bool,
    check: bool,
) -> Result<Tensor> {
    let h = 0.5 * (t_cur - t_next);
    if let (true, Some(kind)) = (allow_fused, fusable_kind(&[x, f_cur, f_next])) {
        let y = empty_like(x)?;
        fn run<T: Real>(x: &Tensor, a: &Tensor, b: &Tensor, h: f64, y: &Tensor, c: bool) -> bool {
            // SAFETY: same numel, dense CPU memory, checked by fusable_kind.
            unsafe { fused::heun::<T>(x.numel(), ptr_in(x), ptr_in(a), ptr_in(b), h, ptr_out(y), c) }
        }
        let ok = match kind {
            Kind::Float => run::<f32>(x, f_cur, f_next, h, &y, check),
            _ => run::<f64>(x, f_cur, f_next, h, &y, check),
        };
        return checked(y, check, |_| Ok(ok));
    }
    checked(x.f_add(&f_cur.f_add(f_next)?.f_mul_scalar(-h)?)?, check, all_finite)
}

/// One interval without extrapolation, the building block a scheduler needs:
/// the Euler form when s = 0, else the stochastic mix with `eps`.
pub fn ucgm_step(
    x: &Tensor,
    f: &Tensor,
    t_cur: f64,
    t_next: f64,
    s: f64,
    eps: Option<&Tensor>,
    out: Option<&Tensor>,
    allow_fused: bool,
    check: bool,
) -> Result<Tensor> {
    if s == 0.0 {
        axpy(x, f, -(t_cur - t_next), None, out, allow_fused, check)
    } else {
        let m = Mix { t_cur, t_next, s };
        mix(x, f, m, MixBuffers { eps, out, ..Default::default() }, allow_fused, check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: &[i64], kind: Kind, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (kind, Device::Cpu))
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).abs().max().double_value(&[]);
        d / (1.0 + b.abs().max().double_value(&[]))
    }

    #[test]
    fn fused_and_ops_paths_agree() {
        for (kind, tol) in [(Kind::Float, 1e-6), (Kind::Double, 1e-14)] {
            let shape = [3, 4, 70, 70]; // > one chunk, so rayon splits it
            let (x, f, e) = (rand(&shape, kind, 1), rand(&shape, kind, 2), rand(&shape, kind, 3));
            let (xp, zp) = (rand(&shape, kind, 4), rand(&shape, kind, 5));
            let run = |fused: bool| {
                let xo = empty_like(&x).unwrap();
                let zo = empty_like(&x).unwrap();
                let m = Mix { t_cur: 0.7, t_next: 0.4, s: 0.3 };
                let y = mix(&x, &f, m, MixBuffers {
                    eps: Some(&e),
                    extrapolate: Some((0.2, &xp, &zp)),
                    xh_out: Some(&xo),
                    zh_out: Some(&zo),
                    out: None,
                }, fused, true).unwrap();
                let xh = empty_like(&x).unwrap();
                let eul = axpy(&x, &f, -0.3, Some((&xh, -0.7)), None, fused, true).unwrap();
                let hn = heun(&x, &f, &e, 0.7, 0.4, fused, true).unwrap();
                let st = ucgm_step(&x, &f, 0.7, 0.4, 1.0, Some(&e), None, fused, true).unwrap();
                [y, xo, zo, eul, xh, hn, st]
            };
            let (a, b) = (run(true), run(false));
            for (p, q) in a.iter().zip(&b) {
                assert!(max_rel(p, q) < tol, "{kind:?}: {}", max_rel(p, q));
            }
            // Spot-check the closed form of the mix.
            let xh = &x - &f * 0.7;
            let zh = &x + &f * 0.3;
            let xe = &xh + (&xh - &xp) * 0.2;
            let ze = &zh + (&zh - &zp) * 0.2;
            let want = &xe * 0.6 + (&ze * 0.7f64.sqrt() + &e * 0.3f64.sqrt()) * 0.4;
            assert!(max_rel(&a[0], &want) < tol * 10.0);
        }
    }

    #[test]
    fn strided_half_and_grad_inputs_take_the_ops_path() {
        let x = rand(&[4, 6], Kind::Float, 1);
        let f = rand(&[6, 4], Kind::Float, 2).tr(); // non-contiguous
        let y = axpy(&x, &f, -0.5, None, None, true, true).unwrap();
        assert!(max_rel(&y, &(&x - &f * 0.5)) < 1e-7);
        let xb = x.to_kind(Kind::BFloat16);
        let yb = axpy(&xb, &xb, -0.5, None, None, true, true).unwrap();
        assert_eq!(yb.kind(), Kind::BFloat16);
        let w = x.copy().set_requires_grad(true);
        let yg = ucgm_step(&w, &f, 0.5, 0.0, 0.0, None, None, true, true).unwrap();
        assert!(yg.requires_grad(), "autograd must see the step");
    }

    #[test]
    fn writes_into_out_and_in_place() {
        let x = rand(&[2, 3, 100, 100], Kind::Float, 1);
        let f = rand(&[2, 3, 100, 100], Kind::Float, 2);
        let want = &x - &f * 0.25;
        let out = empty_like(&x).unwrap();
        let y = ucgm_step(&x, &f, 0.5, 0.25, 0.0, None, Some(&out), true, true).unwrap();
        assert_eq!(y.data_ptr(), out.data_ptr());
        assert!(max_rel(&out, &want) < 1e-7);
        let xi = x.copy();
        let _ = ucgm_step(&xi, &f, 0.5, 0.25, 0.0, None, Some(&xi), true, true).unwrap();
        assert!(max_rel(&xi, &want) < 1e-7);
    }

    #[test]
    fn neg_bit_and_zero_tensors_take_the_ops_path() {
        let x = rand(&[3, 40000], Kind::Float, 1);
        let f = rand(&[3, 40000], Kind::Float, 2);
        // A view whose memory holds f but whose value is −f.
        let neg = f.f_internal_neg_view().unwrap();
        assert!(neg.f_is_neg().unwrap());
        let y = ucgm_step(&x, &neg, 0.5, 0.25, 0.0, None, None, true, true).unwrap();
        assert!(max_rel(&y, &(&x + &f * 0.25)) < 1e-7, "the neg bit was ignored");
        let z = Tensor::f_internal_efficientzerotensor([3, 40000], (Kind::Float, Device::Cpu)).unwrap();
        let y = ucgm_step(&x, &z, 0.5, 0.25, 0.0, None, None, true, true).unwrap();
        assert!(max_rel(&y, &x) < 1e-7);
    }

    #[test]
    fn non_finite_results_are_reported_on_both_paths() {
        let x = rand(&[2, 40000], Kind::Float, 1);
        let f = rand(&[2, 40000], Kind::Float, 2);
        let _ = f.get(1).get(12345).f_fill_(f64::NAN).unwrap();
        for fused in [true, false] {
            let e = ucgm_step(&x, &f, 0.5, 0.25, 0.0, None, None, fused, true).unwrap_err();
            assert!(matches!(e, Error::NonFinite(_)), "{e}");
            let e = heun(&x, &f, &x, 0.5, 0.25, fused, true).unwrap_err();
            assert!(matches!(e, Error::NonFinite(_)), "{e}");
            let m = Mix { t_cur: 0.7, t_next: 0.4, s: 0.3 };
            let e = mix(&x, &f, m, MixBuffers { eps: Some(&x), ..Default::default() }, fused, true).unwrap_err();
            assert!(matches!(e, Error::NonFinite(_)), "{e}");
            // Unchecked: the NaN passes through.
            assert!(ucgm_step(&x, &f, 0.5, 0.25, 0.0, None, None, fused, false).is_ok());
        }
    }
}
