//! TOML into typed configs. Every error names the key path (`train.seq_len`), the bad value and
//! what is allowed, because serde's own messages come from `serde_path_to_error`'s walk.

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Parse `text` into `T`; the error names the offending key path.
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T> {
    let de = toml::Deserializer::parse(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("key `{path}`: {}", e.into_inner().message())
    })
}

/// Read and parse the TOML file at `path`, naming the file in every error.
pub fn read_toml<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    from_toml(&text).with_context(|| format!("invalid {what} {}", path.display()))
}

/// `[model]` of a run or a search: which checkpoint, in what dtype, where.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    pub path: std::path::PathBuf,
    /// Compute dtype: auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16 (a run's masters,
    /// gradients and optimizer state stay float32).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// auto, cpu, cuda or cuda:N.
    #[serde(default = "default_device")]
    pub device: String,
    /// CPU threads for LibTorch (default: LibTorch's choice).
    #[serde(default)]
    pub threads: Option<i32>,
}

fn default_dtype() -> String {
    "auto".into()
}

fn default_device() -> String {
    "auto".into()
}
