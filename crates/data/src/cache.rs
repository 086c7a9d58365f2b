//! Tokenization cache: each source is tokenized once into memory-mapped shards.
//!
//! Layout: `cache_dir/<key>/` holds
//! * `tokens.u32`   — all token ids of the source, little-endian u32, documents back to back
//!   (absent for `tokens` sources, whose own token file is mapped instead);
//! * `offsets.u64`  — little-endian u64 document start offsets (in tokens) plus a final end
//!   offset, so document `i` is `tokens[offsets[i]..offsets[i+1]]`;
//! * `doc_hash.u64` — little-endian u64 stable content hash of each document (drives the
//!   held-out split, see [`crate::hash::hash_tokens`]);
//! * `meta.json`    — [`CacheMeta`]: what was tokenized, with what, and the counts.
//!
//! `<key>` is a SHA-256 (first 128 bits, hex) of the source's canonical file paths, sizes and
//! modification times, its options (text field, grouping, ...; not its weight) and the full
//! content of `tokenizer.json`; changing any of them gives a new key. A shard is written into
//! a temporary folder beside it and renamed into place, so a crash never leaves a half cache
//! and a second run opens it instantly. Documents are tokenized WITHOUT special tokens;
//! BOS/EOS are added by the row builder.

use crate::config::SourceConfig;
use crate::hash::hash_tokens;
use crate::source::{read_documents, resolve_files, FileInfo};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bumped whenever the on-disk layout or the tokenization procedure changes.
pub const CACHE_FORMAT: u32 = 1;

/// Documents' text is handed to the tokenizer in chunks of about this many bytes.
const CHUNK_BYTES: usize = 4 << 20;
const CHUNK_DOCS: usize = 4096;

/// `meta.json` of a shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheMeta {
    pub format: u32,
    pub key: String,
    /// The source entry (weight zeroed: it does not affect tokenization).
    pub source: SourceConfig,
    /// `(path, size, mtime_ns)` of every input file.
    pub files: Vec<(PathBuf, u64, u128)>,
    pub tokenizer_sha256: String,
    pub n_docs: u64,
    pub n_tokens: u64,
    /// Largest token id seen (all are below the tokenizer's vocabulary size).
    pub max_token_id: Option<u32>,
}

/// What opening a source's cache did.
#[derive(Clone, Debug, Serialize)]
pub struct CacheReport {
    pub source_index: usize,
    pub key: String,
    pub dir: PathBuf,
    /// True when this call tokenized the source; false when an existing cache was reused.
    pub built: bool,
    pub n_docs: u64,
    pub n_tokens: u64,
}

/// Read-only bytes, memory-mapped or owned.
pub(crate) enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    pub(crate) fn map(path: &Path) -> Result<Bytes> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(Bytes::Owned(Vec::new()));
        }
        // SAFETY: cache files are written once and never modified in place (new content gets
        // a new key); a tokens source file changing under us would change its key next run.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Ok(Bytes::Mapped(map))
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// One source's documents: token ids, document offsets and document hashes.
pub struct Shard {
    tokens: Bytes,
    offsets: Bytes,
    hashes: Bytes,
    n_docs: usize,
}

impl Shard {
    /// An in-memory shard (tests, benchmarks, synthetic corpora).
    pub fn from_docs(docs: &[Vec<u32>]) -> Shard {
        let mut tokens = Vec::new();
        let mut offsets = Vec::with_capacity((docs.len() + 1) * 8);
        let mut hashes = Vec::with_capacity(docs.len() * 8);
        let mut off = 0u64;
        for d in docs {
            offsets.extend_from_slice(&off.to_le_bytes());
            for t in d {
                tokens.extend_from_slice(&t.to_le_bytes());
            }
            off += d.len() as u64;
            hashes.extend_from_slice(&hash_tokens(d.iter().copied()).to_le_bytes());
        }
        offsets.extend_from_slice(&off.to_le_bytes());
        Shard {
            tokens: Bytes::Owned(tokens),
            offsets: Bytes::Owned(offsets),
            hashes: Bytes::Owned(hashes),
            n_docs: docs.len(),
        }
    }

    pub fn n_docs(&self) -> usize {
        self.n_docs
    }

    pub fn n_tokens(&self) -> u64 {
        self.offset(self.n_docs)
    }

    fn offset(&self, i: usize) -> u64 {
        let b = &self.offsets.as_slice()[i * 8..i * 8 + 8];
        u64::from_le_bytes(b.try_into().unwrap())
    }

    /// Token count of document `i` (without BOS/EOS).
    pub fn doc_len(&self, i: usize) -> usize {
        (self.offset(i + 1) - self.offset(i)) as usize
    }

    pub fn doc_hash(&self, i: usize) -> u64 {
        let b = &self.hashes.as_slice()[i * 8..i * 8 + 8];
        u64::from_le_bytes(b.try_into().unwrap())
    }

    /// Tokens `start..end` of document `i`.
    pub fn doc_tokens(&self, i: usize, start: usize, end: usize) -> impl Iterator<Item = u32> + '_ {
        let base = self.offset(i) as usize;
        debug_assert!(end <= self.doc_len(i) && start <= end);
        self.tokens.as_slice()[(base + start) * 4..(base + end) * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
    }
}

/// The cache key of a source (see the module docs).
pub fn source_key(cfg: &SourceConfig, files: &[FileInfo], tokenizer_sha256: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("longmix-data cache format {CACHE_FORMAT}\n"));
    h.update(serde_json::to_string(&zero_weight(cfg)).unwrap());
    for f in files {
        h.update(format!("\n{}\t{}\t{}", f.path.display(), f.size, f.mtime_ns));
    }
    h.update("\ntokenizer ");
    h.update(tokenizer_sha256);
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", cfg.kind_name())
}

fn zero_weight(cfg: &SourceConfig) -> SourceConfig {
    let mut c = cfg.clone();
    match &mut c {
        SourceConfig::Jsonl { weight, .. }
        | SourceConfig::Text { weight, .. }
        | SourceConfig::Parquet { weight, .. }
        | SourceConfig::Tokens { weight, .. } => *weight = 0.0,
    }
    c
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The tokenizer plus what identifies it.
pub struct TokenizerInfo {
    pub tokenizer: tokenizers::Tokenizer,
    pub sha256: String,
    pub vocab_size: usize,
}

impl TokenizerInfo {
    pub fn load(path: &Path) -> Result<TokenizerInfo> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading tokenizer \"{}\"; pass the model's tokenizer.json", path.display()))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(TokenizerInfo { tokenizer, sha256: sha256_hex(&bytes), vocab_size })
    }
}

/// Whether every source of `config` already has its cache under `cache_dir` for the tokenizer
/// at `tokenizer_path` (so opening a loader tokenizes nothing).
pub fn is_built(config: &crate::DataConfig, tokenizer_path: &Path, cache_dir: &Path) -> Result<bool> {
    let bytes = std::fs::read(tokenizer_path).with_context(|| format!("reading {}", tokenizer_path.display()))?;
    let sha = sha256_hex(&bytes);
    for (index, cfg) in config.sources.iter().enumerate() {
        let key = source_key(cfg, &resolve_files(cfg, index)?, &sha);
        if !cache_dir.join(key).join("meta.json").is_file() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Open the cache of source `index`, tokenizing it first if there is none.
pub fn open_or_build(
    cfg: &SourceConfig,
    index: usize,
    tok: &TokenizerInfo,
    cache_dir: &Path,
) -> Result<(Shard, CacheReport)> {
    let files = resolve_files(cfg, index)?;
    let key = source_key(cfg, &files, &tok.sha256);
    let dir = cache_dir.join(&key);
    let mut built = false;
    if !dir.join("meta.json").is_file() {
        std::fs::create_dir_all(cache_dir)
            .with_context(|| format!("creating cache folder {}; pass a writable cache_dir", cache_dir.display()))?;
        build(cfg, index, &files, tok, &key, cache_dir)?;
        built = true;
    }
    let meta: CacheMeta = serde_json::from_slice(
        &std::fs::read(dir.join("meta.json"))
            .with_context(|| format!("reading {}", dir.join("meta.json").display()))?,
    )
    .with_context(|| format!("{}: corrupt cache metadata; delete that folder to rebuild it", dir.display()))?;
    if meta.format != CACHE_FORMAT || meta.key != key {
        bail!(
            "{}: cache metadata does not match (format {}, key {}); delete that folder to rebuild it",
            dir.display(),
            meta.format,
            meta.key
        );
    }
    let tokens = match cfg {
        SourceConfig::Tokens { .. } => Bytes::map(&files[0].path)?,
        _ => Bytes::map(&dir.join("tokens.u32"))?,
    };
    let offsets = match cfg {
        SourceConfig::Tokens { .. } => Bytes::map(&files[1].path)?,
        _ => Bytes::map(&dir.join("offsets.u64"))?,
    };
    let hashes = Bytes::map(&dir.join("doc_hash.u64"))?;
    let n_docs = meta.n_docs as usize;
    if offsets.as_slice().len() != (n_docs + 1) * 8
        || hashes.as_slice().len() != n_docs * 8
        || tokens.as_slice().len() as u64 != meta.n_tokens * 4
    {
        bail!("{}: cache files have unexpected sizes (truncated?); delete that folder to rebuild it", dir.display());
    }
    let shard = Shard { tokens, offsets, hashes, n_docs };
    let report = CacheReport { source_index: index, key, dir, built, n_docs: meta.n_docs, n_tokens: meta.n_tokens };
    Ok((shard, report))
}

/// A temporary folder in `cache_dir`, removed on drop unless renamed.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn build(
    cfg: &SourceConfig,
    index: usize,
    files: &[FileInfo],
    tok: &TokenizerInfo,
    key: &str,
    cache_dir: &Path,
) -> Result<()> {
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = TempDir(cache_dir.join(format!(".tmp-{key}-{}-{nonce}", std::process::id())));
    std::fs::create_dir_all(&tmp.0).with_context(|| format!("creating {}", tmp.0.display()))?;
    let (n_docs, n_tokens, max_id) = match cfg {
        SourceConfig::Tokens { .. } => index_token_file(index, files, tok, &tmp.0)?,
        _ => tokenize_source(cfg, index, files, tok, &tmp.0)?,
    };
    let meta = CacheMeta {
        format: CACHE_FORMAT,
        key: key.to_string(),
        source: zero_weight(cfg),
        files: files.iter().map(|f| (f.path.clone(), f.size, f.mtime_ns)).collect(),
        tokenizer_sha256: tok.sha256.clone(),
        n_docs,
        n_tokens,
        max_token_id: max_id,
    };
    std::fs::write(tmp.0.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
    let dst = cache_dir.join(key);
    match std::fs::rename(&tmp.0, &dst) {
        Ok(()) => {}
        // Another process finished the same cache first: use theirs.
        Err(_) if dst.join("meta.json").is_file() => {}
        Err(e) => return Err(e).with_context(|| format!("moving the new cache into {}", dst.display())),
    }
    Ok(())
}

struct ShardWriter {
    tokens: BufWriter<std::fs::File>,
    offsets: BufWriter<std::fs::File>,
    hashes: BufWriter<std::fs::File>,
    n_docs: u64,
    n_tokens: u64,
    max_id: Option<u32>,
}

impl ShardWriter {
    fn create(dir: &Path, with_tokens: bool) -> Result<Self> {
        let open = |name: &str| -> Result<BufWriter<std::fs::File>> {
            let p = dir.join(name);
            Ok(BufWriter::with_capacity(
                1 << 20,
                std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?,
            ))
        };
        let tokens = if with_tokens { open("tokens.u32")? } else { open(".unused")? };
        let mut w = ShardWriter {
            tokens,
            offsets: open("offsets.u64")?,
            hashes: open("doc_hash.u64")?,
            n_docs: 0,
            n_tokens: 0,
            max_id: None,
        };
        w.offsets.write_all(&0u64.to_le_bytes())?;
        Ok(w)
    }

    fn push(&mut self, ids: &[u32], write_tokens: bool) -> Result<()> {
        if write_tokens {
            for &t in ids {
                self.tokens.write_all(&t.to_le_bytes())?;
            }
            self.n_tokens += ids.len() as u64;
            self.offsets.write_all(&self.n_tokens.to_le_bytes())?;
        }
        if let Some(&m) = ids.iter().max() {
            self.max_id = Some(self.max_id.map_or(m, |x| x.max(m)));
        }
        self.hashes.write_all(&hash_tokens(ids.iter().copied()).to_le_bytes())?;
        self.n_docs += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<(u64, u64, Option<u32>)> {
        self.tokens.flush()?;
        self.offsets.flush()?;
        self.hashes.flush()?;
        Ok((self.n_docs, self.n_tokens, self.max_id))
    }
}

fn progress_bar(total_bytes: u64, label: String) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total_bytes);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg} ETA {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    pb.set_prefix(label);
    pb
}

fn tokenize_source(
    cfg: &SourceConfig,
    index: usize,
    files: &[FileInfo],
    tok: &TokenizerInfo,
    dir: &Path,
) -> Result<(u64, u64, Option<u32>)> {
    let total: u64 = files.iter().map(|f| f.size).sum();
    let label = format!("tokenizing sources[{index}] ({})", cfg.path().display());
    tracing::info!("{label}: {} file(s), {total} bytes", files.len());
    let pb = progress_bar(total, label);
    let start = Instant::now();
    let mut w = ShardWriter::create(dir, true)?;
    let mut chunk: Vec<String> = Vec::new();
    let mut chunk_bytes = 0usize;
    let flush = |chunk: &mut Vec<String>, w: &mut ShardWriter| -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let enc = tok
            .tokenizer
            .encode_batch_fast(std::mem::take(chunk), false)
            .map_err(|e| anyhow::anyhow!("tokenizing sources[{index}]: {e}"))?;
        for e in &enc {
            w.push(e.get_ids(), true)?;
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!("{} docs, {:.0} docs/s", w.n_docs, w.n_docs as f64 / secs));
        Ok(())
    };
    read_documents(cfg, index, files, &mut |text, bytes_done| {
        chunk_bytes += text.len();
        chunk.push(text);
        if chunk_bytes >= CHUNK_BYTES || chunk.len() >= CHUNK_DOCS {
            flush(&mut chunk, &mut w)?;
            chunk_bytes = 0;
            pb.set_position(bytes_done);
        }
        Ok(())
    })?;
    flush(&mut chunk, &mut w)?;
    pb.finish_and_clear();
    let _ = std::fs::remove_file(dir.join(".unused"));
    let out = w.finish()?;
    tracing::info!("sources[{index}]: {} docs, {} tokens in {:.1}s", out.0, out.1, start.elapsed().as_secs_f64());
    Ok(out)
}

/// Validate a `tokens` source and compute its document hashes (its tokens stay in place).
fn index_token_file(
    index: usize,
    files: &[FileInfo],
    tok: &TokenizerInfo,
    dir: &Path,
) -> Result<(u64, u64, Option<u32>)> {
    let (tok_path, idx) = (&files[0].path, &files[1].path);
    if files[0].size % 4 != 0 {
        bail!(
            "sources[{index}] (tokens source): {} has {} bytes, not a multiple of 4 (u32 tokens)",
            tok_path.display(),
            files[0].size
        );
    }
    if files[1].size % 8 != 0 || files[1].size < 8 {
        bail!(
            "sources[{index}] (tokens source): {} has {} bytes; it must hold little-endian u64 offsets (at least the final end offset)",
            idx.display(),
            files[1].size
        );
    }
    let tokens = Bytes::map(tok_path)?;
    let offsets = Bytes::map(idx)?;
    let n_tokens = files[0].size / 4;
    let offs: Vec<u64> =
        offsets.as_slice().chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    if offs[0] != 0 {
        bail!("sources[{index}] (tokens source): {} must start with offset 0, found {}", idx.display(), offs[0]);
    }
    if let Some(i) = offs.windows(2).position(|w| w[1] < w[0]) {
        bail!(
            "sources[{index}] (tokens source): {}: offsets decrease at entry {} ({} > {})",
            idx.display(),
            i + 1,
            offs[i],
            offs[i + 1]
        );
    }
    if *offs.last().unwrap() != n_tokens {
        bail!(
            "sources[{index}] (tokens source): {} ends at offset {} but {} holds {n_tokens} tokens; the last offset must be the token count",
            idx.display(),
            offs.last().unwrap(),
            tok_path.display()
        );
    }
    let shard = Shard { tokens, offsets, hashes: Bytes::Owned(Vec::new()), n_docs: offs.len() - 1 };
    let mut w = ShardWriter::create(dir, false)?;
    for i in 0..shard.n_docs() {
        let ids: Vec<u32> = shard.doc_tokens(i, 0, shard.doc_len(i)).collect();
        w.push(&ids, false)?;
    }
    let _ = std::fs::remove_file(dir.join(".unused"));
    let (n_docs, _, max_id) = w.finish()?;
    // the offsets file written by the writer is unused for tokens sources
    let _ = std::fs::remove_file(dir.join("offsets.u64"));
    if let Some(m) = max_id {
        if m as usize >= tok.vocab_size {
            bail!(
                "sources[{index}] (tokens source): {} holds token id {m}, but the tokenizer has {} tokens; it was tokenized with another tokenizer",
                tok_path.display(),
                tok.vocab_size
            );
        }
    }
    Ok((n_docs, n_tokens, max_id))
}
