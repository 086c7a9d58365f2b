//! Passkey retrieval and RULER-style single-needle NIAH, scored on a length x depth grid.

use anyhow::Result;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::lm::{LanguageModel, TextTokenizer};
use crate::prompts::{first_integer, niah_sample, passkey_sample, sample_rng, string_match_all, Haystack, NeedleValue};

/// The grid and sampling of a retrieval task.
#[derive(Debug, Clone)]
pub struct GridOptions {
    /// Prompt lengths in tokens (exact).
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1] (0 = right after the instruction, 1 = right before the question).
    pub depths: Vec<f64>,
    /// Prompts per (length, depth) cell.
    pub samples: usize,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Prompts generated together (a cell's samples are split into batches of this size).
    pub batch_size: usize,
}

/// One scored prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleRecord {
    pub length: usize,
    pub depth: f64,
    pub sample: usize,
    pub prompt_tokens: usize,
    /// Token index where the needle starts.
    pub needle_at: usize,
    pub expected: String,
    pub prediction: String,
    /// 0..=100.
    pub score: f64,
}

/// Scores of a retrieval task: `scores[i][j]` is the mean score (0..=100) at `lengths[i]`,
/// `depths[j]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridResult {
    pub task: String,
    pub metric: String,
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub scores: Vec<Vec<f64>>,
    /// Mean over depths, per length.
    pub by_length: Vec<f64>,
    pub mean: f64,
    pub samples: Vec<SampleRecord>,
}

impl GridResult {
    fn new(task: &str, metric: &str, opts: &GridOptions, samples: Vec<SampleRecord>) -> Self {
        let cell = |l: usize, d: f64| {
            let v: Vec<f64> = samples.iter().filter(|s| s.length == l && s.depth == d).map(|s| s.score).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let scores: Vec<Vec<f64>> =
            opts.lengths.iter().map(|&l| opts.depths.iter().map(|&d| cell(l, d)).collect()).collect();
        let by_length: Vec<f64> = scores.iter().map(|r| r.iter().sum::<f64>() / r.len().max(1) as f64).collect();
        let mean = by_length.iter().sum::<f64>() / by_length.len().max(1) as f64;
        GridResult {
            task: task.into(),
            metric: metric.into(),
            lengths: opts.lengths.clone(),
            depths: opts.depths.clone(),
            scores,
            by_length,
            mean,
            samples,
        }
    }

    /// A text table: one row per depth, one column per length, plus the per-length mean.
    pub fn table(&self) -> String {
        let mut s = format!("{} ({}, %)\n", self.task, self.metric);
        s += &format!("{:>8}", "depth");
        for l in &self.lengths {
            s += &format!("{:>9}", l);
        }
        s += "\n";
        for (j, d) in self.depths.iter().enumerate() {
            s += &format!("{:>7.0}%", d * 100.0);
            for i in 0..self.lengths.len() {
                s += &format!("{:>9.1}", self.scores[i][j]);
            }
            s += "\n";
        }
        s += &format!("{:>8}", "mean");
        for v in &self.by_length {
            s += &format!("{:>9.1}", v);
        }
        s += &format!("\noverall {:.1}\n", self.mean);
        s
    }
}

struct Prompt {
    length: usize,
    depth: f64,
    sample: usize,
    tokens: Vec<i64>,
    needle_at: usize,
    expected: String,
    references: Vec<String>,
}

fn run_grid(
    lm: &mut dyn LanguageModel,
    tok: &dyn TextTokenizer,
    opts: &GridOptions,
    bar: &ProgressBar,
    build: &dyn Fn(usize, usize, usize) -> Result<Prompt>,
    score: &dyn Fn(&str, &Prompt) -> f64,
) -> Result<Vec<SampleRecord>> {
    bar.set_length((opts.lengths.len() * opts.depths.len() * opts.samples) as u64);
    let mut records = Vec::new();
    for li in 0..opts.lengths.len() {
        for di in 0..opts.depths.len() {
            let prompts: Vec<Prompt> = (0..opts.samples).map(|s| build(li, di, s)).collect::<Result<_>>()?;
            for batch in prompts.chunks(opts.batch_size.max(1)) {
                let inputs: Vec<Vec<i64>> = batch.iter().map(|p| p.tokens.clone()).collect();
                let outs = lm.generate(&inputs, opts.max_new_tokens)?;
                for (p, out) in batch.iter().zip(outs) {
                    let prediction = tok.decode(&out)?;
                    records.push(SampleRecord {
                        length: p.length,
                        depth: p.depth,
                        sample: p.sample,
                        prompt_tokens: p.tokens.len(),
                        needle_at: p.needle_at,
                        expected: p.expected.clone(),
                        score: score(&prediction, p),
                        prediction,
                    });
                    bar.inc(1);
                }
            }
        }
    }
    Ok(records)
}

/// Passkey retrieval: greedy generation, the first integer of the output compared with the key
/// (`k = randint(1, 50000)`); score 100 or 0 per prompt.
pub fn passkey(
    lm: &mut dyn LanguageModel,
    tok: &dyn TextTokenizer,
    opts: &GridOptions,
    bar: &ProgressBar,
) -> Result<GridResult> {
    let longest = opts.lengths.iter().copied().max().unwrap_or(0);
    let filler = Haystack::repeated(tok, crate::prompts::NOISE, " ", longest, "noise")?;
    let build = |li: usize, di: usize, s: usize| -> Result<Prompt> {
        let (length, depth) = (opts.lengths[li], opts.depths[di]);
        let mut rng = sample_rng(opts.seed, &[1, length as u64, di as u64, s as u64]);
        let key = 1 + rng.below(50_000);
        let p = passkey_sample(tok, &filler, length, depth, key)?;
        Ok(Prompt {
            length,
            depth,
            sample: s,
            tokens: p.prompt,
            needle_at: p.needle_at,
            expected: key.to_string(),
            references: vec![key.to_string()],
        })
    };
    let score = |pred: &str, p: &Prompt| {
        if first_integer(pred).map(|k| k.to_string()) == Some(p.expected.clone()) {
            100.0
        } else {
            0.0
        }
    };
    let records = run_grid(lm, tok, opts, bar, &build, &score)?;
    Ok(GridResult::new("passkey", "accuracy", opts, records))
}

/// RULER niah_single: one needle (`value_type` values, adjective-noun keys) in `haystack`;
/// `string_match_all` x 100 per prompt.
pub fn niah(
    lm: &mut dyn LanguageModel,
    tok: &dyn TextTokenizer,
    haystack: &Haystack,
    value_type: NeedleValue,
    opts: &GridOptions,
    bar: &ProgressBar,
) -> Result<GridResult> {
    let build = |li: usize, di: usize, s: usize| -> Result<Prompt> {
        let (length, depth) = (opts.lengths[li], opts.depths[di]);
        let mut rng = sample_rng(opts.seed, &[2, length as u64, di as u64, s as u64]);
        let p = niah_sample(tok, haystack, value_type, length, depth, &mut rng)?;
        Ok(Prompt {
            length,
            depth,
            sample: s,
            tokens: p.prompt,
            needle_at: p.needle_at,
            expected: p.value,
            references: p.outputs,
        })
    };
    let score = |pred: &str, p: &Prompt| 100.0 * string_match_all(pred, &p.references);
    let records = run_grid(lm, tok, opts, bar, &build, &score)?;
    Ok(GridResult::new(
        &format!("niah_single ({}, {} haystack)", value_type.plural(), haystack.name),
        "string_match_all",
        opts,
        records,
    ))
}
