//! Held-out rows.
//!
//! A document is held out when its content hash falls in `eval_fraction`
//! ([`crate::loader::is_held_out`]); held-out documents never appear in training rows. They are
//! packed, in content-hash order (stable, mixing sources), into fixed short rows (documents of
//! at most `l0` tokens) and long rows (documents longer than `l0`; a remainder of at most `l0`
//! tokens is dropped so every long row starts with a piece longer than `l0`).

use crate::corpus::DocView;
use crate::packing::{materialize, pad, Geometry};
use crate::row::{DocSpan, Piece, Row, Window};

pub(crate) fn pack_eval(
    view: &DocView,
    g: Geometry,
    pad_id: u32,
    kind: Window,
    docs: &[(usize, usize)],
    n: usize,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let (mut i, mut off) = (0usize, 0usize);
    let piece = |s: usize, d: usize, start: usize, len: usize| Piece {
        len,
        origin: Some(DocSpan { source: s, doc: d, start, epoch: 0, stream: kind }),
    };
    while rows.len() < n && i < docs.len() {
        if kind == Window::Long {
            // a long row must start with a piece longer than l0
            while i < docs.len() && view.vlen(docs[i].0, docs[i].1) - off <= g.l0 {
                i += 1;
                off = 0;
            }
            if i == docs.len() {
                break;
            }
        }
        let mut pieces = Vec::new();
        let mut space = g.seq_len;
        while space > 0 {
            if i == docs.len() {
                pad(&mut pieces, space, g.l0);
                break;
            }
            let (s, d) = docs[i];
            let rem = view.vlen(s, d) - off;
            let take = match kind {
                Window::Short => rem.min(space).min(g.l0),
                Window::Long => rem.min(space),
            };
            pieces.push(piece(s, d, off, take));
            space -= take;
            let left = rem - take;
            if left == 0 || (kind == Window::Long && left <= g.l0) {
                i += 1;
                off = 0;
            } else {
                off += take;
            }
        }
        let index = rows.len() as u64;
        rows.push(materialize(view, pieces, g.l0, pad_id, index, None));
    }
    rows
}
