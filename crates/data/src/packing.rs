//! Packing documents into rows of exactly `seq_len` tokens.
//!
//! * **Short rows** take pieces of at most `l0` tokens: first the queued tails of long
//!   documents (see below), then documents of the chosen source's short stream. A document
//!   is cut where the row ends (the rest starts the next short row of that source) and, if it
//!   is longer than `l0` (only when no long rows are produced), every `l0` tokens. So every
//!   position is `< l0`: the row is SHORT.
//! * **Long rows** take documents longer than `l0` from the chosen source's long stream, cut
//!   into pieces of at most `seq_len` tokens where the row ends. The first piece of a long row
//!   is always longer than `l0` (a long document's unused remainder is always kept longer than
//!   `l0`), so the row is LONG. When a cut leaves a remainder of at most `l0` tokens — too short
//!   to make a row long — that *tail* is queued and trained in the next short row(s) instead
//!   of being wasted (when no short rows are produced at all it is dropped and counted).
//! * Padding (only where a row cannot be filled, e.g. held-out rows) is pad-token pieces of at
//!   most `l0` tokens with no targets.
//!
//! Every stream walks its documents in an order shuffled per epoch from the seed; when it runs
//! out it starts the next epoch. Every training token is therefore used exactly once per epoch
//! of its stream (tails: of the long stream).

use crate::corpus::DocView;
use crate::hash::{mix_all, shuffle};
use crate::row::{DocSpan, Piece, Row, Window};
use serde::{Deserialize, Serialize};

/// Where a stream is: epoch, position in that epoch's shuffled order, and tokens of the
/// current document already used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCursor {
    pub epoch: u64,
    pub position: u64,
    pub offset: u64,
}

/// The training documents of one (source, kind), and the current epoch's order of them.
pub(crate) struct Stream {
    pub source: usize,
    pub kind: Window,
    docs: Vec<u32>,
    seed: u64,
    order: Vec<u32>,
    order_epoch: Option<u64>,
}

impl Stream {
    pub fn new(source: usize, kind: Window, docs: Vec<u32>, seed: u64) -> Stream {
        Stream { source, kind, docs, seed, order: Vec::new(), order_epoch: None }
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// The document under the cursor.
    pub fn doc(&mut self, cur: &StreamCursor) -> usize {
        if self.order_epoch != Some(cur.epoch) {
            self.order.clear();
            self.order.extend_from_slice(&self.docs);
            let k = match self.kind {
                Window::Short => 0,
                Window::Long => 1,
            };
            shuffle(&mut self.order, mix_all(&[self.seed, self.source as u64, k, cur.epoch, 0xD0C5]));
            self.order_epoch = Some(cur.epoch);
        }
        self.order[cur.position as usize] as usize
    }

    /// Move to the next document (and epoch).
    pub fn advance(&self, cur: &mut StreamCursor) {
        cur.offset = 0;
        cur.position += 1;
        if cur.position as usize >= self.docs.len() {
            cur.position = 0;
            cur.epoch += 1;
        }
    }
}

/// Row geometry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub seq_len: usize,
    pub l0: usize,
}

fn span(stream: &Stream, doc: usize, start: usize, epoch: u64) -> DocSpan {
    DocSpan { source: stream.source, doc, start, epoch, stream: stream.kind }
}

/// Plan a short row from `tails` then `stream`.
pub(crate) fn plan_short(
    g: Geometry,
    view: &DocView,
    stream: &mut Stream,
    cur: &mut StreamCursor,
    tails: &mut Vec<Piece>,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut space = g.seq_len;
    while space > 0 && !tails.is_empty() {
        let t = &mut tails[0];
        let take = t.len.min(space).min(g.l0);
        let mut origin = t.origin.clone().expect("tails are real documents");
        pieces.push(Piece { len: take, origin: Some(origin.clone()) });
        origin.start += take;
        t.origin = Some(origin);
        t.len -= take;
        space -= take;
        if t.len == 0 {
            tails.remove(0);
        }
    }
    while space > 0 {
        let doc = stream.doc(cur);
        let rem = view.vlen(stream.source, doc) - cur.offset as usize;
        let take = rem.min(space).min(g.l0);
        pieces.push(Piece { len: take, origin: Some(span(stream, doc, cur.offset as usize, cur.epoch)) });
        space -= take;
        if take == rem {
            stream.advance(cur);
        } else {
            cur.offset += take as u64;
        }
    }
    pieces
}

/// Plan a long row from `stream`; tails go to `tails` (or are dropped into `dropped` when
/// `tails` is `None`).
pub(crate) fn plan_long(
    g: Geometry,
    view: &DocView,
    stream: &mut Stream,
    cur: &mut StreamCursor,
    mut tails: Option<&mut Vec<Piece>>,
    dropped: &mut u64,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut space = g.seq_len;
    while space > 0 {
        let doc = stream.doc(cur);
        let rem = view.vlen(stream.source, doc) - cur.offset as usize;
        debug_assert!(rem > g.l0, "a long stream document's remainder is always > l0");
        let take = rem.min(space);
        pieces.push(Piece { len: take, origin: Some(span(stream, doc, cur.offset as usize, cur.epoch)) });
        space -= take;
        let left = rem - take;
        if left == 0 {
            stream.advance(cur);
        } else if left <= g.l0 {
            let start = cur.offset as usize + take;
            match tails.as_deref_mut() {
                Some(t) => t.push(Piece { len: left, origin: Some(span(stream, doc, start, cur.epoch)) }),
                None => *dropped += left as u64,
            }
            stream.advance(cur);
        } else {
            cur.offset += take as u64;
        }
    }
    pieces
}

/// Fill `space` tokens with padding pieces of at most `l0` tokens.
pub(crate) fn pad(pieces: &mut Vec<Piece>, mut space: usize, l0: usize) {
    while space > 0 {
        let n = space.min(l0);
        pieces.push(Piece { len: n, origin: None });
        space -= n;
    }
}

/// Turn a plan into a row.
pub(crate) fn materialize(
    view: &DocView,
    pieces: Vec<Piece>,
    l0: usize,
    pad_id: u32,
    index: u64,
    source: Option<usize>,
) -> Row {
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let mut tokens = Vec::with_capacity(total);
    for p in &pieces {
        match &p.origin {
            Some(o) => view.write(o.source, o.doc, o.start, p.len, &mut tokens),
            None => tokens.extend(std::iter::repeat_n(pad_id as i64, p.len)),
        }
    }
    debug_assert_eq!(tokens.len(), total);
    Row::from_pieces(tokens, pieces, l0, view.corpus.n_sources(), index, source)
}
