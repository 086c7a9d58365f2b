//! Row shape: the model contract on short and long rows, BOS/EOS, Window::of, synthetic rows.
mod common;
use common::*;
use longmix_data::{random_row, random_rows, Window, IGNORE_INDEX};

#[test]
fn row_kind_rule() {
    assert_eq!(Window::of_positions(&[0, 1, 2, 3], 4), Window::Short); // max+1 = 4 = l0
    assert_eq!(Window::of_positions(&[0, 1, 2, 3, 4], 4), Window::Long); // max+1 = 5 > l0
    assert_eq!(Window::of_positions(&[0, 1, 0, 1, 2, 3], 4), Window::Short);
    assert_eq!(Window::of_positions(&[0, 1, 2, 3, 4, 0], 4), Window::Long);
    assert_eq!(Window::of_positions(&[], 4), Window::Short);
}

#[test]
fn short_and_long_rows_follow_the_contract() {
    let docs = make_docs(2, 120, 90, 1);
    let mut cfg = config(mem_sources(&[1.0, 1.0]), 64, 16, 0.4);
    cfg.add_bos = true;
    cfg.bos_id = Some(BOS);
    cfg.add_eos = true;
    cfg.eos_id = Some(EOS);
    let mut l = mem_loader(&docs, cfg.clone());
    let (mut shorts, mut longs) = (0, 0);
    for _ in 0..400 {
        let row = l.next_row();
        check_row_contract(&row, &cfg, Some(&docs));
        match row.kind {
            Window::Short => {
                shorts += 1;
                assert!(row.position_ids.iter().all(|&p| p < 16));
            }
            Window::Long => {
                longs += 1;
                // the first piece of a long row is the long one
                assert!(row.pieces[0].len > 16 && row.pieces[0].len <= 64);
                assert!(row.pieces.iter().all(|p| p.len <= 64));
            }
        }
        // training rows are never padded
        assert_eq!(row.padding_tokens(), 0);
        assert_eq!(row.source_tokens.iter().sum::<usize>(), 64);
    }
    assert!(shorts > 100 && longs > 200, "both kinds produced: {shorts} short, {longs} long");
}

#[test]
fn document_boundaries_carry_no_target_and_bos_eos_are_placed() {
    // docs of exactly 5 tokens, l0 = 8 (so with BOS+EOS each is 7 tokens: all short)
    let docs = vec![(0..30).map(|d| (0..5).map(|p| 10 * d + p).collect::<Vec<u32>>()).collect::<Vec<_>>()];
    let mut cfg = config(mem_sources(&[1.0]), 21, 8, 1.0);
    cfg.add_bos = true;
    cfg.bos_id = Some(BOS);
    cfg.add_eos = true;
    cfg.eos_id = Some(EOS);
    let mut l = mem_loader(&docs, cfg.clone());
    let row = l.next_row();
    check_row_contract(&row, &cfg, Some(&docs));
    // three whole documents of 7 tokens: BOS x x x x x EOS
    assert_eq!(row.doc_lengths(), vec![7, 7, 7]);
    for k in 0..3 {
        assert_eq!(row.input_ids[7 * k], BOS as i64);
        assert_eq!(row.input_ids[7 * k + 6], EOS as i64);
        assert_eq!(row.targets[7 * k + 5], EOS as i64, "the last real token predicts EOS");
        assert_eq!(row.targets[7 * k + 6], IGNORE_INDEX, "EOS does not predict the next document's BOS");
    }
    assert_eq!(row.n_targets, 18);
}

#[test]
fn short_only_cuts_long_documents_at_l0() {
    let docs = vec![vec![(0..100).collect::<Vec<u32>>(), (0..37).collect()]];
    let cfg = config(mem_sources(&[1.0]), 48, 16, 1.0);
    let mut l = mem_loader(&docs, cfg.clone());
    for _ in 0..20 {
        let row = l.next_row();
        check_row_contract(&row, &cfg, Some(&docs));
        assert_eq!(row.kind, Window::Short);
        assert!(row.pieces.iter().all(|p| p.len <= 16));
    }
}

#[test]
fn random_rows_follow_the_contract() {
    let cfg = config(mem_sources(&[1.0]), 96, 20, 0.5);
    let rows = random_rows(200, 96, 20, 1000, 0.5, 3);
    let longs = rows.iter().filter(|r| r.kind == Window::Long).count();
    assert!((60..140).contains(&longs), "{longs}");
    for r in &rows {
        check_row_contract(r, &cfg, None);
        assert!(r.input_ids.iter().all(|&t| (0..1000).contains(&t)));
    }
    assert_eq!(random_row(Window::Long, 96, 20, 1000, 9), random_row(Window::Long, 96, 20, 1000, 9));
    assert_eq!(random_row(Window::Long, 96, 20, 1000, 9).kind, Window::Long);
    assert_eq!(random_row(Window::Short, 96, 20, 1000, 9).kind, Window::Short);
}
