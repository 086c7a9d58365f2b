//! Named architecture presets: the Hugging Face `config.json` of well-known checkpoints, for
//! benchmarks that need a model's shape but not its weights (`longmix bench --preset`). The
//! files sit in `crates/model/presets/`, where `benches/reference.py` reads the same ones.
//!
//! `phi3-mini-4k` is Phi-3-mini's shape without its 2047-token sliding window (the 128k
//! checkpoint and a LongRoPE extension of the 4k one drop it).

use anyhow::{bail, Result};

use crate::config::ModelConfig;

/// Every preset, by name, with its config.json text.
pub const PRESETS: &[(&str, &str)] = &[
    ("smollm2-135m", include_str!("../presets/smollm2-135m.json")),
    ("llama3.2-1b", include_str!("../presets/llama3.2-1b.json")),
    ("phi3-mini-4k", include_str!("../presets/phi3-mini-4k.json")),
    ("llama3-8b", include_str!("../presets/llama3-8b.json")),
];

/// The config of preset `name`.
pub fn preset(name: &str) -> Result<ModelConfig> {
    match PRESETS.iter().find(|(n, _)| *n == name) {
        Some((_, text)) => ModelConfig::from_json_str(text),
        None => {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            bail!("unknown preset {name:?}: use one of {}", names.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_resolves_to_its_published_size() {
        // Parameter counts of the published checkpoints (embeddings included, tied counted once).
        let published =
            [("smollm2-135m", 134.5e6), ("llama3.2-1b", 1235.8e6), ("phi3-mini-4k", 3821.1e6), ("llama3-8b", 8030.3e6)];
        for (name, want) in published {
            let n = preset(name).unwrap().n_params();
            assert!((n - want).abs() / want < 1e-3, "{name}: {n} parameters, published {want}");
        }
        assert!(preset("gpt2").unwrap_err().to_string().contains("smollm2-135m"));
    }
}
