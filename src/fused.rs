//! Fused single-pass CPU kernels for the sampler update (docs/algorithm.md §2).
//!
//! Each kernel reads its inputs once and writes its outputs once, which on CPU runs at
//! memory speed instead of the 5–8 passes (and fresh temporaries) of a sequence of torch ops.
//! Parallelism comes from `pool.rs`; the SIMD vectors from `lanes.rs`.
//!
//! Every kernel also reports whether all of its outputs are finite. Each output vector is
//! folded into a running summary (one add per vector, see `lanes.rs`); once per block of
//! `CHECK_BLOCK` outputs the summary is looked at, and only a suspect block is re-read from
//! L1 cache and checked value by value. Measured with `bench/sampler_step.py`, which times
//! both: a per-output test in the loop cost 1.3–3× the unchecked kernel, and re-reading
//! every block 1.5–1.75×.
//! The arithmetic is done in the element type with f64 coefficients rounded once, in the
//! same order as the ops path in `step.rs`, so the two paths agree to rounding; vector lanes
//! round exactly as scalars do (no fused multiply-add).
//!
//! Pointers, not slices: an output may be the very buffer of an input (in-place step),
//! which Rust references must not alias. Element `j` of every output depends only on
//! element `j` of the inputs, and a kernel reads all inputs of a vector before it writes
//! any output of it, so in-place use is well defined.

use std::ops::{Add, Mul, Sub};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::lanes::Lanes;
use crate::pool::for_chunks;

/// The float element types the kernels support.
pub trait Real:
    Copy + Send + Sync + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Lanes<Self> + 'static
{
    /// The SIMD vector the kernels use for this type.
    type V: Lanes<Self>;
    fn from_f64(v: f64) -> Self;
    fn is_finite(self) -> bool;
}
impl Real for f32 {
    #[cfg(target_arch = "x86_64")]
    type V = crate::lanes::F32x4;
    #[cfg(not(target_arch = "x86_64"))]
    type V = f32;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}
impl Real for f64 {
    #[cfg(target_arch = "x86_64")]
    type V = crate::lanes::F64x2;
    #[cfg(not(target_arch = "x86_64"))]
    type V = f64;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// Outputs per look at the summary: small enough that a suspect block is re-read from L1
/// cache (4 KiB of f32).
const CHECK_BLOCK: usize = 1024;

/// One fused update, a vector at a time.
trait Kernel<T: Real>: Copy + Sync {
    /// Output elements `j..j + L::N` (and those of any side output). Reads every input of the
    /// vector before it writes anything.
    ///
    /// # Safety
    /// Every buffer is valid for `j + L::N` elements.
    unsafe fn at<L: Lanes<T>>(&self, j: usize) -> L;
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
    unsafe fn get<L: Lanes<T>>(self, j: usize) -> L {
        L::load(self.0.add(j))
    }
}
impl<T: Copy> Out<T> {
    #[inline(always)]
    unsafe fn put<L: Lanes<T>>(self, j: usize, v: L) {
        v.store(self.0.add(j))
    }
}

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

/// Runs `k` over `len` elements into `out`: vectors of `T::V`, two per iteration, then the
/// scalar tail. Returns whether every output is finite (always true unless `check`); the
/// loop is monomorphised on `check`, so the unchecked one has no summary.
///
/// # Safety
/// `out` and every buffer `k` touches are valid for `len` elements.
#[inline(always)]
unsafe fn run<T: Real, K: Kernel<T>>(len: usize, out: Out<T>, check: bool, k: K) -> bool {
    #[inline(always)]
    unsafe fn go<T: Real, K: Kernel<T>, const CHECK: bool>(len: usize, out: Out<T>, k: &K) -> bool {
        let n = T::V::N;
        for_chunks_finite(len, move |lo, hi| {
            // A local copy: the compiler cannot prove that the output stores leave a kernel
            // behind a reference unchanged, and would reload its pointers and constants on
            // every vector (measured 1.45× slower).
            let k = *k;
            let mut ok = true;
            let mut b = lo;
            while b < hi {
                let e = if CHECK { (b + CHECK_BLOCK).min(hi) } else { hi };
                let (mut acc0, mut acc1, mut tail) = (T::V::acc0(), T::V::acc0(), <T as Lanes<T>>::acc0());
                let mut j = b;
                while j + 2 * n <= e {
                    let (y0, y1) = (k.at::<T::V>(j), k.at::<T::V>(j + n));
                    out.put(j, y0);
                    out.put(j + n, y1);
                    if CHECK {
                        acc0 = y0.fold(acc0);
                        acc1 = y1.fold(acc1);
                    }
                    j += 2 * n;
                }
                while j < e {
                    let y = k.at::<T>(j);
                    out.put(j, y);
                    if CHECK {
                        tail = y.fold(tail);
                    }
                    j += 1;
                }
                if CHECK && (T::V::suspect(acc0) || T::V::suspect(acc1) || <T as Lanes<T>>::suspect(tail)) {
                    // A NaN or Inf among the outputs, or finite ones whose sum overflowed.
                    // SAFETY: out[b..e] was just written by this task alone (ranges are disjoint).
                    ok &= std::slice::from_raw_parts(out.0.add(b), e - b).iter().all(|v| v.is_finite());
                }
                b = e;
            }
            ok
        })
    }
    if check {
        go::<T, K, true>(len, out, &k)
    } else {
        go::<T, K, false>(len, out, &k)
    }
}

/// `x + f·a`, and `x + f·b` into `xh` when XH.
#[derive(Clone, Copy)]
struct Axpy<T, const XH: bool> {
    x: In<T>,
    f: In<T>,
    a: T,
    xh: Out<T>,
    b: T,
}
unsafe impl<T, const XH: bool> Sync for Axpy<T, XH> {}
impl<T: Real, const XH: bool> Kernel<T> for Axpy<T, XH> {
    #[inline(always)]
    unsafe fn at<L: Lanes<T>>(&self, j: usize) -> L {
        let (x, f) = (self.x.get::<L>(j), self.f.get::<L>(j));
        if XH {
            self.xh.put(j, x + f * L::splat(self.b));
        }
        x + f * L::splat(self.a)
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
        None => run(len, out, check, Axpy::<T, false> { x, f, a, xh: Out(std::ptr::null_mut()), b: a }),
        Some((xh, beta)) => run(len, out, check, Axpy::<T, true> { x, f, a, xh, b: T::from_f64(beta) }),
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

/// The mix for one combination of present buffers (ε, extrapolation, x̂ out, ẑ out), so
/// that its loop has no branches. Absent buffers are null and never touched.
#[derive(Clone, Copy)]
struct MixKernel<T, const EPS: bool, const EXT: bool, const XO: bool, const ZO: bool> {
    x: In<T>,
    f: In<T>,
    /// −t_c, 1 − t_c
    t: (T, T),
    /// x̂, ẑ and ε coefficients
    w: (T, T, T),
    eps: In<T>,
    r: T,
    prev: (In<T>, In<T>),
    save: (Out<T>, Out<T>),
}
unsafe impl<T, const A: bool, const B: bool, const C: bool, const D: bool> Sync for MixKernel<T, A, B, C, D> {}

impl<T: Real, const EPS: bool, const EXT: bool, const XO: bool, const ZO: bool> Kernel<T>
    for MixKernel<T, EPS, EXT, XO, ZO>
{
    #[inline(always)]
    unsafe fn at<L: Lanes<T>>(&self, j: usize) -> L {
        let s = L::splat;
        let (x, f) = (self.x.get::<L>(j), self.f.get::<L>(j));
        let eps = if EPS { self.eps.get::<L>(j) } else { s(self.w.2) };
        let (xp, zp) = if EXT { (self.prev.0.get::<L>(j), self.prev.1.get::<L>(j)) } else { (x, x) };
        let mut xh = x + f * s(self.t.0);
        let mut zh = x + f * s(self.t.1);
        if XO {
            self.save.0.put(j, xh);
        }
        if ZO {
            self.save.1.put(j, zh);
        }
        if EXT {
            xh = xh + (xh - xp) * s(self.r);
            zh = zh + (zh - zp) * s(self.r);
        }
        let y = xh * s(self.w.0) + zh * s(self.w.1);
        if EPS {
            y + eps * s(self.w.2)
        } else {
            y
        }
    }
}

/// The general update in one pass: estimates, optional extrapolation, optional noise.
/// Returns whether every `out` value is finite (always true unless `check`).
///
/// # Safety
/// As for [`axpy`].
pub unsafe fn mix<T: Real>(len: usize, x: In<T>, f: In<T>, m: Mix, io: MixIo<T>, out: Out<T>, check: bool) -> bool {
    let (xo, zo) = (io.xh_out.is_some(), io.zh_out.is_some());
    let (eps, ext) = (io.eps.is_some(), io.extrapolate.is_some());
    by_flags!([xo, zo, eps, ext] mix_with::<T>(len, x, f, m, io, out, check))
}

/// `f::<G, c1, …, cn>(args)` for runtime bools c1…cn: one call per combination, each with
/// its flags as const generics (2ⁿ monomorphised loops, none with a branch inside).
macro_rules! by_flags {
    ([$($c:expr),*] $($call:tt)*) => { by_flags!(@go [] [$($c),*] $($call)*) };
    (@go [$($done:tt)*] [] $f:ident::<$g:ident>($($arg:expr),*)) => { $f::<$g $(, $done)*>($($arg),*) };
    (@go [$($done:tt)*] [$c:expr $(, $rest:expr)*] $($call:tt)*) => {
        if $c {
            by_flags!(@go [$($done)* true] [$($rest),*] $($call)*)
        } else {
            by_flags!(@go [$($done)* false] [$($rest),*] $($call)*)
        }
    };
}
use by_flags;

#[inline(always)]
unsafe fn mix_with<T: Real, const XO: bool, const ZO: bool, const EPS: bool, const EXT: bool>(
    len: usize,
    x: In<T>,
    f: In<T>,
    m: Mix,
    io: MixIo<T>,
    out: Out<T>,
    check: bool,
) -> bool {
    run(len, out, check, mix_kernel::<T, XO, ZO, EPS, EXT>(x, f, m, io))
}

/// The mix kernel for the buffers present (absent ones are null and never touched).
fn mix_kernel<T: Real, const XO: bool, const ZO: bool, const EPS: bool, const EXT: bool>(
    x: In<T>,
    f: In<T>,
    m: Mix,
    io: MixIo<T>,
) -> MixKernel<T, EPS, EXT, XO, ZO> {
    let c = T::from_f64;
    let (wa, wb, wc) = m.weights();
    let (no_in, no_out) = (In(std::ptr::null()), Out(std::ptr::null_mut()));
    let (r, xp, zp) = io.extrapolate.map(|(r, xp, zp)| (c(r), xp, zp)).unwrap_or((c(0.0), no_in, no_in));
    MixKernel::<T, EPS, EXT, XO, ZO> {
        x,
        f,
        t: (c(-m.t_cur), c(1.0 - m.t_cur)),
        w: (c(wa), c(wb), c(wc)),
        eps: io.eps.unwrap_or(no_in),
        r,
        prev: (xp, zp),
        save: (io.xh_out.unwrap_or(no_out), io.zh_out.unwrap_or(no_out)),
    }
}

#[derive(Clone, Copy)]
struct Heun<T> {
    x: In<T>,
    f_cur: In<T>,
    f_next: In<T>,
    neg_h: T,
}
unsafe impl<T> Sync for Heun<T> {}
impl<T: Real> Kernel<T> for Heun<T> {
    #[inline(always)]
    unsafe fn at<L: Lanes<T>>(&self, j: usize) -> L {
        let (x, a, b) = (self.x.get::<L>(j), self.f_cur.get::<L>(j), self.f_next.get::<L>(j));
        x + (a + b) * L::splat(self.neg_h)
    }
}

/// Heun corrector: `out = x + (f_cur + f_next)·(−h)`, h = ½(t_c − t_n). Returns whether
/// every `out` value is finite (always true unless `check`).
///
/// # Safety
/// As for [`axpy`].
pub unsafe fn heun<T: Real>(len: usize, x: In<T>, f_cur: In<T>, f_next: In<T>, h: f64, out: Out<T>, check: bool) -> bool {
    run(len, out, check, Heun { x, f_cur, f_next, neg_h: T::from_f64(-h) })
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
    fn finite_outputs_whose_sum_overflows_are_still_finite() {
        // Every output is f32::MAX: the running sums overflow, the blocks are re-checked.
        for n in [7, 2 * CHECK_BLOCK + 5] {
            let x = vec![f32::MAX; n];
            let f = vec![0.0f32; n];
            let mut out = vec![0.0f32; n];
            let ok = unsafe { axpy(n, In(x.as_ptr()), In(f.as_ptr()), 1.0, Out(out.as_mut_ptr()), None, true) };
            assert!(ok && out.iter().all(|&v| v == f32::MAX), "{n}");
            let m = Mix { t_cur: 0.5, t_next: 0.0, s: 0.0 };
            let io = MixIo { eps: None, extrapolate: None, xh_out: None, zh_out: None };
            let ok = unsafe { mix(n, In(x.as_ptr()), In(f.as_ptr()), m, io, Out(out.as_mut_ptr()), true) };
            assert!(ok, "{n}");
        }
    }

    #[test]
    fn every_mix_variant_matches_the_scalar_formula_at_every_length() {
        // Lengths around the vector width and block edges exercise the vector loop and the tail.
        for n in [1, 3, 8, 9, 17, CHECK_BLOCK + 1, 3 * 32768 + 13] {
            let (x, f, e, xp, zp) = (data(n, 1), data(n, 2), data(n, 3), data(n, 4), data(n, 5));
            let m = Mix { t_cur: 0.8, t_next: 0.3, s: 0.6 };
            let (wa, wb, wc) = m.weights();
            for bits in 0..16u32 {
                let (eps, ext, xo_on, zo_on) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
                let (mut out, mut xo, mut zo) = (vec![0.0; n], vec![7.0; n], vec![7.0; n]);
                let io = MixIo {
                    eps: eps.then(|| In(e.as_ptr())),
                    extrapolate: ext.then(|| (0.5, In(xp.as_ptr()), In(zp.as_ptr()))),
                    xh_out: xo_on.then(|| Out(xo.as_mut_ptr())),
                    zh_out: zo_on.then(|| Out(zo.as_mut_ptr())),
                };
                let ok = unsafe { mix(n, In(x.as_ptr()), In(f.as_ptr()), m, io, Out(out.as_mut_ptr()), true) };
                assert!(ok);
                for j in 0..n {
                    let (mut xh, mut zh) = (x[j] + f[j] * -0.8, x[j] + f[j] * (1.0 - 0.8));
                    assert_eq!(xo[j], if xo_on { xh } else { 7.0 });
                    assert_eq!(zo[j], if zo_on { zh } else { 7.0 });
                    if ext {
                        xh = xh + (xh - xp[j]) * 0.5;
                        zh = zh + (zh - zp[j]) * 0.5;
                    }
                    let mut want = xh * wa + zh * wb;
                    if eps {
                        want = want + e[j] * wc;
                    }
                    assert_eq!(out[j], want, "n {n}, variant {bits}, j {j}");
                }
            }
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
