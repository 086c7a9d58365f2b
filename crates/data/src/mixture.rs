//! The mixture: which kind of row comes next, and from which source.
//!
//! * **Row kind** is a pure function of the seed and the global row index: rows are grouped
//!   in blocks of [`KIND_BLOCK`]; block `b` holds exactly
//!   `floor((b+1)·B·short_share) − floor(b·B·short_share)` short rows at positions drawn from
//!   the seed. So the short fraction of any prefix is within one row of
//!   `short_share` per block boundary, the order inside a block is random, and no state is
//!   needed to resume.
//! * **Source** of a row is chosen by a deficit (smooth weighted round-robin) scheduler over the
//!   sources that have documents for that kind: the source whose row count lags its
//!   weight-proportional share the most (ties: lowest index). Its state is the per-source
//!   row counts kept in [`crate::LoaderState`]. Rows all have `seq_len` tokens, so row shares
//!   are token shares.

use crate::hash::{mix_all, shuffle};
use crate::row::RowKind;

/// Rows per block of the kind schedule.
pub const KIND_BLOCK: u64 = 100;

/// Short rows among the first `blocks` blocks.
fn shorts_before(blocks: u64, short_share: f64) -> u64 {
    ((blocks * KIND_BLOCK) as f64 * short_share).floor() as u64
}

/// The kind of global row `index`.
pub fn row_kind(index: u64, short_share: f64, seed: u64) -> RowKind {
    if short_share >= 1.0 {
        return RowKind::Short;
    }
    if short_share <= 0.0 {
        return RowKind::Long;
    }
    let b = index / KIND_BLOCK;
    let i = (index % KIND_BLOCK) as usize;
    let k = shorts_before(b + 1, short_share) - shorts_before(b, short_share);
    let mut slots: Vec<u8> = (0..KIND_BLOCK as usize)
        .map(|j| (j < k as usize) as u8)
        .collect();
    shuffle(&mut slots, mix_all(&[seed, b, 0x4B1D]));
    if slots[i] == 1 {
        RowKind::Short
    } else {
        RowKind::Long
    }
}

/// Pick the source of the next row of a kind among `eligible` (non-empty) given the rows
/// each source already produced for that kind (`counts`, indexed by source).
pub fn pick_source(eligible: &[usize], weights: &[f64], counts: &[u64]) -> usize {
    let total_w: f64 = eligible.iter().map(|&s| weights[s]).sum();
    let total_rows: u64 = eligible.iter().map(|&s| counts[s]).sum();
    let mut best = eligible[0];
    let mut best_deficit = f64::NEG_INFINITY;
    for &s in eligible {
        let deficit = weights[s] / total_w * (total_rows + 1) as f64 - counts[s] as f64;
        if deficit > best_deficit {
            best = s;
            best_deficit = deficit;
        }
    }
    best
}
