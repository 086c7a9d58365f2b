//! One document reader: `eval ppl` sees exactly the documents `train` (and `search`) see in the
//! same file, grouped records joined the same way.

mod common;

use longmix_data::{Corpus, SourceConfig, TokenizerInfo};

#[test]
fn eval_ppl_and_train_read_the_same_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("books.jsonl");
    let mut lines = Vec::new();
    for (book, verses) in [("Ruth", 3), ("Jonah", 4), ("Ruth", 2)] {
        for v in 0..verses {
            lines.push(
                serde_json::json!({ "book": book, "text": format!("{book} {v}: and it came to pass.") }).to_string(),
            );
        }
        lines.push(String::new()); // blank lines are skipped by both
    }
    std::fs::write(&path, lines.join("\n")).unwrap();

    // What `eval ppl --text books.jsonl --group-by book` reads.
    let eval_docs = longmix_eval::ppl::load_documents(&path, "text", &["book".to_string()]).unwrap();
    // Consecutive equal groups make one document: Ruth, Jonah, Ruth again.
    assert_eq!(eval_docs.len(), 3);
    assert_eq!(
        eval_docs[0],
        "Ruth 0: and it came to pass.\nRuth 1: and it came to pass.\nRuth 2: and it came to pass."
    );

    // What a run's `[data] sources = [{ type = "jsonl", path = ..., group_by = ["book"] }]` reads.
    let source: SourceConfig =
        toml::from_str(&format!("type = \"jsonl\"\npath = \"{}\"\ngroup_by = [\"book\"]", path.display())).unwrap();
    let tok = TokenizerInfo::load(&common::smollm2().join("tokenizer.json")).unwrap();
    let corpus = Corpus::open(&[source], &tok, &tmp.path().join("cache")).unwrap();
    let shard = corpus.shard(0);
    assert_eq!(shard.n_docs(), eval_docs.len());
    for (d, text) in eval_docs.iter().enumerate() {
        let want: Vec<u32> = tok.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let got: Vec<u32> = shard.doc_tokens(d, 0, shard.doc_len(d)).collect();
        assert_eq!(got, want, "document {d} differs between eval and train");
    }
}
