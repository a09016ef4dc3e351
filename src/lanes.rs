//! SIMD vectors for the fused kernels (`fused.rs`), and the running "all finite" summary.
//!
//! The kernels are written once against [`Lanes`]. On x86-64 a block is one SSE2 register
//! (4 × f32 or 2 × f64; SSE2 is part of every x86-64 CPU, so no runtime detection is needed);
//! elsewhere, and for the tail of a buffer, it is the scalar itself.
//!
//! Why explicit vectors: the finite flag must cost next to nothing. On SSE2 the cheapest summary
//! is one add per vector into a running sum, which stays finite while every output is finite
//! (a NaN or ±Inf makes it NaN or ±Inf for good). The compiler's auto-vectoriser cannot keep
//! such a float sum (it may not reorder float adds), so the loop is written with intrinsics.
//! A sum of finite values can overflow, so a non-finite sum only makes the block *suspect*;
//! the kernel then re-reads the block's outputs and checks each one.
//! The scalar fallback ORs the bits of `y − y`, which is +0 for every finite y and NaN
//! otherwise: an integer OR the auto-vectoriser does vectorise.

use std::ops::{Add, Mul, Sub};

/// A vector of `N` values of `T`: loads, stores, lane-wise arithmetic, and the finite summary.
pub trait Lanes<T>: Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> {
    const N: usize;
    /// The running summary of the values seen so far.
    type Acc: Copy;
    /// The summary of no values.
    fn acc0() -> Self::Acc;
    /// # Safety
    /// `p` is valid for reading `N` values.
    unsafe fn load(p: *const T) -> Self;
    /// # Safety
    /// `p` is valid for writing `N` values.
    unsafe fn store(self, p: *mut T);
    fn splat(v: T) -> Self;
    /// Adds this vector's values to the summary.
    fn fold(self, acc: Self::Acc) -> Self::Acc;
    /// False when every value folded into `acc` was finite; true when one may not have been.
    fn suspect(acc: Self::Acc) -> bool;
}

macro_rules! scalar_lanes {
    ($t:ty, $bits:ty) => {
        impl Lanes<$t> for $t {
            const N: usize = 1;
            type Acc = $bits;
            #[inline(always)]
            fn acc0() -> $bits {
                0
            }
            #[inline(always)]
            unsafe fn load(p: *const $t) -> $t {
                p.read()
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut $t) {
                p.write(self)
            }
            #[inline(always)]
            fn splat(v: $t) -> $t {
                v
            }
            #[inline(always)]
            fn fold(self, acc: $bits) -> $bits {
                // +0 (all bits clear) for finite values, a NaN (exponent bits set) otherwise.
                acc | (self - self).to_bits()
            }
            #[inline(always)]
            fn suspect(acc: $bits) -> bool {
                acc != 0
            }
        }
    };
}
scalar_lanes!(f32, u32);
scalar_lanes!(f64, u64);

#[cfg(target_arch = "x86_64")]
pub use sse2::{F32x4, F64x2};

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use super::Lanes;
    use std::arch::x86_64::*;
    use std::ops::{Add, Mul, Sub};

    macro_rules! sse_lanes {
        ($name:ident, $t:ty, $reg:ty, $n:expr, $load:ident, $store:ident, $set1:ident, $zero:ident,
         $add:ident, $sub:ident, $mul:ident) => {
            #[derive(Clone, Copy)]
            pub struct $name($reg);
            // SAFETY (all intrinsics below): SSE2 is baseline on x86-64.
            impl Add for $name {
                type Output = Self;
                #[inline(always)]
                fn add(self, o: Self) -> Self {
                    unsafe { $name($add(self.0, o.0)) }
                }
            }
            impl Sub for $name {
                type Output = Self;
                #[inline(always)]
                fn sub(self, o: Self) -> Self {
                    unsafe { $name($sub(self.0, o.0)) }
                }
            }
            impl Mul for $name {
                type Output = Self;
                #[inline(always)]
                fn mul(self, o: Self) -> Self {
                    unsafe { $name($mul(self.0, o.0)) }
                }
            }
            impl Lanes<$t> for $name {
                const N: usize = $n;
                type Acc = $name;
                #[inline(always)]
                fn acc0() -> $name {
                    unsafe { $name($zero()) }
                }
                #[inline(always)]
                unsafe fn load(p: *const $t) -> $name {
                    $name($load(p))
                }
                #[inline(always)]
                unsafe fn store(self, p: *mut $t) {
                    $store(p, self.0)
                }
                #[inline(always)]
                fn splat(v: $t) -> $name {
                    unsafe { $name($set1(v)) }
                }
                #[inline(always)]
                fn fold(self, acc: $name) -> $name {
                    acc + self
                }
                #[inline(always)]
                fn suspect(acc: $name) -> bool {
                    let mut v = [0 as $t; $n];
                    // SAFETY: v holds N values.
                    unsafe { $store(v.as_mut_ptr(), acc.0) };
                    !v.iter().all(|x| x.is_finite())
                }
            }
        };
    }
    sse_lanes!(F32x4, f32, __m128, 4, _mm_loadu_ps, _mm_storeu_ps, _mm_set1_ps, _mm_setzero_ps, _mm_add_ps, _mm_sub_ps, _mm_mul_ps);
    sse_lanes!(F64x2, f64, __m128d, 2, _mm_loadu_pd, _mm_storeu_pd, _mm_set1_pd, _mm_setzero_pd, _mm_add_pd, _mm_sub_pd, _mm_mul_pd);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary<T: Copy, L: Lanes<T>>(v: &[T]) -> bool {
        let mut acc = L::acc0();
        for c in v.chunks_exact(L::N) {
            acc = unsafe { L::load(c.as_ptr()) }.fold(acc);
        }
        L::suspect(acc)
    }

    #[test]
    fn summary_flags_every_non_finite_value_and_passes_finite_ones() {
        let finite = [1.5f32, -2.0, 0.0, -0.0, f32::MAX, f32::MIN_POSITIVE, 1e-45, 3.0];
        assert!(!summary::<f32, f32>(&finite));
        for bad in [f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), f32::INFINITY, f32::NEG_INFINITY] {
            for k in 0..finite.len() {
                let mut v = finite;
                v[k] = bad;
                assert!(summary::<f32, f32>(&v), "{bad:?} at {k}");
                #[cfg(target_arch = "x86_64")]
                assert!(summary::<f32, F32x4>(&v), "{bad:?} at {k}");
            }
        }
        let f64s = [1.0f64, -0.0, f64::MAX, 2.0];
        assert!(!summary::<f64, f64>(&f64s));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let v = [1.0, bad, 2.0, 3.0];
            assert!(summary::<f64, f64>(&v));
            #[cfg(target_arch = "x86_64")]
            assert!(summary::<f64, F64x2>(&v));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn an_overflowing_sum_of_finite_values_is_only_suspect() {
        // The kernels re-check a suspect block value by value (fused.rs tests the outcome).
        assert!(summary::<f32, F32x4>(&[f32::MAX; 8]));
        assert!(!summary::<f32, f32>(&[f32::MAX; 8]));
    }
}
