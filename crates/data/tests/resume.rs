//! Determinism, exact resume, data-parallel sharding and prefetch.
mod common;
use common::*;
use longmix_data::{Corpus, DataConfig, Loader, LoaderState, Prefetcher, Row};

fn setup() -> (Vec<Vec<Vec<u32>>>, DataConfig) {
    // few documents so epochs of both streams turn over quickly; long docs up to 3×T so
    // they span rows
    let short = make_docs(2, 10, 18, 21);
    let long = make_docs(2, 6, 120, 22);
    let docs: Vec<Vec<Vec<u32>>> = (0..2)
        .map(|s| {
            let mut d = short[s].clone();
            d.extend(long[s].iter().map(|x| {
                let mut x = x.clone();
                x.extend(0..25); // > l0 = 20
                x
            }));
            d
        })
        .collect();
    let mut cfg = config(mem_sources(&[1.0, 1.5]), 48, 20, 0.35);
    cfg.eval_fraction = 0.1;
    cfg.add_bos = true;
    cfg.bos_id = Some(BOS);
    (docs, cfg)
}

fn take(l: &mut Loader, n: usize) -> Vec<Row> {
    (0..n).map(|_| l.next_row()).collect()
}

#[test]
fn same_seed_same_rows_different_seed_different_rows() {
    let (docs, cfg) = setup();
    let a = take(&mut mem_loader(&docs, cfg.clone()), 60);
    let b = take(&mut mem_loader(&docs, cfg.clone()), 60);
    assert_eq!(a, b);
    let mut cfg2 = cfg.clone();
    cfg2.seed = 8;
    let c = take(&mut mem_loader(&docs, cfg2), 60);
    assert_ne!(a, c);
    // different seeds differ in document order; the kind schedule is the same (it depends only
    // on the row index and short_share, so every step holds its share of each kind)
    let ka: Vec<_> = a.iter().map(|r| r.kind).collect();
    let kc: Vec<_> = c.iter().map(|r| r.kind).collect();
    assert_eq!(ka, kc);
    let ids = |rows: &[Row]| rows.iter().map(|r| r.input_ids.clone()).collect::<Vec<_>>();
    assert_ne!(ids(&a), ids(&c));
}

#[test]
fn resume_at_every_split_point_is_exact() {
    let (docs, cfg) = setup();
    let n = 70;
    let mut full_loader = mem_loader(&docs, cfg.clone());
    let full = take(&mut full_loader, n);
    let (mut saw_partial_long, mut saw_epoch_turn, mut saw_long_epoch_turn, mut saw_tails) =
        (false, false, false, false);
    let mut l = mem_loader(&docs, cfg.clone());
    let mut prev_epochs = l.state();
    for k in 1..n {
        let row = l.next_row();
        assert_eq!(row, full[k - 1]);
        let st = l.state();
        saw_partial_long |= st.long.iter().any(|c| c.offset > 0);
        saw_tails |= !st.tails.is_empty();
        saw_epoch_turn |= st
            .short
            .iter()
            .chain(&st.long)
            .zip(prev_epochs.short.iter().chain(&prev_epochs.long))
            .any(|(a, b)| a.epoch > b.epoch);
        saw_long_epoch_turn |= st.long.iter().zip(&prev_epochs.long).any(|(a, b)| a.epoch > b.epoch);
        prev_epochs = st.clone();
        // through JSON, into a fresh loader
        let json = serde_json::to_string(&st).unwrap();
        let back: LoaderState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
        let mut r = Loader::with_corpus(Corpus::from_docs(&docs), cfg.clone()).unwrap();
        r.set_state(back).unwrap();
        let rest = take(&mut r, n - k);
        assert_eq!(&rest[..], &full[k..], "resume after {k} rows differs");
    }
    assert!(saw_partial_long, "no split point inside a long document");
    assert!(saw_epoch_turn, "no epoch boundary crossed");
    assert!(saw_long_epoch_turn, "no long-stream epoch boundary crossed");
    assert!(saw_tails, "no split point with queued tails");
}

#[test]
fn take_20_save_restore_take_30_equals_take_50() {
    let (docs, cfg) = setup();
    let fifty = take(&mut mem_loader(&docs, cfg.clone()), 50);
    let mut a = mem_loader(&docs, cfg.clone());
    let first = take(&mut a, 20);
    let json = serde_json::to_string_pretty(&a.state()).unwrap();
    drop(a);
    let mut b = Loader::with_corpus(Corpus::from_docs(&docs), cfg).unwrap();
    b.set_state(serde_json::from_str(&json).unwrap()).unwrap();
    let rest = take(&mut b, 30);
    assert_eq!([first, rest].concat(), fifty);
}

#[test]
fn prefetcher_yields_rows_with_matching_states() {
    let (docs, cfg) = setup();
    let direct = take(&mut mem_loader(&docs, cfg.clone()), 40);
    let mut p = Prefetcher::new(mem_loader(&docs, cfg.clone()), 4);
    let got: Vec<(Row, LoaderState)> = (0..25).map(|_| p.next_row()).collect();
    for (i, (row, _)) in got.iter().enumerate() {
        assert_eq!(row, &direct[i]);
    }
    // the state that came with row 10 resumes at row 11
    let mut l = mem_loader(&docs, cfg.clone());
    l.set_state(got[10].1.clone()).unwrap();
    assert_eq!(take(&mut l, 29), direct[11..40].to_vec());
    // dropping while the worker is blocked on a full channel must not hang
    drop(p);
    let mut it = Prefetcher::new(mem_loader(&docs, cfg), 1);
    assert_eq!(it.next_row().0, direct[0]);
}

#[test]
fn restoring_into_another_config_is_refused() {
    let (docs, cfg) = setup();
    let mut a = mem_loader(&docs, cfg.clone());
    take(&mut a, 5);
    let st = a.state();
    let mut cfg2 = cfg.clone();
    cfg2.short_share = 0.5;
    let mut b = mem_loader(&docs, cfg2);
    let err = b.set_state(st.clone()).unwrap_err().to_string();
    assert!(err.contains("different data config or corpus"), "{err}");
    // a corpus with different content is refused too
    let mut other = docs.clone();
    other[0][0].push(1);
    let mut c = mem_loader(&other, cfg);
    assert!(c.set_state(st).is_err());
}
