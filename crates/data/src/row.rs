//! Training rows and the contract with the model.
//!
//! A row is exactly `seq_len` tokens made of consecutive *pieces*. Each piece is its own
//! document for the model: its `position_ids` run `0..len` (so a document boundary is where
//! the position restarts at 0) and its tokens attend only within it. Targets:
//! `targets[t] = input_ids[t+1]` when `t+1` is in the same piece, else [`IGNORE`] — the last
//! token of every piece (and of the row) carries no loss, and the first token of a piece is
//! never predicted from the previous one. Padding pieces have every target [`IGNORE`] and
//! are at most `l0` long, so padding never turns a short row long.
//!
//! The RoPE window of a row is decided by the row: LONG iff `max(position_ids) + 1 > l0`,
//! else SHORT ([`RowKind::of`]).

use serde::{Deserialize, Serialize};

/// Target value that carries no loss.
pub const IGNORE: i64 = -100;

/// Which RoPE window a row uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowKind {
    /// Every document fits the original window: max position < l0.
    Short,
    /// At least one document is longer than l0.
    Long,
}

impl RowKind {
    /// LONG iff `max(position_ids) + 1 > l0`, else SHORT (an empty row is SHORT).
    pub fn of(position_ids: &[i64], l0: usize) -> RowKind {
        match position_ids.iter().max() {
            Some(&m) if m + 1 > l0 as i64 => RowKind::Long,
            _ => RowKind::Short,
        }
    }
}

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
    pub stream: RowKind,
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
    pub kind: RowKind,
    /// Number of targets that are not [`IGNORE`].
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
        self.pieces
            .iter()
            .filter(|p| p.origin.is_none())
            .map(|p| p.len)
            .sum()
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
        let mut position_ids = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n);
        let mut source_tokens = vec![0usize; n_sources];
        let mut at = 0usize;
        for p in &pieces {
            for t in 0..p.len {
                position_ids.push(t as i64);
                let last = t + 1 == p.len;
                targets.push(if p.origin.is_none() || last {
                    IGNORE
                } else {
                    tokens[at + t + 1]
                });
            }
            if let Some(o) = &p.origin {
                source_tokens[o.source] += p.len;
            }
            at += p.len;
        }
        let n_targets = targets.iter().filter(|&&t| t != IGNORE).count();
        let kind = RowKind::of(&position_ids, l0);
        Row {
            input_ids: tokens,
            position_ids,
            targets,
            kind,
            n_targets,
            source_tokens,
            pieces,
            index,
            source,
        }
    }
}
