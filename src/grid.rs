//! The sampler's time grid (docs/algorithm.md §2): gapped linspace, Kumaraswamy warp, descending to 0.
//! Computed in f64; the reference rounds it to bf16 (docs/algorithm.md §5.5), we do not.

use crate::config::SamplerConfig;

/// `steps` evenly spaced values from `start` to `end` inclusive (a single value is `start`).
fn linspace(start: f64, end: f64, steps: usize) -> Vec<f64> {
    match steps {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f64;
            (0..steps)
                .map(|i| if i == steps - 1 { end } else { start + step * i as f64 })
                .collect()
        }
    }
}

/// u ↦ (1 − (1 − u^a)^b)^c
pub fn kumaraswamy(u: f64, [a, b, c]: [f64; 3]) -> f64 {
    (1.0 - (1.0 - u.powf(a)).powf(b)).powf(c)
}

/// The n + 1 times t_0 > … > t_{n−1} > t_n = 0 for a validated config.
pub fn time_grid(cfg: &SamplerConfig) -> Vec<f64> {
    let n = cfg.intervals();
    let [g0, g1] = cfg.rfba_gap_steps;
    let u = if g1 == 0.0 {
        let mut u = linspace(g0, 1.0, n + 1);
        u.pop();
        u
    } else {
        linspace(g0, 1.0 - g1, n)
    };
    u.into_iter()
        .map(|u| 1.0 - kumaraswamy(u, cfg.time_dist_ctrl))
        .chain(std::iter::once(0.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SamplerConfig;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn presets_grids() {
        let g = |n: &str| time_grid(&SamplerConfig::preset(n).unwrap());
        close(&g("1-nfe"), &[0.999, 0.0]);
        close(&g("2-nfe"), &[0.999, 0.6, 0.0]);
        close(&g("4-nfe"), &[0.999, 1.0 - (0.001 + 0.499 / 3.0), 1.0 - (0.001 + 2.0 * 0.499 / 3.0), 0.5, 0.0]);
    }

    #[test]
    fn plain_linspace_without_gaps() {
        let c = SamplerConfig { sampling_steps: 4, ..SamplerConfig::default() };
        close(&time_grid(&c), &[1.0, 0.75, 0.5, 0.25, 0.0]);
        // Order 2 halves the intervals (rounding up).
        let c2 = SamplerConfig { sampling_steps: 5, sampling_order: 2, ..SamplerConfig::default() };
        close(&time_grid(&c2), &[1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]);
    }

    #[test]
    fn warped_grid_is_descending_and_ends_at_zero() {
        let c = SamplerConfig::preset("multi-step").unwrap();
        let t = time_grid(&c);
        assert_eq!(t.len(), 31);
        assert_eq!(*t.last().unwrap(), 0.0);
        assert!(t.windows(2).all(|w| w[0] > w[1]), "{t:?}");
        let u1 = 0.001 + 0.999 / 30.0;
        assert!((t[1] - (1.0 - kumaraswamy(u1, [1.17, 0.8, 1.1]))).abs() < 1e-15);
        // Identity warp leaves u unchanged.
        assert!((kumaraswamy(0.3, [1.0, 1.0, 1.0]) - 0.3).abs() < 1e-15);
    }
}
