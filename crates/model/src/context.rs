//! Context parallelism, the DeepSpeed-Ulysses way: the `cp` ranks of a group train the same
//! rows, each holding a contiguous 1/cp slice of every row's tokens for the embedding, norms,
//! projections, MLP, LM head and loss. Around the attention core two all-to-alls change the
//! split: `[B, H, T/cp, D]` (every head, this rank's tokens) becomes `[B, H/cp, T, D]` (this
//! rank's heads, the whole row), the attention of [`crate::attention::Plan`] runs over whole rows
//! with the row's global document boundaries, and the result goes back. Each head's attention is
//! the one a single process computes, so the only difference from one process is the order of
//! the gradients' sums.
//!
//! Grouped KV heads keep their grouping: rank r's query heads `[r H/cp, (r+1) H/cp)` use exactly
//! the KV heads `[r H_kv/cp, (r+1) H_kv/cp)`. When cp exceeds the KV heads, each KV head is
//! repeated cp/H_kv times before the exchange (ALST's way), so every rank gets the one its query
//! heads share.
//!
//! What stays whole-row: the RoPE window (short or long) of a row comes from the whole row's
//! positions, not a slice's ([`CausalLm::slice_tokens`]); the next-token targets are the row's
//! (a slice's last token predicts the next slice's first); a row whose length cp does not divide
//! is padded at its end with a document of its own that has no targets.

use std::rc::Rc;

use anyhow::{bail, Result};
use longmix_core::IGNORE_INDEX;
use longmix_torch_ext::c10d::ProcessGroup;
use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::rope::row_lengths;
use crate::transformer::{CausalLm, Tokens};

/// The start of every message of a failed exchange (a dead or hung peer), which the trainer
/// turns into its error naming the rank.
pub use longmix_torch_ext::c10d::EXCHANGE_FAILED;

/// This rank's place in its context-parallel group, and the group.
#[derive(Clone)]
pub struct ContextParallel {
    group: Rc<ProcessGroup>,
}

impl ContextParallel {
    pub fn new(group: ProcessGroup) -> ContextParallel {
        ContextParallel { group: Rc::new(group) }
    }

    /// This rank's index in the group, which is its slice's index in every row.
    pub fn rank(&self) -> usize {
        self.group.rank
    }

    /// The group's size, cp.
    pub fn size(&self) -> usize {
        self.group.world_size
    }

    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    fn exchange(&self, x: &Tensor) -> Tensor {
        // The forward cannot return an error; the message starts with EXCHANGE_FAILED.
        self.group.all_to_all(x).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Every head of this rank's tokens `[B, H, T/cp, D]` -> this rank's heads of the whole row
    /// `[B, H/cp, T, D]`.
    pub fn to_row(&self, x: &Tensor) -> Tensor {
        let cp = self.size() as i64;
        let (b, h, t, d) = x.size4().unwrap();
        let out = self.exchange(&x.view([b, cp, h / cp, t, d]).permute([1, 0, 2, 3, 4]));
        // out[i]: rank i's tokens (the row's i-th slice) of this rank's heads.
        out.permute([1, 2, 0, 3, 4]).reshape([b, h / cp, cp * t, d])
    }

    /// The inverse of [`ContextParallel::to_row`]: `[B, H/cp, T, D]` -> `[B, H, T/cp, D]`.
    pub fn to_slice(&self, y: &Tensor) -> Tensor {
        let cp = self.size() as i64;
        let (b, h, t, d) = y.size4().unwrap();
        let out = self.exchange(&y.view([b, h, cp, t / cp, d]).permute([2, 0, 1, 3, 4]));
        // out[i]: rank i's heads of this rank's tokens.
        out.permute([1, 0, 2, 3, 4]).reshape([b, cp * h, t / cp, d])
    }

    /// The KV heads to exchange: repeated so there are at least cp of them.
    pub fn kv_heads(&self, kv: Tensor) -> Tensor {
        let (cp, n) = (self.size() as i64, kv.size()[1]);
        if n >= cp {
            kv
        } else {
            kv.repeat_interleave_self_int(cp / n, Some(1), None)
        }
    }

    /// This rank's slice of `[B, T]` row tensors (T a multiple of cp).
    fn slice(&self, x: &Tensor) -> Tensor {
        let per = x.size()[1] / self.size() as i64;
        x.narrow(1, self.rank() as i64 * per, per)
    }
}

/// The context-parallel sizes the heads of `c` allow: cp divides the query heads, and either
/// divides the KV heads or is a multiple of them (KV heads repeated).
pub fn context_parallel_sizes(c: &ModelConfig) -> Vec<usize> {
    let (h, kv) = (c.num_attention_heads as usize, c.num_key_value_heads as usize);
    (1..=h).filter(|&cp| h.is_multiple_of(cp) && (kv.is_multiple_of(cp) || cp.is_multiple_of(kv))).collect()
}

/// Refuse a context-parallel size the model's heads cannot be split into.
pub fn check_context_parallel(c: &ModelConfig, cp: usize) -> Result<()> {
    let ok = context_parallel_sizes(c);
    if !ok.contains(&cp) {
        bail!(
            "key `distributed.context_parallel`: {cp} does not split the model's {} query heads and {} KV heads (cp \
             must divide the query heads, and divide the KV heads or be a multiple of them); use one of {ok:?}",
            c.num_attention_heads,
            c.num_key_value_heads
        );
    }
    Ok(())
}

/// `x` `[B, T]` with `pad` columns of `fill` appended.
fn pad_with(x: &Tensor, pad: i64, fill: &Tensor) -> Tensor {
    Tensor::cat(&[x.shallow_clone(), fill.expand([x.size()[0], pad], false).to_kind(x.kind())], 1)
}

impl CausalLm {
    /// This rank's share of whole rows `input_ids`, `position_ids`, `targets` (`[B, T]`, the same
    /// on every rank of the group): its slice of the tokens and targets, RoPE tables for the
    /// slice's positions with each row's window decided by the whole row, and the attention plan
    /// of the whole rows.
    pub fn slice_tokens(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        targets: &Tensor,
        cp: &ContextParallel,
    ) -> Tokens {
        let (t, n) = (input_ids.size()[1], cp.size() as i64);
        let pad = (n - t % n) % n;
        let (ids, pos, tgt) = if pad == 0 {
            (input_ids.shallow_clone(), position_ids.shallow_clone(), targets.shallow_clone())
        } else {
            // A document of its own at the end (positions from 0, no targets): it changes
            // neither the row's length nor any other token's attention.
            let device = input_ids.device();
            let zeros = Tensor::zeros([1, pad], (Kind::Int64, device));
            let arange = Tensor::arange(pad, (Kind::Int64, device)).unsqueeze(0);
            (
                pad_with(input_ids, pad, &zeros),
                pad_with(position_ids, pad, &arange),
                pad_with(targets, pad, &(zeros.shallow_clone() + IGNORE_INDEX)),
            )
        };
        // The lengths of the rows before padding.
        let lengths = row_lengths(position_ids);
        let positions = self.positions_within(&pos, &lengths, &cp.slice(&pos), Some(cp.clone()));
        Tokens { input_ids: cp.slice(&ids), targets: cp.slice(&tgt), positions }
    }
}
