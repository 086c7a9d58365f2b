//! The mixture: which kind of row comes next, and from which source.
//!
//! * **Row kind** is a pure function of the global row index (error diffusion): the first `n`
//!   rows hold exactly `round(n·short_share)` short rows, so every window of `n` consecutive rows
//!   holds `floor(n·s)` or `ceil(n·s)` of them. An optimizer step of `R` global rows therefore
//!   mixes both kinds whenever `R·s >= 1` and `R·(1-s) >= 1` (with s = 0.5, rows alternate), the
//!   shares hold in every step rather than on average, and no state is needed to resume.
//! * **Source** of a row is chosen by a deficit (smooth weighted round-robin) scheduler over the
//!   sources that have documents for that kind: the source whose row count lags its
//!   weight-proportional share the most (ties: lowest index). Its state is the per-source
//!   row counts kept in [`crate::LoaderState`]. Rows all have `seq_len` tokens, so row shares
//!   are token shares.

use crate::row::Window;

/// Short rows among the first `n` global rows: `round(n·short_share)`.
fn shorts_before(n: u64, short_share: f64) -> u64 {
    (n as f64 * short_share + 0.5).floor() as u64
}

/// The kind of global row `index`.
pub fn row_kind(index: u64, short_share: f64) -> Window {
    if shorts_before(index + 1, short_share) > shorts_before(index, short_share) {
        Window::Short
    } else {
        Window::Long
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
