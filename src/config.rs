//! Sampler settings (SPEC §2): serde-friendly, validated once, plus the published presets.

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, Error, Result};

/// Which target time `tt` the model is asked for at a step from `t_c` to `t_n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplingStyle {
    /// tt = 0: jump to data.
    Few,
    /// tt = t_c: instantaneous velocity.
    Mul,
    /// tt = t_n: jump to the next grid point.
    Any,
}

impl SamplingStyle {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "few" => Ok(Self::Few),
            "mul" => Ok(Self::Mul),
            "any" => Ok(Self::Any),
            _ => Err(Error::config(
                "sampling_style",
                format!("unknown style {name:?}, expected one of \"few\", \"mul\", \"any\""),
            )),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Few => "few",
            Self::Mul => "mul",
            Self::Any => "any",
        }
    }

    /// Target time for a model call at `t` on the interval ending at `t_next`.
    pub fn target(&self, t: f64, t_next: f64) -> f64 {
        match self {
            Self::Few => 0.0,
            Self::Mul => t,
            Self::Any => t_next,
        }
    }
}

/// The stochastic mixing ratio: a constant or the per-step "SDE" schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StochastRatio {
    Fixed(f64),
    #[serde(with = "sde_tag")]
    Sde,
}

mod sde_tag {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("SDE")
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        let v = String::deserialize(d)?;
        if v.eq_ignore_ascii_case("sde") {
            Ok(())
        } else {
            Err(D::Error::custom(format!("expected a number or \"SDE\", got {v:?}")))
        }
    }
}

impl StochastRatio {
    /// s_i for the interval t_c → t_n. The "SDE" ratio is recomputed for every step
    /// (the reference computes it once and reuses it: SPEC §5.2).
    pub fn at(&self, t_c: f64, t_n: f64) -> f64 {
        match *self {
            Self::Fixed(s) => s,
            Self::Sde => {
                if t_n == 0.0 {
                    1.0
                } else {
                    (2.0 * t_c * (t_c - t_n).abs() / (t_n * t_n)).min(1.0)
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    pub sampling_steps: usize,
    pub stochast_ratio: StochastRatio,
    pub extrapol_ratio: f64,
    pub sampling_order: u32,
    pub time_dist_ctrl: [f64; 3],
    pub rfba_gap_steps: [f64; 2],
    pub sampling_style: SamplingStyle,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            sampling_steps: 20,
            stochast_ratio: StochastRatio::Fixed(0.0),
            extrapol_ratio: 0.0,
            sampling_order: 1,
            time_dist_ctrl: [1.0, 1.0, 1.0],
            rfba_gap_steps: [0.0, 0.0],
            sampling_style: SamplingStyle::Few,
        }
    }
}

/// Upper bounds (documented in the README's "Safety" section): far above any useful
/// setting, low enough that a typo cannot allocate gigabytes or overflow the result.
pub const MAX_SAMPLING_STEPS: usize = 10_000;
pub const MAX_EXTRAPOL_RATIO: f64 = 10.0;

/// Names accepted by [`SamplerConfig::preset`].
pub const PRESET_NAMES: [&str; 5] = ["1-nfe", "2-nfe", "4-nfe", "any-step", "multi-step"];

impl SamplerConfig {
    /// The published settings (SPEC §2 table).
    pub fn preset(name: &str) -> Result<Self> {
        let few = |steps: usize, s: f64, g1: f64| Self {
            sampling_steps: steps,
            stochast_ratio: StochastRatio::Fixed(s),
            rfba_gap_steps: [0.001, g1],
            ..Self::default()
        };
        match name.to_ascii_lowercase().replace('_', "-").as_str() {
            "1-nfe" => Ok(few(1, 0.8, 0.7)),
            "2-nfe" => Ok(few(2, 1.0, 0.6)),
            "4-nfe" => Ok(few(4, 1.0, 0.5)),
            "any-step" => Ok(Self {
                sampling_style: SamplingStyle::Any,
                ..few(4, 0.0, 0.5)
            }),
            "multi-step" => Ok(Self {
                sampling_steps: 30,
                rfba_gap_steps: [0.001, 0.0],
                time_dist_ctrl: [1.17, 0.8, 1.1],
                sampling_style: SamplingStyle::Mul,
                ..Self::default()
            }),
            _ => Err(Error::Value(format!(
                "unknown preset {name:?}, expected one of {}",
                PRESET_NAMES.map(|n| format!("{n:?}")).join(", ")
            ))),
        }
    }

    /// Every rule of SPEC §2; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let finite = check_finite;
        if self.sampling_steps < 1 || self.sampling_steps > MAX_SAMPLING_STEPS {
            return Err(Error::config(
                "sampling_steps",
                format!("must be in [1, {MAX_SAMPLING_STEPS}], got {}", self.sampling_steps),
            ));
        }
        if let StochastRatio::Fixed(s) = self.stochast_ratio {
            finite("stochast_ratio", &[s])?;
            if !(0.0..=1.0).contains(&s) {
                return Err(Error::config(
                    "stochast_ratio",
                    format!("must be in [0, 1] or \"SDE\", got {s}"),
                ));
            }
        }
        finite("extrapol_ratio", &[self.extrapol_ratio])?;
        if !(0.0..=MAX_EXTRAPOL_RATIO).contains(&self.extrapol_ratio) {
            return Err(Error::config(
                "extrapol_ratio",
                format!("must be in [0, {MAX_EXTRAPOL_RATIO}], got {}", self.extrapol_ratio),
            ));
        }
        if !matches!(self.sampling_order, 1 | 2) {
            return Err(Error::config(
                "sampling_order",
                format!("must be 1 or 2, got {}", self.sampling_order),
            ));
        }
        finite("time_dist_ctrl", &self.time_dist_ctrl)?;
        if self.time_dist_ctrl.iter().any(|&v| v <= 0.0) {
            return Err(Error::config(
                "time_dist_ctrl",
                format!("(a, b, c) must all be > 0, got {:?}", self.time_dist_ctrl),
            ));
        }
        finite("rfba_gap_steps", &self.rfba_gap_steps)?;
        let [g0, g1] = self.rfba_gap_steps;
        if g0 < 0.0 || g1 < 0.0 {
            return Err(Error::config(
                "rfba_gap_steps",
                format!("gaps must be >= 0, got ({g0}, {g1})"),
            ));
        }
        if g0 + g1 >= 1.0 {
            return Err(Error::config(
                "rfba_gap_steps",
                format!("g0 + g1 must be < 1, got ({g0}, {g1})"),
            ));
        }
        Ok(())
    }

    /// Number of grid intervals n.
    pub fn intervals(&self) -> usize {
        if self.sampling_order == 2 {
            self.sampling_steps.div_ceil(2)
        } else {
            self.sampling_steps
        }
    }

    /// Network evaluations per sample: n, or 2n − 1 for order 2 (last interval is first order).
    pub fn nfe(&self) -> usize {
        let n = self.intervals();
        if self.sampling_order == 2 {
            2 * n - 1
        } else {
            n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_match_the_table() {
        for name in PRESET_NAMES {
            SamplerConfig::preset(name).unwrap().validate().unwrap();
        }
        let p = SamplerConfig::preset("1-nfe").unwrap();
        assert_eq!(p.sampling_steps, 1);
        assert_eq!(p.stochast_ratio, StochastRatio::Fixed(0.8));
        assert_eq!(p.rfba_gap_steps, [0.001, 0.7]);
        let m = SamplerConfig::preset("multi-step").unwrap();
        assert_eq!(m.time_dist_ctrl, [1.17, 0.8, 1.1]);
        assert_eq!(m.sampling_style, SamplingStyle::Mul);
        assert!(SamplerConfig::preset("3-nfe").is_err());
    }

    fn field_of(c: SamplerConfig) -> &'static str {
        match c.validate() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn invalid_settings_name_their_field() {
        let d = SamplerConfig::default;
        assert_eq!(field_of(SamplerConfig { sampling_steps: 0, ..d() }), "sampling_steps");
        for s in [-0.1, 1.5, f64::NAN] {
            let c = SamplerConfig { stochast_ratio: StochastRatio::Fixed(s), ..d() };
            assert_eq!(field_of(c), "stochast_ratio");
        }
        assert_eq!(field_of(SamplerConfig { sampling_steps: MAX_SAMPLING_STEPS + 1, ..d() }), "sampling_steps");
        for r in [-1.0, f64::INFINITY, 1e300] {
            assert_eq!(field_of(SamplerConfig { extrapol_ratio: r, ..d() }), "extrapol_ratio");
        }
        assert_eq!(field_of(SamplerConfig { sampling_order: 3, ..d() }), "sampling_order");
        for abc in [[0.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, f64::NAN]] {
            assert_eq!(field_of(SamplerConfig { time_dist_ctrl: abc, ..d() }), "time_dist_ctrl");
        }
        for g in [[-0.1, 0.0], [0.0, -0.1], [0.5, 0.5], [0.3, f64::NAN]] {
            assert_eq!(field_of(SamplerConfig { rfba_gap_steps: g, ..d() }), "rfba_gap_steps");
        }
        assert!(SamplingStyle::parse("bogus").is_err());
    }

    #[test]
    fn sde_ratio_is_per_step() {
        let s = StochastRatio::Sde;
        assert_eq!(s.at(0.5, 0.0), 1.0);
        assert!((s.at(0.9, 0.8) - (2.0 * 0.9 * 0.1 / 0.64)).abs() < 1e-15);
        assert_eq!(s.at(0.999, 0.6), 1.0);
    }

    #[test]
    fn serde_round_trip() {
        let c = SamplerConfig { stochast_ratio: StochastRatio::Sde, ..SamplerConfig::preset("4-nfe").unwrap() };
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains("\"SDE\""), "{j}");
        let back: SamplerConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(back, c);
        let partial: SamplerConfig = serde_json::from_str(r#"{"sampling_steps": 2, "stochast_ratio": 1.0}"#).unwrap();
        assert_eq!(partial.sampling_steps, 2);
        assert!(serde_json::from_str::<SamplerConfig>(r#"{"bogus": 1}"#).is_err());
    }

    #[test]
    fn nfe_counts() {
        let c = |steps, order| SamplerConfig { sampling_steps: steps, sampling_order: order, ..SamplerConfig::default() };
        assert_eq!(c(4, 1).nfe(), 4);
        assert_eq!(c(4, 2).intervals(), 2);
        assert_eq!(c(4, 2).nfe(), 3);
        assert_eq!(c(5, 2).intervals(), 3);
        assert_eq!(c(1, 2).nfe(), 1);
    }
}
