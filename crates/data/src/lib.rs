//! # longmix-data — rows for mixed-context-window training
//!
//! Pure-Rust data pipeline (no LibTorch): corpus sources → tokenization cache → short/long
//! rows of exactly `seq_len` tokens, mixed deterministically, resumable, prefetched on a
//! background thread.
//!
//! ## Contract with the model
//! A row's documents are delimited by `position_ids` restarting at 0; tokens attend only
//! within their document. The row is LONG iff `max(position_ids) + 1 > l0`, else SHORT
//! ([`Window::of_positions`]). `targets[t] = input_ids[t+1]` when `t+1` is in the same document, else
//! `-100` ([`IGNORE_INDEX`]). The trainer normalises the loss by the sum of [`Row::n_targets`] over
//! an optimizer step. See [`row`].
//!
//! ## Pipeline
//! * [`config`]: [`DataConfig`] and [`SourceConfig`] (`jsonl`, `text`, `parquet`, `tokens`).
//! * [`source`]: reading raw documents; [`cache`]: tokenizing each source once into
//!   memory-mapped shards keyed by content.
//! * [`packing`]: short and long rows; [`mixture`]: row kind by `short_share`, source by
//!   weight; [`loader`]: [`Loader`] and [`LoaderState`] (exact resume);
//!   [`eval`]: held-out rows; [`prefetch`]: [`Prefetcher`]; [`synthetic`]: random rows.
//!
//! ## `tokens` source format
//! Pre-tokenized documents are two files:
//! * `<path>`: token ids as raw little-endian `u32`, all documents back to back, no header;
//! * `<path>.idx`: raw little-endian `u64` document start offsets (in tokens, not bytes),
//!   starting at 0, non-decreasing, followed by a final end offset equal to the number of
//!   tokens in `<path>`. Document `i` is `tokens[idx[i]..idx[i+1]]`; `n + 1` offsets for `n`
//!   documents. The ids must be below the tokenizer's vocabulary size; documents must not
//!   contain BOS/EOS if the config adds them. [`write_tokens_source`] writes this format.
//!
//! ## Cache format
//! `cache_dir/<key>/{tokens.u32, offsets.u64, doc_hash.u64, meta.json}`; see [`cache`].

pub mod cache;
pub mod config;
pub mod corpus;
pub mod eval;
pub mod hash;
pub mod loader;
pub mod mixture;
pub mod packing;
pub mod prefetch;
pub mod row;
pub mod source;
pub mod synthetic;

pub use cache::{CacheMeta, CacheReport, Shard, TokenizerInfo};
pub use config::{DataConfig, SourceConfig};
pub use corpus::Corpus;
pub use loader::{is_held_out, prepare_cache, Loader, LoaderState, SourceStats};
pub use packing::StreamCursor;
pub use prefetch::Prefetcher;
pub use row::{DocSpan, Piece, Row, Window, IGNORE_INDEX};
pub use synthetic::{random_row, random_rows};

/// Write documents in the `tokens` source format (`path` and `path.idx`).
pub fn write_tokens_source(path: &std::path::Path, docs: &[Vec<u32>]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut tok = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut idx = std::io::BufWriter::new(std::fs::File::create(source::idx_path(path))?);
    let mut off = 0u64;
    idx.write_all(&off.to_le_bytes())?;
    for d in docs {
        for t in d {
            tok.write_all(&t.to_le_bytes())?;
        }
        off += d.len() as u64;
        idx.write_all(&off.to_le_bytes())?;
    }
    tok.flush()?;
    idx.flush()?;
    Ok(())
}
