//! Causal self-attention over rows that may hold several packed documents.
//!
//! A row's documents are delimited by its position ids: a document starts wherever the position
//! id is 0. Tokens attend only within their own document, which gives exactly what running each
//! document alone gives. A [`Plan`] is derived once per forward from the position ids and reused
//! by every layer.
//!
//! * Every row one document and no sliding window in play: one `scaled_dot_product_attention`
//!   call with `is_causal` (the flash kernel on CUDA, O(T) memory).
//! * Otherwise the rows' documents go packed, back to back, through
//!   [`varlen_attention`]: FlashAttention-2 over `cu_seqlens` on CUDA in bf16/f16 (one kernel
//!   for the whole batch), elsewhere each document on its own through SDPA (`is_causal`, plus a
//!   sliding-window mask only where a document is longer than the window).

use longmix_torch_ext::attention::{causal_sdpa, varlen_attention, CuSeqlens};
use tch::{Device, Tensor};

/// A document inside a row: `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: i64,
    pub len: i64,
}

pub enum Plan {
    /// Every row is one document.
    Causal { sliding_window: Option<i64> },
    /// The batch's documents packed back to back (row `r`'s document at `s` starts at `r * T + s`),
    /// their boundaries built once for every layer.
    Documents { cu: CuSeqlens, sliding_window: Option<i64> },
}

/// Split each row of `position_ids` (`[B, T]`) into documents at the zeros.
pub fn document_spans(position_ids: &Tensor) -> Vec<Vec<Span>> {
    let size = position_ids.size();
    let (batch, seq_len) = (size[0], size[1]);
    let pos: Vec<i64> =
        Vec::try_from(position_ids.to_device(Device::Cpu).reshape([-1])).expect("position_ids must be an int64 tensor");
    (0..batch)
        .map(|b| {
            let row = &pos[(b * seq_len) as usize..((b + 1) * seq_len) as usize];
            let mut starts: Vec<i64> = vec![0];
            starts.extend((1..seq_len).filter(|&t| row[t as usize] == 0));
            starts
                .iter()
                .enumerate()
                .map(|(i, &s)| Span { start: s, len: starts.get(i + 1).copied().unwrap_or(seq_len) - s })
                .collect()
        })
        .collect()
}

impl Plan {
    pub fn new(position_ids: &Tensor, sliding_window: Option<i64>) -> Plan {
        let rows = document_spans(position_ids);
        if rows.iter().all(|r| r.len() == 1) {
            return Plan::Causal { sliding_window };
        }
        let t = position_ids.size()[1];
        let mut cu: Vec<i64> =
            rows.iter().enumerate().flat_map(|(r, spans)| spans.iter().map(move |s| r as i64 * t + s.start)).collect();
        cu.push(rows.len() as i64 * t);
        Plan::Documents { cu: CuSeqlens::new(cu, position_ids.device()), sliding_window }
    }

    /// Attention output `[B, H, T, D]` for `q` `[B, H, T, D]` and `k`, `v` `[B, H_kv, T, D]`.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        match self {
            Plan::Causal { sliding_window } => causal_sdpa(q, k, v, *sliding_window),
            Plan::Documents { cu, sliding_window } => {
                let (b, h, t, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
                let pack = |x: &Tensor| x.transpose(1, 2).reshape([b * t, x.size()[1], d]);
                varlen_attention(&pack(q), &pack(k), &pack(v), cu, *sliding_window).view([b, t, h, d]).transpose(1, 2)
            }
        }
    }
}
