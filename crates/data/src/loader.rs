//! The loader: deterministic, resumable stream of training rows.
//!
//! The global row sequence is a pure function of (config, corpus): row `g` has the kind
//! [`crate::mixture::row_kind`]`(g)`, its source is picked by the deficit scheduler, and its
//! documents come from that source's stream (see [`crate::packing`]). The loader returns the
//! rows in order; data-parallel ranks all read the same sequence and share out each global
//! batch among themselves, so the data cursor is a property of the run, not of a rank. Saving
//! a [`LoaderState`] and restoring it reproduces exactly the rows the uninterrupted loader
//! would have produced.

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
    /// Global index of the next row to plan (= rows produced so far).
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

impl LoaderState {
    /// The state of a loader at row 0 over `n_sources` sources.
    fn start(fingerprint: String, n_sources: usize) -> LoaderState {
        LoaderState {
            format: STATE_FORMAT,
            fingerprint,
            next_row: 0,
            short: vec![StreamCursor::default(); n_sources],
            long: vec![StreamCursor::default(); n_sources],
            tails: Vec::new(),
            short_rows: vec![0; n_sources],
            long_rows: vec![0; n_sources],
            dropped_tail_tokens: 0,
        }
    }
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

/// The row loader.
pub struct Loader {
    config: DataConfig,
    corpus: Corpus,
    weights: Vec<f64>,
    short: Vec<Stream>,
    long: Vec<Stream>,
    eligible_short: Vec<usize>,
    eligible_long: Vec<usize>,
    /// Held-out documents `(source, doc)` of each kind, ordered by content hash.
    eval_short: Vec<DocRef>,
    eval_long: Vec<DocRef>,
    stats: Vec<SourceStats>,
    fingerprint: String,
    state: LoaderState,
}

/// The error of a [`LoaderState`] that does not fit this corpus.
fn inconsistent(what: &str) -> anyhow::Error {
    anyhow::anyhow!("loader state is inconsistent with this corpus ({what}); it was not produced by this loader")
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
    pub fn new(config: DataConfig, tokenizer_path: &Path, cache_dir: &Path) -> Result<Loader> {
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
        Loader::with_corpus(corpus, config)
    }

    /// [`Loader::new`], then continue from `state`.
    pub fn restore(config: DataConfig, tokenizer_path: &Path, cache_dir: &Path, state: LoaderState) -> Result<Loader> {
        let mut l = Loader::new(config, tokenizer_path, cache_dir)?;
        l.set_state(state)?;
        Ok(l)
    }

    /// A loader over an already opened (or in-memory) corpus.
    pub fn with_corpus(corpus: Corpus, config: DataConfig) -> Result<Loader> {
        config.validate()?;
        ensure!(
            corpus.n_sources() == config.sources.len(),
            "corpus has {} sources but the config lists {}",
            corpus.n_sources(),
            config.sources.len()
        );
        let split = DocSplit::of(&corpus, &config);
        split.check(&config)?;
        split.report(&config);
        Ok(Loader::from_split(corpus, config, split))
    }

    /// The loader at row 0, streaming the training documents of `split`.
    fn from_split(corpus: Corpus, config: DataConfig, mut split: DocSplit) -> Loader {
        let n = corpus.n_sources();
        let eligible = |docs: &[Vec<u32>]| (0..n).filter(|&s| !docs[s].is_empty()).collect();
        let (eligible_short, eligible_long) = (eligible(&split.short_docs), eligible(&split.long_docs));
        let (eval_short, eval_long) = split.held_out_by_kind(config.l0);
        let streams = |docs: Vec<Vec<u32>>, kind: Window| -> Vec<Stream> {
            docs.into_iter().enumerate().map(|(s, d)| Stream::new(s, kind, d, config.seed)).collect()
        };
        let short = streams(split.short_docs, Window::Short);
        let long = streams(split.long_docs, Window::Long);
        let fingerprint = fingerprint(&config, &corpus);
        let state = LoaderState::start(fingerprint.clone(), n);
        let weights = config.sources.iter().map(|s| s.weight()).collect();
        Loader {
            config,
            corpus,
            weights,
            short,
            long,
            eligible_short,
            eligible_long,
            eval_short,
            eval_long,
            stats: split.stats,
            fingerprint,
            state,
        }
    }

    pub fn config(&self) -> &DataConfig {
        &self.config
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
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
        self.check_cursors(&state)?;
        self.check_tails(&state)?;
        self.check_offsets(&state)?;
        self.state = state;
        Ok(())
    }

    /// Every source has its cursors, and each lies within its stream.
    fn check_cursors(&self, state: &LoaderState) -> Result<()> {
        let n = self.corpus.n_sources();
        if [state.short.len(), state.long.len(), state.short_rows.len(), state.long_rows.len()].iter().any(|&l| l != n)
        {
            return Err(inconsistent("number of sources"));
        }
        for (streams, curs) in [(&self.short, &state.short), (&self.long, &state.long)] {
            for (st, c) in streams.iter().zip(curs) {
                if st.len() == 0 {
                    if c.position != 0 || c.offset != 0 {
                        return Err(inconsistent("cursor of an empty stream"));
                    }
                    continue;
                }
                if c.position as usize >= st.len() {
                    return Err(inconsistent("cursor position"));
                }
            }
        }
        Ok(())
    }

    /// Every queued tail is a piece of a document of this corpus.
    fn check_tails(&self, state: &LoaderState) -> Result<()> {
        let n = self.corpus.n_sources();
        for t in &state.tails {
            let o = t.origin.as_ref().ok_or_else(|| inconsistent("padding tail"))?;
            if o.source >= n
                || o.doc >= self.corpus.shard(o.source).n_docs()
                || o.start + t.len > self.view().vlen(o.source, o.doc)
            {
                return Err(inconsistent("tail"));
            }
        }
        Ok(())
    }

    /// Offsets are checked lazily against the (epoch-dependent) document under the cursor.
    fn check_offsets(&mut self, state: &LoaderState) -> Result<()> {
        let view = doc_view(&self.corpus, &self.config);
        let mut check = state.clone();
        for s in 0..self.corpus.n_sources() {
            for (stream, cur) in [(&mut self.short[s], &mut check.short[s]), (&mut self.long[s], &mut check.long[s])] {
                if stream.len() > 0 {
                    let d = stream.doc(cur);
                    if cur.offset as usize >= view.vlen(s, d) {
                        return Err(inconsistent("cursor offset"));
                    }
                }
            }
        }
        Ok(())
    }

    fn view(&self) -> DocView<'_> {
        doc_view(&self.corpus, &self.config)
    }

    fn geometry(&self) -> Geometry {
        Geometry { seq_len: self.config.seq_len, l0: self.config.l0 }
    }

    /// Plan global row `state.next_row` and advance the state past it.
    fn plan_next(&mut self) -> (u64, usize, Vec<Piece>) {
        let g = self.geometry();
        let index = self.state.next_row;
        let view = doc_view(&self.corpus, &self.config);
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

    /// The next row of the global sequence.
    pub fn next_row(&mut self) -> Row {
        let (index, source, pieces) = self.plan_next();
        materialize(&self.view(), pieces, self.config.l0, self.config.pad_token(), index, Some(source))
    }

    /// Up to `n` held-out rows of `kind`, deterministic (independent of the seed and the
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

/// A document: its source and its index in that source.
type DocRef = (usize, usize);

/// A document as the split records it: content hash, source, index in its source and tokens
/// (BOS/EOS included).
type HeldOut = (u64, usize, usize, usize);

/// The corpus split into held-out, short and long training documents, per source.
struct DocSplit {
    stats: Vec<SourceStats>,
    /// Per source: training documents streamed into short rows.
    short_docs: Vec<Vec<u32>>,
    /// Per source: training documents longer than `l0` (only when long rows are asked for).
    long_docs: Vec<Vec<u32>>,
    held_out: Vec<HeldOut>,
    /// Tokens of the longest training document.
    longest: usize,
}

impl DocSplit {
    /// Sort every non-empty document of `corpus` into held out, short or long.
    fn of(corpus: &Corpus, config: &DataConfig) -> DocSplit {
        let n = corpus.n_sources();
        let mut split = DocSplit {
            stats: vec![SourceStats::default(); n],
            short_docs: vec![Vec::new(); n],
            long_docs: vec![Vec::new(); n],
            held_out: Vec::new(),
            longest: 0,
        };
        let view = doc_view(corpus, config);
        for s in 0..n {
            split.add_source(&view, s, config);
        }
        split
    }

    fn add_source(&mut self, view: &DocView, s: usize, config: &DataConfig) {
        let shard = view.corpus.shard(s);
        let st = &mut self.stats[s];
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
                self.held_out.push((h, s, d, vlen));
                continue;
            }
            self.longest = self.longest.max(vlen);
            if config.wants_long() && vlen > config.l0 {
                st.long_docs += 1;
                st.long_tokens += vlen as u64;
                self.long_docs[s].push(d as u32);
            } else {
                st.short_docs += 1;
                st.short_tokens += vlen as u64;
                self.short_docs[s].push(d as u32);
            }
        }
    }

    /// Refuse a split that cannot feed the rows `config` asks for.
    fn check(&self, config: &DataConfig) -> Result<()> {
        let l0 = config.l0;
        let non_empty: usize = self.stats.iter().map(|s| s.docs - s.empty_docs).sum();
        if non_empty == 0 {
            let paths: Vec<String> = config.sources.iter().map(|s| format!("\"{}\"", s.path().display())).collect();
            bail!(
                "the corpus is empty: the {} source(s) ({}) hold no document with any token; check the paths and `text_field`/`text_column`",
                self.stats.len(),
                paths.join(", ")
            );
        }
        let train: usize = self.stats.iter().map(|s| s.short_docs + s.long_docs).sum();
        if train == 0 {
            bail!(
                "every one of the {non_empty} documents is held out (eval_fraction = {}); lower `eval_fraction` or add documents",
                config.eval_fraction
            );
        }
        if config.wants_short() && self.short_docs.iter().all(Vec::is_empty) {
            bail!(
                "short_share = {} asks for short rows, but no training document has at most l0 = {l0} tokens; \
                 add a source of shorter documents or set `short_share = 0`",
                config.short_share
            );
        }
        if config.wants_long() && self.long_docs.iter().all(Vec::is_empty) {
            bail!(
                "short_share = {} asks for long rows, but no training document is longer than l0 = {l0} tokens (longest: {}); \
                 add longer documents (e.g. `group_by` to join jsonl records, or a books source) or set `short_share = 1.0`",
                config.short_share,
                self.longest
            );
        }
        Ok(())
    }

    /// Log the split of every source, and warn about documents no row will use.
    fn report(&self, config: &DataConfig) {
        if !config.wants_short() {
            let unused: usize = self.stats.iter().map(|s| s.short_docs).sum();
            if unused > 0 {
                tracing::warn!(
                    "{unused} training documents of at most l0 = {} tokens are unused because short_share = 0",
                    config.l0
                );
            }
        }
        for (s, st) in self.stats.iter().enumerate() {
            tracing::info!(
                "sources[{s}]: {} docs / {} tokens; training short {} docs / {} tokens, long {} docs / {} tokens; held out {} docs / {} tokens",
                st.docs, st.tokens, st.short_docs, st.short_tokens, st.long_docs, st.long_tokens, st.eval_docs, st.eval_tokens
            );
        }
    }

    /// Held-out documents `(source, doc)` ordered by content hash: those of at most `l0`
    /// tokens, then the longer ones.
    fn held_out_by_kind(&mut self, l0: usize) -> (Vec<DocRef>, Vec<DocRef>) {
        let eval = &mut self.held_out;
        eval.sort_by_key(|&(h, s, d, _)| (h, s, d));
        let eval_short = eval.iter().filter(|e| e.3 <= l0).map(|e| (e.1, e.2)).collect();
        let eval_long = eval.iter().filter(|e| e.3 > l0).map(|e| (e.1, e.2)).collect();
        (eval_short, eval_long)
    }
}

/// The documents of `corpus` with the BOS/EOS `config` adds.
fn doc_view<'a>(corpus: &'a Corpus, config: &DataConfig) -> DocView<'a> {
    DocView { corpus, bos: config.bos_id.filter(|_| config.add_bos), eos: config.eos_id.filter(|_| config.add_eos) }
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
