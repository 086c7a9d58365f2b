//! Synthetic rows (tests and benchmarks of the model/trainer without a corpus).

use crate::hash::{mix_all, SplitMix64};
use crate::row::{DocSpan, Piece, Row, Window};

/// One random row of `kind` following the row contract: random token ids below `vocab_size`,
/// random document lengths; a `Short` row's documents are all ≤ `l0`, a `Long` row starts
/// with a document longer than `l0` (needs `seq_len > l0`). Its pieces claim source 0.
pub fn random_row(kind: Window, seq_len: usize, l0: usize, vocab_size: u32, seed: u64) -> Row {
    assert!(vocab_size > 0 && seq_len > 0 && l0 > 0);
    assert!(kind == Window::Short || seq_len > l0, "a long row needs seq_len > l0");
    let mut rng = SplitMix64::new(mix_all(&[seed, 0x5EE7]));
    let mut pieces = Vec::new();
    let mut space = seq_len;
    let mut doc = 0usize;
    let mut push = |len: usize, pieces: &mut Vec<Piece>| {
        pieces.push(Piece { len, origin: Some(DocSpan { source: 0, doc, start: 0, epoch: 0, stream: kind }) });
        doc += 1;
    };
    if kind == Window::Long {
        let len = l0 + 1 + rng.below((seq_len - l0) as u64) as usize;
        push(len, &mut pieces);
        space -= len;
    }
    while space > 0 {
        let len = (1 + rng.below(l0 as u64) as usize).min(space);
        push(len, &mut pieces);
        space -= len;
    }
    let tokens = (0..seq_len).map(|_| rng.below(vocab_size as u64) as i64).collect();
    Row::from_pieces(tokens, pieces, l0, 1, seed, Some(0))
}

/// `n` random rows; each is short with probability `short_share`.
pub fn random_rows(n: usize, seq_len: usize, l0: usize, vocab_size: u32, short_share: f64, seed: u64) -> Vec<Row> {
    let mut rng = SplitMix64::new(mix_all(&[seed, 0xA11]));
    (0..n)
        .map(|i| {
            let kind = if rng.next_f64() < short_share { Window::Short } else { Window::Long };
            random_row(kind, seq_len, l0, vocab_size, mix_all(&[seed, i as u64]))
        })
        .collect()
}
