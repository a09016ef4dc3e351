//! Fused single-pass CPU kernels for the sampler update (docs/algorithm.md §2).
//!
//! Each kernel reads its inputs once and writes its outputs once, which on CPU runs at
//! memory speed instead of the 5–8 passes (and fresh temporaries) of a sequence of torch ops.
//! Parallelism comes from `pool.rs`.
//! Every kernel also reports whether all of its outputs are finite. The loop that computes
//! them is the unchecked one; after each block of `CHECK_BLOCK` outputs, still in L1 cache,
//! a separate OR-reduction of "exponent all ones" over their bits flags a NaN or Inf. Both
//! loops vectorise on plain x86-64, so the check costs a read from cache, not a second pass
//! over memory (an `ok &= y.is_finite()` in the computing loop cost up to 3× the unchecked
//! kernel; `bench/sampler_step.py` measures both).
//! The arithmetic is done in the element type with f64 coefficients rounded once, in the
//! same order as the ops path in `step.rs`, so the two paths agree to rounding.
//!
//! Pointers, not slices: an output may be the very buffer of an input (in-place step),
//! which Rust references must not alias. Element `j` of every output depends only on
//! element `j` of the inputs, so in-place use is well defined.

use std::ops::{Add, Mul, Sub};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::pool::for_chunks;

/// The float element types the kernels support.
pub trait Real:
    Copy + Send + Sync + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + 'static
{
    fn from_f64(v: f64) -> Self;
    /// Whether every value of `s` is finite (no NaN, no ±Inf).
    fn all_finite(s: &[Self]) -> bool;
}
impl Real for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn all_finite(s: &[Self]) -> bool {
        const EXP: u32 = 0x7f80_0000;
        s.iter().fold(0u32, |a, v| a | ((v.to_bits() & EXP) == EXP) as u32) == 0
    }
}
impl Real for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn all_finite(s: &[Self]) -> bool {
        const EXP: u64 = 0x7ff0_0000_0000_0000;
        s.iter().fold(0u64, |a, v| a | ((v.to_bits() & EXP) == EXP) as u64) == 0
    }
}

/// Outputs per finite check: small enough to be re-read from L1 cache (4 KiB of f32).
const CHECK_BLOCK: usize = 1024;

/// `for_chunks` whose body returns "all finite" for its range; true when every range was.
fn for_chunks_finite<F: Fn(usize, usize) -> bool + Sync>(len: usize, body: F) -> bool {
    let ok = AtomicBool::new(true);
    for_chunks(len, |lo, hi| {
        if !body(lo, hi) {
            ok.store(false, Ordering::Relaxed);
        }
    });
    ok.into_inner()
}

/// `out[j] = value(j)` for every j < len; returns whether every value is finite (always true
/// unless `check`). The loop is monomorphised on `check` so the unchecked one has no test.
///
/// # Safety
/// `out` is valid for `len` elements, and so is whatever `value` reads at each j.
#[inline(always)]
unsafe fn store_each<T: Real, V: Fn(usize) -> T + Sync>(len: usize, out: Out<T>, check: bool, value: V) -> bool {
    #[inline(always)]
    unsafe fn run<T: Real, V: Fn(usize) -> T + Sync, const CHECK: bool>(len: usize, out: Out<T>, value: V) -> bool {
        for_chunks_finite(len, move |lo, hi| {
            let mut ok = true;
            let mut b = lo;
            while b < hi {
                let e = if CHECK { (b + CHECK_BLOCK).min(hi) } else { hi };
                for j in b..e {
                    out.set(j, value(j));
                }
                if CHECK {
                    // SAFETY: out[b..e] was just written by this task alone (ranges are disjoint).
                    ok &= T::all_finite(std::slice::from_raw_parts(out.0.add(b), e - b));
                }
                b = e;
            }
            ok
        })
    }
    if check {
        run::<T, V, true>(len, out, value)
    } else {
        run::<T, V, false>(len, out, value)
    }
}

#[derive(Clone, Copy)]
pub struct In<T>(pub *const T);
#[derive(Clone, Copy)]
pub struct Out<T>(pub *mut T);
// SAFETY: tasks touch disjoint index ranges; see the module comment.
unsafe impl<T> Send for In<T> {}
unsafe impl<T> Sync for In<T> {}
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T: Copy> In<T> {
    #[inline(always)]
    unsafe fn at(self, j: usize) -> T {
        self.0.add(j).read()
    }
}
impl<T: Copy> Out<T> {
    #[inline(always)]
    unsafe fn set(self, j: usize, v: T) {
        self.0.add(j).write(v)
    }
}

/// `out = x + f·alpha`, and optionally `xh = x + f·beta` in the same pass. Returns whether
/// every `out` value is finite (always true unless `check`).
///
/// Euler step: alpha = −(t_c − t_n); data estimate x̂: beta = −t_c.
///
/// # Safety
/// Every pointer is valid for `len` elements; outputs do not overlap each other, and an
/// output overlaps an input only at identical addresses.
pub unsafe fn axpy<T: Real>(
    len: usize,
    x: In<T>,
    f: In<T>,
    alpha: f64,
    out: Out<T>,
    xh: Option<(Out<T>, f64)>,
    check: bool,
) -> bool {
    let a = T::from_f64(alpha);
    match xh {
        None => store_each(len, out, check, move |j| x.at(j) + f.at(j) * a),
        Some((xh, beta)) => {
            let b = T::from_f64(beta);
            store_each(len, out, check, move |j| {
                let (xv, fv) = (x.at(j), f.at(j));
                xh.set(j, xv + fv * b);
                xv + fv * a
            })
        }
    }
}

/// Coefficients of the stochastic update from t_c to t_n with ratio s:
/// x ← (1 − t_n)·x̂ + t_n·(√(1 − s)·ẑ + √s·ε).
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub t_cur: f64,
    pub t_next: f64,
    pub s: f64,
}

impl Mix {
    /// (x̂ coefficient, ẑ coefficient, ε coefficient)
    pub fn weights(&self) -> (f64, f64, f64) {
        (
            1.0 - self.t_next,
            self.t_next * (1.0 - self.s).sqrt(),
            self.t_next * self.s.sqrt(),
        )
    }
}

/// Buffers of the mix kernel beyond x and F.
pub struct MixIo<T> {
    /// ε, when s > 0.
    pub eps: Option<In<T>>,
    /// (ratio r, previous x̂, previous ẑ): extrapolate x̂ += r(x̂ − x̂_prev), same for ẑ.
    pub extrapolate: Option<(f64, In<T>, In<T>)>,
    /// Where to store the un-extrapolated x̂ and ẑ (trajectory, next step's extrapolation).
    pub xh_out: Option<Out<T>>,
    pub zh_out: Option<Out<T>>,
}

/// The general update in one pass: estimates, optional extrapolation, optional noise.
/// Returns whether every `out` value is finite (always true unless `check`).
///
/// # Safety
/// As for [`axpy`].
pub unsafe fn mix<T: Real>(len: usize, x: In<T>, f: In<T>, m: Mix, io: MixIo<T>, out: Out<T>, check: bool) -> bool {
    // Monomorphise on which buffers are present so the inner loop has no branches.
    match (io.eps.is_some(), io.extrapolate.is_some()) {
        (false, false) => mix_impl::<T, false, false>(len, x, f, m, io, out, check),
        (true, false) => mix_impl::<T, true, false>(len, x, f, m, io, out, check),
        (false, true) => mix_impl::<T, false, true>(len, x, f, m, io, out, check),
        (true, true) => mix_impl::<T, true, true>(len, x, f, m, io, out, check),
    }
}

#[inline(always)]
unsafe fn mix_impl<T: Real, const EPS: bool, const EXT: bool>(
    len: usize,
    x: In<T>,
    f: In<T>,
    m: Mix,
    io: MixIo<T>,
    out: Out<T>,
    check: bool,
) -> bool {
    let c = T::from_f64;
    let (neg_t, one_minus_t) = (c(-m.t_cur), c(1.0 - m.t_cur));
    let (wa, wb, wc) = m.weights();
    let (wa, wb, wc) = (c(wa), c(wb), c(wc));
    let eps = io.eps.unwrap_or(In(std::ptr::null()));
    let (r, xp, zp) = io
        .extrapolate
        .map(|(r, xp, zp)| (c(r), xp, zp))
        .unwrap_or((c(0.0), In(std::ptr::null()), In(std::ptr::null())));
    let (xo, zo) = (io.xh_out, io.zh_out);
    store_each(len, out, check, move |j| {
        let (xv, fv) = (x.at(j), f.at(j));
        let mut xh = xv + fv * neg_t;
        let mut zh = xv + fv * one_minus_t;
        if let Some(o) = xo {
            o.set(j, xh);
        }
        if let Some(o) = zo {
            o.set(j, zh);
        }
        if EXT {
            xh = xh + (xh - xp.at(j)) * r;
            zh = zh + (zh - zp.at(j)) * r;
        }
        let mut y = xh * wa + zh * wb;
        if EPS {
            y = y + eps.at(j) * wc;
        }
        y
    })
}

/// Heun corrector: `out = x + (f_cur + f_next)·(−h)`, h = ½(t_c − t_n). Returns whether
/// every `out` value is finite (always true unless `check`).
///
/// # Safety
/// As for [`axpy`].
pub unsafe fn heun<T: Real>(len: usize, x: In<T>, f_cur: In<T>, f_next: In<T>, h: f64, out: Out<T>, check: bool) -> bool {
    let nh = T::from_f64(-h);
    store_each(len, out, check, move |j| x.at(j) + (f_cur.at(j) + f_next.at(j)) * nh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f64> {
        // Small LCG: deterministic values in [-2, 2) without extra crates.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn axpy_matches_scalar_formula_across_chunks() {
        let n = 3 * 32768 + 17;
        let (x, f) = (data(n, 1), data(n, 2));
        let (mut out, mut xh) = (vec![0.0; n], vec![0.0; n]);
        unsafe {
            axpy(n, In(x.as_ptr()), In(f.as_ptr()), -0.25, Out(out.as_mut_ptr()), Some((Out(xh.as_mut_ptr()), -0.75)), true);
        }
        for j in 0..n {
            assert_eq!(out[j], x[j] + f[j] * -0.25);
            assert_eq!(xh[j], x[j] + f[j] * -0.75);
        }
    }

    #[test]
    fn mix_matches_scalar_formula() {
        let n = 2 * 32768 + 3;
        let (x, f, e, xp, zp) = (data(n, 1), data(n, 2), data(n, 3), data(n, 4), data(n, 5));
        let m = Mix { t_cur: 0.8, t_next: 0.3, s: 0.6 };
        let (mut out, mut xo, mut zo) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let io = MixIo {
            eps: Some(In(e.as_ptr())),
            extrapolate: Some((0.5, In(xp.as_ptr()), In(zp.as_ptr()))),
            xh_out: Some(Out(xo.as_mut_ptr())),
            zh_out: Some(Out(zo.as_mut_ptr())),
        };
        unsafe { mix(n, In(x.as_ptr()), In(f.as_ptr()), m, io, Out(out.as_mut_ptr()), true) };
        for j in 0..n {
            let xh = x[j] - 0.8 * f[j];
            let zh = x[j] + 0.2 * f[j];
            assert!((xo[j] - xh).abs() < 1e-14 && (zo[j] - zh).abs() < 1e-14);
            let xe = xh + 0.5 * (xh - xp[j]);
            let ze = zh + 0.5 * (zh - zp[j]);
            let want = 0.7 * xe + 0.3 * (0.4f64.sqrt() * ze + 0.6f64.sqrt() * e[j]);
            assert!((out[j] - want).abs() < 1e-13, "{j}: {} vs {want}", out[j]);
        }
    }

    #[test]
    fn finite_flag_reports_a_single_nan_or_inf_in_any_chunk() {
        let n = 3 * 32768 + 17;
        let f = data(n, 2);
        // chunk and CHECK_BLOCK edges included: the first and last element of a block
        let edges = [(0, f64::NAN), (CHECK_BLOCK - 1, f64::INFINITY), (CHECK_BLOCK, f64::NAN), (32767, f64::NAN)];
        for (pos, bad) in [(5, f64::NAN), (n - 1, f64::INFINITY), (40000, f64::NEG_INFINITY)].into_iter().chain(edges) {
            let mut x = data(n, 1);
            let mut out = vec![0.0; n];
            let ok = unsafe { axpy(n, In(x.as_ptr()), In(f.as_ptr()), -0.25, Out(out.as_mut_ptr()), None, true) };
            assert!(ok);
            x[pos] = bad;
            let ok = unsafe { axpy(n, In(x.as_ptr()), In(f.as_ptr()), -0.25, Out(out.as_mut_ptr()), None, true) };
            assert!(!ok, "{pos}");
            let ok = unsafe { heun(n, In(x.as_ptr()), In(f.as_ptr()), In(f.as_ptr()), 0.1, Out(out.as_mut_ptr()), true) };
            assert!(!ok, "{pos}");
            let m = Mix { t_cur: 0.8, t_next: 0.3, s: 0.0 };
            let io = MixIo { eps: None, extrapolate: None, xh_out: None, zh_out: None };
            let ok = unsafe { mix(n, In(x.as_ptr()), In(f.as_ptr()), m, io, Out(out.as_mut_ptr()), true) };
            assert!(!ok, "{pos}");
        }
    }

    #[test]
    fn finite_flag_in_f32_with_signalling_and_negative_nans() {
        let n = 2 * CHECK_BLOCK + 3;
        let f = vec![0.5f32; n];
        let bads = [f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), f32::INFINITY, f32::NEG_INFINITY];
        for (k, bad) in bads.into_iter().enumerate() {
            let mut x = vec![1.0f32; n];
            let mut out = vec![0.0f32; n];
            let ok = unsafe { axpy(n, In(x.as_ptr()), In(f.as_ptr()), -0.25, Out(out.as_mut_ptr()), None, true) };
            assert!(ok);
            x[(k * 977) % n] = bad;
            let ok = unsafe { axpy(n, In(x.as_ptr()), In(f.as_ptr()), -0.25, Out(out.as_mut_ptr()), None, true) };
            assert!(!ok, "{bad:?}");
            // the largest finite value stays finite
            x[(k * 977) % n] = f32::MAX;
            let ok = unsafe { axpy(n, In(x.as_ptr()), In(f.as_ptr()), 0.0, Out(out.as_mut_ptr()), None, true) };
            assert!(ok);
        }
    }

    #[test]
    fn in_place_and_f32() {
        let n = 32768 + 5;
        let x: Vec<f32> = data(n, 7).into_iter().map(|v| v as f32).collect();
        let f: Vec<f32> = data(n, 8).into_iter().map(|v| v as f32).collect();
        let mut y = x.clone();
        let p = y.as_mut_ptr();
        unsafe { heun(n, In(p as *const f32), In(f.as_ptr()), In(f.as_ptr()), 0.1, Out(p), true) };
        for j in 0..n {
            assert_eq!(y[j], x[j] + (f[j] + f[j]) * -0.1f32);
        }
    }
}
