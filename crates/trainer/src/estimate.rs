//! Peak memory of a training step, by component: what `--dry-run` plans with and what
//! `longmix bench` prints next to the measured peak (docs/performance.md breaks it down).
//!
//! Elements saved for the backward per token and decoder layer (LLaMA/Phi-3, hidden `h`,
//! query width `q = heads * head_dim`, key/value width `kv`, MLP width `i`):
//!
//! * each RMSNorm: its input and the normalised output (`2h`, twice per layer);
//! * attention: rotated q and k, v, the SDPA output and its `[T, q]` copy for `o_proj`
//!   (`3q + 2kv`);
//! * MLP: gate, up, SiLU(gate) and their product (`4i`).
//!
//! Without layer checkpointing every layer keeps its set; with it only each layer's input
//! (`h`) is kept and one layer's set exists at a time, with about as much again for its
//! gradients while it back-propagates. The LM head holds, per chunk, float32 logits, their
//! log-softmax and the gradients of both (`4 * chunk * vocab`). The optimizer's temporaries are
//! a few copies of the largest parameter with the tensor-op AdamW, none with the fused kernel (see
//! [`MemoryEstimate::new`]). Under context
//! parallelism of size cp a rank holds T/cp of each row's tokens: every term above that counts
//! tokens counts T/cp, and a layer's working set adds the all-to-alls' buffers (q, k, v and the
//! attention output, sent and received: `2 (2q + 2kv')` per local token, with `kv'` the KV width
//! after repeating KV heads up to cp). On CPU the process also
//! holds LibTorch itself, memory the C allocator keeps after it is freed, and, with
//! checkpointing, a measured share that grows with the tokens ([`CPU_RUNTIME_BYTES`],
//! [`CPU_RETENTION`], [`CPU_CHECKPOINT_UNATTRIBUTED`]).

use longmix_model::{MemoryOptions, ModelConfig};
use serde_json::json;
use tch::{Device, Kind};

/// Resident LibTorch and process before the model exists (CPU: `longmix env`'s peak RSS).
pub const CPU_RUNTIME_BYTES: f64 = 0.48e9;
/// Freed working memory the C allocator still holds at the peak, as a share of the step's
/// transient working set (CPU; fitted to SmolLM2-135M at 2048 tokens with and without layer
/// checkpointing, measured by `longmix bench`: docs/performance.md).
pub const CPU_RETENTION: f64 = 0.25;

/// What the optimizer holds: bytes per parameter element it updates, the share of the
/// parameters it updates (1, or 1 / world with ZeRO-1), and whether the fused kernel runs.
/// Resident memory of a checkpointed CPU step that grows with its tokens beyond every component
/// above, in hidden-sized float32 tensors per token and layer: measured (SmolLM2-135M with layer
/// checkpointing, 2048 and 8448 tokens: the measured peak grew 2.5x faster with the tokens than
/// the components) and not yet attributed to a tensor (docs/performance.md).
pub const CPU_CHECKPOINT_UNATTRIBUTED: f64 = 3.3;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerMemory {
    pub bytes_per_element: u64,
    pub share: f64,
    pub fused: bool,
    /// The share of the parameters whose float32 gradients a rank keeps (1, or 1 / world with
    /// ZeRO-2).
    pub grad_share: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// Weights in the compute dtype, float32 gradients (plus autograd's own bf16/f16 ones
    /// until they are folded in), AdamW moments (and float32 masters).
    pub state: f64,
    /// Activations kept for the backward (every layer's, or each layer's input).
    pub saved: f64,
    /// One layer's working set and its gradients during the backward (with checkpointing:
    /// the recomputed layer).
    pub layer: f64,
    /// The LM head chunk's logits, log-softmax and gradient.
    pub head: f64,
    /// Optimizer temporaries.
    pub optimizer: f64,
    /// LibTorch itself, allocator retention and the measured unattributed term (CPU only).
    pub runtime: f64,
}

impl MemoryEstimate {
    /// The estimate for `tokens` tokens per micro-batch of model `c` computing in `kind` on
    /// `device`, each row split over `cp` ranks (1: no context parallelism).
    pub fn new(
        c: &ModelConfig,
        kind: Kind,
        opt: OptimizerMemory,
        tokens: i64,
        cp: usize,
        mem: MemoryOptions,
        device: Device,
    ) -> MemoryEstimate {
        let b = kind.elt_size_in_bytes() as f64;
        let n = c.n_params();
        let t = (tokens as f64 / cp as f64).ceil();
        let (h, q, kv, i) = (
            c.hidden_size as f64,
            (c.num_attention_heads * c.head_dim) as f64,
            (c.num_key_value_heads * c.head_dim) as f64,
            c.intermediate_size as f64,
        );
        let layers = c.num_hidden_layers as f64;
        let exchange = if cp > 1 {
            let kv_sent = kv.max((cp as i64 * c.head_dim) as f64);
            2.0 * (2.0 * q + 2.0 * kv_sent)
        } else {
            0.0
        };
        let per_layer = t * (4.0 * h + 3.0 * q + 2.0 * kv + 4.0 * i + exchange) * b;
        let (saved, layer) = if mem.checkpoint_layers {
            (t * h * b * (layers + 1.0), 2.0 * per_layer)
        } else {
            (per_layer * layers, per_layer)
        };
        let chunk = mem.loss_chunk.map_or(t, |c| (c as f64).min(t));
        let head = 4.0 * chunk * c.vocab_size as f64 * 4.0 + t * h * 4.0;
        let largest = (c.vocab_size * c.hidden_size).max(c.hidden_size * c.intermediate_size) as f64;
        // The gradient norm is a reduction (no temporary); the tensor-op AdamW makes about four
        // float32 temporaries of a parameter, the fused kernel none.
        let optimizer = if opt.fused { 0.0 } else { 4.0 * largest * 4.0 };
        let unattributed = if mem.checkpoint_layers { CPU_CHECKPOINT_UNATTRIBUTED * t * h * layers * 4.0 } else { 0.0 };
        let runtime = match device {
            Device::Cpu => CPU_RUNTIME_BYTES + CPU_RETENTION * (layer + head + optimizer) + unattributed,
            _ => 0.0,
        };
        // Gradients accumulate in float32 (`crate::grads`). In bf16/f16, autograd's own gradients
        // live until folded in: each layer's after its backward (all layers at once without
        // checkpointing), the embedding's and LM head's until the micro-batch ends.
        // ZeRO-2 takes each micro-batch's gradients from autograd as the reduction needs them,
        // so they live as long as bf16 ones before their fold.
        let sharded_grads = opt.grad_share < 1.0;
        let unfolded = match (kind == Kind::Float && !sharded_grads, mem.checkpoint_layers) {
            (true, _) => 0.0,
            (false, true) => 2.0 * largest * b,
            (false, false) => n * b,
        };
        let grads = n * 4.0 * opt.grad_share;
        let state = n * b + grads + unfolded + n * opt.share * opt.bytes_per_element as f64;
        MemoryEstimate { state, saved, layer, head, optimizer, runtime }
    }

    pub fn total_bytes(&self) -> f64 {
        self.state + self.saved + self.layer + self.head + self.optimizer + self.runtime
    }

    pub fn to_json(self) -> serde_json::Value {
        let mb = |x: f64| (x / 1e6).round();
        json!({
            "state_mb": mb(self.state),
            "saved_activations_mb": mb(self.saved),
            "layer_working_set_mb": mb(self.layer),
            "lm_head_mb": mb(self.head),
            "optimizer_temporaries_mb": mb(self.optimizer),
            "runtime_mb": mb(self.runtime),
        })
    }
}
