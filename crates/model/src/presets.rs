//! Named architecture presets: the Hugging Face `config.json` of well-known checkpoints, for
//! benchmarks that need a model's shape but not its weights (`longmix bench --preset`). The
//! files sit in `crates/model/presets/`, where `benches/reference.py` reads the same ones.
//!
//! `qwen2.5-7b` is Qwen2.5-7B as published: its config.json states 131072 positions, while its
//! pre-training ended at 32768 (so `configs/qwen2.5-7b-128k.toml` sets `rope.original_length`).
//! `qwen3-8b` is Qwen3-8B (`head_dim` 128 set on its own, per-head q/k norms).
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
    ("qwen2.5-7b", include_str!("../presets/qwen2.5-7b.json")),
    ("qwen3-8b", include_str!("../presets/qwen3-8b.json")),
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
        // Qwen2.5-7B and Qwen3-8B: the Hub's safetensors counts (q/k/v biases and q/k norms included).
        let published = [
            ("smollm2-135m", 134.5e6),
            ("llama3.2-1b", 1235.8e6),
            ("phi3-mini-4k", 3821.1e6),
            ("llama3-8b", 8030.3e6),
            ("qwen2.5-7b", 7615.6e6),
            ("qwen3-8b", 8190.7e6),
        ];
        for (name, want) in published {
            let n = preset(name).unwrap().n_params();
            assert!((n - want).abs() / want < 1e-3, "{name}: {n} parameters, published {want}");
        }
        // The model cards' non-embedding counts (untied: embedding and LM head both excluded).
        for (name, want) in [("qwen2.5-7b", 6.53e9), ("qwen3-8b", 6.95e9)] {
            let c = preset(name).unwrap();
            let n = c.n_params() - 2.0 * (c.vocab_size * c.hidden_size) as f64;
            assert!((n - want).abs() / want < 1e-3, "{name}: {n} non-embedding parameters, published {want}");
        }
        let qwen3 = preset("qwen3-8b").unwrap();
        assert!(qwen3.qk_norm && !qwen3.attention_bias && qwen3.head_dim == 128);
        let qwen2 = preset("qwen2.5-7b").unwrap();
        assert!(qwen2.attention_bias && !qwen2.o_proj_bias && qwen2.sliding_window.is_none());
        assert!(preset("gpt2").unwrap_err().to_string().contains("smollm2-135m"));
    }
}
