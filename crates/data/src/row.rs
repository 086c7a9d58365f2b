//! Training rows and the contract with the model.
//!
//! A row is exactly `seq_len` tokens made of consecutive *pieces*. Each piece is its own
//! document for the model: its `position_ids` run `0..len` (so a document boundary is where
//! the position restarts at 0) and its tokens attend only within it. Targets:
//! `targets[t] = input_ids[t+1]` when `t+1` is in the same piece, else [`IGNORE_INDEX`] — the last
//! token of every piece (and of the row) carries no loss, and the first token of a piece is
//! never predicted from the previous one. Padding pieces have every target [`IGNORE_INDEX`] and
//! are at most `l0` long, so padding never turns a short row long.
//!
//! The RoPE window of a row is decided by the row: LONG iff `max(position_ids) + 1 > l0`,
//! else SHORT ([`Window::of_positions`]).

use serde::{Deserialize, Serialize};

pub use longmix_core::{Window, IGNORE_INDEX};

/// Where a piece's tokens come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DocSpan {
    /// Index of the source in the config.
    pub source: usize,
    /// Document index inside that source (cache order).
    pub doc: usize,
    /// First token of the piece inside the document, counting an added BOS as token 0.
    pub start: usize,
    /// Epoch of the stream the document was drawn from.
    pub epoch: u64,
    /// The stream the document belongs to (a tail of a long document is `Long` even when it
    /// is trained in a short row).
    pub stream: Window,
}

/// One document of a row.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Piece {
    pub len: usize,
    /// `None` for padding.
    pub origin: Option<DocSpan>,
}

/// One training (or eval) row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub targets: Vec<i64>,
    pub kind: Window,
    /// Number of targets that are not [`IGNORE_INDEX`].
    pub n_targets: usize,
    /// Real (non-padding) tokens per source index, BOS/EOS included.
    pub source_tokens: Vec<usize>,
    /// The documents of the row in order (their lengths sum to the row length).
    pub pieces: Vec<Piece>,
    /// Index of the row in the global (all ranks) sequence; eval rows count from 0.
    pub index: u64,
    /// The source the mixture scheduled this row for (its documents come from that source,
    /// except queued tails of long documents at the start of a short row); `None` for
    /// held-out rows.
    pub source: Option<usize>,
}

impl Row {
    /// Lengths of the row's documents (padding included), e.g. for varlen attention.
    pub fn doc_lengths(&self) -> Vec<usize> {
        self.pieces.iter().map(|p| p.len).collect()
    }

    /// Number of padding tokens.
    pub fn padding_tokens(&self) -> usize {
        self.pieces.iter().filter(|p| p.origin.is_none()).map(|p| p.len).sum()
    }

    /// Build a row from its tokens and pieces (`tokens.len()` = sum of piece lengths); the
    /// positions, targets, kind and counts follow the contract in the module docs.
    pub fn from_pieces(
        tokens: Vec<i64>,
        pieces: Vec<Piece>,
        l0: usize,
        n_sources: usize,
        index: u64,
        source: Option<usize>,
    ) -> Row {
        let n = tokens.len();
        debug_assert_eq!(n, pieces.iter().map(|p| p.len).sum::<usize>());
        let position_ids: Vec<i64> = pieces.iter().flat_map(|p| 0..p.len as i64).collect();
        let mut targets = longmix_core::next_token_targets(&tokens, &position_ids);
        let mut source_tokens = vec![0usize; n_sources];
        let mut at = 0usize;
        for p in &pieces {
            match &p.origin {
                Some(o) => source_tokens[o.source] += p.len,
                // Padding predicts nothing.
                None => targets[at..at + p.len].fill(IGNORE_INDEX),
            }
            at += p.len;
        }
        let n_targets = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let kind = Window::of_positions(&position_ids, l0 as i64);
        Row { input_ids: tokens, position_ids, targets, kind, n_targets, source_tokens, pieces, index, source }
    }
}
