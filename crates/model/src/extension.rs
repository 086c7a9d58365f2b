//! A LongRoPE window extension L0 -> L: the one place that assembles it and checks it.
//!
//! Training (`[rope]`), evaluation (`--rope longrope2`, `--factors`), the factor search and
//! `needle-ppl` all describe an extension as an [`ExtensionSpec`] and turn it into an
//! [`Extension`] with [`Extension::resolve`]; the model takes it with [`Extension::apply`] and the
//! exported `config.json` writes it (see `export.rs`). The formulas are in `docs/numerics.md`.
//!
//! * Long factors come from a closed form ([`FactorSet`]), a list, or a factors file.
//! * Short factors default to a file's own, else the model's own short-window frequencies
//!   ([`own_short_factors`]: all 1.0 for plain RoPE), so short rows keep the original RoPE.
//! * The attention factor follows an [`AttentionFactor`] policy.

use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tch::{Device, Kind};

use crate::config::ModelConfig;
use crate::factors::FactorsFile;
use crate::rope::{RopeConfig, RopeScaling};

/// LongRoPE's magnitude scaling `sqrt(1 + ln s / ln L0)` (1 when `s <= 1`); what transformers
/// derives for a longrope config that states no `attention_factor`.
pub fn longrope_attention_factor(s: f64, original: i64) -> f64 {
    if s <= 1.0 {
        1.0
    } else {
        (1.0 + s.ln() / (original as f64).ln()).sqrt()
    }
}

/// YaRN's magnitude scaling `0.1 ln s + 1` (1 when `s <= 1`).
pub fn yarn_attention_factor(s: f64) -> f64 {
    if s <= 1.0 {
        1.0
    } else {
        0.1 * s.ln() + 1.0
    }
}

/// LongRoPE2's theoretical critical dimension (0-based pair index):
/// `ceil((d/2) · log_b(L0 / 2π)) - 1`, clamped to a valid pair (34 for LLaMA-3-8B at 8k, 33 for
/// Phi-3 at 4k; docs/numerics.md §3.4).
pub fn critical_dim(theta: f64, d_rot: i64, original: i64) -> i64 {
    let pairs = (d_rot / 2) as f64;
    let cd = (pairs * ((original as f64) / (2.0 * PI)).ln() / theta.ln()).ceil() as i64 - 1;
    cd.clamp(1, d_rot / 2 - 1)
}

/// A closed-form set of long factors. One vocabulary for the TOML (`rope.init`), the CLI
/// (`eval --rope`, `needle-ppl --factors`) and the search's start (`search.init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FactorSet {
    /// λ_i = 1: the original frequencies, extrapolated.
    Original,
    /// Position interpolation: λ_i = s.
    Pi,
    /// NTK-aware base change b' = b·s^(d/(d-2)): λ_i = s^(2i/(d-2)).
    Ntk,
    /// YaRN's frequencies (beta_fast 32, beta_slow 1): λ_i = 1 / ((1-γ_i)/s + γ_i).
    Yarn,
    /// LongRoPE2's initial shape: pairs below the critical dimension NTK-shaped from λ_cd = s,
    /// pairs from it on at s, rising by 0.01 per pair so the list is strictly increasing.
    Longrope2,
}

impl FactorSet {
    pub const ALL: [FactorSet; 5] =
        [FactorSet::Original, FactorSet::Pi, FactorSet::Ntk, FactorSet::Yarn, FactorSet::Longrope2];

    pub fn name(self) -> &'static str {
        match self {
            FactorSet::Original => "original",
            FactorSet::Pi => "pi",
            FactorSet::Ntk => "ntk",
            FactorSet::Yarn => "yarn",
            FactorSet::Longrope2 => "longrope2",
        }
    }

    /// "original, pi, ntk, yarn or longrope2".
    pub fn names() -> String {
        let n: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
        format!("{} or {}", n[..n.len() - 1].join(", "), n[n.len() - 1])
    }

    /// The long factors for `d_rot` rotated dims, base `theta`, L0 -> L.
    pub fn factors(self, theta: f64, d_rot: i64, original: i64, target: i64) -> Vec<f64> {
        let s = target as f64 / original as f64;
        let n = d_rot / 2;
        let d = d_rot as f64;
        match self {
            FactorSet::Original => vec![1.0; n as usize],
            FactorSet::Pi => vec![s; n as usize],
            FactorSet::Ntk => (0..n).map(|i| s.powf(2.0 * i as f64 / (d - 2.0))).collect(),
            FactorSet::Yarn => {
                let corr = |rot: f64| d * ((original as f64) / (rot * 2.0 * PI)).ln() / (2.0 * theta.ln());
                let low = corr(32.0).floor().max(0.0);
                let mut high = corr(1.0).ceil().min(d - 1.0);
                if low == high {
                    high += 0.001;
                }
                (0..n)
                    .map(|i| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let gamma = 1.0 - ramp;
                        1.0 / ((1.0 - gamma) / s + gamma)
                    })
                    .collect()
            }
            FactorSet::Longrope2 => {
                let cd = critical_dim(theta, d_rot, original);
                (0..n).map(|i| if i < cd { s.powf(i as f64 / cd as f64) } else { s + 0.01 * (i - cd) as f64 }).collect()
            }
        }
    }

    /// The attention factor the method itself uses: 1 for original / PI / NTK, YaRN's
    /// `0.1 ln s + 1`, LongRoPE's `sqrt(1 + ln s / ln L0)`.
    pub fn native_attention(self, s: f64, original: i64) -> f64 {
        match self {
            FactorSet::Original | FactorSet::Pi | FactorSet::Ntk => 1.0,
            FactorSet::Yarn => yarn_attention_factor(s),
            FactorSet::Longrope2 => longrope_attention_factor(s, original),
        }
    }
}

impl FromStr for FactorSet {
    type Err = anyhow::Error;

    /// The names of [`FactorSet::name`]; the spellings of earlier versions (`longrope-ntk-init`,
    /// `longrope`, `linear`) keep working.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "original" => FactorSet::Original,
            "pi" | "linear" => FactorSet::Pi,
            "ntk" => FactorSet::Ntk,
            "yarn" => FactorSet::Yarn,
            "longrope2" | "longrope-ntk-init" | "longrope" => FactorSet::Longrope2,
            _ => bail!("unknown factor set {s:?}: use {}", FactorSet::names()),
        })
    }
}

impl std::fmt::Display for FactorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for FactorSet {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for FactorSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: anyhow::Error| de::Error::custom(e))
    }
}

/// The attention-factor policy (the magnitude scaling of cos and sin) of an extension.
/// Spelled `"longrope"`, `"native"`, `"none"` or a positive number, in TOML and on the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum AttentionFactor {
    /// sqrt(1 + ln s / ln L0), what transformers derives for a longrope config without one.
    #[default]
    Longrope,
    /// The factor set's own ([`FactorSet::native_attention`]); for a factors file, the value its
    /// search recorded, else `longrope`.
    Native,
    /// 1.0.
    None,
    Value(f64),
}

const ATTENTION_SPELLINGS: &str = "\"longrope\", \"native\", \"none\" or a positive number";

impl FromStr for AttentionFactor {
    type Err = anyhow::Error;

    fn from_str(v: &str) -> Result<Self> {
        Ok(match v {
            "longrope" => AttentionFactor::Longrope,
            "native" => AttentionFactor::Native,
            "none" => AttentionFactor::None,
            _ => match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x > 0.0 => AttentionFactor::Value(x),
                _ => bail!("{v:?} is not an attention factor; use {ATTENTION_SPELLINGS}"),
            },
        })
    }
}

impl Serialize for AttentionFactor {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            AttentionFactor::Longrope => s.serialize_str("longrope"),
            AttentionFactor::Native => s.serialize_str("native"),
            AttentionFactor::None => s.serialize_str("none"),
            AttentionFactor::Value(v) => s.serialize_f64(*v),
        }
    }
}

impl<'de> Deserialize<'de> for AttentionFactor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AttentionFactor;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(ATTENTION_SPELLINGS)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<AttentionFactor, E> {
                match v.parse::<f64>() {
                    // A number must be a TOML number, not a string.
                    Ok(_) => Err(E::custom(format!("{v:?} is not allowed; use {ATTENTION_SPELLINGS}"))),
                    Err(_) => {
                        v.parse().map_err(|_| E::custom(format!("{v:?} is not allowed; use {ATTENTION_SPELLINGS}")))
                    }
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<AttentionFactor, E> {
                if v.is_finite() && v > 0.0 {
                    Ok(AttentionFactor::Value(v))
                } else {
                    Err(E::custom(format!("{v} must be a positive number")))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<AttentionFactor, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<AttentionFactor, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(V)
    }
}

/// Where the long factors come from.
#[derive(Debug, Clone, PartialEq)]
pub enum LongFactors {
    Set(FactorSet),
    List(Vec<f64>),
    /// A factors file written by `longmix search`; it must have been made for this L0 -> L.
    File(PathBuf),
}

/// An extension as a user describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtensionSpec {
    /// L (None: a factors file's own).
    pub target_length: Option<i64>,
    /// L0 (None: the model's original window).
    pub original_length: Option<i64>,
    pub long: LongFactors,
    /// None: the file's own short factors, else the model's own short-window frequencies.
    pub short: Option<Vec<f64>>,
    pub attention: AttentionFactor,
}

/// A resolved, checked LongRoPE extension L0 -> L. Serialised into checkpoints (the field names
/// are part of the checkpoint format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    pub target_length: i64,
    pub original_length: i64,
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub attention_factor: f64,
    /// Whether the exported config states the factor (false: transformers derives the same value).
    pub explicit_attention_factor: bool,
    /// Keep a sliding window shorter than L (for a model really trained with sliding-window
    /// attention); by default the extension drops it, see [`Extension::sliding_window`].
    #[serde(default)]
    pub keep_sliding_window: bool,
}

/// `(L, L0)` of an extension of a model whose RoPE is `rope`, checked `L > L0`.
pub fn window_lengths(target: i64, original: Option<i64>, rope: &RopeConfig) -> Result<(i64, i64)> {
    let l0 = original.unwrap_or(rope.original_max_position_embeddings);
    if l0 < 1 {
        bail!("the original window L0 = {l0} must be at least 1");
    }
    if target <= l0 {
        bail!("{target} must exceed the original window L0 = {l0} (give the original length to override L0)");
    }
    Ok((target, l0))
}

/// The short factors that keep `rope`'s own short-window frequencies exactly: all 1.0 for plain
/// RoPE, the equivalent factors for llama3 / linear / longrope-short checkpoints.
pub fn own_short_factors(rope: &RopeConfig) -> Vec<f64> {
    let plain = RopeConfig { scaling: RopeScaling::Default, ..rope.clone() }.inv_freq(1, Device::Cpu);
    let own = rope.inv_freq(1, Device::Cpu);
    Vec::<f64>::try_from(plain.to_kind(Kind::Double) / own.to_kind(Kind::Double)).expect("a 1-D double tensor")
}

impl Extension {
    /// Resolve `spec` against the RoPE of the loaded model; every check of an extension is here.
    pub fn resolve(spec: &ExtensionSpec, rope: &RopeConfig) -> Result<Extension> {
        let file = match &spec.long {
            LongFactors::File(path) => Some((path, FactorsFile::read(path)?)),
            _ => None,
        };
        let target = match (spec.target_length, &file) {
            (Some(l), _) => l,
            (None, Some((_, f))) => f.target_length,
            (None, None) => bail!("a closed-form or inline extension needs the target length L"),
        };
        let (l, l0) = window_lengths(target, spec.original_length, rope).context("target length")?;
        let s = l as f64 / l0 as f64;
        let (long_factor, file_short, native) = match (&spec.long, file) {
            (LongFactors::Set(set), _) => {
                (set.factors(rope.theta, rope.d_rot, l0, l), None, set.native_attention(s, l0))
            }
            (LongFactors::List(list), _) => (list.clone(), None, longrope_attention_factor(s, l0)),
            (LongFactors::File(_), Some((path, f))) => {
                if (f.target_length, f.original_length) != (l, l0) {
                    bail!(
                        "factors file {} was made for {} -> {}, but this extends {l0} -> {l}",
                        path.display(),
                        f.original_length,
                        f.target_length
                    );
                }
                let native = f.notes["attention_factor"].as_f64().unwrap_or(longrope_attention_factor(s, l0));
                (f.long_factor, f.short_factor, native)
            }
            (LongFactors::File(_), None) => unreachable!("read above"),
        };
        let short_factor = spec.short.clone().or(file_short).unwrap_or_else(|| own_short_factors(rope));
        let attention_factor = match spec.attention {
            AttentionFactor::Longrope => longrope_attention_factor(s, l0),
            AttentionFactor::Native => native,
            AttentionFactor::None => 1.0,
            AttentionFactor::Value(v) => v,
        };
        // transformers derives the longrope factor itself from the exported config; any other
        // value is written into the export.
        let explicit_attention_factor = attention_factor != longrope_attention_factor(s, l0);
        let ext = Extension {
            target_length: l,
            original_length: l0,
            short_factor,
            long_factor,
            attention_factor,
            explicit_attention_factor,
            keep_sliding_window: false,
        };
        ext.check(rope)?;
        Ok(ext)
    }

    /// The checks every extension passes, also when read back from a checkpoint or exported.
    pub fn check(&self, rope: &RopeConfig) -> Result<()> {
        let n = rope.n_pairs() as usize;
        if self.target_length <= self.original_length {
            bail!(
                "the extended window L = {} must exceed the original one L0 = {}",
                self.target_length,
                self.original_length
            );
        }
        for (name, list) in [("long", &self.long_factor), ("short", &self.short_factor)] {
            if list.len() != n {
                bail!("{} {name} factors, but this model needs d_rot/2 = {n} (one per rotated pair)", list.len());
            }
            if list.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                bail!("every {name} factor must be a finite number > 0");
            }
        }
        if !(self.attention_factor.is_finite() && self.attention_factor > 0.0) {
            bail!("the attention factor {} must be a finite number > 0", self.attention_factor);
        }
        Ok(())
    }

    /// Extension ratio s = L / L0.
    pub fn scale(&self) -> f64 {
        self.target_length as f64 / self.original_length as f64
    }

    /// `base` with this extension's factors: rows longer than L0 use the long ones.
    pub fn rope(&self, base: &RopeConfig) -> RopeConfig {
        RopeConfig {
            original_max_position_embeddings: self.original_length,
            scaling: RopeScaling::LongRope {
                short_factor: self.short_factor.clone(),
                long_factor: self.long_factor.clone(),
                attention_factor: self.attention_factor,
            },
            ..base.clone()
        }
    }

    /// The sliding window of the extended model whose own window is `own`. A window shorter
    /// than L is dropped unless [`Extension::keep_sliding_window`]: a 4k model's window (Phi-3-mini's
    /// 2047) would otherwise keep the extended model from looking past it, in training and in
    /// every runtime that loads the export (Microsoft's 128k Phi-3-mini ships 262144, wider than
    /// its window). A window of at least L never bites and is kept as it is.
    pub fn sliding_window(&self, own: Option<i64>) -> Option<i64> {
        own.filter(|&w| w >= self.target_length || self.keep_sliding_window)
    }

    /// What [`Extension::sliding_window`] does to `own`, for logs and the dry-run plan (None
    /// when the model has no window).
    pub fn sliding_window_note(&self, own: Option<i64>) -> Option<String> {
        let w = own?;
        let l = self.target_length;
        Some(match self.sliding_window(own) {
            None => format!(
                "the model's sliding window {w} < L = {l} is dropped (rope.keep_sliding_window = true keeps it)"
            ),
            Some(_) if w < l => format!("the model's sliding window {w} < L = {l} is kept (rope.keep_sliding_window)"),
            Some(_) => format!("the model's sliding window {w} >= L = {l} is kept (it never bites)"),
        })
    }

    /// Put this extension into a model's config (`max_position_embeddings` becomes L, the
    /// sliding window as [`Extension::sliding_window`] says).
    pub fn apply(&self, config: &mut ModelConfig) {
        config.rope = self.rope(&config.rope);
        config.max_position_embeddings = self.target_length;
        config.sliding_window = self.sliding_window(config.sliding_window);
    }

    /// This extension with other long factors (a search candidate).
    pub fn with_long(&self, long: &[f64]) -> Extension {
        Extension { long_factor: long.to_vec(), ..self.clone() }
    }

    /// A factors file of this extension.
    pub fn factors_file(&self, notes: serde_json::Value) -> FactorsFile {
        FactorsFile {
            long_factor: self.long_factor.clone(),
            short_factor: Some(self.short_factor.clone()),
            target_length: self.target_length,
            original_length: self.original_length,
            notes,
        }
    }
}

/// Read a factors file path or a factor-set name: `needle-ppl --factors` takes either.
pub fn parse_long_factors(s: &str) -> Result<LongFactors> {
    match s.parse::<FactorSet>() {
        Ok(set) => Ok(LongFactors::Set(set)),
        Err(_) if Path::new(s).is_file() => Ok(LongFactors::File(PathBuf::from(s))),
        Err(_) => bail!("{s:?} is neither a factor set ({}) nor a factors file", FactorSet::names()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_dims_of_published_models() {
        // docs/numerics.md §3.4 worked values.
        assert_eq!(critical_dim(5e5, 128, 8192), 34); // LLaMA-3-8B, 8k
        assert_eq!(critical_dim(1e4, 96, 4096), 33); // Phi-3, 4k
        assert_eq!(critical_dim(1e4, 96, 2048), 30); // Phi-3, 2k
    }

    #[test]
    fn sets_have_the_right_ends() {
        let (theta, d, l0, l) = (1e4, 96, 4096, 131072);
        let pi = FactorSet::Pi.factors(theta, d, l0, l);
        assert!(pi.iter().all(|&x| x == 32.0) && pi.len() == 48);
        let ntk = FactorSet::Ntk.factors(theta, d, l0, l);
        assert_eq!(ntk[0], 1.0);
        assert!((ntk[47] - 32f64.powf(94.0 / 94.0)).abs() < 1e-12);
        let yarn = FactorSet::Yarn.factors(theta, d, l0, l);
        assert_eq!(yarn[0], 1.0, "high-frequency pairs extrapolate");
        assert!((yarn[47] - 32.0).abs() < 1e-9, "low-frequency pairs interpolate");
        let lr2 = FactorSet::Longrope2.factors(theta, d, l0, l);
        assert_eq!(lr2[0], 1.0);
        assert!((lr2[33] - 32.0).abs() < 1e-12);
        assert!(lr2.windows(2).all(|w| w[1] > w[0]), "strictly increasing");
        // Below cd the shape is NTK from λ_cd: λ_i = 32^(i/33).
        assert!((lr2[10] - 32f64.powf(10.0 / 33.0)).abs() < 1e-12);
        assert!(FactorSet::Original.factors(theta, d, l0, l).iter().all(|&x| x == 1.0));
    }

    #[test]
    fn one_vocabulary_with_the_old_spellings() {
        for set in FactorSet::ALL {
            assert_eq!(set.name().parse::<FactorSet>().unwrap(), set);
        }
        assert_eq!("longrope-ntk-init".parse::<FactorSet>().unwrap(), FactorSet::Longrope2);
        assert_eq!("longrope".parse::<FactorSet>().unwrap(), FactorSet::Longrope2);
        let e = "ntk-by-parts".parse::<FactorSet>().unwrap_err().to_string();
        assert!(e.contains("original, pi, ntk, yarn or longrope2"), "{e}");
        assert_eq!("1.25".parse::<AttentionFactor>().unwrap(), AttentionFactor::Value(1.25));
        assert_eq!("native".parse::<AttentionFactor>().unwrap(), AttentionFactor::Native);
        assert!("-1".parse::<AttentionFactor>().is_err());
    }
}
