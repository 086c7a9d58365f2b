//! Writing a Hugging Face model folder that transformers and vLLM load as they are.
//!
//! * Weights: sharded safetensors (`model-0000i-of-0000n.safetensors`, metadata
//!   `{"format": "pt"}`) plus `model.safetensors.index.json`; a tied LM head is not written.
//! * `config.json`: the source config with the RoPE section rewritten for the extended window
//!   (`max_position_embeddings = L`, `original_max_position_embeddings = L0`, a `longrope`
//!   `rope_scaling` and the same dict as transformers-5 `rope_parameters`); `sliding_window` as
//!   the extension leaves it (`null` when dropped), and for Qwen2 / Qwen3 the window keys
//!   (`use_sliding_window`, `layer_types`) state the attention the model runs; every other key
//!   kept, the `architectures` class name included.
//! * Tokenizer and generation files copied from the source folder.
//!
//! * `SHA256SUMS`: every other file's SHA-256, taken as it was written, in the form
//!   `sha256sum -c SHA256SUMS` checks (and `longmix verify`); the weights' sums are the ones the
//!   Hugging Face Hub shows for LFS files.
//!
//! Everything is written (and synced) to `<out>.partial` and renamed into place at the end.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use longmix_core::checksum::{parse_sums_text, sums_text, write_summed, Algo, Expected};
use serde_json::{json, Map, Value};
use tch::{nn, Kind, Tensor};

use crate::config::{Architecture, ModelConfig};
use crate::extension::Extension;
use crate::tensor_file::write_safetensors;

/// The export's checksums of its other files, `sha256sum` style.
pub const SUMS_FILE: &str = "SHA256SUMS";

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub dtype: Kind,
    /// Upper bound of one shard's tensor bytes (a tensor larger than this gets a shard alone).
    pub max_shard_bytes: u64,
    /// The extended window to write into `config.json` (None: the model's own RoPE section).
    pub rope: Option<Extension>,
}

/// Files copied from the source model folder when present.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        k => bail!("cannot export weights as {k:?}: use f32, bf16 or f16"),
    })
}

/// The exported `config.json`.
pub fn exported_config(config: &ModelConfig, dtype_name: &str, rope: Option<&Extension>) -> Result<Map<String, Value>> {
    let mut c = config.raw.clone();
    c.insert("torch_dtype".into(), json!(dtype_name));
    c.insert("dtype".into(), json!(dtype_name));
    // The window the exported model runs: what the extension leaves of the model's own.
    let window = rope.map_or(config.sliding_window, |r| r.sliding_window(config.sliding_window));
    if let Some(r) = rope {
        r.check(&config.rope).context("the extension to export")?;
        c.insert("max_position_embeddings".into(), json!(r.target_length));
        c.insert("original_max_position_embeddings".into(), json!(r.original_length));
        let mut rope = json!({
            "rope_type": "longrope",
            "type": "longrope",
            "short_factor": r.short_factor,
            "long_factor": r.long_factor,
            "original_max_position_embeddings": r.original_length,
            "factor": r.target_length as f64 / r.original_length as f64,
        });
        if r.explicit_attention_factor {
            rope["attention_factor"] = json!(r.attention_factor);
        }
        let mut params = rope.clone();
        params["rope_theta"] = json!(config.rope.theta);
        if config.rope.d_rot != config.rope.head_dim {
            params["partial_rotary_factor"] = json!(config.rope.d_rot as f64 / config.rope.head_dim as f64);
        }
        params.as_object_mut().unwrap().remove("type");
        c.insert("rope_scaling".into(), rope);
        c.insert("rope_parameters".into(), params);
        c.insert("rope_theta".into(), json!(config.rope.theta));
        if c.contains_key("sliding_window") {
            c.insert("sliding_window".into(), json!(window));
        }
    }
    write_qwen_window(config, window, &mut c);
    Ok(c)
}

/// Qwen2Config / Qwen3Config slide a window only with `use_sliding_window = true`, and then in
/// the layers of `layer_types` (derived from `max_window_layers` when absent): state the one
/// pattern the model runs, no window or the same window in every layer.
fn write_qwen_window(config: &ModelConfig, window: Option<i64>, c: &mut Map<String, Value>) {
    if !matches!(config.arch, Architecture::Qwen2 | Architecture::Qwen3) {
        return;
    }
    c.insert("use_sliding_window".into(), json!(window.is_some()));
    let layer_type = match window {
        Some(w) => {
            c.insert("sliding_window".into(), json!(w));
            c.insert("max_window_layers".into(), json!(0));
            "sliding_attention"
        }
        None => "full_attention",
    };
    if c.contains_key("layer_types") {
        c.insert("layer_types".into(), json!(vec![layer_type; config.num_hidden_layers as usize]));
    }
}

/// The shards of `vars` in name order, each under `max_bytes` of `elt`-byte elements (a tensor
/// larger than that alone in its shard).
fn plan_shards(vars: &BTreeMap<String, Tensor>, elt: u64, max_bytes: u64) -> Vec<Vec<&String>> {
    let mut shards: Vec<Vec<&String>> = vec![vec![]];
    let mut used = 0u64;
    for (name, t) in vars {
        let bytes = t.numel() as u64 * elt;
        if used > 0 && used + bytes > max_bytes {
            shards.push(vec![]);
            used = 0;
        }
        shards.last_mut().unwrap().push(name);
        used += bytes;
    }
    shards
}

/// Export the variables of `vs` (HF names) with `config` into the new folder `out`.
pub fn export_hf(
    vs: &nn::VarStore,
    config: &ModelConfig,
    source_dir: Option<&Path>,
    out: &Path,
    opts: &ExportOptions,
) -> Result<()> {
    if out.exists() {
        bail!("{} already exists: choose another --out or remove it first", out.display());
    }
    let dtype_name = dtype_name(opts.dtype)?;
    let cfg = exported_config(config, dtype_name, opts.rope.as_ref())?;
    let partial = out.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("cannot create {}", partial.display()))?;

    let vars: BTreeMap<String, Tensor> =
        vs.variables().into_iter().filter(|(k, _)| !(config.tie_word_embeddings && k == "lm_head.weight")).collect();
    let elt = opts.dtype.elt_size_in_bytes() as u64;
    let shards = plan_shards(&vars, elt, opts.max_shard_bytes);
    let n = shards.len();
    let mut weight_map = Map::new();
    let mut sums = BTreeMap::new();
    for (i, names) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let tensors: Vec<(String, Tensor)> =
            names.iter().map(|&name| (name.clone(), vars[name].shallow_clone())).collect();
        for name in names {
            weight_map.insert((*name).clone(), json!(file));
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let sum = write_safetensors(&partial.join(&file), &tensors, Some(opts.dtype), Some(meta), Algo::Sha256)?;
        sums.insert(file, sum);
    }
    let total: u64 = vars.values().map(|t| t.numel() as u64 * elt).sum();
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let mut write_text = |name: &str, text: String| -> Result<()> {
        sums.insert(
            name.into(),
            write_summed(&partial.join(name), Algo::Sha256, |w| Ok(w.write_all(text.as_bytes())?))?,
        );
        Ok(())
    };
    write_text("model.safetensors.index.json", serde_json::to_string_pretty(&index)?)?;
    write_text("config.json", serde_json::to_string_pretty(&Value::Object(cfg))?)?;
    for f in TOKENIZER_FILES.iter().filter(|f| source_dir.is_some_and(|src| src.join(f).exists())) {
        let src = source_dir.unwrap().join(f);
        let copy = |w: &mut dyn Write| Ok(std::io::copy(&mut std::fs::File::open(&src)?, w).map(|_| ())?);
        let sum = write_summed(&partial.join(f), Algo::Sha256, copy).with_context(|| format!("cannot copy {f}"))?;
        sums.insert(f.to_string(), sum);
    }
    let listed = sums_text(&sums);
    write_summed(&partial.join(SUMS_FILE), Algo::Sha256, |w| Ok(w.write_all(listed.as_bytes())?))?;
    longmix_core::fsx::fsync_dir(&partial)?;
    std::fs::rename(&partial, out).with_context(|| format!("cannot move the export into {}", out.display()))?;
    Ok(())
}

/// The files an export's [`SUMS_FILE`] lists, with their SHA-256 (None: `dir` has no such file,
/// an export written before checksums, or not an export).
pub fn expected_files(dir: &Path) -> Result<Option<Vec<Expected>>> {
    let path = dir.join(SUMS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines = parse_sums_text(&text).with_context(|| format!("{} is not a sha256sum file", path.display()))?;
    Ok(Some(lines.into_iter().map(|(name, hash)| Expected { name, bytes: None, hash: Some(hash) }).collect()))
}
