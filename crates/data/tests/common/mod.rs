//! Shared test helpers: a byte-level tokenizer built in code (token id = UTF-8 byte value,
//! plus `<s>` = 256 and `</s>` = 257), configs and in-memory corpora.
#![allow(dead_code)]

use longmix_data::{Corpus, DataConfig, Loader, Row, SourceConfig, Window, IGNORE_INDEX};
use std::path::{Path, PathBuf};

pub const BOS: u32 = 256;
pub const EOS: u32 = 257;

/// GPT-2's byte → printable-char map, so that byte b is token b.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// Write a tokenizer.json whose tokens are exactly the UTF-8 bytes of the text.
pub fn write_byte_tokenizer(dir: &Path) -> PathBuf {
    let chars = byte_chars();
    let vocab: serde_json::Map<String, serde_json::Value> =
        chars.iter().enumerate().map(|(i, c)| (c.to_string(), serde_json::json!(i))).collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BOS, "<s>"), special(EOS, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, serde_json::to_vec(&tok).unwrap()).unwrap();
    p
}

pub fn config(sources: Vec<SourceConfig>, seq_len: usize, l0: usize, short_share: f64) -> DataConfig {
    DataConfig {
        sources,
        seq_len,
        l0,
        short_share,
        seed: 7,
        eval_fraction: 0.0,
        add_bos: false,
        bos_id: None,
        add_eos: false,
        eos_id: None,
        pad_id: None,
    }
}

/// Dummy source entries for in-memory corpora (paths are never read).
pub fn mem_sources(weights: &[f64]) -> Vec<SourceConfig> {
    weights.iter().map(|&w| SourceConfig::Text { path: PathBuf::from("/in-memory"), weight: w }).collect()
}

/// Deterministic pseudo-random documents: `n` per source with lengths in `1..=max_len`;
/// token values identify (source, doc, position) loosely so misplaced copies show up.
pub fn make_docs(n_sources: usize, n: usize, max_len: usize, seed: u64) -> Vec<Vec<Vec<u32>>> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n_sources)
        .map(|s| {
            (0..n)
                .map(|d| {
                    let len = 1 + (next() % max_len as u64) as usize;
                    (0..len).map(|p| ((s * 7919 + d * 104729 + p * 31) % 250) as u32).collect()
                })
                .collect()
        })
        .collect()
}

pub fn mem_loader(docs: &[Vec<Vec<u32>>], cfg: DataConfig) -> Loader {
    Loader::with_corpus(Corpus::from_docs(docs), cfg).unwrap()
}

/// The BOS/EOS view of a document.
pub fn virtual_doc(doc: &[u32], cfg: &DataConfig) -> Vec<i64> {
    let mut v = Vec::new();
    if cfg.add_bos {
        v.push(cfg.bos_id.unwrap() as i64);
    }
    v.extend(doc.iter().map(|&t| t as i64));
    if cfg.add_eos {
        v.push(cfg.eos_id.unwrap() as i64);
    }
    v
}

/// Check the row contract on one row; returns nothing, panics with a message on violation.
pub fn check_row_contract(row: &Row, cfg: &DataConfig, docs: Option<&[Vec<Vec<u32>>]>) {
    let t = cfg.seq_len;
    assert_eq!(row.input_ids.len(), t, "row length");
    assert_eq!(row.position_ids.len(), t);
    assert_eq!(row.targets.len(), t);
    assert_eq!(row.pieces.iter().map(|p| p.len).sum::<usize>(), t, "pieces cover the row");
    let mut at = 0;
    let mut n_targets = 0;
    for p in &row.pieces {
        assert!(p.len > 0, "empty piece");
        for i in 0..p.len {
            assert_eq!(row.position_ids[at + i], i as i64, "positions restart at each document");
            let expect = if p.origin.is_some() && i + 1 < p.len { row.input_ids[at + i + 1] } else { IGNORE_INDEX };
            assert_eq!(row.targets[at + i], expect, "target at {}", at + i);
            if expect != IGNORE_INDEX {
                n_targets += 1;
            }
        }
        match &p.origin {
            None => {
                assert!(p.len <= cfg.l0, "padding pieces are split at l0");
                assert!(row.input_ids[at..at + p.len].iter().all(|&x| x == cfg.pad_token() as i64));
            }
            Some(o) => {
                if let Some(docs) = docs {
                    let v = virtual_doc(&docs[o.source][o.doc], cfg);
                    assert!(o.start + p.len <= v.len(), "piece inside its document");
                    assert_eq!(&row.input_ids[at..at + p.len], &v[o.start..o.start + p.len], "piece tokens");
                }
            }
        }
        at += p.len;
    }
    assert_eq!(row.n_targets, n_targets);
    assert_eq!(row.kind, Window::of_positions(&row.position_ids, cfg.l0 as i64));
    match row.kind {
        Window::Short => assert!(row.pieces.iter().all(|p| p.len <= cfg.l0), "short row has a piece > l0"),
        Window::Long => assert!(row.pieces.iter().any(|p| p.len > cfg.l0), "long row without a piece > l0"),
    }
}
