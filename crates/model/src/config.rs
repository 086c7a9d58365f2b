//! `config.json` of a Hugging Face LLaMA or Phi-3 checkpoint, resolved into one [`ModelConfig`].
//!
//! RoPE parameters are resolved the way transformers 5 does it
//! (`modeling_rope_utils.py::convert_rope_params_to_dict` / `standardize_rope_params`):
//! the legacy `rope_scaling` dict wins over `rope_parameters`; inside it `rope_type` wins over
//! `type`; `rope_theta` and `partial_rotary_factor` inside the dict win over the top-level keys;
//! for llama3/yarn/longrope the original length is the top-level
//! `original_max_position_embeddings` if the config has one (Phi-3 always has one, default 4096),
//! else the dict's, else `max_position_embeddings`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::rope::{RopeConfig, RopeScaling};

/// The decoder family. Both are the same pre-norm decoder; Phi-3 fuses q/k/v into `qkv_proj`
/// and gate/up into `gate_up_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Phi3,
}

/// Everything the model needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Keys may attend to queries at most `sliding_window - 1` positions back (HF semantics:
    /// `kv_idx > q_idx - sliding_window`).
    pub sliding_window: Option<i64>,
    pub rope: RopeConfig,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    /// The file as read, so an export can keep every key it does not rewrite.
    pub raw: Map<String, Value>,
}

/// The subset of config.json keys we read; everything else is kept in `raw`.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    #[serde(default)]
    num_key_value_heads: Option<i64>,
    #[serde(default)]
    head_dim: Option<i64>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    max_position_embeddings: Option<i64>,
    #[serde(default)]
    original_max_position_embeddings: Option<i64>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    sliding_window: Option<i64>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Map<String, Value>>,
    #[serde(default)]
    rope_parameters: Option<Map<String, Value>>,
    #[serde(default)]
    bos_token_id: Option<Value>,
    #[serde(default)]
    eos_token_id: Option<Value>,
}

impl ModelConfig {
    /// Read `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read {}: a model folder needs the Hugging Face config.json", path.display())
        })?;
        Self::from_json_str(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: Map<String, Value> = serde_json::from_str(text).context("config.json is not a JSON object")?;
        let c: RawConfig = serde_json::from_value(Value::Object(raw.clone()))
            .context("config.json lacks a field every LLaMA/Phi-3 config has")?;
        let arch = detect_arch(&c.architectures, c.model_type.as_deref())?;
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported: LLaMA and Phi-3 checkpoints use \"silu\"");
            }
        }
        let default_original = match arch {
            // Phi3Config declares the field with default 4096, so transformers always uses it.
            Architecture::Phi3 => Some(c.original_max_position_embeddings.unwrap_or(4096)),
            Architecture::Llama => c.original_max_position_embeddings,
        };
        let max_pos = c.max_position_embeddings.unwrap_or(2048);
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        let num_kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if c.num_attention_heads % num_kv != 0 {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({num_kv})",
                c.num_attention_heads
            );
        }
        let rope = resolve_rope(
            c.rope_scaling.as_ref().or(c.rope_parameters.as_ref()),
            c.rope_theta,
            c.partial_rotary_factor,
            head_dim,
            max_pos,
            default_original,
        )?;
        Ok(ModelConfig {
            arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: num_kv,
            head_dim,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: max_pos,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            attention_bias: c.attention_bias.unwrap_or(false),
            mlp_bias: c.mlp_bias.unwrap_or(false),
            sliding_window: c.sliding_window,
            rope,
            bos_token_id: first_id(c.bos_token_id.as_ref()),
            eos_token_id: first_id(c.eos_token_id.as_ref()),
            raw,
        })
    }

    /// Parameters (embeddings included; a tied LM head counted once).
    pub fn n_params(&self) -> f64 {
        let (h, v) = (self.hidden_size as f64, self.vocab_size as f64);
        let (q, kv) =
            ((self.num_attention_heads * self.head_dim) as f64, (self.num_key_value_heads * self.head_dim) as f64);
        let attn = h * (q + 2.0 * kv) + q * h + if self.attention_bias { q + 2.0 * kv } else { 0.0 };
        let mlp = 3.0 * h * self.intermediate_size as f64;
        let layer = attn + mlp + 2.0 * h;
        let head = if self.tie_word_embeddings { 0.0 } else { v * h };
        v * h + self.num_hidden_layers as f64 * layer + h + head
    }

    /// Training FLOPs (forward + backward, no recomputation) of `tokens` tokens whose documents
    /// have squared lengths summing to `doc_len_sq`: `6 N T` for every matmul weight (the LM
    /// head included, the embedding lookup not) plus causal attention's
    /// `6 * layers * heads * head_dim * sum(d^2)` (QK^T and AV, 2 FLOPs per multiply-add, half
    /// the square, times 3 for the backward). PaLM's MFU convention (appendix B), with
    /// causality and packing counted.
    pub fn train_flops(&self, tokens: f64, doc_len_sq: f64) -> f64 {
        let embed = if self.tie_word_embeddings { 0.0 } else { (self.vocab_size * self.hidden_size) as f64 };
        let matmul = self.n_params() - embed;
        let attn = (self.num_hidden_layers * self.num_attention_heads * self.head_dim) as f64;
        6.0 * matmul * tokens + 6.0 * attn * doc_len_sq
    }

    /// The window the model was pre-trained on: the longrope/yarn/llama3 original length, or
    /// `max_position_embeddings` for unscaled models.
    pub fn original_max_position_embeddings(&self) -> i64 {
        self.rope.original_max_position_embeddings
    }
}

fn detect_arch(architectures: &[String], model_type: Option<&str>) -> Result<Architecture> {
    let by_class = architectures.iter().find_map(|a| match a.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" => Some(Architecture::Llama),
        "Phi3ForCausalLM" => Some(Architecture::Phi3),
        _ => None,
    });
    let by_type = match model_type {
        Some("llama") => Some(Architecture::Llama),
        Some("phi3") => Some(Architecture::Phi3),
        _ => None,
    };
    by_class.or(by_type).ok_or_else(|| {
        anyhow::anyhow!(
            "unsupported architecture (architectures = {architectures:?}, model_type = {model_type:?}): \
             longmix supports LlamaForCausalLM (model_type \"llama\") and Phi3ForCausalLM (model_type \"phi3\")"
        )
    })
}

fn first_id(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::Array(a) => a.first().and_then(Value::as_i64),
        _ => None,
    }
}

fn get_f64(m: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| anyhow::anyhow!("rope parameter {key:?} must be a number, got {v}"))
        }
    }
}

fn get_factors(m: &Map<String, Value>, key: &str, expected: usize) -> Result<Vec<f64>> {
    let v = m
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("rope type \"longrope\" needs {key:?} (a list of {expected} numbers)"))?;
    let list: Vec<f64> = v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect())
        .ok_or_else(|| anyhow::anyhow!("rope parameter {key:?} must be a list of numbers, got {v}"))?;
    if list.len() != expected {
        bail!(
            "rope parameter {key:?} has {} entries but must have d_rot/2 = {expected} (one per rotated \
             dimension pair; d_rot = head_dim x partial_rotary_factor)",
            list.len()
        );
    }
    if let Some(bad) = list.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        bail!("rope parameter {key:?} holds {bad}: every factor must be a finite number > 0");
    }
    Ok(list)
}

/// Resolve the RoPE dict (either spelling) into a [`RopeConfig`].
pub fn resolve_rope(
    params: Option<&Map<String, Value>>,
    top_theta: Option<f64>,
    top_partial: Option<f64>,
    head_dim: i64,
    max_position_embeddings: i64,
    top_original: Option<i64>,
) -> Result<RopeConfig> {
    let empty = Map::new();
    let p = params.unwrap_or(&empty);
    let rope_type = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let theta = get_f64(p, "rope_theta")?.or(top_theta).unwrap_or(10_000.0);
    let partial = get_f64(p, "partial_rotary_factor")?.or(top_partial).unwrap_or(1.0);
    let d_rot = (head_dim as f64 * partial) as i64;
    if d_rot <= 0 || d_rot % 2 != 0 || d_rot > head_dim {
        bail!("head_dim {head_dim} x partial_rotary_factor {partial} = {d_rot} rotated dims: must be even and in (0, head_dim]");
    }
    let dict_original = get_f64(p, "original_max_position_embeddings")?.map(|x| x as i64);
    let original = top_original.or(dict_original).unwrap_or(max_position_embeddings);
    let factor = get_f64(p, "factor")?;
    let need_factor = |name: &str| factor.ok_or_else(|| anyhow::anyhow!("rope type {name:?} needs a \"factor\""));
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: need_factor("linear")? },
        // Dynamic NTK reads max_position_embeddings as the original length (docs/numerics.md §6 #8).
        "dynamic" => RopeScaling::Dynamic { factor: need_factor("dynamic")?, original: max_position_embeddings },
        "yarn" => RopeScaling::Yarn {
            factor: factor.unwrap_or(max_position_embeddings as f64 / original as f64),
            attention_factor: get_f64(p, "attention_factor")?,
            beta_fast: get_f64(p, "beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
            beta_slow: get_f64(p, "beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
            mscale: get_f64(p, "mscale")?,
            mscale_all_dim: get_f64(p, "mscale_all_dim")?,
            truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need_factor("llama3")?,
            low_freq_factor: get_f64(p, "low_freq_factor")?
                .ok_or_else(|| anyhow::anyhow!("rope type \"llama3\" needs \"low_freq_factor\""))?,
            high_freq_factor: get_f64(p, "high_freq_factor")?
                .ok_or_else(|| anyhow::anyhow!("rope type \"llama3\" needs \"high_freq_factor\""))?,
        },
        // "su" is the legacy Phi-3 spelling of longrope.
        "longrope" | "su" => {
            let n = (d_rot / 2) as usize;
            let factor = factor.unwrap_or(max_position_embeddings as f64 / original as f64);
            RopeScaling::LongRope {
                short_factor: get_factors(p, "short_factor", n)?,
                long_factor: get_factors(p, "long_factor", n)?,
                attention_factor: get_f64(p, "attention_factor")?
                    .unwrap_or_else(|| crate::extension::longrope_attention_factor(factor, original)),
            }
        }
        other => bail!(
            "unknown rope type {other:?}: supported are default, linear, dynamic, yarn, llama3, longrope (alias su)"
        ),
    };
    Ok(RopeConfig { theta, head_dim, d_rot, original_max_position_embeddings: original, scaling })
}
