//! LongRoPE rescale factors: closed-form initialisations and the factors file.
//!
//! A factor λ_i divides pair i's frequency: `inv_freq_i = 1 / (λ_i · b^(2i/d_rot))`
//! (rope-extension.md §3.1). `s = L / L0` is the extension ratio.

use std::f64::consts::PI;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How to initialise the long factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FactorInit {
    /// Position interpolation: λ_i = s.
    Pi,
    /// NTK-aware base change b' = b·s^(d/(d-2)): λ_i = s^(2i/(d-2)).
    Ntk,
    /// YaRN's frequencies (beta_fast 32, beta_slow 1): λ_i = 1 / ((1-γ_i)/s + γ_i).
    Yarn,
    /// LongRoPE2's shape: pairs below the critical dimension NTK-shaped from λ_cd, pairs from it
    /// on at s, rising by 0.01 per pair so the list is strictly increasing as the search wants.
    LongropeNtkInit,
}

/// LongRoPE2's theoretical critical dimension (0-based pair index):
/// `ceil((d/2) · log_b(L0 / 2π)) - 1` (rope-extension.md §3.4; 34 for LLaMA-3-8B 8k,
/// 33 for Phi-3 4k).
pub fn critical_dim(theta: f64, d_rot: i64, original: i64) -> i64 {
    let pairs = (d_rot / 2) as f64;
    let cd = (pairs * ((original as f64) / (2.0 * PI)).ln() / theta.ln()).ceil() as i64 - 1;
    cd.clamp(1, d_rot / 2 - 1)
}

/// The long factors of `init` for `d_rot` rotated dims, base `theta`, L0 → L.
pub fn init_factors(init: FactorInit, theta: f64, d_rot: i64, original: i64, target: i64) -> Vec<f64> {
    let s = target as f64 / original as f64;
    let n = d_rot / 2;
    let d = d_rot as f64;
    match init {
        FactorInit::Pi => vec![s; n as usize],
        FactorInit::Ntk => (0..n).map(|i| s.powf(2.0 * i as f64 / (d - 2.0))).collect(),
        FactorInit::Yarn => {
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
        FactorInit::LongropeNtkInit => {
            let cd = critical_dim(theta, d_rot, original);
            (0..n)
                .map(|i| if i < cd { s.powf(i as f64 / cd as f64) } else { s + 0.01 * (i - cd) as f64 })
                .collect()
        }
    }
}

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
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read factors file {}", path.display()))?;
        let f: FactorsFile = serde_json::from_str(&text).with_context(|| {
            format!("{} is not a factors file (expected {{\"long_factor\": [...], \"target_length\": L, \"original_length\": L0}})", path.display())
        })?;
        if f.long_factor.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
            bail!("{}: every long factor must be a finite number > 0", path.display());
        }
        Ok(f)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.partial");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_dims_of_published_models() {
        // rope-extension.md §3.4 worked values.
        assert_eq!(critical_dim(5e5, 128, 8192), 34); // LLaMA-3-8B, 8k
        assert_eq!(critical_dim(1e4, 96, 4096), 33); // Phi-3, 4k
        assert_eq!(critical_dim(1e4, 96, 2048), 30); // Phi-3, 2k
    }

    #[test]
    fn inits_have_the_right_ends() {
        let (theta, d, l0, l) = (1e4, 96, 4096, 131072);
        let pi = init_factors(FactorInit::Pi, theta, d, l0, l);
        assert!(pi.iter().all(|&x| x == 32.0) && pi.len() == 48);
        let ntk = init_factors(FactorInit::Ntk, theta, d, l0, l);
        assert_eq!(ntk[0], 1.0);
        assert!((ntk[47] - 32f64.powf(94.0 / 94.0)).abs() < 1e-12);
        let yarn = init_factors(FactorInit::Yarn, theta, d, l0, l);
        assert_eq!(yarn[0], 1.0, "high-frequency pairs extrapolate");
        assert!((yarn[47] - 32.0).abs() < 1e-9, "low-frequency pairs interpolate");
        let lr2 = init_factors(FactorInit::LongropeNtkInit, theta, d, l0, l);
        assert_eq!(lr2[0], 1.0);
        assert!((lr2[33] - 32.0).abs() < 1e-12);
        assert!(lr2.windows(2).all(|w| w[1] > w[0]), "strictly increasing");
        // Below cd the shape is NTK from λ_cd: λ_i = 32^(i/33).
        assert!((lr2[10] - 32f64.powf(10.0 / 33.0)).abs() < 1e-12);
    }
}
