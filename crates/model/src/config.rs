//! `config.json` of a Hugging Face LLaMA, Mistral, Phi-3, Qwen2 or Qwen3 checkpoint, resolved into
//! one [`ModelConfig`] the way each family's transformers config class reads it.
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

/// The decoder family. All are the same pre-norm decoder; Phi-3 fuses q/k/v into `qkv_proj`
/// and gate/up into `gate_up_proj`, Qwen2 has biases on q/k/v (not on o), Qwen3 normalises each
/// query and key head before RoPE. Mistral runs as LLaMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Phi3,
    Qwen2,
    Qwen3,
}

/// The supported `architectures` classes, the `model_type` that names the same family, and the
/// decoder each runs. The one list an unsupported checkpoint's error shows.
const FAMILIES: &[(&str, &str, Architecture)] = &[
    ("LlamaForCausalLM", "llama", Architecture::Llama),
    ("MistralForCausalLM", "mistral", Architecture::Llama),
    ("Phi3ForCausalLM", "phi3", Architecture::Phi3),
    ("Qwen2ForCausalLM", "qwen2", Architecture::Qwen2),
    ("Qwen3ForCausalLM", "qwen3", Architecture::Qwen3),
];

/// A supported family: its transformers class name and its decoder.
#[derive(Debug, Clone, Copy)]
struct Family {
    class: &'static str,
    arch: Architecture,
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
    /// Biases on q/k/v.
    pub attention_bias: bool,
    /// A bias on o (LLaMA with `attention_bias`, Qwen3 with `attention_bias`; never Qwen2).
    pub o_proj_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3's `q_norm` / `k_norm`).
    pub qk_norm: bool,
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
            .context("config.json lacks a field every supported decoder config has")?;
        let family = detect_family(&c.architectures, c.model_type.as_deref())?;
        let arch = family.arch;
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported: the supported families use \"silu\"");
            }
        }
        let default_original = match arch {
            // Phi3Config declares the field with default 4096, so transformers always uses it.
            Architecture::Phi3 => Some(c.original_max_position_embeddings.unwrap_or(4096)),
            _ => c.original_max_position_embeddings,
        };
        let max_pos = c.max_position_embeddings.unwrap_or(2048);
        // Qwen3Config declares head_dim with default 128; the others derive it from the width.
        let default_head_dim = match arch {
            Architecture::Qwen3 => 128,
            _ => c.hidden_size / c.num_attention_heads,
        };
        let head_dim = c.head_dim.unwrap_or(default_head_dim);
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
        let flags = LayerFlags::of(family, &c);
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
            attention_bias: flags.qkv_bias,
            o_proj_bias: flags.o_bias,
            mlp_bias: flags.mlp_bias,
            qk_norm: flags.qk_norm,
            sliding_window: sliding_window(family, &raw, c.num_hidden_layers)?,
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
        let bias = |on: bool, n: f64| if on { n } else { 0.0 };
        let attn = h * (q + 2.0 * kv)
            + q * h
            + bias(self.attention_bias, q + 2.0 * kv)
            + bias(self.o_proj_bias, h)
            + bias(self.qk_norm, 2.0 * self.head_dim as f64);
        let i = self.intermediate_size as f64;
        let mlp = 3.0 * h * i + bias(self.mlp_bias, 2.0 * i + h);
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

fn detect_family(architectures: &[String], model_type: Option<&str>) -> Result<Family> {
    let by_class = architectures.iter().find_map(|a| FAMILIES.iter().find(|f| f.0 == a.as_str()));
    let by_type = || FAMILIES.iter().find(|f| Some(f.1) == model_type);
    let (class, _, arch) = by_class.or_else(by_type).ok_or_else(|| {
        let supported: Vec<String> = FAMILIES.iter().map(|(c, t, _)| format!("{c} (model_type {t:?})")).collect();
        anyhow::anyhow!(
            "unsupported architecture (architectures = {architectures:?}, model_type = {model_type:?}): \
             longmix supports {}; set \"architectures\" to the class this checkpoint was trained as",
            supported.join(", ")
        )
    })?;
    Ok(Family { class, arch: *arch })
}

/// Which projections a family builds with biases, and whether it normalises q/k heads: what each
/// transformers class does with (or without) the `attention_bias` / `mlp_bias` keys.
struct LayerFlags {
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    qk_norm: bool,
}

impl LayerFlags {
    fn of(family: Family, c: &RawConfig) -> LayerFlags {
        let attention_bias = c.attention_bias.unwrap_or(false);
        let none = LayerFlags { qkv_bias: false, o_bias: false, mlp_bias: false, qk_norm: false };
        match (family.arch, family.class) {
            // MistralForCausalLM builds every projection without a bias, whatever the config says.
            (Architecture::Llama, "MistralForCausalLM") | (Architecture::Phi3, _) => none,
            (Architecture::Llama, _) => LayerFlags {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                mlp_bias: c.mlp_bias.unwrap_or(false),
                qk_norm: false,
            },
            // Qwen2Attention: q/k/v always biased, o never (the config has no key for it).
            (Architecture::Qwen2, _) => LayerFlags { qkv_bias: true, ..none },
            (Architecture::Qwen3, _) => {
                LayerFlags { qkv_bias: attention_bias, o_bias: attention_bias, qk_norm: true, ..none }
            }
        }
    }
}

/// `sliding_window`, or when the key is absent the class's default (MistralConfig, Qwen2Config
/// and Qwen3Config declare 4096; LLaMA and Phi-3 none). A JSON null is no window.
fn declared_window(family: Family, raw: &Map<String, Value>) -> Result<Option<i64>> {
    let default = match family.arch {
        Architecture::Qwen2 | Architecture::Qwen3 => Some(4096),
        Architecture::Llama if family.class == "MistralForCausalLM" => Some(4096),
        _ => None,
    };
    match raw.get("sliding_window") {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(w) if w >= 1 => Ok(Some(w)),
            _ => bail!("sliding_window = {v} must be a positive integer or null (no window)"),
        },
    }
}

/// The window every layer applies, read as the family's transformers class reads it. Qwen2 and
/// Qwen3 slide only with `use_sliding_window = true`, and then only in the layers `layer_types`
/// marks `"sliding_attention"` (by default those from `max_window_layers` on); longmix applies
/// one pattern to every layer, so a checkpoint that mixes windowed and full layers is refused.
fn sliding_window(family: Family, raw: &Map<String, Value>, layers: i64) -> Result<Option<i64>> {
    let window = declared_window(family, raw)?;
    if !matches!(family.arch, Architecture::Qwen2 | Architecture::Qwen3) {
        return Ok(window);
    }
    let on = match raw.get("use_sliding_window") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| anyhow::anyhow!("use_sliding_window = {v} must be true or false"))?,
    };
    let Some(w) = window.filter(|_| on) else { return Ok(None) };
    let sliding: Vec<bool> = match raw.get("layer_types") {
        Some(Value::Array(types)) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => bail!("layer_types holds {t}: use \"full_attention\" or \"sliding_attention\""),
            })
            .collect::<Result<_>>()?,
        _ => {
            let first = raw.get("max_window_layers").and_then(Value::as_i64).unwrap_or(28);
            (0..layers).map(|i| i >= first).collect()
        }
    };
    if sliding.len() as i64 != layers {
        bail!("layer_types has {} entries but num_hidden_layers is {layers}: give one per layer", sliding.len());
    }
    match sliding.iter().filter(|s| **s).count() as i64 {
        0 => Ok(None),
        n if n == layers => Ok(Some(w)),
        n => bail!(
            "use_sliding_window = true with sliding_window = {w} and max_window_layers = {} gives a \
             {w}-token window to {n} of {layers} layers and full attention to the others: per-layer windows \
             are not supported (longmix applies one attention pattern to every layer). The published {} \
             checkpoints set use_sliding_window = false; train a checkpoint whose layers all attend alike",
            raw.get("max_window_layers").map_or("28 (default)".to_string(), Value::to_string),
            family.class
        ),
    }
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
