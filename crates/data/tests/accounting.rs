//! Token accounting and the mixture: every training token once per epoch of its stream,
//! held-out documents never trained, short share and source weights honoured.
mod common;
use common::*;
use longmix_data::{is_held_out, Corpus, Loader, Row, Shard, Window};
use std::collections::BTreeMap;

type Key = (usize, usize, Window, u64); // source, doc, stream, epoch

/// Collect the covered intervals per (source, doc, stream, epoch).
fn coverage(rows: &[Row]) -> BTreeMap<Key, Vec<(usize, usize)>> {
    let mut m: BTreeMap<Key, Vec<(usize, usize)>> = BTreeMap::new();
    for r in rows {
        for p in &r.pieces {
            if let Some(o) = &p.origin {
                m.entry((o.source, o.doc, o.stream, o.epoch)).or_default().push((o.start, o.start + p.len));
            }
        }
    }
    m
}

#[allow(clippy::needless_range_loop)]
fn run_accounting(short_share: f64, eval_fraction: f64) {
    let docs = make_docs(2, 150, 120, 11);
    let mut cfg = config(mem_sources(&[1.0, 2.0]), 64, 24, short_share);
    cfg.eval_fraction = eval_fraction;
    cfg.add_eos = true;
    cfg.eos_id = Some(EOS);
    let mut l = mem_loader(&docs, cfg.clone());
    let mut rows = Vec::new();
    // run until every non-empty stream finished epochs 0 and 1, then a little more so queued
    // tails of long epoch 1 are trained too
    let mut extra = 0;
    while extra < 40 {
        rows.push(l.next_row());
        let st = l.state();
        let stats = l.stats();
        let done = (0..2).all(|s| {
            (stats[s].short_docs == 0 || st.short[s].epoch >= 2) && (stats[s].long_docs == 0 || st.long[s].epoch >= 2)
        });
        if done {
            extra += 1;
        }
        assert!(rows.len() < 100_000, "streams never finished two epochs");
    }
    assert!(l.state().tails.iter().all(|t| t.origin.as_ref().unwrap().epoch >= 2));
    let cov = coverage(&rows);
    let corpus = Corpus::from_docs(&docs);
    let mut checked_tokens = 0usize;
    let mut held_out = 0;
    for s in 0..2 {
        let shard: &Shard = corpus.shard(s);
        for d in 0..shard.n_docs() {
            let vlen = docs[s][d].len() + 1;
            let stream = if short_share < 1.0 && vlen > 24 { Window::Long } else { Window::Short };
            let other = if stream == Window::Long { Window::Short } else { Window::Long };
            if is_held_out(shard.doc_hash(d), eval_fraction) {
                held_out += 1;
                for e in 0..3 {
                    assert!(!cov.contains_key(&(s, d, stream, e)), "held-out doc {s}/{d} was trained");
                }
                continue;
            }
            for e in 0..2 {
                assert!(!cov.contains_key(&(s, d, other, e)), "doc {s}/{d} appears in the wrong stream");
                let mut iv = cov.get(&(s, d, stream, e)).cloned().unwrap_or_default();
                iv.sort();
                // exact cover of 0..vlen: no gap, no overlap
                let mut at = 0;
                for (a, b) in iv {
                    assert_eq!(a, at, "doc {s}/{d} epoch {e}: gap or overlap at {at} (intervals from {a})");
                    at = b;
                }
                assert_eq!(at, vlen, "doc {s}/{d} epoch {e}: covered {at} of {vlen} tokens");
                checked_tokens += vlen;
            }
        }
    }
    if eval_fraction > 0.0 {
        let expect = eval_fraction * 300.0;
        assert!(
            (held_out as f64) > 0.4 * expect && (held_out as f64) < 1.6 * expect,
            "eval_fraction {eval_fraction} held out {held_out} docs"
        );
    }
    assert!(checked_tokens > 10_000);
    for r in &rows {
        check_row_contract(r, &cfg, Some(&docs));
    }
}

#[test]
fn every_token_once_per_epoch_mixed() {
    run_accounting(0.3, 0.1);
}

#[test]
fn every_token_once_per_epoch_mostly_short() {
    // few long rows: tails queue up behind many short rows, and vice versa
    run_accounting(0.8, 0.0);
}

#[test]
fn every_token_once_per_epoch_short_only() {
    run_accounting(1.0, 0.05);
}

#[test]
fn long_only_drops_tails_and_counts_them() {
    let docs = vec![vec![(0..50).collect::<Vec<u32>>(); 10]];
    // 50-token docs, T = 32, l0 = 20: each doc gives a 32 piece, then 18 left (≤ l0) → tail
    let cfg = config(mem_sources(&[1.0]), 32, 20, 0.0);
    let mut l = mem_loader(&docs, cfg.clone());
    for _ in 0..10 {
        let r = l.next_row();
        assert_eq!(r.kind, Window::Long);
        assert_eq!(r.pieces.len(), 1);
        check_row_contract(&r, &cfg, Some(&docs));
    }
    let st = l.state();
    assert!(st.tails.is_empty());
    assert_eq!(st.dropped_tail_tokens, 10 * 18);
    assert_eq!(st.long[0].epoch, 1);
}

#[test]
fn short_share_is_honoured() {
    let docs = make_docs(1, 300, 200, 5);
    for share in [0.3, 0.05, 0.5, 0.77] {
        let cfg = config(mem_sources(&[1.0]), 96, 32, share);
        let mut l = mem_loader(&docs, cfg);
        let n = 3000;
        let shorts = (0..n).filter(|_| l.next_row().kind == Window::Short).count();
        let frac = shorts as f64 / n as f64;
        assert!((frac - share).abs() < 0.005, "share {share}: got {frac}");
    }
}

#[test]
fn every_window_of_rows_holds_the_share() {
    // An optimizer step is a window of consecutive global rows: its short count must be
    // floor(n*s) or ceil(n*s) wherever the window starts, so every step of >= 2 rows with
    // s = 0.5 holds both kinds.
    let docs = make_docs(1, 300, 200, 5);
    for share in [0.3, 0.5, 0.77] {
        let cfg = config(mem_sources(&[1.0]), 96, 32, share);
        let mut l = mem_loader(&docs, cfg);
        let kinds: Vec<Window> = (0..600).map(|_| l.next_row().kind).collect();
        for n in 1..=40usize {
            let (lo, hi) = ((n as f64 * share).floor() as usize, (n as f64 * share).ceil() as usize);
            for w in kinds.windows(n) {
                let shorts = w.iter().filter(|&&k| k == Window::Short).count();
                assert!(lo <= shorts && shorts <= hi, "share {share}: {shorts} short rows in a window of {n}");
            }
        }
    }
}

#[test]
fn source_weights_set_row_shares() {
    let docs = make_docs(3, 200, 200, 9);
    let cfg = config(mem_sources(&[1.0, 3.0, 6.0]), 96, 32, 0.3);
    let mut l = mem_loader(&docs, cfg);
    let mut per_source = [[0usize; 3]; 2];
    for _ in 0..2000 {
        let r = l.next_row();
        let k = (r.kind == Window::Long) as usize;
        let s = r.source.unwrap();
        // apart from queued tails (short rows only), every token comes from that source
        let foreign: usize = (0..3).filter(|&x| x != s).map(|x| r.source_tokens[x]).sum();
        if r.kind == Window::Long {
            assert_eq!(foreign, 0);
        }
        per_source[k][s] += 1;
    }
    for (k, counts) in per_source.iter().enumerate() {
        let total: usize = counts.iter().sum();
        for (s, w) in [0.1, 0.3, 0.6].iter().enumerate() {
            let f = counts[s] as f64 / total as f64;
            assert!((f - w).abs() < 0.04, "kind {k} source {s}: share {f}, want {w}");
        }
    }
}

#[test]
fn stats_split_documents() {
    let docs = make_docs(1, 400, 100, 2);
    let mut cfg = config(mem_sources(&[1.0]), 64, 30, 0.3);
    cfg.eval_fraction = 0.2;
    let l = Loader::with_corpus(Corpus::from_docs(&docs), cfg).unwrap();
    let s = &l.stats()[0];
    assert_eq!(s.short_docs + s.long_docs + s.eval_docs, 400);
    assert_eq!(s.short_tokens + s.long_tokens + s.eval_tokens, s.tokens);
    let frac = s.eval_docs as f64 / 400.0;
    assert!((0.12..0.28).contains(&frac), "held out {frac}");
    assert_eq!(
        s.long_docs,
        docs[0]
            .iter()
            .enumerate()
            .filter(|(d, x)| x.len() > 30 && !is_held_out(l.corpus().shard(0).doc_hash(*d), 0.2))
            .count()
    );
}

#[test]
fn each_epoch_is_reshuffled() {
    // 40 documents of 4 tokens, two per row: the document order of each epoch
    let docs = vec![(0..40u32).map(|d| vec![d; 4]).collect::<Vec<_>>()];
    let cfg = config(mem_sources(&[1.0]), 8, 4, 1.0);
    let mut l = mem_loader(&docs, cfg);
    let mut order: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for _ in 0..60 {
        for p in l.next_row().pieces {
            let o = p.origin.unwrap();
            order.entry(o.epoch).or_default().push(o.doc);
        }
    }
    let (e0, e1, e2) = (&order[&0], &order[&1], &order[&2]);
    for e in [e0, e1, e2] {
        let mut s = e.clone();
        s.sort();
        assert_eq!(s, (0..40).collect::<Vec<_>>(), "each epoch is a permutation of all documents");
    }
    assert_ne!(e0, e1);
    assert_ne!(e1, e2);
    assert_ne!(e0, &(0..40).collect::<Vec<_>>(), "documents are shuffled");
}
