//! The factors file: LongRoPE rescale factors as `longmix search` writes them and `[rope]`,
//! `eval --factors` and `needle-ppl` read them.
//!
//! A factor λ_i divides pair i's frequency: `inv_freq_i = 1 / (λ_i · b^(2i/d_rot))`
//! (docs/numerics.md §3.1). The closed forms are [`crate::extension::FactorSet`].

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A factors file, written by `longmix search` and read by `[rope]` and `longmix export`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactorsFile {
    pub long_factor: Vec<f64>,
    #[serde(default)]
    pub short_factor: Option<Vec<f64>>,
    /// L the factors were made for.
    pub target_length: i64,
    /// L0 the factors were made for.
    pub original_length: i64,
    /// Free-form provenance (method, fitness, ...).
    #[serde(default)]
    pub notes: serde_json::Value,
}

impl FactorsFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read factors file {}", path.display()))?;
        let f: FactorsFile = serde_json::from_str(&text).with_context(|| {
            format!("{} is not a factors file (expected {{\"long_factor\": [...], \"target_length\": L, \"original_length\": L0}})", path.display())
        })?;
        if f.long_factor.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
            bail!("{}: every long factor must be a finite number > 0", path.display());
        }
        Ok(f)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        longmix_core::fsx::write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes())
    }
}
