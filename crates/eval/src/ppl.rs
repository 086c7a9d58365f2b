//! Perplexity by length on a user's corpus (`docs/numerics.md` §5, the PI / YaRN /
//! LongRoPE protocol).
//!
//! Documents are tokenized as `tokenizer(text)` does (special tokens per the tokenizer) and
//! taken in corpus order; for each length L the first `samples` documents of at least L tokens
//! are used, so every model and override sees the same tokens.
//!
//! * `truncate` (default): each document cut to its first L tokens, one window, all L-1
//!   next-token predictions scored.
//! * `sliding`: windows of L tokens every `stride` tokens over the document (at most
//!   `max_windows` per document); each window scores only the tokens no earlier window scored.
//!
//! PPL = exp(total NLL / scored tokens) over all documents of that length.

use std::path::Path;

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use longmix_data::SourceConfig;
use serde::Serialize;

use crate::lm::{LanguageModel, TextTokenizer};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PplMode {
    Truncate,
    Sliding { stride: usize, max_windows: usize },
}

#[derive(Debug, Clone)]
pub struct PplOptions {
    pub lengths: Vec<usize>,
    /// Documents per length.
    pub samples: usize,
    pub mode: PplMode,
}

/// Perplexity at one length.
#[derive(Debug, Clone, Serialize)]
pub struct PplPoint {
    pub length: usize,
    pub ppl: f64,
    pub mean_nll: f64,
    pub scored_tokens: usize,
    pub documents: usize,
    pub windows: usize,
    /// Per-document perplexity.
    pub per_document: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PplResult {
    pub task: String,
    pub mode: String,
    pub points: Vec<PplPoint>,
}

impl PplResult {
    pub fn table(&self) -> String {
        let mut s = format!(
            "perplexity ({})\n{:>8} {:>10} {:>9} {:>6} {:>8} {:>10}\n",
            self.mode, "length", "ppl", "mean_nll", "docs", "windows", "tokens"
        );
        for p in &self.points {
            s += &format!(
                "{:>8} {:>10.3} {:>9.4} {:>6} {:>8} {:>10}\n",
                p.length, p.ppl, p.mean_nll, p.documents, p.windows, p.scored_tokens
            );
        }
        s
    }
}

/// The documents of a corpus path, read by the data pipeline's own reader
/// ([`SourceConfig::from_path`]: `.jsonl` with `field` and `group_by`, anything else one
/// document per file), so `eval ppl` sees exactly the documents `train` sees.
pub fn load_documents(path: &Path, field: &str, group_by: &[String]) -> Result<Vec<String>> {
    let source = SourceConfig::from_path(path, field, group_by);
    if !group_by.is_empty() && !matches!(source, SourceConfig::Jsonl { .. }) {
        bail!("--group-by applies to .jsonl corpora; {} is read as one document per file", path.display());
    }
    longmix_data::source::documents(&source)
}

/// Tokenize documents in order until `samples` of them have at least `min_len` tokens (or
/// the corpus ends); returns all tokenized documents.
pub fn tokenize_documents(
    tok: &dyn TextTokenizer,
    docs: &[String],
    min_len: usize,
    samples: usize,
) -> Result<Vec<Vec<i64>>> {
    let mut out = Vec::new();
    let mut long = 0;
    for d in docs {
        let ids = tok.encode(d, true)?;
        long += (ids.len() >= min_len) as usize;
        out.push(ids);
        if long >= samples {
            break;
        }
    }
    Ok(out)
}

/// The windows `(start, end, first_scored)` of one document of `n` tokens at length `len`.
pub fn windows(n: usize, len: usize, mode: PplMode) -> Vec<(usize, usize, usize)> {
    match mode {
        PplMode::Truncate => vec![(0, len.min(n), 1)],
        PplMode::Sliding { stride, max_windows } => {
            let mut out = Vec::new();
            let (mut begin, mut prev_end) = (0usize, 0usize);
            while out.len() < max_windows {
                let end = (begin + len).min(n);
                // Score tokens after the previous window's end (the first window: from 1).
                let first = prev_end.max(begin + 1);
                out.push((begin, end, first));
                prev_end = end;
                if end == n {
                    break;
                }
                begin += stride;
            }
            out
        }
    }
}

/// Perplexity at every length. `docs` are tokenized documents (see [`tokenize_documents`]).
pub fn perplexity(
    lm: &mut dyn LanguageModel,
    docs: &[Vec<i64>],
    opts: &PplOptions,
    bar: &ProgressBar,
) -> Result<PplResult> {
    let plan: Vec<(usize, Vec<&Vec<i64>>)> =
        opts.lengths.iter().map(|&l| (l, docs.iter().filter(|d| d.len() >= l).take(opts.samples).collect())).collect();
    let total: usize =
        plan.iter().map(|(l, ds)| ds.iter().map(|d| windows(d.len(), *l, opts.mode).len()).sum::<usize>()).sum();
    bar.set_length(total as u64);
    let mut points = Vec::new();
    for (len, ds) in plan {
        if ds.is_empty() {
            bail!("no document of the corpus has {len} tokens: use shorter --lengths or a corpus with longer documents (e.g. --group-by book)");
        }
        let (mut nll, mut count, mut nwin) = (0f64, 0usize, 0usize);
        let mut per_document = Vec::new();
        for d in ds.iter() {
            let (mut dn, mut dc) = (0f64, 0usize);
            for (start, end, first) in windows(d.len(), len, opts.mode) {
                let (s, c) = lm.nll(&d[start..end], first - start)?;
                dn += s;
                dc += c;
                nwin += 1;
                bar.inc(1);
            }
            per_document.push((dn / dc as f64).exp());
            nll += dn;
            count += dc;
        }
        let mean = nll / count as f64;
        points.push(PplPoint {
            length: len,
            ppl: mean.exp(),
            mean_nll: mean,
            scored_tokens: count,
            documents: ds.len(),
            windows: nwin,
            per_document,
        });
    }
    let mode = match opts.mode {
        PplMode::Truncate => "truncate: first L tokens of each document".to_string(),
        PplMode::Sliding { stride, max_windows } => {
            format!("sliding: stride {stride}, at most {max_windows} windows per document")
        }
    };
    Ok(PplResult { task: "ppl".into(), mode, points })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_windows_score_each_token_once() {
        let w = windows(10, 4, PplMode::Sliding { stride: 3, max_windows: 100 });
        assert_eq!(w, vec![(0, 4, 1), (3, 7, 4), (6, 10, 7)]);
        let scored: usize = w.iter().map(|(_, e, f)| e - f).sum();
        assert_eq!(scored, 9, "every token after the first, once");
        assert_eq!(windows(10, 4, PplMode::Sliding { stride: 3, max_windows: 2 }).len(), 2);
        assert_eq!(windows(10, 4, PplMode::Truncate), vec![(0, 4, 1)]);
    }
}
