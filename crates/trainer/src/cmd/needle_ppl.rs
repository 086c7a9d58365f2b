//! `longmix needle-ppl`: needle-driven perplexity (docs/numerics.md §3.5) of a model at length L
//! under one or more factor sets, on the same samples: the search's fitness, by hand.
//!
//! Factor sets: `own` (the model's own RoPE, as its config.json says; `model` also reads), or a
//! LongRoPE extension ([`longmix_model::Extension`]) with the long factors of `original` (plain
//! RoPE, extrapolated), `pi`, `ntk`, `yarn`, `longrope2` (the LongRoPE2 initial shape) or a
//! factors file. Each gets its method's own attention factor unless `--attention-factor` says
//! otherwise (`native`: 1 for original/pi/ntk, 0.1·ln s + 1 for yarn, sqrt(1 + ln s / ln L0) for
//! longrope2, the value a search recorded in a file's notes).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longmix_data::SourceConfig;
use longmix_model::extension::{parse_long_factors, window_lengths};
use longmix_model::{AttentionFactor, Extension, ExtensionSpec, FactorSet, LoadedModel, ModelConfig};
use longmix_search::config::AddBos;
use longmix_search::driver::{needle_samples, NeedleData};
use longmix_search::needle::{needle_ppl, NeedleSample};
use serde_json::json;

use crate::device::ComputeArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// L: tokens per sample.
    #[arg(long)]
    target_length: i64,
    /// L0 (default: the model's original window).
    #[arg(long)]
    original_length: Option<i64>,
    /// JSONL documents (see --group-by, --text-field) ...
    #[arg(long, conflicts_with = "text")]
    jsonl: Option<PathBuf>,
    /// Join consecutive JSONL records with equal values of these fields (comma-separated).
    #[arg(long, value_delimiter = ',')]
    group_by: Vec<String>,
    #[arg(long, default_value = "text")]
    text_field: String,
    /// ... or a text file / folder of text files (one document each).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokenization cache.
    #[arg(long, default_value = ".cache/tokens")]
    cache_dir: PathBuf,
    /// N: samples.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// D: distinct documents at most.
    #[arg(long, default_value_t = 10)]
    documents: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto (the tokenizer decides), true or false.
    #[arg(long, default_value = "auto")]
    add_bos: String,
    /// Comma-separated factor sets: own, original, pi, ntk, yarn, longrope2, or factors files.
    #[arg(long, value_delimiter = ',', default_value = "pi,ntk,yarn,longrope2")]
    factors: Vec<String>,
    /// native, longrope, none or a number.
    #[arg(long, default_value = "native")]
    attention_factor: AttentionFactor,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[command(flatten)]
    compute: ComputeArgs,
    /// CPU threads for LibTorch.
    #[arg(long)]
    threads: Option<i32>,
    /// One JSON object per factor set instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (device, kind) = a.compute.resolve()?;
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let add_bos = a.add_bos()?;
    let source = a.source()?;
    if a.samples == 0 || a.batch_size == 0 {
        bail!("--samples and --batch-size must be at least 1");
    }
    let lm = longmix_model::load_model(&a.model, kind, device)?;
    let base = lm.model.config.clone();
    let (l, l0) = window_lengths(a.target_length, a.original_length, &base.rope)
        .map_err(|e| anyhow::anyhow!("--target-length {e}"))?;
    let data = NeedleData {
        sources: std::slice::from_ref(&source),
        cache_dir: &a.cache_dir,
        samples: a.samples,
        documents: a.documents,
        seed: a.seed,
        add_bos,
    };
    let samples = needle_samples(&a.model, base.bos_token_id, l as usize, &data)?;
    let mut comparison = Comparison { lm, base, target: l, original: l0, samples };
    if !a.json {
        comparison.print_header(a.batch_size);
    }
    for name in &a.factors {
        let label = comparison.configure(name, a.attention_factor)?;
        let score = comparison.score(&label, a.batch_size, !a.json)?;
        comparison.print_score(name, &label, &score, a.json);
    }
    Ok(())
}

impl Args {
    fn add_bos(&self) -> Result<AddBos> {
        Ok(match self.add_bos.as_str() {
            "auto" => AddBos::Auto,
            "true" => AddBos::Yes,
            "false" => AddBos::No,
            other => bail!("--add-bos {other:?}: use auto, true or false"),
        })
    }

    /// The long documents: `--jsonl` or `--text`.
    fn source(&self) -> Result<SourceConfig> {
        Ok(match (&self.jsonl, &self.text) {
            (Some(path), None) => SourceConfig::Jsonl {
                path: path.clone(),
                text_field: self.text_field.clone(),
                group_by: (!self.group_by.is_empty()).then(|| self.group_by.clone()),
                join: "\n".into(),
                weight: 1.0,
            },
            (None, Some(path)) => SourceConfig::Text { path: path.clone(), weight: 1.0 },
            _ => bail!("give the long documents with --jsonl PATH [--group-by book] or --text PATH"),
        })
    }
}

/// The model, its configuration as loaded, and the samples every factor set is scored on.
struct Comparison {
    lm: LoadedModel,
    base: ModelConfig,
    /// L.
    target: i64,
    /// L0.
    original: i64,
    samples: Vec<NeedleSample>,
}

/// Needle-driven NLL of one factor set over all samples.
struct Score {
    mean_nll: f64,
    answer_tokens: usize,
    per_sample_nll: Vec<f64>,
    seconds: f64,
    attention_factor: f64,
}

impl Comparison {
    /// Configure the model with the factor set `name`; returns its label in the table.
    fn configure(&mut self, name: &str, attention: AttentionFactor) -> Result<String> {
        let config = &mut self.lm.model.config;
        if matches!(name, "own" | "model") {
            *config = self.base.clone();
            return Ok("own (as configured)".to_string());
        }
        let long = parse_long_factors(name).with_context(|| format!("--factors {name:?}"))?;
        let spec = ExtensionSpec {
            target_length: Some(self.target),
            original_length: Some(self.original),
            long,
            short: None,
            attention,
        };
        let ext = Extension::resolve(&spec, &self.base.rope).with_context(|| format!("--factors {name}"))?;
        *config = self.base.clone();
        ext.apply(config);
        Ok(match name.parse::<FactorSet>() {
            Ok(FactorSet::Original) => "original (extrapolate)".into(),
            Ok(FactorSet::Longrope2) => "longrope2 (init)".into(),
            Ok(set) => set.name().into(),
            Err(_) => name.to_string(),
        })
    }

    /// Score every sample under the model's current configuration, `batch_size` rows per
    /// forward pass, with a progress bar labelled `label` when `progress` is set.
    fn score(&self, label: &str, batch_size: usize, progress: bool) -> Result<Score> {
        let attention_factor = self.lm.model.config.rope.attention_factor();
        let bar = if progress {
            ProgressBar::new(self.samples.len() as u64)
                .with_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} samples  eta {eta}").unwrap())
                .with_message(label.to_string())
        } else {
            ProgressBar::hidden()
        };
        let t0 = Instant::now();
        let (mut total, mut count, mut per_sample) = (0.0f64, 0usize, Vec::new());
        for chunk in self.samples.chunks(batch_size) {
            let score = needle_ppl(&self.lm.model, chunk, batch_size)?;
            total += score.mean_nll * score.tokens as f64;
            count += score.tokens;
            per_sample.extend(score.per_sample_nll);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let mean_nll = total / count as f64;
        let seconds = t0.elapsed().as_secs_f64();
        Ok(Score { mean_nll, answer_tokens: count, per_sample_nll: per_sample, seconds, attention_factor })
    }

    fn print_header(&self, batch_size: usize) {
        let (l, l0) = (self.target, self.original);
        let s = l as f64 / l0 as f64;
        println!(
            "needle-driven PPL: {} samples of {l} tokens (L0 = {l0}, s = {s}), {} answer tokens each; {batch_size} rows per forward",
            self.samples.len(),
            self.samples[0].answer_len,
        );
        println!("{:<28} {:>9} {:>12} {:>10} {:>9}", "factors", "attn", "needle PPL", "mean NLL", "seconds");
    }

    /// One line of the table, or one JSON object when `json` is set.
    fn print_score(&self, name: &str, label: &str, score: &Score, json: bool) {
        let (mean, af, secs) = (score.mean_nll, score.attention_factor, score.seconds);
        if json {
            println!(
                "{}",
                json!({
                    "factors": name, "attention_factor": af, "needle_ppl": mean.exp(), "mean_nll": mean,
                    "answer_tokens": score.answer_tokens, "samples": self.samples.len(),
                    "target_length": self.target, "original_length": self.original,
                    "per_sample_nll": score.per_sample_nll,
                    "depths": self.samples.iter().map(|s| s.depth).collect::<Vec<_>>(), "seconds": secs,
                })
            );
        } else {
            println!("{label:<28} {af:>9.4} {:>12.4} {mean:>10.4} {secs:>9.1}", mean.exp());
        }
    }
}
