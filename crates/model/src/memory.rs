//! Forward + backward for training, with two switchable memory savers.
//!
//! * **Activation checkpointing** (per layer): the forward runs without autograd and keeps only
//!   each layer's input; the backward re-runs layer i with autograd on its detached input and
//!   back-propagates the surrogate `sum(y * dL/dy)`, whose gradient with respect to the layer's
//!   parameters and input is exactly the chain rule's. Activation memory drops from all layers'
//!   intermediates to one hidden state per layer.
//! * **Chunked LM head + cross-entropy**: logits are formed for `chunk` target positions at a
//!   time and back-propagated at once, so `[tokens, vocab]` logits never exist in full
//!   (128k tokens x 128k vocab would be 64 GB in float32). Positions without a target are
//!   dropped before the head.
//!
//! Both give the same gradients as the plain path (tested); the loss is summed, and `scale`
//! (e.g. 1 / target tokens of the whole optimizer step) multiplies every gradient.

use tch::{Kind, Reduction, Tensor};

use crate::transformer::{CausalLm, IGNORE_INDEX};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryOptions {
    /// Recompute each decoder layer in the backward pass.
    pub checkpoint_layers: bool,
    /// Compute the LM head and loss this many target positions at a time (None = all at once).
    pub loss_chunk: Option<i64>,
}

/// What one micro-batch contributed, in total and per row.
#[derive(Debug, Clone, Default)]
pub struct StepLoss {
    /// Summed NLL over scored tokens (float64 for accumulation across micro-batches).
    pub nll_sum: f64,
    pub tokens: i64,
    pub row_nll: Vec<f64>,
    pub row_tokens: Vec<i64>,
}

impl CausalLm {
    /// Accumulate into every parameter's `.grad` the gradient of `scale * summed NLL`.
    pub fn forward_backward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        targets: &Tensor,
        scale: f64,
        opts: MemoryOptions,
    ) -> StepLoss {
        let pos = self.positions(position_ids);
        let run_layers = |x: Tensor| {
            self.layers.iter().fold(x, |x, layer| layer.forward(&x, &pos.cos, &pos.sin, &pos.plan))
        };
        let embedded = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        if !opts.checkpoint_layers {
            let hidden = self.norm.forward(&run_layers(embedded));
            return self.head_loss(&hidden, targets, opts.loss_chunk, scale);
        }
        // Forward without autograd, keeping each layer's input.
        let mut inputs = vec![embedded.detach()];
        tch::no_grad(|| {
            for layer in &self.layers {
                let x = layer.forward(inputs.last().unwrap(), &pos.cos, &pos.sin, &pos.plan);
                inputs.push(x);
            }
        });
        // Head (with the final norm) on a detached leaf, giving dL/d(last hidden state).
        let last = inputs.pop().unwrap().set_requires_grad(true);
        let loss = self.head_loss(&self.norm.forward(&last), targets, opts.loss_chunk, scale);
        let mut grad = last.grad();
        // Backward through the layers, last first, recomputing each.
        for (layer, x) in self.layers.iter().zip(inputs).rev() {
            let x = x.set_requires_grad(true);
            let y = layer.forward(&x, &pos.cos, &pos.sin, &pos.plan);
            (y * &grad).sum(Kind::Float).backward();
            grad = x.grad();
        }
        (embedded * grad).sum(Kind::Float).backward();
        loss
    }

    /// Summed NLL of `hidden` (`[B, T, H]`) against `targets`, back-propagated with `scale`.
    fn head_loss(&self, hidden: &Tensor, targets: &Tensor, chunk: Option<i64>, scale: f64) -> StepLoss {
        let (b, t, h) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
        let flat_targets = targets.reshape([-1]);
        let keep = flat_targets.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
        let tokens = keep.size()[0];
        let row_of = keep.divide_scalar_mode(t, "floor");
        let row_tokens = Vec::<i64>::try_from(row_of.bincount::<Tensor>(None, b)).unwrap();
        let mut row_nll = Tensor::zeros([b], (Kind::Double, hidden.device()));
        if tokens == 0 {
            // Still touch the graph so callers' gradients stay defined (all zero).
            (hidden.sum(Kind::Float) * 0.0).backward();
            return StepLoss { nll_sum: 0.0, tokens: 0, row_nll: vec![0.0; b as usize], row_tokens };
        }
        let hidden = hidden.reshape([-1, h]).index_select(0, &keep);
        let targets = flat_targets.index_select(0, &keep);
        let w = self.lm_head_weight();
        // Back-propagate one piece's loss; return its per-token NLL (detached).
        let piece = |h: &Tensor, t: &Tensor| {
            let nll = h.matmul(&w.tr()).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(t, None, Reduction::None, IGNORE_INDEX, 0.0);
            (nll.sum(Kind::Float) * scale).backward();
            nll.detach()
        };
        let chunk = chunk.unwrap_or(tokens).clamp(1, tokens);
        let nll = if chunk == tokens {
            piece(&hidden, &targets)
        } else {
            // Each chunk's head + loss is back-propagated on its own into a detached copy of the
            // hidden states; their gradient then flows back through `hidden` once.
            let leaf = hidden.detach().set_requires_grad(true);
            let parts: Vec<Tensor> = (0..tokens)
                .step_by(chunk as usize)
                .map(|start| {
                    let n = chunk.min(tokens - start);
                    piece(&leaf.narrow(0, start, n), &targets.narrow(0, start, n))
                })
                .collect();
            (hidden * leaf.grad()).sum(Kind::Float).backward();
            Tensor::cat(&parts, 0)
        };
        let _ = row_nll.index_add_(0, &row_of, &nll.to_kind(Kind::Double));
        StepLoss {
            nll_sum: nll.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]),
            tokens,
            row_nll: Vec::<f64>::try_from(row_nll.to_device(tch::Device::Cpu)).unwrap(),
            row_tokens,
        }
    }
}
