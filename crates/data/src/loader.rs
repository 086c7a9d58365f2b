//! The loader: deterministic, resumable, data-parallel stream of training rows.
//!
//! The global row sequence is a pure function of (config, corpus): row `g` has the kind
//! [`crate::mixture::row_kind`]`(g)`, its source is picked by the deficit scheduler, and its
//! documents come from that source's stream (see [`crate::packing`]). Rank `r` of `w` returns
//! global rows `r, r+w, r+2w, …`; it plans (without materialising) the rows of the other
//! ranks, so after each returned row its state sits at the start of the next round of `w` rows
//! and is the same on every rank. Saving any rank's [`LoaderState`] and restoring it
//! reproduces exactly the rows the uninterrupted loader would have produced.

use crate::cache::{sha256_hex, CacheReport, TokenizerInfo};
use crate::config::DataConfig;
use crate::corpus::{Corpus, DocView};
use crate::hash::{mix64, unit_f64};
use crate::mixture::{pick_source, row_kind};
use crate::packing::{materialize, plan_long, plan_short, Geometry, Stream, StreamCursor};
use crate::row::{Piece, Row, Window};
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Bumped when the meaning of [`LoaderState`] changes.
pub const STATE_FORMAT: u32 = 1;

/// Everything needed to resume the row sequence exactly (JSON-serialisable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub format: u32,
    /// SHA-256 of the config's row-shaping fields and of the corpus content; a state only
    /// restores into a loader with the same fingerprint.
    pub fingerprint: String,
    /// Global index of the next row to plan (= rows produced by all ranks together).
    pub next_row: u64,
    /// Per source: cursor of its short-document stream.
    pub short: Vec<StreamCursor>,
    /// Per source: cursor of its long-document stream.
    pub long: Vec<StreamCursor>,
    /// Tails of long documents waiting for the next short row (FIFO).
    pub tails: Vec<Piece>,
    /// Scheduler state: short rows produced per source.
    pub short_rows: Vec<u64>,
    /// Scheduler state: long rows produced per source.
    pub long_rows: Vec<u64>,
    /// Tail tokens dropped because no short rows are produced (`short_share = 0`).
    pub dropped_tail_tokens: u64,
}

/// Document and token counts of one source after the split.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceStats {
    pub docs: usize,
    pub tokens: u64,
    /// Training documents of at most `l0` tokens (BOS/EOS included) and their tokens.
    pub short_docs: usize,
    pub short_tokens: u64,
    /// Training documents longer than `l0` (none when `short_share = 1`).
    pub long_docs: usize,
    pub long_tokens: u64,
    /// Held-out documents and their tokens.
    pub eval_docs: usize,
    pub eval_tokens: u64,
    /// Documents with no tokens (skipped).
    pub empty_docs: usize,
}

/// The row loader of one rank.
pub struct Loader {
    config: DataConfig,
    corpus: Corpus,
    rank: usize,
    world_size: usize,
    weights: Vec<f64>,
    short: Vec<Stream>,
    long: Vec<Stream>,
    eligible_short: Vec<usize>,
    eligible_long: Vec<usize>,
    /// Held-out documents `(source, doc)` of each kind, ordered by content hash.
    eval_short: Vec<(usize, usize)>,
    eval_long: Vec<(usize, usize)>,
    stats: Vec<SourceStats>,
    fingerprint: String,
    state: LoaderState,
}

/// Whether a document (by its content hash) is held out.
pub fn is_held_out(doc_hash: u64, eval_fraction: f64) -> bool {
    unit_f64(mix64(doc_hash ^ 0xE7A1_5E7D_0C0F_FEE5)) < eval_fraction
}

/// Tokenize every source of `config` into `cache_dir` now (e.g. once, before launching the
/// data-parallel ranks, which would otherwise all tokenize a missing cache at the same time).
pub fn prepare_cache(config: &DataConfig, tokenizer_path: &Path, cache_dir: &Path) -> Result<Vec<CacheReport>> {
    config.validate()?;
    let tok = TokenizerInfo::load(tokenizer_path)?;
    Ok(Corpus::open(&config.sources, &tok, cache_dir)?.cache_reports().to_vec())
}

impl Loader {
    /// Open the corpus (tokenizing into `cache_dir` on first use) and start at row 0.
    pub fn new(
        config: DataConfig,
        tokenizer_path: &Path,
        cache_dir: &Path,
        rank: usize,
        world_size: usize,
    ) -> Result<Loader> {
        config.validate()?;
        let tok = TokenizerInfo::load(tokenizer_path)?;
        for (name, id) in [("bos_id", config.bos_id), ("eos_id", config.eos_id), ("pad_id", config.pad_id)] {
            if let Some(id) = id {
                if id as usize >= tok.vocab_size {
                    bail!(
                        "data config: {name} = {id} is not a token of {} ({} tokens); use the tokenizer's id",
                        tokenizer_path.display(),
                        tok.vocab_size
                    );
                }
            }
        }
        let corpus = Corpus::open(&config.sources, &tok, cache_dir)?;
        Loader::with_corpus(corpus, config, rank, world_size)
    }

    /// [`Loader::new`], then continue from `state`.
    pub fn restore(
        config: DataConfig,
        tokenizer_path: &Path,
        cache_dir: &Path,
        rank: usize,
        world_size: usize,
        state: LoaderState,
    ) -> Result<Loader> {
        let mut l = Loader::new(config, tokenizer_path, cache_dir, rank, world_size)?;
        l.set_state(state)?;
        Ok(l)
    }

    /// A loader over an already opened (or in-memory) corpus.
    pub fn with_corpus(corpus: Corpus, config: DataConfig, rank: usize, world_size: usize) -> Result<Loader> {
        config.validate()?;
        ensure!(world_size >= 1, "world_size must be at least 1");
        ensure!(rank < world_size, "rank {rank} must be below world_size {world_size}");
        ensure!(
            corpus.n_sources() == config.sources.len(),
            "corpus has {} sources but the config lists {}",
            corpus.n_sources(),
            config.sources.len()
        );
        let view = DocView {
            corpus: &corpus,
            bos: config.bos_id.filter(|_| config.add_bos),
            eos: config.eos_id.filter(|_| config.add_eos),
        };
        let n = corpus.n_sources();
        let (l0, wants_long) = (config.l0, config.wants_long());
        let mut stats = vec![SourceStats::default(); n];
        let mut short_docs = vec![Vec::new(); n];
        let mut long_docs = vec![Vec::new(); n];
        let mut eval: Vec<(u64, usize, usize, usize)> = Vec::new();
        let mut longest = 0usize;
        for s in 0..n {
            let shard = corpus.shard(s);
            let st = &mut stats[s];
            st.docs = shard.n_docs();
            st.tokens = shard.n_tokens();
            for d in 0..shard.n_docs() {
                let vlen = view.vlen(s, d);
                if vlen == 0 {
                    st.empty_docs += 1;
                    continue;
                }
                let h = shard.doc_hash(d);
                if is_held_out(h, config.eval_fraction) {
                    st.eval_docs += 1;
                    st.eval_tokens += vlen as u64;
                    eval.push((h, s, d, vlen));
                    continue;
                }
                longest = longest.max(vlen);
                if wants_long && vlen > l0 {
                    st.long_docs += 1;
                    st.long_tokens += vlen as u64;
                    long_docs[s].push(d as u32);
                } else {
                    st.short_docs += 1;
                    st.short_tokens += vlen as u64;
                    short_docs[s].push(d as u32);
                }
            }
        }
        let non_empty: usize = stats.iter().map(|s| s.docs - s.empty_docs).sum();
        if non_empty == 0 {
            let paths: Vec<String> = config.sources.iter().map(|s| format!("\"{}\"", s.path().display())).collect();
            bail!(
                "the corpus is empty: the {} source(s) ({}) hold no document with any token; check the paths and `text_field`/`text_column`",
                n,
                paths.join(", ")
            );
        }
        let train: usize = stats.iter().map(|s| s.short_docs + s.long_docs).sum();
        if train == 0 {
            bail!(
                "every one of the {non_empty} documents is held out (eval_fraction = {}); lower `eval_fraction` or add documents",
                config.eval_fraction
            );
        }
        let eligible_short: Vec<usize> = (0..n).filter(|&s| !short_docs[s].is_empty()).collect();
        let eligible_long: Vec<usize> = (0..n).filter(|&s| !long_docs[s].is_empty()).collect();
        if config.wants_short() && eligible_short.is_empty() {
            bail!(
                "short_share = {} asks for short rows, but no training document has at most l0 = {l0} tokens; \
                 add a source of shorter documents or set `short_share = 0`",
                config.short_share
            );
        }
        if wants_long && eligible_long.is_empty() {
            bail!(
                "short_share = {} asks for long rows, but no training document is longer than l0 = {l0} tokens (longest: {longest}); \
                 add longer documents (e.g. `group_by` to join jsonl records, or a books source) or set `short_share = 1.0`",
                config.short_share
            );
        }
        if !config.wants_short() {
            let unused: usize = stats.iter().map(|s| s.short_docs).sum();
            if unused > 0 {
                tracing::warn!(
                    "{unused} training documents of at most l0 = {l0} tokens are unused because short_share = 0"
                );
            }
        }
        for (s, st) in stats.iter().enumerate() {
            tracing::info!(
                "sources[{s}]: {} docs / {} tokens; training short {} docs / {} tokens, long {} docs / {} tokens; held out {} docs / {} tokens",
                st.docs, st.tokens, st.short_docs, st.short_tokens, st.long_docs, st.long_tokens, st.eval_docs, st.eval_tokens
            );
        }
        eval.sort_by_key(|&(h, s, d, _)| (h, s, d));
        let eval_short = eval.iter().filter(|e| e.3 <= l0).map(|e| (e.1, e.2)).collect();
        let eval_long = eval.iter().filter(|e| e.3 > l0).map(|e| (e.1, e.2)).collect();
        let short =
            short_docs.into_iter().enumerate().map(|(s, d)| Stream::new(s, Window::Short, d, config.seed)).collect();
        let long =
            long_docs.into_iter().enumerate().map(|(s, d)| Stream::new(s, Window::Long, d, config.seed)).collect();
        let fingerprint = fingerprint(&config, &corpus);
        let state = LoaderState {
            format: STATE_FORMAT,
            fingerprint: fingerprint.clone(),
            next_row: 0,
            short: vec![StreamCursor::default(); n],
            long: vec![StreamCursor::default(); n],
            tails: Vec::new(),
            short_rows: vec![0; n],
            long_rows: vec![0; n],
            dropped_tail_tokens: 0,
        };
        let weights = config.sources.iter().map(|s| s.weight()).collect();
        Ok(Loader {
            config,
            corpus,
            rank,
            world_size,
            weights,
            short,
            long,
            eligible_short,
            eligible_long,
            eval_short,
            eval_long,
            stats,
            fingerprint,
            state,
        })
    }

    pub fn config(&self) -> &DataConfig {
        &self.config
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// What opening each source's cache did.
    pub fn cache_reports(&self) -> &[CacheReport] {
        self.corpus.cache_reports()
    }

    /// Per-source document/token counts after the split.
    pub fn stats(&self) -> &[SourceStats] {
        &self.stats
    }

    /// The state after the last row returned (resume point).
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    /// Continue from `state` (saved by a loader with the same config and corpus).
    pub fn set_state(&mut self, state: LoaderState) -> Result<()> {
        if state.format != STATE_FORMAT {
            bail!(
                "loader state has format {} but this build reads format {STATE_FORMAT}; start the data stream fresh",
                state.format
            );
        }
        if state.fingerprint != self.fingerprint {
            bail!(
                "loader state was saved for a different data config or corpus (seq_len, l0, short_share, seed, eval_fraction, \
                 BOS/EOS/pad, source weights or documents differ); restore with the config and data it was saved with, or start fresh"
            );
        }
        let n = self.corpus.n_sources();
        let bad = |what: &str| {
            anyhow::anyhow!(
                "loader state is inconsistent with this corpus ({what}); it was not produced by this loader"
            )
        };
        if [state.short.len(), state.long.len(), state.short_rows.len(), state.long_rows.len()].iter().any(|&l| l != n)
        {
            return Err(bad("number of sources"));
        }
        let (bos, eos) = (self.view().bos, self.view().eos);
        for (streams, curs) in [(&self.short, &state.short), (&self.long, &state.long)] {
            for (st, c) in streams.iter().zip(curs) {
                if st.len() == 0 {
                    if c.position != 0 || c.offset != 0 {
                        return Err(bad("cursor of an empty stream"));
                    }
                    continue;
                }
                if c.position as usize >= st.len() {
                    return Err(bad("cursor position"));
                }
            }
        }
        for t in &state.tails {
            let o = t.origin.as_ref().ok_or_else(|| bad("padding tail"))?;
            if o.source >= n
                || o.doc >= self.corpus.shard(o.source).n_docs()
                || o.start + t.len > self.view().vlen(o.source, o.doc)
            {
                return Err(bad("tail"));
            }
        }
        // Offsets are checked lazily against the (epoch-dependent) document under the cursor.
        let mut check = state.clone();
        for s in 0..n {
            for (stream, cur) in [(&mut self.short[s], &mut check.short[s]), (&mut self.long[s], &mut check.long[s])] {
                if stream.len() > 0 {
                    let d = stream.doc(cur);
                    let vlen = DocView { corpus: &self.corpus, bos, eos }.vlen(s, d);
                    if cur.offset as usize >= vlen {
                        return Err(bad("cursor offset"));
                    }
                }
            }
        }
        self.state = state;
        Ok(())
    }

    fn view(&self) -> DocView<'_> {
        DocView {
            corpus: &self.corpus,
            bos: self.config.bos_id.filter(|_| self.config.add_bos),
            eos: self.config.eos_id.filter(|_| self.config.add_eos),
        }
    }

    fn geometry(&self) -> Geometry {
        Geometry { seq_len: self.config.seq_len, l0: self.config.l0 }
    }

    /// Plan global row `state.next_row` and advance the state past it.
    fn plan_next(&mut self) -> (u64, usize, Vec<Piece>) {
        let g = self.geometry();
        let index = self.state.next_row;
        let view = DocView {
            corpus: &self.corpus,
            bos: self.config.bos_id.filter(|_| self.config.add_bos),
            eos: self.config.eos_id.filter(|_| self.config.add_eos),
        };
        let st = &mut self.state;
        let (source, pieces) = match row_kind(index, self.config.short_share) {
            Window::Short => {
                let s = pick_source(&self.eligible_short, &self.weights, &st.short_rows);
                st.short_rows[s] += 1;
                (s, plan_short(g, &view, &mut self.short[s], &mut st.short[s], &mut st.tails))
            }
            Window::Long => {
                let s = pick_source(&self.eligible_long, &self.weights, &st.long_rows);
                st.long_rows[s] += 1;
                let tails = if self.config.wants_short() { Some(&mut st.tails) } else { None };
                (s, plan_long(g, &view, &mut self.long[s], &mut st.long[s], tails, &mut st.dropped_tail_tokens))
            }
        };
        st.next_row += 1;
        (index, source, pieces)
    }

    /// The next row of this rank.
    pub fn next_row(&mut self) -> Row {
        let w = self.world_size as u64;
        loop {
            let (index, source, pieces) = self.plan_next();
            if index % w == self.rank as u64 {
                // Skip the other ranks' rows of this round so every rank's state is the same.
                while self.state.next_row % w != 0 {
                    self.plan_next();
                }
                return materialize(&self.view(), pieces, self.config.l0, self.config.pad_token(), index, Some(source));
            }
        }
    }

    /// Up to `n` held-out rows of `kind`, deterministic (independent of the seed, rank and
    /// state): short rows pack held-out documents of at most `l0` tokens; long rows pack
    /// held-out documents longer than `l0` (each row starts with a piece longer than `l0`).
    /// The last row is padded; fewer than `n` rows come back when the held-out documents run
    /// out. Fails when there is no held-out document of that kind.
    pub fn eval_rows(&self, kind: Window, n: usize) -> Result<Vec<Row>> {
        let docs = match kind {
            Window::Short => &self.eval_short,
            Window::Long => &self.eval_long,
        };
        if kind == Window::Long && self.config.seq_len <= self.config.l0 {
            bail!(
                "long eval rows need seq_len > l0 (seq_len = {}, l0 = {}); raise `seq_len`",
                self.config.seq_len,
                self.config.l0
            );
        }
        if docs.is_empty() {
            let what = match kind {
                Window::Short => format!("of at most l0 = {} tokens", self.config.l0),
                Window::Long => format!("longer than l0 = {} tokens", self.config.l0),
            };
            bail!(
                "no held-out document {what} (eval_fraction = {}); raise `eval_fraction` or add such documents",
                self.config.eval_fraction
            );
        }
        Ok(crate::eval::pack_eval(&self.view(), self.geometry(), self.config.pad_token(), kind, docs, n))
    }
}

fn fingerprint(config: &DataConfig, corpus: &Corpus) -> String {
    let weights: Vec<f64> = config.sources.iter().map(|s| s.weight()).collect();
    let shape = serde_json::json!({
        "state_format": STATE_FORMAT,
        "seq_len": config.seq_len,
        "l0": config.l0,
        "short_share": config.short_share,
        "seed": config.seed,
        "eval_fraction": config.eval_fraction,
        "bos": config.bos_id.filter(|_| config.add_bos),
        "eos": config.eos_id.filter(|_| config.add_eos),
        "pad": config.pad_token(),
        "weights": weights,
        "corpus": corpus.fingerprint().to_string(),
    });
    sha256_hex(shape.to_string().as_bytes())
}
