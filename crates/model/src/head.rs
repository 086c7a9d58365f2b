//! The LM head and next-token NLL: the one primitive behind training, held-out evaluation,
//! `score`, `eval` and the search's needle-driven perplexity.
//!
//! Only positions with a target go through the head, [`HEAD_CHUNK`] of them at a time, so
//! `[tokens, vocab]` logits never exist in full (a 128k-token row with LLaMA-3's 128k vocabulary
//! would need 64 GB of float32 logits). The result is per row: summed NLL (float64) and the
//! number of scored tokens.

use tch::{Device, Kind, Reduction, Tensor};

use crate::transformer::{CausalLm, Tokens};
use crate::IGNORE_INDEX;

/// Scored positions per LM-head chunk unless the caller chooses.
pub const HEAD_CHUNK: i64 = 2048;

/// Summed next-token NLL and scored tokens of every row of a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadLoss {
    pub row_nll: Vec<f64>,
    pub row_tokens: Vec<i64>,
}

impl HeadLoss {
    /// Summed NLL over all rows.
    pub fn sum(&self) -> f64 {
        self.row_nll.iter().sum()
    }

    /// Scored tokens over all rows.
    pub fn tokens(&self) -> i64 {
        self.row_tokens.iter().sum()
    }

    /// Mean NLL per scored token (NaN when nothing was scored).
    pub fn mean(&self) -> f64 {
        self.sum() / self.tokens() as f64
    }
}

impl CausalLm {
    /// NLL of final hidden states `hidden` `[B, T, H]` against `targets` `[B, T]` (the token each
    /// position must predict, or [`IGNORE_INDEX`]), `chunk` scored positions at a time (None:
    /// [`HEAD_CHUNK`]).
    ///
    /// With `backward = Some(scale)` the gradient of `scale * summed NLL` is accumulated into the
    /// head's weight and back-propagated through `hidden`: each chunk's head and loss run backward
    /// on their own into a detached copy of the hidden states, whose gradient then flows back
    /// through `hidden` once. With `None` no graph is kept.
    pub fn head_nll(&self, hidden: &Tensor, targets: &Tensor, chunk: Option<i64>, backward: Option<f64>) -> HeadLoss {
        let (b, t, h) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
        let flat_targets = targets.reshape([-1]);
        let keep = flat_targets.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
        let tokens = keep.size()[0];
        let row_of = keep.divide_scalar_mode(t, "floor");
        let row_tokens = Vec::<i64>::try_from(row_of.bincount::<Tensor>(None, b).to_device(Device::Cpu)).unwrap();
        if tokens == 0 {
            if let Some(scale) = backward {
                // Still touch the graph so callers' gradients stay defined (all zero).
                (hidden.sum(Kind::Float) * (0.0 * scale)).backward();
            }
            return HeadLoss { row_nll: vec![0.0; b as usize], row_tokens };
        }
        let w = self.lm_head_weight();
        let targets = flat_targets.index_select(0, &keep);
        let chunk = chunk.unwrap_or(HEAD_CHUNK).clamp(1, tokens);
        // A bf16/f16 head weight's gradient is summed over the chunks in float32 (each chunk's
        // backward goes into a detached copy) and handed to autograd once, so the chunks'
        // contributions are not rounded into a low-precision sum one after another.
        let w_sum = (backward.is_some() && chunk < tokens && w.kind() != Kind::Float)
            .then(|| (w.detach().set_requires_grad(true), Tensor::zeros_like(w).to_kind(Kind::Float)));
        let w_piece = w_sum.as_ref().map_or(w, |(leaf, _)| leaf);
        // Per-token NLL of one piece of scored hidden states (float32 logits).
        let piece_nll = |h: &Tensor, t: &Tensor| {
            h.matmul(&w_piece.tr()).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                t,
                None,
                Reduction::None,
                IGNORE_INDEX,
                0.0,
            )
        };
        let pieces = |h: &Tensor, each: &mut dyn FnMut(&Tensor, Tensor) -> Tensor| -> Tensor {
            let parts: Vec<Tensor> = (0..tokens)
                .step_by(chunk as usize)
                .map(|start| {
                    let n = chunk.min(tokens - start);
                    each(&h.narrow(0, start, n), targets.narrow(0, start, n))
                })
                .collect();
            Tensor::cat(&parts, 0)
        };
        let nll = match backward {
            None => tch::no_grad(|| {
                let scored = hidden.reshape([-1, h]).index_select(0, &keep);
                pieces(&scored, &mut |h, t| piece_nll(h, &t))
            }),
            Some(scale) => {
                let scored = hidden.reshape([-1, h]).index_select(0, &keep);
                let step = |h: &Tensor, t: Tensor| {
                    let nll = piece_nll(h, &t);
                    (nll.sum(Kind::Float) * scale).backward();
                    if let Some((leaf, sum)) = &w_sum {
                        let mut g = leaf.grad();
                        let _ = sum.shallow_clone().g_add_(&g);
                        let _ = g.zero_();
                    }
                    nll.detach()
                };
                if chunk == tokens {
                    step(&scored, targets.shallow_clone())
                } else {
                    let leaf = scored.detach().set_requires_grad(true);
                    let nll = pieces(&leaf, &mut |h, t| step(h, t));
                    let mut through_hidden = (scored * leaf.grad()).sum(Kind::Float);
                    if let Some((_, sum)) = &w_sum {
                        // d/dw (w . sum) = sum: the float32 total reaches the weight's gradient.
                        through_hidden += (w * sum.to_kind(w.kind())).sum(Kind::Float);
                    }
                    through_hidden.backward();
                    nll
                }
            }
        };
        let row_nll =
            Tensor::zeros([b], (Kind::Double, hidden.device())).index_add(0, &row_of, &nll.to_kind(Kind::Double));
        HeadLoss { row_nll: Vec::<f64>::try_from(row_nll.to_device(Device::Cpu)).unwrap(), row_tokens }
    }

    /// Next-token NLL of `input_ids` at `position_ids` against `targets` (all `[B, T]`), without
    /// gradients: the evaluation path.
    pub fn nll(&self, input_ids: &Tensor, position_ids: &Tensor, targets: &Tensor) -> HeadLoss {
        self.nll_of(&self.tokens(input_ids, position_ids, targets))
    }

    /// [`CausalLm::nll`] of `tokens` (under context parallelism: this rank's slice's share).
    pub fn nll_of(&self, tokens: &Tokens) -> HeadLoss {
        tch::no_grad(|| {
            let hidden = self.hidden_of(&tokens.input_ids, &tokens.positions);
            self.head_nll(&hidden, &tokens.targets, None, None)
        })
    }
}

/// [`longmix_core::next_token_targets`] of every row of `input_ids` / `position_ids` `[B, T]`.
pub fn batch_targets(input_ids: &Tensor, position_ids: &Tensor) -> Tensor {
    let rows =
        |t: &Tensor| -> Vec<Vec<i64>> { Vec::<Vec<i64>>::try_from(t.to_device(Device::Cpu)).expect("int64 [B, T]") };
    let targets: Vec<Tensor> = rows(input_ids)
        .iter()
        .zip(rows(position_ids).iter())
        .map(|(ids, pos)| Tensor::from_slice(&longmix_core::next_token_targets(ids, pos)))
        .collect();
    Tensor::stack(&targets, 0).to_device(input_ids.device())
}
