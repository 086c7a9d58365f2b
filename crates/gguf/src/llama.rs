//! The `llama` architecture: hyper-parameters, tensor names and the `config.json` of a
//! Hugging Face `LlamaForCausalLM`.

use serde_json::{json, Map, Value as Json};

use crate::error::{GgufError, Result};
use crate::reader::{GgufFile, TensorInfo};

pub const ARCHITECTURE: &str = "llama";

const WRITTEN_FOR_EVERY_MODEL: &str =
    "llama.cpp writes it for every LLaMA model; the file is incomplete, re-convert it";

/// The hyper-parameters of a LLaMA model, read from `llama.*` metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaParams {
    pub n_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: usize,
    pub vocab_size: usize,
    /// `true` when the file has no `output.weight`: the LM head reuses the embeddings.
    pub tie_word_embeddings: bool,
    /// The `rope_scaling` entry of `config.json`, when the model scales RoPE.
    pub rope_scaling: Option<Json>,
}

impl LlamaParams {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let architecture = file.architecture()?;
        if architecture != ARCHITECTURE {
            return Err(GgufError::UnsupportedArchitecture { architecture: architecture.to_string() });
        }
        let required = |key: &str| -> Result<usize> {
            let key = format!("llama.{key}");
            match file.get_u64(&key)? {
                Some(value) => Ok(value as usize),
                None => Err(GgufError::MissingMetadata { key, hint: WRITTEN_FOR_EVERY_MODEL }),
            }
        };
        let n_layers = required("block_count")?;
        let hidden_size = required("embedding_length")?;
        let intermediate_size = required("feed_forward_length")?;
        let n_heads = required("attention.head_count")?;
        let n_kv_heads = file.get_u64("llama.attention.head_count_kv")?.map_or(n_heads, |v| v as usize);
        let context_length = required("context_length")?;
        let eps_key = "llama.attention.layer_norm_rms_epsilon";
        let rms_norm_eps = file
            .get_f64(eps_key)?
            .ok_or(GgufError::MissingMetadata { key: eps_key.into(), hint: WRITTEN_FOR_EVERY_MODEL })?;
        // llama.cpp's default when the key is absent.
        let rope_theta = file.get_f64("llama.rope.freq_base")?.unwrap_or(10_000.0);

        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || n_layers == 0 {
            return Err(GgufError::Inconsistent(format!(
                "{n_layers} layers, {n_heads} attention heads and {n_kv_heads} key/value heads"
            )));
        }
        let head_dim = match file.get_u64("llama.attention.key_length")? {
            Some(k) => k as usize,
            None if hidden_size % n_heads == 0 => hidden_size / n_heads,
            None => {
                return Err(GgufError::Inconsistent(format!(
                    "hidden size {hidden_size} is not a multiple of the {n_heads} heads and llama.attention.key_length is absent"
                )))
            }
        };
        if let Some(v) = file.get_u64("llama.attention.value_length")? {
            if v as usize != head_dim {
                return Err(GgufError::Unsupported(format!(
                    "the model has key heads of {head_dim} and value heads of {v} dimensions; LlamaForCausalLM needs them equal"
                )));
            }
        }
        if head_dim % 2 != 0 {
            return Err(GgufError::Inconsistent(format!("head dimension {head_dim} is odd, RoPE needs it even")));
        }
        if let Some(rot) = file.get_u64("llama.rope.dimension_count")? {
            if rot as usize != head_dim {
                return Err(GgufError::Unsupported(format!(
                    "RoPE rotates {rot} of {head_dim} head dimensions; LlamaForCausalLM rotates all of them, \
                     so this model cannot be represented"
                )));
            }
        }
        if file.get_u64("llama.expert_count")?.unwrap_or(0) > 0 {
            return Err(GgufError::Unsupported(
                "mixture-of-experts LLaMA models (Mixtral) are not supported; import a dense model".into(),
            ));
        }

        let embeddings = file
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::Inconsistent("the file has no token_embd.weight tensor".into()))?;
        let vocab_size = match embeddings.dims.as_slice() {
            [h, v] if *h as usize == hidden_size => *v as usize,
            dims => {
                return Err(GgufError::Inconsistent(format!(
                    "token_embd.weight has GGUF dims {dims:?}, expected [{hidden_size}, vocab size]"
                )))
            }
        };
        if let Some(v) = file.get_u64("llama.vocab_size")? {
            if v as usize != vocab_size {
                return Err(GgufError::Inconsistent(format!(
                    "llama.vocab_size is {v} but token_embd.weight has {vocab_size} rows"
                )));
            }
        }

        Ok(LlamaParams {
            n_layers,
            hidden_size,
            intermediate_size,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            context_length,
            vocab_size,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            rope_scaling: rope_scaling(file)?,
        })
    }

    /// Every HF tensor the model needs, with its row-major shape and the GGUF tensor it comes from.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.n_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        let mut out = vec![
            ExpectedTensor::new("token_embd.weight", "model.embed_tokens.weight", vec![v, h], None),
            ExpectedTensor::new("output_norm.weight", "model.norm.weight", vec![h], None),
        ];
        if !self.tie_word_embeddings {
            out.push(ExpectedTensor::new("output.weight", "lm_head.weight", vec![v, h], None));
        }
        for layer in 0..self.n_layers {
            let g = |s: &str| format!("blk.{layer}.{s}.weight");
            let hf = |s: &str| format!("model.layers.{layer}.{s}.weight");
            out.extend([
                ExpectedTensor::new(&g("attn_norm"), &hf("input_layernorm"), vec![h], None),
                ExpectedTensor::new(&g("attn_q"), &hf("self_attn.q_proj"), vec![q, h], Some(self.n_heads)),
                ExpectedTensor::new(&g("attn_k"), &hf("self_attn.k_proj"), vec![kv, h], Some(self.n_kv_heads)),
                ExpectedTensor::new(&g("attn_v"), &hf("self_attn.v_proj"), vec![kv, h], None),
                ExpectedTensor::new(&g("attn_output"), &hf("self_attn.o_proj"), vec![h, q], None),
                ExpectedTensor::new(&g("ffn_norm"), &hf("post_attention_layernorm"), vec![h], None),
                ExpectedTensor::new(&g("ffn_gate"), &hf("mlp.gate_proj"), vec![f, h], None),
                ExpectedTensor::new(&g("ffn_up"), &hf("mlp.up_proj"), vec![f, h], None),
                ExpectedTensor::new(&g("ffn_down"), &hf("mlp.down_proj"), vec![h, f], None),
            ]);
        }
        out
    }

    /// Checks that the file's tensors are exactly the ones the model needs (see
    /// [`Self::expected_tensors`]), with the right shapes, and returns them paired up.
    pub fn plan<'f>(&self, file: &'f GgufFile) -> Result<Vec<(ExpectedTensor, &'f TensorInfo)>> {
        let expected = self.expected_tensors();
        let mut plan = Vec::with_capacity(expected.len());
        for tensor in expected {
            let info = file.tensor(&tensor.gguf_name).ok_or_else(|| {
                GgufError::Inconsistent(format!(
                    "tensor {} is missing ({} layers expected)",
                    tensor.gguf_name, self.n_layers
                ))
            })?;
            if info.shape() != tensor.shape {
                return Err(GgufError::Inconsistent(format!(
                    "tensor {} has shape {:?}, expected {:?} from the metadata",
                    info.name,
                    info.shape(),
                    tensor.shape
                )));
            }
            plan.push((tensor, info));
        }
        let planned: std::collections::HashSet<&str> = plan.iter().map(|(t, _)| t.gguf_name.as_str()).collect();
        for info in file.tensors() {
            if planned.contains(info.name.as_str()) {
                continue;
            }
            if info.name == "rope_freqs.weight" {
                check_rope_freqs(file, info)?;
                continue;
            }
            return Err(GgufError::Unsupported(format!(
                "tensor {:?} has no counterpart in LlamaForCausalLM (biases, extra layers and other \
                 additions are not supported); this file holds a variant of LLaMA that cannot be imported",
                info.name
            )));
        }
        Ok(plan)
    }

    /// `config.json` for `LlamaForCausalLM`.
    pub fn config_json(&self, special: &SpecialTokenIds) -> Json {
        let mut config = Map::new();
        let mut set = |key: &str, value: Json| {
            config.insert(key.to_string(), value);
        };
        set("architectures", json!(["LlamaForCausalLM"]));
        set("model_type", json!("llama"));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.n_layers));
        set("num_attention_heads", json!(self.n_heads));
        set("num_key_value_heads", json!(self.n_kv_heads));
        set("head_dim", json!(self.head_dim));
        set("hidden_act", json!("silu"));
        set("max_position_embeddings", json!(self.context_length));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("rope_theta", json!(self.rope_theta));
        if let Some(scaling) = &self.rope_scaling {
            set("rope_scaling", scaling.clone());
        }
        set("vocab_size", json!(self.vocab_size));
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        set("attention_bias", json!(false));
        set("attention_dropout", json!(0.0));
        set("mlp_bias", json!(false));
        set("bos_token_id", json!(special.bos));
        set("eos_token_id", json!(special.eos));
        set("pad_token_id", json!(special.pad));
        set("torch_dtype", json!("float32"));
        set("use_cache", json!(true));
        Json::Object(config)
    }
}

/// The special token ids `config.json` and `generation_config.json` carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokenIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

impl SpecialTokenIds {
    /// `generation_config.json`: the special token ids, no sampling settings.
    pub fn generation_config(&self) -> Json {
        let mut config = Map::new();
        for (key, id) in [("bos_token_id", self.bos), ("eos_token_id", self.eos), ("pad_token_id", self.pad)] {
            if let Some(id) = id {
                config.insert(key.into(), json!(id));
            }
        }
        Json::Object(config)
    }
}

/// A tensor of the HF model and where it comes from in the GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub gguf_name: String,
    pub hf_name: String,
    /// Row-major HF shape.
    pub shape: Vec<usize>,
    /// For Q and K projections, the number of heads llama.cpp permuted the rows with.
    pub unpermute_heads: Option<usize>,
}

impl ExpectedTensor {
    fn new(gguf_name: &str, hf_name: &str, shape: Vec<usize>, unpermute_heads: Option<usize>) -> Self {
        ExpectedTensor { gguf_name: gguf_name.into(), hf_name: hf_name.into(), shape, unpermute_heads }
    }
}

/// Undoes the row permutation llama.cpp's `convert_hf_to_gguf.py` applies to Q and K weights.
///
/// llama.cpp computes RoPE on interleaved pairs `(x[2i], x[2i+1])`, HF's `rotate_half` on
/// `(x[i], x[i + d/2])`; the converter reorders each head's rows from the second layout to the
/// first with `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2)`. So GGUF row `2i + s` of a head is
/// HF row `s * d/2 + i`, and this writes them back there.
///
/// `data` is row-major `[rows, cols]` with `rows` a multiple of `2 * n_heads`.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_heads: usize) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols, "data must be rows x cols");
    assert!(n_heads > 0 && rows % (2 * n_heads) == 0, "rows must split into heads of even size");
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for head in 0..n_heads {
        for i in 0..half {
            for s in 0..2 {
                let src = head * head_dim + 2 * i + s;
                let dst = head * head_dim + s * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// `rope_scaling` from `llama.rope.scaling.*` (or the older `llama.rope.scale_linear`).
fn rope_scaling(file: &GgufFile) -> Result<Option<Json>> {
    let factor = match file.get_f64("llama.rope.scaling.factor")? {
        Some(factor) => Some(factor),
        None => file.get_f64("llama.rope.scale_linear")?,
    };
    let kind = file.get_str("llama.rope.scaling.type")?.unwrap_or(if factor.is_some() { "linear" } else { "none" });
    match (kind, factor) {
        ("none", _) => Ok(None),
        ("linear", None) => Ok(None),
        ("linear", Some(1.0)) => Ok(None),
        ("linear", Some(factor)) => Ok(Some(json!({ "rope_type": "linear", "factor": factor }))),
        ("yarn", Some(factor)) => {
            let mut yarn = Map::new();
            yarn.insert("rope_type".into(), json!("yarn"));
            yarn.insert("factor".into(), json!(factor));
            if let Some(n) = file.get_u64("llama.rope.scaling.original_context_length")? {
                yarn.insert("original_max_position_embeddings".into(), json!(n));
            }
            for (gguf_key, hf_key) in [
                ("llama.rope.scaling.yarn_beta_fast", "beta_fast"),
                ("llama.rope.scaling.yarn_beta_slow", "beta_slow"),
                ("llama.rope.scaling.attn_factor", "attention_factor"),
            ] {
                if let Some(v) = file.get_f64(gguf_key)? {
                    yarn.insert(hf_key.into(), json!(v));
                }
            }
            Ok(Some(Json::Object(yarn)))
        }
        ("yarn", None) => Err(GgufError::Inconsistent("YaRN RoPE scaling without llama.rope.scaling.factor".into())),
        (kind, _) => Err(GgufError::Unsupported(format!(
            "RoPE scaling type {kind:?} is not supported (supported: none, linear, yarn); \
             import the original Hugging Face checkpoint instead"
        ))),
    }
}

/// `rope_freqs.weight` holds per-dimension RoPE frequency factors (Llama 3.1-style scaling).
/// All ones changes nothing and is dropped; anything else has no exact `config.json` form.
fn check_rope_freqs(file: &GgufFile, info: &TensorInfo) -> Result<()> {
    let factors = file.dequantize(info)?;
    if factors.iter().all(|&f| f == 1.0) {
        tracing::info!("dropping rope_freqs.weight: all factors are 1");
        return Ok(());
    }
    Err(GgufError::Unsupported(
        "the model scales RoPE with per-dimension factors (rope_freqs.weight, as Llama 3.1 does); \
         the exact rope_scaling cannot be recovered from a GGUF file, so import the original Hugging Face \
         checkpoint instead"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute`, written out for the test.
    fn permute(w: &[f32], rows: usize, cols: usize, n_heads: usize) -> Vec<f32> {
        let half = rows / n_heads / 2;
        let mut out = vec![0.0; w.len()];
        // out[h, i, s] = w[h, s, i]
        for h in 0..n_heads {
            for s in 0..2 {
                for i in 0..half {
                    let src = (h * 2 + s) * half + i;
                    let dst = (h * half + i) * 2 + s;
                    out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (24, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        assert_eq!(unpermute_rows(&permute(&w, rows, cols, heads), rows, cols, heads), w);
    }

    #[test]
    fn unpermute_known_rows() {
        // One head of 4 rows: GGUF rows [r0, r2, r1, r3] become HF rows [r0, r1, r2, r3].
        let gguf = [0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute_rows(&gguf, 4, 1, 1), vec![0.0, 1.0, 2.0, 3.0]);
    }
}
