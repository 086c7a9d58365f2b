//! Needle-driven perplexity (docs/numerics.md §3.5): the LongRoPE2 search's fitness.
//!
//! A sample is exactly `L` tokens:
//!
//! ```text
//! [BOS] t1  doc[..split]  t2(needle)  doc[split..budget]  t3(needle)
//! ```
//!
//! * `t1`, `t2`, `t3` are the released templates ([`T1`], [`T2`], [`T3`]); the needle is a
//!   7-digit number drawn from the seed; `t3` ends with it, and those **answer tokens are the
//!   only scored ones** (every other target is -100).
//! * `budget = L − |BOS + t1| − |t2| − |t3|`: the document is cut to exactly what fits, so the
//!   answer is never cut off (the released `--truncate` dropped it) and nothing else is scored
//!   (the released `cus_label`/`cus_labels` mismatch scored every token).
//! * Sample k of N uses document `k mod D` and depth `k / (N − 1)`, i.e. `(i + D·j)/(N − 1)` for
//!   document i, round j: with D = 10 and N = 100 the released `(i + 10j)/99`. The split
//!   `⌊depth · budget⌋` moves down to just after the nearest token ending in a newline
//!   (`"\n"`, `",\n"`, `".\n"`, ...), and stays put if there is none above the document start.
//! * Fitness = exp(mean NLL over the answer tokens of all samples).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use longmix_data::Corpus;
use longmix_model::{CausalLm, IGNORE_INDEX};
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

use crate::rng::Rng;

pub const T1: &str =
    "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about the number afterwards.\n";
pub const T2: &str = "One of the special magic numbers for wandering-age is: {needle}.\n";
pub const T3: &str = "The special magic number for wandering-age mentioned in the provided text is: {needle}";

/// What to build.
#[derive(Debug, Clone, PartialEq)]
pub struct NeedleOptions {
    /// L: every sample has exactly this many tokens.
    pub length: usize,
    /// N.
    pub samples: usize,
    /// At most this many distinct documents (D); the released recipe uses 10 books.
    pub documents: usize,
    pub seed: u64,
    /// BOS id to put first, if the model uses one.
    pub bos: Option<u32>,
}

/// One document's leading tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// `source/doc` index in the corpus, for reports.
    pub id: String,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NeedleSample {
    /// Exactly L tokens.
    pub input_ids: Vec<i64>,
    /// `targets[t]` is the token position t must predict: the answer tokens, -100 elsewhere.
    pub targets: Vec<i64>,
    pub needle: String,
    /// The answer (needle) tokens are `input_ids[L − answer_len ..]`.
    pub answer_len: usize,
    /// Requested depth in [0, 1] and where `t2` actually starts.
    pub depth: f64,
    pub needle_at: usize,
    /// Index into the documents the samples were built from.
    pub document: usize,
}

/// Encode without special tokens.
fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?.get_ids().to_vec())
}

/// Encode `text`, which ends with `needle`; returns the ids and how many trailing ids are the
/// needle's (every token overlapping the needle's characters).
pub fn encode_with_answer(tok: &Tokenizer, text: &str, needle: &str) -> Result<(Vec<u32>, usize)> {
    assert!(text.ends_with(needle));
    let enc = tok.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
    let start = text.len() - needle.len();
    let first = enc
        .get_offsets()
        .iter()
        .position(|&(_, end)| end > start)
        .with_context(|| format!("the tokenizer gives no offsets covering the needle in {text:?}"))?;
    let ids = enc.get_ids().to_vec();
    let answer = &ids[first..];
    let decoded = tok.decode(answer, false).map_err(|e| anyhow::anyhow!("decoding the answer: {e}"))?;
    if decoded.trim() != needle {
        bail!("the answer tokens of {text:?} decode to {decoded:?}, not the needle {needle:?}");
    }
    Ok((ids.clone(), ids.len() - first))
}

/// Whether the BOS the model's tokenizer adds (if any) should lead each sample: the tokenizer's
/// own post-processor decides, as `tokenizer(text)` does in transformers.
pub fn tokenizer_bos(tok: &Tokenizer) -> Result<Option<u32>> {
    let specials = longmix_core::leading_specials(|text, special| -> Result<Vec<i64>> {
        let enc = tok.encode(text, special).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    })?;
    Ok(match specials[..] {
        [bos] => Some(bos as u32),
        _ => None,
    })
}

/// Up to `max_docs` documents with at least `min_len` tokens, picked in a seeded shuffle of the
/// corpus, each cut to `keep` tokens.
pub fn pick_documents(
    corpus: &Corpus,
    min_len: usize,
    keep: usize,
    max_docs: usize,
    seed: u64,
) -> Result<Vec<Document>> {
    let mut eligible: Vec<(usize, usize)> = Vec::new();
    let mut longest = 0;
    for s in 0..corpus.n_sources() {
        let shard = corpus.shard(s);
        for d in 0..shard.n_docs() {
            let n = shard.doc_len(d);
            longest = longest.max(n);
            if n >= min_len {
                eligible.push((s, d));
            }
        }
    }
    if eligible.is_empty() {
        bail!(
            "no document has the {min_len} tokens a needle sample needs (the longest has {longest}); \
             use longer documents (e.g. jsonl `group_by` to join records into books) or a smaller target length"
        );
    }
    Rng::new(seed ^ 0xD0C5_D0C5_D0C5_D0C5).shuffle(&mut eligible);
    eligible.truncate(max_docs);
    Ok(eligible
        .into_iter()
        .map(|(s, d)| {
            let shard = corpus.shard(s);
            let n = shard.doc_len(d).min(keep);
            Document { id: format!("{s}/{d}"), tokens: shard.doc_tokens(d, 0, n).collect() }
        })
        .collect())
}

/// Build N samples of exactly L tokens (see the module docs).
pub fn build_samples(tok: &Tokenizer, docs: &[Document], opts: &NeedleOptions) -> Result<Vec<NeedleSample>> {
    if docs.is_empty() {
        bail!("needle samples need at least one document");
    }
    if opts.samples == 0 {
        bail!("needle samples: N must be at least 1");
    }
    let l = opts.length;
    let mut prefix: Vec<u32> = opts.bos.into_iter().collect();
    prefix.extend(encode(tok, T1)?);
    let mut rng = Rng::new(opts.seed);
    let mut newline: HashMap<u32, bool> = HashMap::new();
    let mut ends_line = |id: u32| -> bool {
        *newline.entry(id).or_insert_with(|| tok.decode(&[id], false).map(|s| s.ends_with('\n')).unwrap_or(false))
    };
    let d = docs.len().min(opts.documents.max(1));
    let mut out = Vec::with_capacity(opts.samples);
    for k in 0..opts.samples {
        let needle = rng.range(1_000_000, 9_999_999).to_string();
        let t2 = encode(tok, &T2.replace("{needle}", &needle))?;
        let (t3, answer_len) = encode_with_answer(tok, &T3.replace("{needle}", &needle), &needle)?;
        let overhead = prefix.len() + t2.len() + t3.len();
        if overhead >= l {
            bail!("target length {l} is too short for a needle sample: the templates alone take {overhead} tokens");
        }
        let budget = l - overhead;
        let doc_index = k % d;
        let doc = &docs[doc_index].tokens;
        if doc.len() < budget {
            bail!("document {} has {} tokens, a sample of {l} needs {budget}", docs[doc_index].id, doc.len());
        }
        let depth = if opts.samples > 1 { k as f64 / (opts.samples - 1) as f64 } else { 0.5 };
        let target = ((depth * budget as f64).floor() as usize).min(budget);
        let split = (1..=target).rev().find(|&p| ends_line(doc[p - 1])).unwrap_or(target);
        let mut ids: Vec<i64> = Vec::with_capacity(l);
        ids.extend(prefix.iter().map(|&t| t as i64));
        ids.extend(doc[..split].iter().map(|&t| t as i64));
        let needle_at = ids.len();
        ids.extend(t2.iter().map(|&t| t as i64));
        ids.extend(doc[split..budget].iter().map(|&t| t as i64));
        ids.extend(t3.iter().map(|&t| t as i64));
        assert_eq!(ids.len(), l);
        let mut targets = vec![IGNORE_INDEX; l];
        // Position t predicts token t + 1: only the answer tokens are scored.
        targets[l - 1 - answer_len..l - 1].copy_from_slice(&ids[l - answer_len..]);
        out.push(NeedleSample { input_ids: ids, targets, needle, answer_len, depth, needle_at, document: doc_index });
    }
    Ok(out)
}

/// Needle-driven perplexity of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct NeedleScore {
    /// exp(mean_nll): the fitness.
    pub ppl: f64,
    pub mean_nll: f64,
    /// Answer tokens scored.
    pub tokens: usize,
    /// Mean answer NLL of each sample.
    pub per_sample_nll: Vec<f64>,
}

/// Score `samples` (all of one length) under `model` as it is configured, `batch_size` rows per
/// forward, without gradients. Only the hidden states that predict answer tokens go through the
/// LM head ([`CausalLm::head_nll`]), so no `[B, L, vocab]` logits are made.
pub fn needle_ppl(model: &CausalLm, samples: &[NeedleSample], batch_size: usize) -> Result<NeedleScore> {
    if samples.is_empty() {
        bail!("no needle samples to score");
    }
    let l = samples[0].input_ids.len();
    if samples.iter().any(|s| s.input_ids.len() != l) {
        bail!("needle samples must all have the same length");
    }
    let device = model.lm_head_weight().device();
    let mut per_sample = Vec::with_capacity(samples.len());
    let (mut total, mut count) = (0.0f64, 0usize);
    for chunk in samples.chunks(batch_size.max(1)) {
        let b = chunk.len() as i64;
        let rows = |f: fn(&NeedleSample) -> &Vec<i64>| {
            let flat: Vec<i64> = chunk.iter().flat_map(|s| f(s).iter().copied()).collect();
            Tensor::from_slice(&flat).view([b, l as i64]).to_device(device)
        };
        let pos = Tensor::arange(l as i64, (Kind::Int64, device)).unsqueeze(0).repeat([b, 1]);
        let loss = model.nll(&rows(|s| &s.input_ids), &pos, &rows(|s| &s.targets));
        for ((s, sum), n) in chunk.iter().zip(&loss.row_nll).zip(&loss.row_tokens) {
            debug_assert_eq!(*n as usize, s.answer_len);
            per_sample.push(sum / s.answer_len as f64);
            total += sum;
            count += s.answer_len;
        }
    }
    let mean_nll = total / count as f64;
    Ok(NeedleScore { ppl: mean_nll.exp(), mean_nll, tokens: count, per_sample_nll: per_sample })
}
