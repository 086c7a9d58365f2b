//! Causal self-attention over rows that may hold several packed documents.
//!
//! A row's documents are delimited by its position ids: a document starts wherever the position
//! id is 0. Tokens attend only within their own document, which gives exactly what running each
//! document alone gives. A [`Plan`] is derived once per forward from the position ids and reused
//! by every layer.
//!
//! * Every row one document and no sliding window in play: one `scaled_dot_product_attention`
//!   call with `is_causal` (the flash kernel on CUDA, O(T) memory).
//! * Otherwise each document is attended on its own (`is_causal` again, plus a sliding-window
//!   mask only where a document is longer than the window), then the pieces are concatenated.

use tch::{Device, Kind, Tensor};

/// A document inside a row: `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: i64,
    pub len: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Every row is one document.
    Causal { seq_len: i64, sliding_window: Option<i64> },
    /// Per row, its documents in order (they tile the row).
    Documents { rows: Vec<Vec<Span>>, sliding_window: Option<i64> },
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
            Plan::Causal { seq_len: position_ids.size()[1], sliding_window }
        } else {
            Plan::Documents { rows, sliding_window }
        }
    }

    /// Attention output `[B, H, T, D]` for `q` `[B, H, T, D]` and `k`, `v` `[B, H_kv, T, D]`.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        match self {
            Plan::Causal { seq_len, sliding_window } => causal(q, k, v, *seq_len, *sliding_window),
            Plan::Documents { rows, sliding_window } => {
                let outs: Vec<Tensor> = rows
                    .iter()
                    .enumerate()
                    .map(|(b, spans)| {
                        let b = b as i64;
                        let pieces: Vec<Tensor> = spans
                            .iter()
                            .map(|s| {
                                let cut = |x: &Tensor| x.narrow(0, b, 1).narrow(2, s.start, s.len);
                                causal(&cut(q), &cut(k), &cut(v), s.len, *sliding_window)
                            })
                            .collect();
                        Tensor::cat(&pieces, 2)
                    })
                    .collect();
                Tensor::cat(&outs, 0)
            }
        }
    }
}

/// Causal attention over one document per row, honouring a sliding window if it bites.
fn causal(q: &Tensor, k: &Tensor, v: &Tensor, len: i64, sliding_window: Option<i64>) -> Tensor {
    let gqa = q.size()[1] != k.size()[1];
    match sliding_window {
        Some(w) if len > w => {
            let mask = sliding_window_mask(len, w, q.device());
            Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, None, gqa)
        }
        _ => Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, None, gqa),
    }
}

/// Boolean `[T, T]` mask, true where query i may see key j: `j <= i` and `j > i - w`.
pub fn sliding_window_mask(len: i64, w: i64, device: Device) -> Tensor {
    let i = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(1);
    let j = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(0);
    j.le_tensor(&i).logical_and(&j.gt_tensor(&(i - w)))
}
