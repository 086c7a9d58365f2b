//! The LLaMA / Mistral / Phi-3 / Qwen2 / Qwen3 decoder.
//!
//! Every family is the same pre-norm decoder (RMSNorm, rotary attention with grouped KV heads,
//! SiLU-gated MLP). Phi-3 fuses q/k/v into one `qkv_proj` and gate/up into `gate_up_proj`, and
//! may rotate only part of each head (`partial_rotary_factor`); Qwen2 has biases on q/k/v but
//! not on o; Qwen3 normalises every query and key head (`q_norm`, `k_norm`) before RoPE and sets
//! `head_dim` apart from `hidden_size / heads`. Variables live in a
//! [`tch::nn::VarStore`] under their Hugging Face names (`model.layers.3.self_attn.q_proj.weight`),
//! so loading and exporting need no renaming table.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use longmix_core::Window;

use crate::attention::Plan;
use crate::config::{Architecture, ModelConfig};
use crate::context::ContextParallel;
use crate::rope::{apply_rotary, row_lengths};

/// HF `LlamaRMSNorm`: normalise in float32, cast back, then scale.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, size: i64, eps: f64) -> Self {
        RmsNorm { weight: p.var("weight", &[size], nn::Init::Const(1.0)), eps }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim([-1].as_slice(), true, Kind::Float);
        &self.weight * (xf * (var + self.eps).rsqrt()).to_kind(kind)
    }
}

fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig { bias, ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() };
    nn::linear(p, in_dim, out_dim, cfg)
}

#[derive(Debug)]
enum QkvProj {
    Split { q: nn::Linear, k: nn::Linear, v: nn::Linear },
    Fused(nn::Linear),
}

#[derive(Debug)]
struct Attention {
    qkv: QkvProj,
    /// Qwen3's per-head RMSNorm of queries and keys (`q_norm`, `k_norm`), applied before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    o_proj: nn::Linear,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, c: &ModelConfig) -> Self {
        let (h, q_dim, kv_dim) =
            (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let qkv = match c.arch {
            Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => QkvProj::Split {
                q: linear(&p / "q_proj", h, q_dim, c.attention_bias),
                k: linear(&p / "k_proj", h, kv_dim, c.attention_bias),
                v: linear(&p / "v_proj", h, kv_dim, c.attention_bias),
            },
            Architecture::Phi3 => QkvProj::Fused(linear(&p / "qkv_proj", h, q_dim + 2 * kv_dim, false)),
        };
        let qk_norm = c.qk_norm.then(|| {
            let norm = |name: &str| RmsNorm::new(&p / name, c.head_dim, c.rms_norm_eps);
            (norm("q_norm"), norm("k_norm"))
        });
        Attention {
            qkv,
            qk_norm,
            o_proj: linear(&p / "o_proj", q_dim, h, c.o_proj_bias),
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        }
    }

    fn forward(&self, x: &Tensor, pos: &Positions) -> Tensor {
        let (q, k, v) = self.project(x);
        let q = apply_rotary(&q, &pos.cos, &pos.sin);
        let k = apply_rotary(&k, &pos.cos, &pos.sin);
        let y = match &pos.context {
            None => pos.plan.attend(&q, &k, &v),
            Some(cp) => {
                let (k, v) = (cp.to_row(&cp.kv_heads(k)), cp.to_row(&cp.kv_heads(v)));
                cp.to_slice(&pos.plan.attend(&cp.to_row(&q), &k, &v))
            }
        };
        self.output(&y)
    }

    /// The unrotated projections in heads layout (q and k normalised where the family does):
    /// q `[B, H, T, D]`, k and v `[B, H_kv, T, D]`.
    pub(crate) fn project(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (q, k, v) = match &self.qkv {
            QkvProj::Split { q, k, v } => (q.forward(x), k.forward(x), v.forward(x)),
            QkvProj::Fused(qkv) => {
                let parts = qkv.forward(x).split_with_sizes(
                    [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim],
                    -1,
                );
                (parts[0].shallow_clone(), parts[1].shallow_clone(), parts[2].shallow_clone())
            }
        };
        let heads = |x: Tensor, n: i64| x.view([b, t, n, self.head_dim]).transpose(1, 2);
        let (q, k) = (heads(q, self.n_heads), heads(k, self.n_kv_heads));
        let (q, k) = match &self.qk_norm {
            Some((q_norm, k_norm)) => (q_norm.forward(&q), k_norm.forward(&k)),
            None => (q, k),
        };
        (q, k, heads(v, self.n_kv_heads))
    }

    /// The output projection of attention results `y` `[B, H, T, D]`.
    pub(crate) fn output(&self, y: &Tensor) -> Tensor {
        let (b, t) = (y.size()[0], y.size()[2]);
        self.o_proj.forward(&y.transpose(1, 2).reshape([b, t, self.n_heads * self.head_dim]))
    }
}

#[derive(Debug)]
enum Mlp {
    Split { gate: nn::Linear, up: nn::Linear, down: nn::Linear },
    Fused { gate_up: nn::Linear, down: nn::Linear },
}

impl Mlp {
    fn new(p: nn::Path, c: &ModelConfig) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        match c.arch {
            Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => Mlp::Split {
                gate: linear(&p / "gate_proj", h, i, c.mlp_bias),
                up: linear(&p / "up_proj", h, i, c.mlp_bias),
                down: linear(&p / "down_proj", i, h, c.mlp_bias),
            },
            Architecture::Phi3 => Mlp::Fused {
                gate_up: linear(&p / "gate_up_proj", h, 2 * i, false),
                down: linear(&p / "down_proj", i, h, false),
            },
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Split { gate, up, down } => down.forward(&(gate.forward(x).silu() * up.forward(x))),
            Mlp::Fused { gate_up, down } => {
                let gu = gate_up.forward(x).chunk(2, -1);
                down.forward(&(&gu[1] * gu[0].silu()))
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(p: nn::Path, c: &ModelConfig) -> Self {
        DecoderLayer {
            input_layernorm: RmsNorm::new(&p / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            self_attn: Attention::new(&p / "self_attn", c),
            post_attention_layernorm: RmsNorm::new(&p / "post_attention_layernorm", c.hidden_size, c.rms_norm_eps),
            mlp: Mlp::new(&p / "mlp", c),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor, pos: &Positions) -> Tensor {
        let h = x + self.self_attn.forward(&self.input_layernorm.forward(x), pos);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }

    /// The layer with the attention core supplied by the caller (KV-cached decoding, STRING):
    /// `attend(q, k, v)` gets the **unrotated** projections (q `[B, H, T, D]`, k and v
    /// `[B, H_kv, T, D]`) and returns the attention result `[B, H, T, D]`.
    pub(crate) fn forward_with(&self, x: &Tensor, attend: &mut dyn FnMut(Tensor, Tensor, Tensor) -> Tensor) -> Tensor {
        let (q, k, v) = self.self_attn.project(&self.input_layernorm.forward(x));
        let h = x + self.self_attn.output(&attend(q, k, v));
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }
}

/// Per-forward inputs shared by every layer: rotary tables, the attention plan and each row's
/// RoPE window; under context parallelism the group the heads are exchanged with.
pub struct Positions {
    /// float32 `[B, T, d_rot]` for this process's tokens.
    pub cos: Tensor,
    pub sin: Tensor,
    /// The attention of whole rows.
    pub plan: Plan,
    /// The window each row ran with, decided by the whole row.
    pub windows: Vec<Window>,
    pub context: Option<ContextParallel>,
}

/// What a forward takes: this process's tokens `[B, T]` (the whole rows, or its
/// context-parallel slice of them), the token each must predict (or `IGNORE_INDEX`), and their
/// [`Positions`].
pub struct Tokens {
    pub input_ids: Tensor,
    pub targets: Tensor,
    pub positions: Positions,
}

/// A causal language model (`LlamaForCausalLM`, `MistralForCausalLM`, `Phi3ForCausalLM`,
/// `Qwen2ForCausalLM`, `Qwen3ForCausalLM`).
#[derive(Debug)]
pub struct CausalLm {
    pub config: ModelConfig,
    pub(crate) embed_tokens: Tensor,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    lm_head: Option<nn::Linear>,
}

impl CausalLm {
    /// Build the model's variables under `root` (randomly initialised; load weights afterwards).
    pub fn new(root: &nn::Path, config: ModelConfig) -> Self {
        let c = &config;
        let m = root / "model";
        let embed_tokens = (&m / "embed_tokens").var(
            "weight",
            &[c.vocab_size, c.hidden_size],
            nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        );
        let layers = (0..c.num_hidden_layers).map(|i| DecoderLayer::new(&m / "layers" / i, c)).collect();
        let norm = RmsNorm::new(&m / "norm", c.hidden_size, c.rms_norm_eps);
        let lm_head = (!c.tie_word_embeddings).then(|| linear(root / "lm_head", c.hidden_size, c.vocab_size, false));
        CausalLm { config, embed_tokens, layers, norm, lm_head }
    }

    /// Rotary tables (window picked per row) and the attention plan for `position_ids` `[B, T]`.
    pub fn positions(&self, position_ids: &Tensor) -> Positions {
        self.positions_within(position_ids, &row_lengths(position_ids), position_ids, None)
    }

    /// [`Positions`] of `local` (all of the rows `whole`, or a context-parallel slice of them):
    /// the RoPE tables and windows of rows of lengths `lengths`, the attention plan of `whole`.
    pub(crate) fn positions_within(
        &self,
        whole: &Tensor,
        lengths: &[i64],
        local: &Tensor,
        context: Option<ContextParallel>,
    ) -> Positions {
        let (cos, sin) = self.config.rope.cos_sin_for(local, lengths);
        Positions {
            cos,
            sin,
            plan: Plan::new(whole, self.config.sliding_window),
            windows: lengths.iter().map(|&l| self.config.rope.window(l)).collect(),
            context,
        }
    }

    /// Whole rows as one process feeds them (see [`CausalLm::slice_tokens`] for a
    /// context-parallel slice).
    pub fn tokens(&self, input_ids: &Tensor, position_ids: &Tensor, targets: &Tensor) -> Tokens {
        Tokens {
            input_ids: input_ids.shallow_clone(),
            targets: targets.shallow_clone(),
            positions: self.positions(position_ids),
        }
    }

    /// Final hidden states `[B, T, hidden]` (after the last norm), in the weights' dtype.
    pub fn hidden_states(&self, input_ids: &Tensor, position_ids: &Tensor) -> Tensor {
        self.hidden_of(input_ids, &self.positions(position_ids))
    }

    /// [`CausalLm::hidden_states`] of `input_ids` at `pos`.
    pub fn hidden_of(&self, input_ids: &Tensor, pos: &Positions) -> Tensor {
        let x = self.layers.iter().fold(self.embed(input_ids), |x, layer| layer.forward(&x, pos));
        self.norm.forward(&x)
    }

    /// Token embeddings `[B, T, hidden]` of `input_ids`.
    pub(crate) fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// Float32 logits of final hidden states (`[..., hidden]` -> `[..., vocab]`).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.lm_head_weight().tr()).to_kind(Kind::Float)
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().map_or(&self.embed_tokens, |l| &l.ws)
    }

    /// Logits `[B, T, vocab]` in float32.
    pub fn forward(&self, input_ids: &Tensor, position_ids: &Tensor) -> Tensor {
        self.logits(&self.hidden_states(input_ids, position_ids))
    }
}
