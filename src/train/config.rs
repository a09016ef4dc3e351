//! The objective's settings (docs/algorithm.md §3): [`LOSS_SETTINGS`] declares each one once — type,
//! range, doc — and [`ObjectiveConfig`] holds their values, with the published recipes
//! (§3.7) and the validation derived from the declarations.

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "loss", rename_all = "lowercase")]
pub enum LossKind {
    L2,
    Barron { alpha: f64, c: f64 },
}

/// How a setting is written in Python.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingType {
    Float,
    Int,
    Bool,
    /// One of [`Setting::choices`].
    Choice,
    /// A tuple of this many floats.
    Floats(usize),
    /// {"e2e", "mul", "any", "adv"} → weight.
    RunWeights,
}

impl SettingType {
    /// The Python annotation.
    pub fn python(&self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::Int => "int",
            Self::Bool => "bool",
            Self::Choice => "str",
            Self::Floats(2) => "Tuple[float, float]",
            Self::Floats(_) => "Tuple[float, float, float]",
            Self::RunWeights => "Dict[str, float]",
        }
    }
}

/// Every number of a setting must be finite and lie in `lo ≤ v ≤ hi` (`lo < v` when `lo_open`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    pub lo: f64,
    pub lo_open: bool,
    pub hi: f64,
}

impl Bounds {
    const ANY: Self = Self { lo: f64::NEG_INFINITY, lo_open: false, hi: f64::INFINITY };
    const UNIT: Self = Self { lo: 0.0, lo_open: false, hi: 1.0 };
    const NON_NEGATIVE: Self = Self { lo: 0.0, lo_open: false, hi: f64::INFINITY };
    const POSITIVE: Self = Self { lo: 0.0, lo_open: true, hi: f64::INFINITY };

    /// "must be in [0, 1]", "must be > 0", … ; empty when any finite value is allowed.
    pub fn describe(&self) -> String {
        let lo = if self.lo_open { ">" } else { ">=" };
        match (self.lo.is_finite(), self.hi.is_finite()) {
            (true, true) => format!("must be in [{}, {}]", self.lo, self.hi),
            (true, false) => format!("must be {lo} {}", self.lo),
            (false, true) => format!("must be <= {}", self.hi),
            (false, false) => String::new(),
        }
    }

    pub fn check(&self, field: &'static str, v: f64) -> Result<()> {
        check_finite(field, &[v])?;
        let above = if self.lo_open { v > self.lo } else { v >= self.lo };
        if above && v <= self.hi {
            Ok(())
        } else {
            Err(Error::config(field, format!("{}, got {v}", self.describe())))
        }
    }
}

/// One setting of the objective: the single declaration that the validation, the Python
/// signature and docs (`twinflow._core.LOSS_SETTINGS`) and the training config read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setting {
    pub name: &'static str,
    pub ty: SettingType,
    pub bounds: Bounds,
    pub choices: &'static [&'static str],
    pub doc: &'static str,
}

const fn setting(name: &'static str, ty: SettingType, bounds: Bounds, doc: &'static str) -> Setting {
    Setting { name, ty, bounds, choices: &[], doc }
}

/// The twelve settings, in the order TwinFlowLoss documents them; defaults are
/// [`ObjectiveConfig::default`] (the TwinFlow recipe).
pub const LOSS_SETTINGS: [Setting; 12] = {
    use SettingType::*;
    [
        setting("consistc_ratio", Float, Bounds::UNIT, "consistency ratio cor: how far tt lies below t (tt = t − U·cor·t); 0 is plain flow matching"),
        setting("ema_decay_rate", Float, Bounds::UNIT, "target EMA decay emd of the teacher; 0: the online model is the teacher, 1: a frozen copy"),
        setting("enhanced_ratio", Float, Bounds::ANY, "guidance strength enr of the enhanced target, target + enr·(v_c − v_u); 0 turns it off"),
        setting("enhanced_range", Floats(2), Bounds::ANY, "(lo, hi): the enhanced target applies where lo < t < hi"),
        setting("time_dist_ctrl", Floats(3), Bounds::POSITIVE, "(β1, β2, scale): training times t ~ Beta(β1, β2)·scale"),
        setting("estimate_order", Int, Bounds { lo: 0.0, lo_open: false, hi: MAX_ESTIMATE_ORDER as f64 }, "RCGM order N (N teacher calls per step); 0: no RCGM target"),
        Setting { name: "loss", ty: Choice, bounds: Bounds::ANY, choices: &["barron", "l2"], doc: "per-row loss: Barron's robust loss or the mean squared error" },
        setting("barron_alpha", Float, Bounds::ANY, "Barron shape α (2 is L2 / c)"),
        setting("barron_c", Float, Bounds::POSITIVE, "Barron scale c"),
        setting("dist_match_cof", Float, Bounds::NON_NEGATIVE, "weight of the distribution-matching term on the e2e rows; 0 turns it off"),
        setting("use_image_free", Bool, Bounds::ANY, "replace every row's data by a one-step fake (image-free training)"),
        setting("sub_batches", RunWeights, Bounds::NON_NEGATIVE, "weights of the e2e, mul, any and adv runs (0 turns a run off)"),
    ]
};

/// The declaration of the setting `name`.
pub fn loss_setting(name: &str) -> Option<&'static Setting> {
    LOSS_SETTINGS.iter().find(|s| s.name == name)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// The values of [`LOSS_SETTINGS`] (`loss`, `barron_alpha`, `barron_c` make up [`LossKind`]).
pub struct ObjectiveConfig {
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

impl Default for ObjectiveConfig {
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

impl ObjectiveConfig {
    /// docs/algorithm.md §3.7: TwinFlow (all four runs), RCGM only (no adv run, no distribution
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

    /// The numbers of setting `name` (empty for bool and choice settings, and for the Barron
    /// parameters under the L2 loss): what its [`Bounds`] constrain.
    pub fn numbers(&self, name: &str) -> Vec<f64> {
        match (name, self.loss) {
            ("consistc_ratio", _) => vec![self.consistc_ratio],
            ("ema_decay_rate", _) => vec![self.ema_decay_rate],
            ("enhanced_ratio", _) => vec![self.enhanced_ratio],
            ("enhanced_range", _) => self.enhanced_range.to_vec(),
            ("time_dist_ctrl", _) => self.time_dist_ctrl.to_vec(),
            ("estimate_order", _) => vec![self.estimate_order as f64],
            ("barron_alpha", LossKind::Barron { alpha, .. }) => vec![alpha],
            ("barron_c", LossKind::Barron { c, .. }) => vec![c],
            ("dist_match_cof", _) => vec![self.dist_match_cof],
            ("sub_batches", _) => self.sub_batches.to_vec(),
            _ => vec![],
        }
    }

    /// Each setting against its declared bounds, then the rules that tie settings together;
    /// every error names its field.
    pub fn validate(&self) -> Result<()> {
        for s in &LOSS_SETTINGS {
            if s.ty == SettingType::RunWeights {
                crate::train::split::check_weights(&self.sub_batches)?; // names the run
            }
            for v in self.numbers(s.name) {
                s.bounds.check(s.name, v)?;
            }
        }
        let [lo, hi] = self.enhanced_range;
        if lo > hi {
            return Err(Error::config("enhanced_range", format!("lo must be <= hi, got ({lo}, {hi})")));
        }
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
    use crate::error::config_field;

    #[test]
    fn recipes() {
        for r in RECIPES {
            ObjectiveConfig::recipe(r).unwrap().validate().unwrap();
        }
        let fm = ObjectiveConfig::recipe("flow_matching").unwrap();
        assert_eq!(fm.sub_batches, [0.0, 1.0, 0.0, 0.0]);
        assert_eq!((fm.consistc_ratio, fm.enhanced_ratio, fm.estimate_order), (0.0, 0.0, 0));
        assert_eq!(ObjectiveConfig::recipe("rcgm").unwrap().sub_batches[3], 0.0);
        assert!(ObjectiveConfig::recipe("gan").is_err());
    }

    #[test]
    fn invalid_fields_are_named() {
        let field = |c: ObjectiveConfig| config_field(c.validate());
        let d = ObjectiveConfig::default;
        assert_eq!(field(ObjectiveConfig { consistc_ratio: f64::NAN, ..d() }), "consistc_ratio");
        assert_eq!(field(ObjectiveConfig { ema_decay_rate: 1.5, ..d() }), "ema_decay_rate");
        assert_eq!(field(ObjectiveConfig { estimate_order: -1, ..d() }), "estimate_order");
        assert_eq!(field(ObjectiveConfig { estimate_order: 1 << 62, ..d() }), "estimate_order");
        assert_eq!(field(ObjectiveConfig { loss: LossKind::Barron { alpha: 1.0, c: 0.0 }, ..d() }), "barron_c");
        assert_eq!(field(ObjectiveConfig { sub_batches: [1.0, -1.0, 1.0, 1.0], ..d() }), "sub_batches");
        assert_eq!(field(ObjectiveConfig { sub_batches: [0.0; 4], ..d() }), "sub_batches");
        assert_eq!(field(ObjectiveConfig { time_dist_ctrl: [1.0, 0.0, 1.0], ..d() }), "time_dist_ctrl");
        assert_eq!(field(ObjectiveConfig { enhanced_range: [0.8, 0.2], ..d() }), "enhanced_range");
        assert_eq!(field(ObjectiveConfig { dist_match_cof: -0.5, ..d() }), "dist_match_cof");
        assert_eq!(field(ObjectiveConfig { enhanced_ratio: f64::INFINITY, ..d() }), "enhanced_ratio");
    }

    #[test]
    fn every_setting_is_declared_once_and_checked() {
        let names: Vec<&str> = LOSS_SETTINGS.iter().map(|s| s.name).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(names.len(), unique.len());
        let d = ObjectiveConfig::default();
        for s in &LOSS_SETTINGS {
            assert!(!s.doc.is_empty(), "{}", s.name);
            let numeric = !matches!(s.ty, SettingType::Bool | SettingType::Choice);
            assert_eq!(!d.numbers(s.name).is_empty(), numeric, "{}", s.name);
        }
        assert_eq!(loss_setting("barron_c").unwrap().bounds.describe(), "must be > 0");
        assert_eq!(loss_setting("consistc_ratio").unwrap().bounds.describe(), "must be in [0, 1]");
        // Under L2 the Barron parameters are not checked (they are not used).
        let l2 = ObjectiveConfig { loss: LossKind::L2, ..d };
        assert!(l2.numbers("barron_c").is_empty());
        l2.validate().unwrap();
    }
}
