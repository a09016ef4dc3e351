//! Sampler settings (docs/algorithm.md §2): each declared once (type, default, range, doc) in
//! [`sampler_settings!`], serde-friendly, validated once, plus the published presets.

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
    /// (the reference computes it once and reuses it: docs/algorithm.md §5.2).
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

/// Upper bounds (documented in the README's "Safety" section): far above any useful
/// setting, low enough that a typo cannot allocate gigabytes or overflow the result.
pub const MAX_SAMPLING_STEPS: usize = 10_000;
pub const MAX_EXTRAPOL_RATIO: f64 = 10.0;

/// A setting's value as the bindings hand it over (Python objects map onto these).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    /// An integer that does not fit i64, as written.
    BigInt(String),
    Float(f64),
    Str(String),
    Seq(Vec<Value>),
    /// Anything else, by its type name.
    Other(String),
}

impl Value {
    fn type_name(&self) -> &str {
        match self {
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Seq(_) => "sequence",
            Value::Other(t) => t,
        }
    }

    /// The value as Python would print it.
    pub fn show(&self) -> String {
        match self {
            Value::Bool(b) => if *b { "True".into() } else { "False".into() },
            Value::Int(i) => i.to_string(),
            Value::BigInt(s) => s.clone(),
            Value::Float(f) => format!("{f:?}"),
            Value::Str(s) => format!("{s:?}"),
            Value::Seq(v) => format!("({})", v.iter().map(Value::show).collect::<Vec<_>>().join(", ")),
            Value::Other(t) => format!("<{t}>"),
        }
    }
}

/// Why a [`Value`] does not convert to a setting's type.
pub enum Mismatch {
    /// Wrong kind of value (`TypeError`).
    Type,
    /// The right kind but outside the setting's range (`ValueError` with the range).
    Range,
    /// A sequence of the wrong length.
    Len(usize),
}

/// The Rust types a setting can have: conversion from and to [`Value`], and the numbers its
/// range applies to.
pub trait SettingValue: Sized {
    /// The type as the Python signature writes it.
    const TYPE: &'static str;
    fn from_value(v: &Value) -> std::result::Result<Self, Mismatch>;
    fn to_value(&self) -> Value;
    fn numbers(&self) -> Vec<f64> {
        vec![]
    }
}

impl SettingValue for f64 {
    const TYPE: &'static str = "float";
    fn from_value(v: &Value) -> std::result::Result<Self, Mismatch> {
        match v {
            Value::Int(i) => Ok(*i as f64),
            Value::Float(f) => Ok(*f),
            Value::BigInt(_) => Err(Mismatch::Range),
            _ => Err(Mismatch::Type),
        }
    }
    fn to_value(&self) -> Value {
        Value::Float(*self)
    }
    fn numbers(&self) -> Vec<f64> {
        vec![*self]
    }
}

/// The integer settings: a negative or too large int is out of range, not a type error.
macro_rules! int_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            const TYPE: &'static str = "int";
            fn from_value(v: &Value) -> std::result::Result<Self, Mismatch> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i).map_err(|_| Mismatch::Range),
                    Value::BigInt(_) => Err(Mismatch::Range),
                    _ => Err(Mismatch::Type),
                }
            }
            fn to_value(&self) -> Value {
                Value::Int(*self as i64)
            }
            fn numbers(&self) -> Vec<f64> {
                vec![*self as f64]
            }
        }
    )*};
}

int_setting!(usize, u32);

impl SettingValue for bool {
    const TYPE: &'static str = "bool";
    fn from_value(v: &Value) -> std::result::Result<Self, Mismatch> {
        match v {
            Value::Bool(b) => Ok(*b),
            _ => Err(Mismatch::Type),
        }
    }
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
}

/// Python type names of the fixed-length float tuples.
const fn tuple_type(n: usize) -> &'static str {
    match n {
        2 => "tuple[float, float]",
        3 => "tuple[float, float, float]",
        _ => "tuple[float, ...]",
    }
}

impl<const N: usize> SettingValue for [f64; N] {
    const TYPE: &'static str = tuple_type(N);
    fn from_value(v: &Value) -> std::result::Result<Self, Mismatch> {
        let Value::Seq(items) = v else { return Err(Mismatch::Type) };
        if items.len() != N {
            return Err(Mismatch::Len(items.len()));
        }
        let mut out = [0.0; N];
        for (o, it) in out.iter_mut().zip(items) {
            *o = f64::from_value(it).map_err(|_| Mismatch::Type)?;
        }
        Ok(out)
    }
    fn to_value(&self) -> Value {
        Value::Seq(self.iter().map(|&f| Value::Float(f)).collect())
    }
    fn numbers(&self) -> Vec<f64> {
        self.to_vec()
    }
}

impl SettingValue for StochastRatio {
    const TYPE: &'static str = "float | \"SDE\"";
    fn from_value(v: &Value) -> std::result::Result<Self, Mismatch> {
        match v {
            Value::Str(s) if s.eq_ignore_ascii_case("sde") => Ok(Self::Sde),
            Value::Str(_) => Err(Mismatch::Range),
            other => f64::from_value(other).map(Self::Fixed),
        }
    }
    fn to_value(&self) -> Value {
        match self {
            Self::Fixed(s) => Value::Float(*s),
            Self::Sde => Value::Str("SDE".into()),
        }
    }
    fn numbers(&self) -> Vec<f64> {
        match self {
            Self::Fixed(s) => vec![*s],
            Self::Sde => vec![],
        }
    }
}

impl SettingValue for SamplingStyle {
    const TYPE: &'static str = "str";
    fn from_value(v: &Value) -> std::result::Result<Self, Mismatch> {
        match v {
            Value::Str(s) => Self::parse(s).map_err(|_| Mismatch::Range),
            _ => Err(Mismatch::Type),
        }
    }
    fn to_value(&self) -> Value {
        Value::Str(self.as_str().into())
    }
}

/// The values a setting accepts (for tuples: every element).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Range {
    /// Finite numbers between `lo` and `hi`; `*_open` excludes the bound.
    Num { lo: f64, lo_open: bool, hi: f64, hi_open: bool },
    Choices(&'static [&'static str]),
    /// Any value of the type (the boolean switches).
    Any,
}

impl Range {
    const fn closed(lo: f64, hi: f64) -> Self {
        Range::Num { lo, lo_open: false, hi, hi_open: false }
    }

    fn contains(&self, v: f64) -> bool {
        match *self {
            Range::Num { lo, lo_open, hi, hi_open } => {
                (if lo_open { v > lo } else { v >= lo }) && (if hi_open { v < hi } else { v <= hi })
            }
            _ => true,
        }
    }

    /// "in [0, 1]", "> 0", "one of \"few\", ..."
    pub fn describe(&self) -> String {
        match *self {
            Range::Num { lo, lo_open, hi, .. } if hi.is_infinite() => {
                format!("{} {lo}", if lo_open { ">" } else { ">=" })
            }
            Range::Num { lo, lo_open, hi, hi_open } => format!(
                "in {}{lo}, {hi}{}",
                if lo_open { "(" } else { "[" },
                if hi_open { ")" } else { "]" }
            ),
            Range::Choices(c) => format!("one of {}", c.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")),
            Range::Any => "True or False".into(),
        }
    }
}

/// One sampler setting as declared in [`sampler_settings!`].
#[derive(Clone, Copy, Debug)]
pub struct SettingSpec {
    pub name: &'static str,
    /// The type as Python writes it ("int", "float", "tuple[float, float]", ...).
    pub type_name: &'static str,
    pub range: Range,
    /// A rule across the elements of a tuple, beyond `range`.
    pub rule: Option<&'static str>,
    pub doc: &'static str,
    /// Part of the sampler's configuration (saved by `to_dict`, shapes the time grid);
    /// `false` for the run-time switches.
    pub saved: bool,
}

impl SettingSpec {
    /// What the setting accepts, in words ("each value > 0; g0 + g1 < 1").
    pub fn range_text(&self) -> String {
        let each = if self.type_name.starts_with("tuple") { "each value " } else { "" };
        let mut s = format!("{each}{}", self.range.describe());
        if let Some(r) = self.rule {
            s.push_str("; ");
            s.push_str(r);
        }
        s
    }

    fn convert<T: SettingValue>(&self, v: &Value) -> Result<T> {
        T::from_value(v).map_err(|m| match m {
            Mismatch::Type => Error::Type(format!("{} must be {}, got {}", self.name, self.type_name, v.type_name())),
            Mismatch::Range => self.out_of_range(&v.show()),
            Mismatch::Len(n) => Error::config(self.name, format!("expected {}, got {n} values", self.type_name)),
        })
    }

    fn out_of_range(&self, shown: &str) -> Error {
        Error::config(self.name, format!("must be {}, got {shown}", self.range_text()))
    }

    /// Finite and inside `range`, element by element.
    fn check<T: SettingValue>(&self, value: &T) -> Result<()> {
        let numbers = value.numbers();
        check_finite(self.name, &numbers)?;
        if numbers.iter().all(|&x| self.range.contains(x)) {
            Ok(())
        } else {
            Err(self.out_of_range(&value.to_value().show()))
        }
    }
}

/// Declares every sampler setting once: the [`SamplerConfig`] field with its type and
/// default, its range and doc. The validation, `get`/`set` by name (what the bindings use)
/// and the exported table [`SAMPLER_SETTINGS`] all come from here.
macro_rules! sampler_settings {
    ($( $(#[doc = $doc:literal])+ $name:ident : $ty:ty = $default:expr, range: $range:expr, rule: $rule:expr, saved: $saved:expr; )*) => {
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct SamplerConfig {
            $( $(#[doc = $doc])+ pub $name: $ty, )*
        }

        impl Default for SamplerConfig {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// Every sampler setting in declaration order.
        pub const SAMPLER_SETTINGS: &[SettingSpec] = &[
            $( SettingSpec {
                name: stringify!($name),
                type_name: <$ty as SettingValue>::TYPE,
                range: $range,
                rule: $rule,
                doc: concat!($($doc, "\n"),+),
                saved: $saved,
            }, )*
        ];

        impl SamplerConfig {
            /// The setting `name` as a [`Value`] (None for an unknown name).
            pub fn get(&self, name: &str) -> Option<Value> {
                match name {
                    $( stringify!($name) => Some(self.$name.to_value()), )*
                    _ => None,
                }
            }

            /// Set `name` from a [`Value`]: `Error::Type` for a wrong kind or an unknown name,
            /// `Error::Config` for a value outside the setting's range.
            pub fn set(&mut self, name: &str, v: &Value) -> Result<()> {
                match name {
                    $( stringify!($name) => self.$name = spec(stringify!($name)).convert(v)?, )*
                    _ => return Err(Error::Type(format!("unknown sampler setting {name:?}"))),
                }
                Ok(())
            }

            /// Every setting finite and inside its declared range.
            fn check_ranges(&self) -> Result<()> {
                $( spec(stringify!($name)).check(&self.$name)?; )*
                Ok(())
            }
        }
    };
}

/// The declaration of setting `name` (a name from the macro itself: always present).
fn spec(name: &str) -> &'static SettingSpec {
    SAMPLER_SETTINGS.iter().find(|s| s.name == name).expect("declared setting")
}

const RFBA_RULE: &str = "g0 + g1 < 1";

sampler_settings! {
    /// Number of model evaluations with order 1; order 2 uses ceil(steps / 2) intervals.
    sampling_steps: usize = 20, range: Range::closed(1.0, MAX_SAMPLING_STEPS as f64), rule: None, saved: true;
    /// Share s of fresh noise mixed in at each step: 0 is deterministic, "SDE" recomputes
    /// s = min(1, 2·t_c·|t_c − t_n| / t_n²) for every interval.
    stochast_ratio: StochastRatio = StochastRatio::Fixed(0.0), range: Range::closed(0.0, 1.0), rule: None, saved: true;
    /// Extrapolate x̂ and ẑ from the previous interval by this ratio (from the third interval).
    extrapol_ratio: f64 = 0.0, range: Range::closed(0.0, MAX_EXTRAPOL_RATIO), rule: None, saved: true;
    /// 1: one evaluation per interval; 2: Heun corrector (2n − 1 evaluations).
    sampling_order: u32 = 1, range: Range::closed(1.0, 2.0), rule: None, saved: true;
    /// Kumaraswamy warp (a, b, c) of the time grid: u ↦ (1 − (1 − u^a)^b)^c.
    time_dist_ctrl: [f64; 3] = [1.0, 1.0, 1.0],
        range: Range::Num { lo: 0.0, lo_open: true, hi: f64::INFINITY, hi_open: true }, rule: None, saved: true;
    /// Gaps (g0, g1) cut from the start and the end of the grid before warping.
    rfba_gap_steps: [f64; 2] = [0.0, 0.0],
        range: Range::Num { lo: 0.0, lo_open: false, hi: f64::INFINITY, hi_open: true }, rule: Some(RFBA_RULE), saved: true;
    /// Target time tt of each model call: "few" → 0, "mul" → t_c, "any" → t_n.
    sampling_style: SamplingStyle = SamplingStyle::Few, range: Range::Choices(&["few", "mul", "any"]), rule: None, saved: true;
    /// Use the fused CPU kernels where the tensors allow it (False: libtorch ops everywhere).
    use_fused_kernel: bool = true, range: Range::Any, rule: None, saved: false;
    /// Refuse NaN/Inf noise and stop at the first step whose result is not finite, naming it.
    check_finite: bool = true, range: Range::Any, rule: None, saved: false;
}

/// Names accepted by [`SamplerConfig::preset`].
pub const PRESET_NAMES: [&str; 5] = ["1-nfe", "2-nfe", "4-nfe", "any-step", "multi-step"];

impl SamplerConfig {
    /// The published settings (docs/algorithm.md §2 table).
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

    /// Every declared range, then the rule across `rfba_gap_steps`; the error names the
    /// offending setting.
    pub fn validate(&self) -> Result<()> {
        self.check_ranges()?;
        let [g0, g1] = self.rfba_gap_steps;
        if g0 + g1 >= 1.0 {
            return Err(Error::config("rfba_gap_steps", format!("{RFBA_RULE} required, got ({g0}, {g1})")));
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
    use crate::error::config_field;

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
        config_field(c.validate())
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
    fn every_declared_setting_is_a_field_with_its_default_in_range() {
        let d = SamplerConfig::default();
        d.validate().unwrap();
        for spec in SAMPLER_SETTINGS {
            let v = d.get(spec.name).unwrap_or_else(|| panic!("{} has no field", spec.name));
            let mut c = SamplerConfig::default();
            c.set(spec.name, &v).unwrap();
            assert_eq!(c, d, "{}", spec.name);
            assert!(!spec.doc.trim().is_empty() && !spec.range_text().is_empty());
        }
        assert!(matches!(SamplerConfig::default().set("bogus", &Value::Int(1)), Err(Error::Type(_))));
    }

    #[test]
    fn values_convert_or_name_the_setting() {
        let mut c = SamplerConfig::default();
        let field = config_field::<()>;
        // Out of the type's domain is out of range, not a type error.
        assert_eq!(field(c.set("sampling_steps", &Value::Int(-1))), "sampling_steps");
        assert_eq!(field(c.set("sampling_steps", &Value::BigInt("1".repeat(30)))), "sampling_steps");
        assert_eq!(field(c.set("stochast_ratio", &Value::Str("foo".into()))), "stochast_ratio");
        assert_eq!(field(c.set("time_dist_ctrl", &Value::Seq(vec![Value::Int(1)]))), "time_dist_ctrl");
        for (name, v) in [("sampling_steps", Value::Float(2.0)), ("sampling_style", Value::Int(1)),
                          ("use_fused_kernel", Value::Int(1)), ("rfba_gap_steps", Value::Str("ab".into()))] {
            assert!(matches!(c.set(name, &v), Err(Error::Type(m)) if m.contains(name)), "{name}");
        }
        c.set("stochast_ratio", &Value::Str("sde".into())).unwrap();
        c.set("time_dist_ctrl", &Value::Seq(vec![Value::Int(2), Value::Float(0.5), Value::Int(1)])).unwrap();
        assert_eq!((c.stochast_ratio, c.time_dist_ctrl), (StochastRatio::Sde, [2.0, 0.5, 1.0]));
        // Ranges are checked by validate (so presets and serde input get the same checks).
        c.set("extrapol_ratio", &Value::Float(11.0)).unwrap();
        assert_eq!(field(c.validate()), "extrapol_ratio");
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
