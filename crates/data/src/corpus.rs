//! The tokenized corpus: one [`Shard`] per source, plus the BOS/EOS view of documents.

use crate::cache::{open_or_build, CacheReport, Shard, TokenizerInfo};
use crate::config::SourceConfig;
use crate::hash::mix_all;
use anyhow::Result;
use std::path::Path;

/// All sources' documents, in config order.
pub struct Corpus {
    shards: Vec<Shard>,
    reports: Vec<CacheReport>,
}

impl Corpus {
    /// Open (tokenizing on first use) every source through the cache in `cache_dir`.
    pub fn open(sources: &[SourceConfig], tokenizer: &TokenizerInfo, cache_dir: &Path) -> Result<Corpus> {
        let mut shards = Vec::with_capacity(sources.len());
        let mut reports = Vec::with_capacity(sources.len());
        for (i, s) in sources.iter().enumerate() {
            let (shard, report) = open_or_build(s, i, tokenizer, cache_dir)?;
            shards.push(shard);
            reports.push(report);
        }
        Ok(Corpus { shards, reports })
    }

    /// An in-memory corpus: `sources[s][d]` is document `d` of source `s` (tests, benchmarks).
    pub fn from_docs(sources: &[Vec<Vec<u32>>]) -> Corpus {
        Corpus { shards: sources.iter().map(|d| Shard::from_docs(d)).collect(), reports: Vec::new() }
    }

    pub fn n_sources(&self) -> usize {
        self.shards.len()
    }

    pub fn shard(&self, source: usize) -> &Shard {
        &self.shards[source]
    }

    /// What opening each source's cache did (empty for in-memory corpora).
    pub fn cache_reports(&self) -> &[CacheReport] {
        &self.reports
    }

    pub fn n_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.n_tokens()).sum()
    }

    /// A content fingerprint (document counts, lengths and hashes), independent of paths.
    pub fn fingerprint(&self) -> u64 {
        let mut words = Vec::with_capacity(self.shards.len() + 1);
        words.push(self.shards.len() as u64);
        for s in &self.shards {
            let mut h = mix_all(&[s.n_docs() as u64, s.n_tokens()]);
            for d in 0..s.n_docs() {
                h = mix_all(&[h, s.doc_hash(d), s.doc_len(d) as u64]);
            }
            words.push(h);
        }
        mix_all(&words)
    }
}

/// Documents as the rows see them: `[BOS] tokens [EOS]` per config.
pub(crate) struct DocView<'a> {
    pub corpus: &'a Corpus,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl DocView<'_> {
    /// Length of document `doc` of `source` with BOS/EOS (0 for an empty document: empty
    /// documents are never used).
    pub fn vlen(&self, source: usize, doc: usize) -> usize {
        let n = self.corpus.shard(source).doc_len(doc);
        if n == 0 {
            0
        } else {
            n + self.bos.is_some() as usize + self.eos.is_some() as usize
        }
    }

    /// Append tokens `start..start+len` of the BOS/EOS view of a document to `out`.
    pub fn write(&self, source: usize, doc: usize, start: usize, len: usize, out: &mut Vec<i64>) {
        let shard = self.corpus.shard(source);
        let n = shard.doc_len(doc);
        let b = self.bos.is_some() as usize;
        let end = start + len;
        let mut v = start;
        if v == 0 && v < end {
            if let Some(bos) = self.bos {
                out.push(bos as i64);
                v += 1;
            }
        }
        // real tokens occupy virtual positions b..b+n
        let a = v.max(b) - b;
        let z = end.min(b + n).saturating_sub(b);
        if a < z {
            out.extend(shard.doc_tokens(doc, a, z).map(|t| t as i64));
        }
        if let Some(eos) = self.eos {
            if end == b + n + 1 {
                out.push(eos as i64);
            }
        }
    }
}
