//! Training hyper-parameters (SPEC §3), the published recipes (§3.7) and validation.

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "loss", rename_all = "lowercase")]
pub enum LossKind {
    L2,
    Barron { alpha: f64, c: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub consistc_ratio: f64,
    pub ema_decay_rate: f64,
    pub enhanced_ratio: f64,
    pub enhanced_range: [f64; 2],
    /// (β1, β2, scale) of the time distribution.
    pub time_dist_ctrl: [f64; 3],
    /// RCGM order N; i64 so that a negative value from a config is reported, not wrapped.
    pub estimate_order: i64,
    pub loss: LossKind,
    pub dist_match_cof: f64,
    pub use_image_free: bool,
    /// Weights of the e2e, mul, any and adv runs.
    pub sub_batches: [f64; 4],
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            consistc_ratio: 1.0,
            ema_decay_rate: 0.99,
            enhanced_ratio: 0.5,
            enhanced_range: [0.0, 1.0],
            time_dist_ctrl: [1.0, 1.0, 1.0],
            estimate_order: 2,
            loss: LossKind::Barron { alpha: 1.0, c: 1e-3 },
            dist_match_cof: 0.5,
            use_image_free: false,
            sub_batches: [1.0; 4],
        }
    }
}

/// RCGM order bound: each order is one more model call per step.
pub const MAX_ESTIMATE_ORDER: i64 = 16;

pub const RECIPES: [&str; 3] = ["twinflow", "rcgm", "flow_matching"];

impl TrainConfig {
    /// SPEC §3.7: TwinFlow (all four runs), RCGM only (no adv run, no distribution
    /// matching), plain flow matching (mul run only, no consistency, guidance or RCGM).
    pub fn recipe(name: &str) -> Result<Self> {
        let d = Self::default();
        match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "twinflow" => Ok(d),
            "rcgm" => Ok(Self { sub_batches: [1.0, 1.0, 1.0, 0.0], dist_match_cof: 0.0, ..d }),
            "flow_matching" | "fm" => Ok(Self {
                sub_batches: [0.0, 1.0, 0.0, 0.0],
                consistc_ratio: 0.0,
                enhanced_ratio: 0.0,
                estimate_order: 0,
                ..d
            }),
            _ => Err(Error::config(
                "recipe",
                format!("unknown recipe {name:?}, expected one of {}", RECIPES.map(|r| format!("{r:?}")).join(", ")),
            )),
        }
    }

    /// Every rule, each error naming its field.
    pub fn validate(&self) -> Result<()> {
        let finite = check_finite;
        fn within(field: &'static str, v: f64, lo: f64, hi: f64) -> Result<()> {
            check_finite(field, &[v])?;
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::config(field, format!("must be in [{lo}, {hi}], got {v}")))
            }
        }
        within("consistc_ratio", self.consistc_ratio, 0.0, 1.0)?;
        within("ema_decay_rate", self.ema_decay_rate, 0.0, 1.0)?;
        finite("enhanced_ratio", &[self.enhanced_ratio])?;
        let [lo, hi] = self.enhanced_range;
        finite("enhanced_range", &[lo, hi])?;
        if lo > hi {
            return Err(Error::config("enhanced_range", format!("lo must be <= hi, got ({lo}, {hi})")));
        }
        finite("time_dist_ctrl", &self.time_dist_ctrl)?;
        if self.time_dist_ctrl.iter().any(|&v| v <= 0.0) {
            return Err(Error::config(
                "time_dist_ctrl",
                format!("(β1, β2, scale) must all be > 0, got {:?}", self.time_dist_ctrl),
            ));
        }
        if !(0..=MAX_ESTIMATE_ORDER).contains(&self.estimate_order) {
            return Err(Error::config(
                "estimate_order",
                format!("must be in [0, {MAX_ESTIMATE_ORDER}], got {}", self.estimate_order),
            ));
        }
        if let LossKind::Barron { alpha, c } = self.loss {
            finite("barron_alpha", &[alpha])?;
            finite("barron_c", &[c])?;
            if c <= 0.0 {
                return Err(Error::config("barron_c", format!("must be > 0, got {c}")));
            }
        }
        finite("dist_match_cof", &[self.dist_match_cof])?;
        if self.dist_match_cof < 0.0 {
            return Err(Error::config("dist_match_cof", format!("must be >= 0, got {}", self.dist_match_cof)));
        }
        crate::train::split::check_weights(&self.sub_batches)?;
        if self.estimate_order == 0 && self.sub_batches[1] == 0.0 && self.sub_batches[3] == 0.0 {
            return Err(Error::config(
                "sub_batches",
                "with estimate_order = 0 the loss uses only the mul and adv runs: give one of them a weight",
            ));
        }
        Ok(())
    }

    /// Whether any term calls the teacher (enhanced target, or RCGM with a non-frozen teacher;
    /// with emd = 1 RCGM uses the online model).
    pub fn needs_teacher(&self) -> bool {
        self.enhanced_ratio != 0.0
            || (self.estimate_order >= 1 && self.consistc_ratio != 0.0 && self.ema_decay_rate < 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes() {
        for r in RECIPES {
            TrainConfig::recipe(r).unwrap().validate().unwrap();
        }
        let fm = TrainConfig::recipe("flow_matching").unwrap();
        assert_eq!(fm.sub_batches, [0.0, 1.0, 0.0, 0.0]);
        assert_eq!((fm.consistc_ratio, fm.enhanced_ratio, fm.estimate_order), (0.0, 0.0, 0));
        assert_eq!(TrainConfig::recipe("rcgm").unwrap().sub_batches[3], 0.0);
        assert!(TrainConfig::recipe("gan").is_err());
    }

    #[test]
    fn invalid_fields_are_named() {
        let field = |c: TrainConfig| match c.validate() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let d = TrainConfig::default;
        assert_eq!(field(TrainConfig { consistc_ratio: f64::NAN, ..d() }), "consistc_ratio");
        assert_eq!(field(TrainConfig { ema_decay_rate: 1.5, ..d() }), "ema_decay_rate");
        assert_eq!(field(TrainConfig { estimate_order: -1, ..d() }), "estimate_order");
        assert_eq!(field(TrainConfig { estimate_order: 1 << 62, ..d() }), "estimate_order");
        assert_eq!(field(TrainConfig { loss: LossKind::Barron { alpha: 1.0, c: 0.0 }, ..d() }), "barron_c");
        assert_eq!(field(TrainConfig { sub_batches: [1.0, -1.0, 1.0, 1.0], ..d() }), "sub_batches");
        assert_eq!(field(TrainConfig { sub_batches: [0.0; 4], ..d() }), "sub_batches");
        assert_eq!(field(TrainConfig { time_dist_ctrl: [1.0, 0.0, 1.0], ..d() }), "time_dist_ctrl");
        assert_eq!(field(TrainConfig { enhanced_range: [0.8, 0.2], ..d() }), "enhanced_range");
    }
}
