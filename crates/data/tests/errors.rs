//! Each misconfiguration fails with one message that names the problem and the fix.
mod common;
use common::*;
use longmix_data::{Corpus, DataConfig, Loader, SourceConfig};
use std::path::Path;

fn err_new(cfg: DataConfig, tok: &Path, cache: &Path) -> String {
    format!("{:#}", Loader::new(cfg, tok, cache).err().expect("expected an error"))
}

fn jsonl(path: &Path) -> SourceConfig {
    serde_json::from_value(serde_json::json!({"type": "jsonl", "path": path})).unwrap()
}

#[test]
fn missing_source_path_names_path_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let ok = dir.path().join("ok.jsonl");
    std::fs::write(&ok, "{\"text\":\"x\"}\n").unwrap();
    let missing = dir.path().join("nope/train.jsonl");
    let e = err_new(config(vec![jsonl(&ok), jsonl(&missing)], 32, 16, 1.0), &tok, &dir.path().join("c"));
    assert!(e.contains("sources[1].path"), "{e}");
    assert!(e.contains(&missing.display().to_string()), "{e}");
    assert!(e.contains("does not exist") && e.contains("fix `path`"), "{e}");
}

#[test]
fn jsonl_line_without_text_field_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let p = dir.path().join("d.jsonl");
    std::fs::write(&p, "{\"text\":\"a\"}\n\n{\"content\":\"b\",\"id\":3}\n").unwrap();
    let e = err_new(config(vec![jsonl(&p)], 32, 16, 1.0), &tok, &dir.path().join("c"));
    assert!(e.contains(&format!("{}:3", p.display())), "{e}");
    assert!(e.contains("no field \"text\"") && e.contains("content, id") && e.contains("text_field"), "{e}");
    // a failed build leaves no cache entry (nor temporary folder) behind
    assert_eq!(std::fs::read_dir(dir.path().join("c")).unwrap().count(), 0);
    // non-string text and invalid JSON
    std::fs::write(&p, "{\"text\":5}\n").unwrap();
    let e = err_new(config(vec![jsonl(&p)], 32, 16, 1.0), &tok, &dir.path().join("c"));
    assert!(e.contains(":1") && e.contains("is a number, not a string"), "{e}");
    std::fs::write(&p, "{\"text\":\"a\"}\n{oops\n").unwrap();
    let e = err_new(config(vec![jsonl(&p)], 32, 16, 1.0), &tok, &dir.path().join("c"));
    assert!(e.contains(":2") && e.contains("not valid JSON"), "{e}");
    // a group_by field that is missing
    std::fs::write(&p, "{\"text\":\"a\",\"book\":\"x\"}\n{\"text\":\"b\"}\n").unwrap();
    let src: SourceConfig =
        serde_json::from_value(serde_json::json!({"type": "jsonl", "path": p, "group_by": ["book"]})).unwrap();
    let e = err_new(config(vec![src], 32, 16, 1.0), &tok, &dir.path().join("c"));
    assert!(e.contains(":2") && e.contains("\"book\"") && e.contains("group_by"), "{e}");
}

#[test]
fn empty_corpus_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let p = dir.path().join("empty.jsonl");
    std::fs::write(&p, "\n{\"text\":\"\"}\n").unwrap();
    let e = err_new(config(vec![jsonl(&p)], 32, 16, 1.0), &tok, &dir.path().join("c"));
    assert!(e.contains("corpus is empty") && e.contains(&p.display().to_string()), "{e}");
    let folder = dir.path().join("nothing");
    std::fs::create_dir(&folder).unwrap();
    let e = err_new(
        config(vec![SourceConfig::Text { path: folder, weight: 1.0 }], 32, 16, 1.0),
        &tok,
        &dir.path().join("c"),
    );
    assert!(e.contains("sources[0].path") && e.contains("folder without files"), "{e}");
}

#[test]
fn seq_len_not_above_l0_with_long_rows_is_refused() {
    let cfg = config(mem_sources(&[1.0]), 4096, 4096, 0.3);
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("seq_len = 4096 <= l0 = 4096") && e.contains("raise `seq_len`") && e.contains("short_share = 1.0"),
        "{e}"
    );
    // fine for short-only training
    config(mem_sources(&[1.0]), 4096, 4096, 1.0).validate().unwrap();
}

#[test]
fn config_value_errors() {
    let bad = |f: &dyn Fn(&mut DataConfig), needle: &str| {
        let mut c = config(mem_sources(&[1.0]), 64, 16, 0.3);
        f(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{needle:?} not in {e}");
    };
    bad(&|c| c.short_share = 1.5, "`short_share` = 1.5 must be in [0, 1]");
    bad(&|c| c.eval_fraction = 1.0, "`eval_fraction` = 1 must be in [0, 1)");
    bad(&|c| c.add_bos = true, "`add_bos = true` needs `bos_id`");
    bad(&|c| c.add_eos = true, "`add_eos = true` needs `eos_id`");
    bad(&|c| c.sources.clear(), "`sources` is empty");
    bad(&|c| c.sources = mem_sources(&[0.0]), "sources[0].weight = 0");
    bad(&|c| c.l0 = 0, "`l0` = 0");
}

#[test]
fn unknown_config_keys_are_rejected() {
    let e = serde_json::from_value::<DataConfig>(serde_json::json!({
        "sources": [{"type": "jsonl", "path": "x", "text_feild": "body"}], "seq_len": 8, "l0": 4
    }))
    .unwrap_err()
    .to_string();
    assert!(e.contains("text_feild"), "{e}");
    let e = serde_json::from_value::<DataConfig>(serde_json::json!({
        "sources": [], "seq_len": 8, "l0": 4, "shortshare": 0.2
    }))
    .unwrap_err()
    .to_string();
    assert!(e.contains("shortshare"), "{e}");
    // defaults
    let c: DataConfig = serde_json::from_value(serde_json::json!({
        "sources": [{"type": "parquet", "path": "x"}], "seq_len": 8, "l0": 4
    }))
    .unwrap();
    assert_eq!(c.short_share, 0.3);
    assert_eq!(c.sources[0], SourceConfig::Parquet { path: "x".into(), text_column: "text".into(), weight: 1.0 });
}

#[test]
fn corpus_that_cannot_feed_a_requested_row_kind() {
    // all documents short but long rows requested
    let docs = vec![vec![vec![1u32; 10]; 20]];
    let e = Loader::with_corpus(Corpus::from_docs(&docs), config(mem_sources(&[1.0]), 64, 16, 0.3))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no training document is longer than l0 = 16")
            && e.contains("longest: 10")
            && e.contains("short_share = 1.0"),
        "{e}"
    );
    // all documents long but short rows requested
    let docs = vec![vec![vec![1u32; 100]; 20]];
    let e = Loader::with_corpus(Corpus::from_docs(&docs), config(mem_sources(&[1.0]), 64, 16, 0.3))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no training document has at most l0 = 16") && e.contains("short_share = 0"), "{e}");
    // everything held out
    let mut cfg = config(mem_sources(&[1.0]), 64, 16, 1.0);
    cfg.eval_fraction = 0.999_999;
    let docs = vec![vec![vec![1u32; 10], vec![2u32; 10]]];
    let e = Loader::with_corpus(Corpus::from_docs(&docs), cfg).err().unwrap().to_string();
    assert!(e.contains("held out") && e.contains("lower `eval_fraction`"), "{e}");
}

#[test]
fn bad_tokenizer_and_token_ids() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let p = dir.path().join("d.jsonl");
    std::fs::write(&p, "{\"text\":\"a\"}\n").unwrap();
    let e = err_new(config(vec![jsonl(&p)], 32, 16, 1.0), &dir.path().join("missing.json"), &dir.path().join("c"));
    assert!(e.contains("missing.json") && e.contains("tokenizer.json"), "{e}");
    let mut cfg = config(vec![jsonl(&p)], 32, 16, 1.0);
    cfg.add_bos = true;
    cfg.bos_id = Some(5000);
    let e = err_new(cfg, &tok, &dir.path().join("c"));
    assert!(e.contains("bos_id = 5000") && e.contains("258 tokens"), "{e}");
}

#[test]
fn no_held_out_rows_of_a_kind() {
    let docs = make_docs(1, 50, 100, 3);
    let l = Loader::with_corpus(Corpus::from_docs(&docs), config(mem_sources(&[1.0]), 128, 32, 0.3)).unwrap();
    let e = l.eval_rows(longmix_data::Window::Long, 2).unwrap_err().to_string();
    assert!(e.contains("no held-out document longer than l0 = 32") && e.contains("raise `eval_fraction`"), "{e}");
}
