//! RoPE overrides: evaluate one checkpoint under its own config, PI, NTK, dynamic NTK, YaRN,
//! a LongRoPE factor set, and/or STRING, without touching its files.
//!
//! The extension ratio is `s = target_length / L0`, with `L0` the model's pre-training window
//! (`original_max_position_embeddings`, or `max_position_embeddings` for unscaled models).

use anyhow::{bail, Context, Result};
use longmix_model::{
    AttentionFactor, Extension, ExtensionSpec, FactorSet, LongFactors, ModelConfig, RopeScaling, StringConfig,
};
use serde_json::{json, Value};

/// A RoPE override (or none).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeOverride {
    /// The checkpoint's own `config.json`.
    Own,
    /// Position interpolation: every frequency / s (`rope_type: linear`, short rows included).
    Pi,
    /// Static NTK-aware base change `b' = b * s^(d/(d-2))` (YaRN repository's NTK).
    Ntk,
    /// transformers' dynamic NTK (`rope_type: dynamic`, base grows with the sequence beyond L0).
    Dynamic,
    /// YaRN (beta_fast 32, beta_slow 1, attention factor 0.1 ln s + 1).
    Yarn,
    /// A LongRoPE extension ([`Extension`]): short rows keep the model's own RoPE, long rows
    /// take a closed-form factor set (`longrope2`: LongRoPE2's initial factors; `original`) or
    /// a factors file, with the set's own attention factor.
    Extension(LongFactors),
}

impl RopeOverride {
    /// `own`, `pi`, `ntk`, `dynamic`, `yarn`, or a LongRoPE factor set (`longrope2`, `original`).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "own" | "none" => RopeOverride::Own,
            "pi" | "linear" => RopeOverride::Pi,
            "ntk" => RopeOverride::Ntk,
            "dynamic" | "dynamic-ntk" => RopeOverride::Dynamic,
            "yarn" => RopeOverride::Yarn,
            other => match other.parse::<FactorSet>() {
                Ok(set) => RopeOverride::Extension(LongFactors::Set(set)),
                Err(_) => bail!(
                    "unknown --rope {s:?}: use own, pi, ntk, dynamic, yarn, longrope2 or original (or --factors FILE)"
                ),
            },
        })
    }

    pub fn name(&self) -> String {
        match self {
            RopeOverride::Own => "own".into(),
            RopeOverride::Pi => "pi".into(),
            RopeOverride::Ntk => "ntk".into(),
            RopeOverride::Dynamic => "dynamic".into(),
            RopeOverride::Yarn => "yarn".into(),
            RopeOverride::Extension(LongFactors::Set(set)) => set.name().into(),
            RopeOverride::Extension(LongFactors::File(path)) => {
                format!("factors({})", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            }
            RopeOverride::Extension(LongFactors::List(_)) => "factors".into(),
        }
    }
}

/// STRING's knobs as a user gives them (unset ones take STRING's defaults for the model).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StringChoice {
    pub shifted_offset: Option<i64>,
    pub local_window: Option<i64>,
    pub attention_factor: Option<f64>,
}

impl StringChoice {
    pub fn resolve(&self, config: &ModelConfig) -> Result<StringConfig> {
        let mut s = StringConfig::for_model(config);
        if let Some(o) = self.shifted_offset {
            s.shifted_offset = o;
            if self.local_window.is_none() {
                s.local_window = s.local_window.min(o - 1).max(0);
            }
        }
        if let Some(w) = self.local_window {
            s.local_window = w;
        }
        if let Some(a) = self.attention_factor {
            s.attention_factor = a;
        }
        s.validate()?;
        Ok(s)
    }
}

/// Everything that changes how positions are encoded for one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeChoice {
    pub rope: RopeOverride,
    /// L, the length the closed-form methods extend to (needed by all but `own`; a factors
    /// file carries its own).
    pub target_length: Option<i64>,
    pub string: Option<StringChoice>,
}

impl Default for RopeChoice {
    fn default() -> Self {
        RopeChoice { rope: RopeOverride::Own, target_length: None, string: None }
    }
}

/// What an override resolved to, for reports.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Short label, e.g. `yarn x2`, `own+string(S=2703,W=128)`.
    pub label: String,
    pub string: Option<StringConfig>,
    /// JSON description of the RoPE in force.
    pub details: Value,
}

impl RopeChoice {
    /// Rewrite `config.rope` (and `max_position_embeddings` to L for extended settings) and
    /// resolve STRING. The model keeps its weights; only positions change.
    pub fn apply(&self, config: &mut ModelConfig) -> Result<Applied> {
        let rope = &mut config.rope;
        let l0 = rope.original_max_position_embeddings;
        let target = |what: &str| -> Result<i64> {
            let l = self.target_length.ok_or_else(|| {
                anyhow::anyhow!("--rope {what} needs --target-length L (the window to extend to; L0 = {l0})")
            })?;
            longmix_model::extension::window_lengths(l, None, rope)
                .map_err(|e| anyhow::anyhow!("--target-length {e}"))?;
            Ok(l)
        };
        let mut label = self.rope.name();
        match &self.rope {
            RopeOverride::Own => {
                if self.target_length.is_some() {
                    bail!("--target-length needs a --rope method (pi, ntk, dynamic, yarn, longrope2)");
                }
            }
            RopeOverride::Pi => {
                let l = target("pi")?;
                rope.scaling = RopeScaling::Linear { factor: l as f64 / l0 as f64 };
                config.max_position_embeddings = l;
            }
            RopeOverride::Ntk => {
                let l = target("ntk")?;
                let s = l as f64 / l0 as f64;
                let d = rope.d_rot as f64;
                rope.theta *= s.powf(d / (d - 2.0));
                rope.scaling = RopeScaling::Default;
                config.max_position_embeddings = l;
            }
            RopeOverride::Dynamic => {
                let l = target("dynamic")?;
                rope.scaling = RopeScaling::Dynamic { factor: l as f64 / l0 as f64, original: l0 };
                config.max_position_embeddings = l;
            }
            RopeOverride::Yarn => {
                let l = target("yarn")?;
                rope.scaling = RopeScaling::Yarn {
                    factor: l as f64 / l0 as f64,
                    attention_factor: None,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    mscale: None,
                    mscale_all_dim: None,
                    truncate: true,
                };
                config.max_position_embeddings = l;
            }
            RopeOverride::Extension(long) => {
                let target_length = match long {
                    LongFactors::File(_) if self.target_length.is_some() => {
                        bail!("--target-length cannot be combined with --factors: the file names its own target length")
                    }
                    LongFactors::File(_) => None,
                    _ => Some(target(&self.rope.name())?),
                };
                let spec = ExtensionSpec {
                    target_length,
                    original_length: None,
                    long: long.clone(),
                    short: None,
                    attention: AttentionFactor::Native,
                };
                let ext = Extension::resolve(&spec, rope).with_context(|| format!("--rope {}", self.rope.name()))?;
                ext.apply(config);
            }
        }
        if let Some(l) = self.target_length {
            label = format!("{label} x{}", fmt_ratio(l as f64 / l0 as f64));
        }
        let string = self.string.map(|s| s.resolve(config)).transpose()?;
        if let Some(s) = &string {
            label = format!("{label}+string(S={},W={})", s.shifted_offset, s.local_window);
        }
        let details = json!({
            "rope": self.rope.name(),
            "scaling": format!("{:?}", config.rope.scaling),
            "theta": config.rope.theta,
            "d_rot": config.rope.d_rot,
            "original_length": config.rope.original_max_position_embeddings,
            "target_length": self.target_length,
            "attention_factor": config.rope.attention_factor(),
            "string": string.map(|s| json!({
                "shifted_offset": s.shifted_offset, "local_window": s.local_window,
                "attention_factor": s.attention_factor,
            })),
        });
        Ok(Applied { label, string, details })
    }
}

fn fmt_ratio(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.2}")
    }
}
