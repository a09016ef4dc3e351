//! Contiguous sub-batch runs e2e, mul, any, adv (docs/algorithm.md §3.1): one row per active run, the
//! rest by the largest-remainder method, ties to the earlier run.

use std::ops::Range;

use crate::error::{Error, Result};

pub const RUN_NAMES: [&str; 4] = ["e2e", "mul", "any", "adv"];

/// Largest batch: quotas stay exact in f64, so the remainder loop runs at most four times.
pub const MAX_BATCH: usize = 1 << 40;

pub fn check_weights(w: &[f64; 4]) -> Result<()> {
    for (name, &v) in RUN_NAMES.iter().zip(w) {
        if !v.is_finite() || v < 0.0 {
            return Err(Error::config("sub_batches", format!("weight of {name:?} must be finite and >= 0, got {v}")));
        }
    }
    if w.iter().all(|&v| v == 0.0) {
        return Err(Error::config("sub_batches", "at least one weight must be > 0"));
    }
    Ok(())
}

/// Row ranges of the four runs for a batch of `b` rows; an inactive run is empty.
pub fn split_sub_batches(b: usize, w: &[f64; 4]) -> Result<[Range<usize>; 4]> {
    check_weights(w)?;
    if b > MAX_BATCH {
        return Err(Error::Value(format!("batch size {b} is larger than the maximum {MAX_BATCH}")));
    }
    let active: Vec<bool> = w.iter().map(|&v| v > 0.0).collect();
    let a = active.iter().filter(|&&x| x).count();
    if b < a {
        return Err(Error::Value(format!(
            "batch size {b} is smaller than the number of active sub-batches ({a}): the minimum batch size is {a}"
        )));
    }
    let rest = (b - a) as f64;
    let total: f64 = w.iter().sum();
    let quota: Vec<f64> = w.iter().map(|&v| rest * v / total).collect();
    let mut size: Vec<usize> = (0..4).map(|k| if active[k] { 1 + quota[k].floor() as usize } else { 0 }).collect();
    let mut frac: Vec<f64> = (0..4).map(|k| if active[k] { quota[k] - quota[k].floor() } else { -1.0 }).collect();
    let mut left = b - size.iter().sum::<usize>();
    while left > 0 {
        // Largest fractional part; a tie (within rounding) goes to the earlier run.
        let mut best = None::<usize>;
        for k in 0..4 {
            if active[k] && frac[k] >= 0.0 && best.map_or(true, |j| frac[k] > frac[j] + 1e-9) {
                best = Some(k);
            }
        }
        // More rows left than runs can only come from rounding: give them round-robin.
        let k = best.unwrap_or_else(|| (0..4).find(|&k| active[k]).unwrap_or(0));
        size[k] += 1;
        frac[k] = -1.0;
        left -= 1;
    }
    let mut start = 0;
    Ok(std::array::from_fn(|k| {
        let r = start..start + size[k];
        start = r.end;
        r
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(b: usize, w: [f64; 4]) -> Vec<usize> {
        split_sub_batches(b, &w).unwrap().iter().map(|r| r.len()).collect()
    }

    #[test]
    fn huge_batches_are_refused() {
        assert!(split_sub_batches(MAX_BATCH + 1, &[1.0; 4]).is_err());
        assert_eq!(split_sub_batches(MAX_BATCH, &[1.0, 3.0, 0.0, 7.0]).unwrap()[3].end, MAX_BATCH);
    }

    #[test]
    fn spec_examples() {
        assert_eq!(sizes(8, [1.0; 4]), [2, 2, 2, 2]);
        assert_eq!(sizes(10, [1.0; 4]), [3, 3, 2, 2]);
        assert_eq!(sizes(6, [1.0; 4]), [2, 2, 1, 1]);
        assert_eq!(sizes(4, [1.0; 4]), [1, 1, 1, 1]);
    }

    #[test]
    fn skewed_and_inactive() {
        assert_eq!(sizes(10, [0.0, 1.0, 0.0, 0.0]), [0, 10, 0, 0]);
        assert_eq!(sizes(9, [1.0, 1.0, 1.0, 0.0]), [3, 3, 3, 0]);
        // quotas 7.5 and 2.5: the tie on .5 goes to the earlier run
        assert_eq!(sizes(12, [3.0, 1.0, 0.0, 0.0]), [9, 3, 0, 0]);
        assert_eq!(sizes(14, [3.0, 1.0, 0.0, 0.0]), [10, 4, 0, 0]);
        let r = split_sub_batches(7, &[1.0, 0.0, 2.0, 1.0]).unwrap();
        assert_eq!(r[1], 2..2);
        assert_eq!(r.iter().map(|r| r.len()).sum::<usize>(), 7);
        for b in 4..40 {
            for w in [[0.1, 5.0, 0.3, 2.0], [1e-6, 1.0, 1.0, 1.0], [7.0, 0.0, 0.0, 1.0]] {
                let r = split_sub_batches(b, &w).unwrap();
                assert_eq!(r[3].end, b);
                assert!(r.windows(2).all(|p| p[0].end == p[1].start));
                assert!(r.iter().zip(w).all(|(r, w)| (w > 0.0) == !r.is_empty()));
            }
        }
    }

    #[test]
    fn too_small_batch_names_the_minimum() {
        let e = split_sub_batches(3, &[1.0; 4]).unwrap_err().to_string();
        assert!(e.contains("minimum batch size is 4"), "{e}");
    }
}
