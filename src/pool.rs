//! Where the fused CPU kernels run in parallel.
//!
//! Default: libtorch's own OpenMP thread pool. The torch wheel loads `libgomp.so.1`, and we
//! link the same soname, so a parallel region here reuses the workers that torch's ops just
//! used (still spin-waiting for a while after each op) and follows `torch.set_num_threads`.
//! A separate rayon pool competes with those spinning workers: measured on 2 cores, a step
//! right after a torch op ran ~2× slower on rayon (see `bench/sampler_step.py`).
//! `TWINFLOW_CPU_POOL=rayon` selects rayon instead (it sizes itself by RAYON_NUM_THREADS).

use rayon::prelude::*;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU8, Ordering};

/// Below this many elements a single thread is faster than waking a pool.
pub const MIN_PARALLEL: usize = 1 << 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// libgomp, shared with libtorch.
    OpenMp,
    Rayon,
}

// 0: not chosen yet, 1: OpenMP, 2: rayon.
static POOL: AtomicU8 = AtomicU8::new(0);

/// The pool in use: `set_pool`'s choice, else `TWINFLOW_CPU_POOL` ("openmp", the default,
/// or "rayon") read on first use.
pub fn pool() -> Pool {
    match POOL.load(Ordering::Relaxed) {
        1 => Pool::OpenMp,
        2 => Pool::Rayon,
        _ => {
            let p = match std::env::var("TWINFLOW_CPU_POOL") {
                Ok(v) if v.eq_ignore_ascii_case("rayon") => Pool::Rayon,
                _ => Pool::OpenMp,
            };
            set_pool(p);
            p
        }
    }
}

pub fn set_pool(p: Pool) {
    POOL.store(if p == Pool::OpenMp { 1 } else { 2 }, Ordering::Relaxed);
}

extern "C" {
    // The entry point GCC emits for `#pragma omp parallel`: runs `f(data)` on the calling
    // thread and the team's workers, and returns when all are done.
    fn GOMP_parallel(f: extern "C" fn(*mut c_void), data: *mut c_void, num_threads: c_uint, flags: c_uint);
    fn omp_get_thread_num() -> c_int;
    fn omp_get_num_threads() -> c_int;
}

struct Job<'a, F> {
    len: usize,
    body: &'a F,
}

extern "C" fn run_share<F: Fn(usize, usize) + Sync>(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `for_chunks` keeps alive until GOMP_parallel returns.
    let job = unsafe { &*(data as *const Job<F>) };
    let (tid, n) = unsafe { (omp_get_thread_num() as usize, omp_get_num_threads().max(1) as usize) };
    // Static split into contiguous blocks, aligned to 64 elements (whole cache lines).
    let per = job.len.div_ceil(n).div_ceil(64) * 64;
    let lo = (tid * per).min(job.len);
    let hi = (lo + per).min(job.len);
    if lo < hi {
        (job.body)(lo, hi);
    }
}

/// Run `body(lo, hi)` over disjoint ranges covering `0..len`, in parallel when it pays.
pub fn for_chunks<F: Fn(usize, usize) + Sync>(len: usize, body: F) {
    if len <= MIN_PARALLEL {
        body(0, len);
        return;
    }
    match pool() {
        Pool::OpenMp => {
            let job = Job { len, body: &body };
            // SAFETY: num_threads 0 = the calling thread's default (torch's setting); the job
            // outlives the call, and `body` only touches the range it is given.
            unsafe { GOMP_parallel(run_share::<F>, &job as *const Job<F> as *mut c_void, 0, 0) }
        }
        Pool::Rayon => (0..len.div_ceil(MIN_PARALLEL)).into_par_iter().for_each(|c| {
            body(c * MIN_PARALLEL, (c * MIN_PARALLEL + MIN_PARALLEL).min(len))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn covers_every_index_exactly_once() {
        for p in [Pool::Rayon, Pool::OpenMp] {
            set_pool(p);
            cover(p);
        }
    }

    fn cover(p: Pool) {
        for len in [0, 1, 100, MIN_PARALLEL + 1, 3 * MIN_PARALLEL + 77] {
            let hits: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
            for_chunks(len, |lo, hi| {
                for h in &hits[lo..hi] {
                    h.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{p:?} len {len}");
        }
    }
}
