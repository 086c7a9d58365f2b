//! Real sources through the tokenization cache: jsonl (group_by), text folder, tokens format,
//! parquet; cache reuse and invalidation; held-out rows; restore through files.
mod common;
use common::*;
use longmix_data::{write_tokens_source, DataConfig, Loader, LoaderState, SourceConfig, Window};
use std::path::{Path, PathBuf};

fn jsonl(path: &Path, group_by: Option<Vec<&str>>) -> SourceConfig {
    SourceConfig::Jsonl {
        path: path.to_path_buf(),
        text_field: "text".into(),
        group_by: group_by.map(|g| g.into_iter().map(String::from).collect()),
        join: " ".into(),
        weight: 1.0,
    }
}

/// Document texts as the rows saw them, in document order (needs T large enough that the
/// whole first epoch fits the first row).
fn doc_texts(l: &mut Loader, n_docs: usize) -> Vec<String> {
    let mut seen = std::collections::BTreeMap::new();
    let mut guard = 0;
    while seen.len() < n_docs {
        let row = l.next_row();
        let mut at = 0;
        for p in &row.pieces {
            if let Some(o) = p.origin.as_ref().filter(|o| o.epoch == 0) {
                assert_eq!(o.start, 0, "documents are expected whole here");
                let bytes: Vec<u8> = row.input_ids[at..at + p.len].iter().map(|&t| t as u8).collect();
                seen.insert(o.doc, String::from_utf8(bytes).unwrap());
            }
            at += p.len;
        }
        guard += 1;
        assert!(guard < 1000);
    }
    seen.into_values().collect()
}

fn kjv(dir: &Path) -> PathBuf {
    let p = dir.join("kjv.jsonl");
    let mut s = String::new();
    for (book, chapters) in [("Gen", 2), ("Exo", 1), ("Lev", 2)] {
        for c in 1..=chapters {
            for v in 1..=3 {
                s.push_str(&format!(
                    "{{\"book\":\"{book}\",\"chapter\":{c},\"verse\":{v},\"text\":\"{book}{c}:{v}\"}}\n"
                ));
            }
        }
    }
    s.push('\n'); // a blank line is skipped
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn jsonl_group_by_builds_chapter_and_book_documents() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let path = kjv(dir.path());
    let cache = dir.path().join("cache");
    let by = |g: Option<Vec<&str>>| {
        let cfg = config(vec![jsonl(&path, g)], 1024, 1024, 1.0);
        Loader::new(cfg, &tok, &cache).unwrap()
    };
    let mut verses = by(None);
    assert_eq!(verses.stats()[0].docs, 15);
    assert_eq!(doc_texts(&mut verses, 15)[0], "Gen1:1");
    let mut chapters = by(Some(vec!["book", "chapter"]));
    assert_eq!(chapters.stats()[0].docs, 5);
    assert_eq!(
        doc_texts(&mut chapters, 5),
        vec![
            "Gen1:1 Gen1:2 Gen1:3",
            "Gen2:1 Gen2:2 Gen2:3",
            "Exo1:1 Exo1:2 Exo1:3",
            "Lev1:1 Lev1:2 Lev1:3",
            "Lev2:1 Lev2:2 Lev2:3"
        ]
    );
    let mut books = by(Some(vec!["book"]));
    assert_eq!(books.stats()[0].docs, 3);
    let texts = doc_texts(&mut books, 3);
    assert_eq!(texts[1], "Exo1:1 Exo1:2 Exo1:3");
    assert_eq!(texts[0].len(), 6 * 6 + 5);
    // three option sets → three cache entries
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 3);
}

#[test]
fn text_folder_is_one_document_per_file_sorted_recursively() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let root = dir.path().join("texts");
    std::fs::create_dir_all(root.join("b/sub")).unwrap();
    std::fs::write(root.join("b/sub/z.txt"), "zeta").unwrap();
    std::fs::write(root.join("a.txt"), "alpha").unwrap();
    std::fs::write(root.join("b/c.md"), "gamma é").unwrap();
    std::fs::write(root.join(".hidden"), "never").unwrap();
    let cfg = config(vec![SourceConfig::Text { path: root.clone(), weight: 1.0 }], 1024, 1024, 1.0);
    let mut l = Loader::new(cfg, &tok, &dir.path().join("cache")).unwrap();
    assert_eq!(l.stats()[0].docs, 3);
    assert_eq!(doc_texts(&mut l, 3), vec!["alpha", "gamma é", "zeta"]);
    // a single file is one document
    let cfg = config(vec![SourceConfig::Text { path: root.join("a.txt"), weight: 1.0 }], 64, 64, 1.0);
    let l = Loader::new(cfg, &tok, &dir.path().join("cache")).unwrap();
    assert_eq!((l.stats()[0].docs, l.stats()[0].tokens), (1, 5));
}

#[test]
fn tokens_source_format_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let docs: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![], vec![200, 201], (0..40).collect()];
    let path = dir.path().join("corpus.u32");
    write_tokens_source(&path, &docs).unwrap();
    // the documented layout, byte for byte
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(raw.len(), 4 * 45);
    assert_eq!(&raw[..8], &[1, 0, 0, 0, 2, 0, 0, 0]);
    let idx = std::fs::read(dir.path().join("corpus.u32.idx")).unwrap();
    let offs: Vec<u64> = idx.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(offs, vec![0, 3, 3, 5, 45]);
    let mut cfg = config(vec![SourceConfig::Tokens { path: path.clone(), weight: 1.0 }], 32, 16, 0.5);
    cfg.add_eos = true;
    cfg.eos_id = Some(EOS);
    let mut l = Loader::new(cfg.clone(), &tok, &dir.path().join("cache")).unwrap();
    let s = &l.stats()[0];
    assert_eq!((s.docs, s.empty_docs, s.short_docs, s.long_docs), (4, 1, 2, 1));
    let padded: Vec<Vec<Vec<u32>>> = vec![docs.clone()];
    for _ in 0..10 {
        let r = l.next_row();
        check_row_contract(&r, &cfg, Some(&padded));
    }
    // ids beyond the tokenizer's vocabulary are refused
    write_tokens_source(&path, &[vec![1, 99_999]]).unwrap();
    let err = Loader::new(cfg, &tok, &dir.path().join("cache")).err().unwrap().to_string();
    assert!(err.contains("99999") && err.contains("another tokenizer"), "{err}");
}

fn write_parquet(path: &Path, texts: &[Option<&str>], compression: parquet::basic::Compression) {
    use parquet::column::writer::ColumnWriter;
    use parquet::data_type::ByteArray;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED INT64 id; OPTIONAL BINARY text (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(compression).build());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut col_i = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        match col.untyped() {
            ColumnWriter::Int64ColumnWriter(c) => {
                let ids: Vec<i64> = (0..texts.len() as i64).collect();
                c.write_batch(&ids, None, None).unwrap();
            }
            ColumnWriter::ByteArrayColumnWriter(c) => {
                let vals: Vec<ByteArray> = texts.iter().flatten().map(|t| ByteArray::from(*t)).collect();
                let defs: Vec<i16> = texts.iter().map(|t| t.is_some() as i16).collect();
                c.write_batch(&vals, Some(&defs), None).unwrap();
            }
            _ => unreachable!(),
        }
        col.close().unwrap();
        col_i += 1;
    }
    assert_eq!(col_i, 2);
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_file_and_hf_folder_layout() {
    use parquet::basic::Compression;
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let root = dir.path().join("ds");
    std::fs::create_dir_all(root.join("data")).unwrap();
    write_parquet(
        &root.join("data/train-00000-of-00002.parquet"),
        &[Some("one"), None, Some("two")],
        Compression::SNAPPY,
    );
    #[cfg(feature = "parquet-zstd")]
    let second = Compression::ZSTD(parquet::basic::ZstdLevel::default());
    #[cfg(not(feature = "parquet-zstd"))]
    let second = Compression::UNCOMPRESSED;
    write_parquet(&root.join("data/train-00001-of-00002.parquet"), &[Some("three")], second);
    std::fs::write(root.join("README.md"), "not data").unwrap();
    let src = |p: PathBuf, col: &str| SourceConfig::Parquet { path: p, text_column: col.into(), weight: 1.0 };
    let cache = dir.path().join("cache");
    let mut l = Loader::new(config(vec![src(root.clone(), "text")], 1024, 1024, 1.0), &tok, &cache).unwrap();
    assert_eq!(l.stats()[0].docs, 3, "null skipped, README ignored");
    assert_eq!(doc_texts(&mut l, 3), vec!["one", "two", "three"]);
    let l = Loader::new(
        config(vec![src(root.join("data/train-00001-of-00002.parquet"), "text")], 64, 64, 1.0),
        &tok,
        &cache,
    )
    .unwrap();
    assert_eq!(l.stats()[0].tokens, 5);
    let err = Loader::new(config(vec![src(root, "content")], 64, 64, 1.0), &tok, &cache).err().unwrap().to_string();
    assert!(err.contains("no column \"content\"") && err.contains("id, text") && err.contains("text_column"), "{err}");
}

#[test]
fn cache_is_reused_and_invalidated_by_changes() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let cache = dir.path().join("cache");
    let path = dir.path().join("d.jsonl");
    std::fs::write(&path, "{\"text\":\"hello world\"}\n{\"text\":\"second\"}\n").unwrap();
    let cfg = config(vec![jsonl(&path, None)], 32, 32, 1.0);
    let first = Loader::new(cfg.clone(), &tok, &cache).unwrap();
    let r1 = first.cache_reports()[0].clone();
    assert!(r1.built);
    assert_eq!((r1.n_docs, r1.n_tokens), (2, 17));
    // the cache holds the tokens (= bytes for this tokenizer) and a meta.json
    let toks = std::fs::read(r1.dir.join("tokens.u32")).unwrap();
    let ids: Vec<u32> = toks.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(ids, b"hello worldsecond".iter().map(|&b| b as u32).collect::<Vec<_>>());
    let meta_before = std::fs::read(r1.dir.join("meta.json")).unwrap();
    let mtime_before = std::fs::metadata(r1.dir.join("meta.json")).unwrap().modified().unwrap();
    // second open: same key, nothing rebuilt, meta.json untouched, same rows
    let second = Loader::new(cfg.clone(), &tok, &cache).unwrap();
    let r2 = second.cache_reports()[0].clone();
    assert!(!r2.built);
    assert_eq!(r2.key, r1.key);
    assert_eq!(std::fs::read(r1.dir.join("meta.json")).unwrap(), meta_before);
    assert_eq!(std::fs::metadata(r1.dir.join("meta.json")).unwrap().modified().unwrap(), mtime_before);
    // no temporary folders left behind
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    // a weight change does not invalidate the tokenization
    let mut cfg_w = cfg.clone();
    cfg_w.sources = vec![SourceConfig::Jsonl {
        path: path.clone(),
        text_field: "text".into(),
        group_by: None,
        join: " ".into(),
        weight: 5.0,
    }];
    assert!(!Loader::new(cfg_w, &tok, &cache).unwrap().cache_reports()[0].built);
    // changing the file changes the key and re-tokenizes
    std::fs::write(&path, "{\"text\":\"hello world\"}\n{\"text\":\"second\"}\n{\"text\":\"third\"}\n").unwrap();
    let third = Loader::new(cfg.clone(), &tok, &cache).unwrap();
    let r3 = third.cache_reports()[0].clone();
    assert!(r3.built);
    assert_ne!(r3.key, r1.key);
    assert_eq!(r3.n_docs, 3);
    // so does a different tokenizer.json
    let tok2_dir = dir.path().join("tok2");
    std::fs::create_dir_all(&tok2_dir).unwrap();
    let tok2 = write_byte_tokenizer(&tok2_dir);
    let mut t = std::fs::read_to_string(&tok2).unwrap();
    t = t.replace("\"dropout\":null", "\"dropout\":null ");
    std::fs::write(&tok2, t).unwrap();
    let r4 = Loader::new(cfg, &tok2, &cache).unwrap().cache_reports()[0].clone();
    assert!(r4.built);
    assert_ne!(r4.key, r3.key);
}

fn long_corpus(dir: &Path) -> PathBuf {
    // 200 documents of 10..300 bytes
    let p = dir.join("mixed.jsonl");
    let mut s = String::new();
    for i in 0..200usize {
        let len = 10 + (i * 7919) % 290;
        let text: String = (0..len).map(|k| (b'a' + ((i + k) % 26) as u8) as char).collect();
        s.push_str(&format!("{{\"text\":\"{text}\",\"i\":{i}}}\n"));
    }
    std::fs::write(&p, s).unwrap();
    p
}

fn long_cfg(path: &Path) -> DataConfig {
    let mut cfg = config(vec![jsonl(path, None)], 128, 48, 0.3);
    cfg.eval_fraction = 0.1;
    cfg.add_bos = true;
    cfg.bos_id = Some(BOS);
    cfg.add_eos = true;
    cfg.eos_id = Some(EOS);
    cfg
}

#[test]
fn restore_through_files_take_20_then_30_equals_50() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let path = long_corpus(dir.path());
    let cache = dir.path().join("cache");
    let cfg = long_cfg(&path);
    let mut full = Loader::new(cfg.clone(), &tok, &cache).unwrap();
    let fifty: Vec<_> = (0..50).map(|_| full.next_row()).collect();
    let mut a = Loader::new(cfg.clone(), &tok, &cache).unwrap();
    let mut rows: Vec<_> = (0..20).map(|_| a.next_row()).collect();
    let state_file = dir.path().join("state.json");
    std::fs::write(&state_file, serde_json::to_string(&a.state()).unwrap()).unwrap();
    drop(a);
    let state: LoaderState = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let mut b = Loader::restore(cfg.clone(), &tok, &cache, state).unwrap();
    rows.extend((0..30).map(|_| b.next_row()));
    assert_eq!(rows, fifty);
    assert!(rows.iter().any(|r| r.kind == Window::Long) && rows.iter().any(|r| r.kind == Window::Short));
}

#[test]
fn held_out_rows_are_fixed_and_disjoint_from_training() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let path = long_corpus(dir.path());
    let cache = dir.path().join("cache");
    let cfg = long_cfg(&path);
    let mut l = Loader::new(cfg.clone(), &tok, &cache).unwrap();
    let short = l.eval_rows(Window::Short, 3).unwrap();
    let long = l.eval_rows(Window::Long, 3).unwrap();
    assert!(!short.is_empty() && !long.is_empty());
    for r in &short {
        assert_eq!(r.kind, Window::Short);
        assert_eq!(r.input_ids.len(), 128);
        check_row_contract(r, &cfg, None);
    }
    for r in &long {
        assert_eq!(r.kind, Window::Long);
        assert!(r.pieces[0].len > 48);
        check_row_contract(r, &cfg, None);
    }
    // the same rows from another seed (held-out rows do not depend on it)
    let mut cfg2 = cfg.clone();
    cfg2.seed = 99;
    let l2 = Loader::new(cfg2, &tok, &cache).unwrap();
    assert_eq!(l2.eval_rows(Window::Short, 3).unwrap(), short);
    assert_eq!(l2.eval_rows(Window::Long, 3).unwrap(), long);
    // held-out documents never show up in training rows
    let eval_docs: std::collections::BTreeSet<usize> = short
        .iter()
        .chain(&long)
        .flat_map(|r| r.pieces.iter().filter_map(|p| p.origin.as_ref().map(|o| o.doc)))
        .collect();
    assert!(!eval_docs.is_empty());
    for _ in 0..300 {
        let r = l.next_row();
        for p in &r.pieces {
            assert!(!eval_docs.contains(&p.origin.as_ref().unwrap().doc));
        }
    }
    // asking for more rows than there are held-out documents gives fewer, padded at the end
    let all = l.eval_rows(Window::Short, 1000).unwrap();
    assert!(all.len() < 1000);
    assert!(all.last().unwrap().padding_tokens() > 0);
}

#[test]
fn prepare_cache_then_loader_reuses_it_and_jsonl_folders_skip_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_byte_tokenizer(dir.path());
    let root = dir.path().join("shards");
    std::fs::create_dir_all(root.join("part")).unwrap();
    std::fs::write(root.join("part/b.jsonl"), "{\"text\":\"bb\"}\n").unwrap();
    std::fs::write(root.join("a.json"), "{\"text\":\"a\"}\n{\"text\":\"aa\"}\n").unwrap();
    std::fs::write(root.join("README.md"), "# not jsonl\n").unwrap();
    let cfg = config(vec![jsonl(&root, None)], 1024, 1024, 1.0);
    let cache = dir.path().join("cache");
    let reports = longmix_data::prepare_cache(&cfg, &tok, &cache).unwrap();
    assert!(reports[0].built);
    assert_eq!((reports[0].n_docs, reports[0].n_tokens), (3, 5));
    let mut l = Loader::new(cfg, &tok, &cache).unwrap();
    assert!(!l.cache_reports()[0].built);
    assert_eq!(doc_texts(&mut l, 3), vec!["a", "aa", "bb"]);
}
