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
use longmix_model::{AttentionFactor, Extension, ExtensionSpec, FactorSet};
use longmix_search::config::AddBos;
use longmix_search::driver::{needle_samples, NeedleData};
use longmix_search::needle::needle_ppl;
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
    let add_bos = match a.add_bos.as_str() {
        "auto" => AddBos::Auto,
        "true" => AddBos::Yes,
        "false" => AddBos::No,
        other => bail!("--add-bos {other:?}: use auto, true or false"),
    };
    let source = match (&a.jsonl, &a.text) {
        (Some(path), None) => SourceConfig::Jsonl {
            path: path.clone(),
            text_field: a.text_field.clone(),
            group_by: (!a.group_by.is_empty()).then(|| a.group_by.clone()),
            join: "\n".into(),
            weight: 1.0,
        },
        (None, Some(path)) => SourceConfig::Text { path: path.clone(), weight: 1.0 },
        _ => bail!("give the long documents with --jsonl PATH [--group-by book] or --text PATH"),
    };
    if a.samples == 0 || a.batch_size == 0 {
        bail!("--samples and --batch-size must be at least 1");
    }
    let mut lm = longmix_model::load_model(&a.model, kind, device)?;
    let base = lm.model.config.clone();
    let (l, l0) = window_lengths(a.target_length, a.original_length, &base.rope)
        .map_err(|e| anyhow::anyhow!("--target-length {e}"))?;
    let s = l as f64 / l0 as f64;
    let data = NeedleData {
        sources: std::slice::from_ref(&source),
        cache_dir: &a.cache_dir,
        samples: a.samples,
        documents: a.documents,
        seed: a.seed,
        add_bos,
    };
    let samples = needle_samples(&a.model, base.bos_token_id, l as usize, &data)?;
    if !a.json {
        println!(
            "needle-driven PPL: {} samples of {l} tokens (L0 = {l0}, s = {s}), {} answer tokens each; {} rows per forward",
            samples.len(),
            samples[0].answer_len,
            a.batch_size
        );
        println!("{:<28} {:>9} {:>12} {:>10} {:>9}", "factors", "attn", "needle PPL", "mean NLL", "seconds");
    }
    for name in &a.factors {
        let label = match name.as_str() {
            "own" | "model" => {
                lm.model.config = base.clone();
                "own (as configured)".to_string()
            }
            other => {
                let long = parse_long_factors(other).with_context(|| format!("--factors {other:?}"))?;
                let spec = ExtensionSpec {
                    target_length: Some(l),
                    original_length: Some(l0),
                    long,
                    short: None,
                    attention: a.attention_factor,
                };
                let ext = Extension::resolve(&spec, &base.rope).with_context(|| format!("--factors {other}"))?;
                lm.model.config = base.clone();
                ext.apply(&mut lm.model.config);
                match other.parse::<FactorSet>() {
                    Ok(FactorSet::Original) => "original (extrapolate)".into(),
                    Ok(FactorSet::Longrope2) => "longrope2 (init)".into(),
                    Ok(set) => set.name().into(),
                    Err(_) => other.to_string(),
                }
            }
        };
        let shown_af = lm.model.config.rope.attention_factor();
        let bar = if a.json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(samples.len() as u64)
                .with_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} samples  eta {eta}").unwrap())
                .with_message(label.clone())
        };
        let t0 = Instant::now();
        let (mut total, mut count, mut per_sample) = (0.0f64, 0usize, Vec::new());
        for chunk in samples.chunks(a.batch_size) {
            let score = needle_ppl(&lm.model, chunk, a.batch_size)?;
            total += score.mean_nll * score.tokens as f64;
            count += score.tokens;
            per_sample.extend(score.per_sample_nll);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let mean = total / count as f64;
        let secs = t0.elapsed().as_secs_f64();
        if a.json {
            println!(
                "{}",
                json!({
                    "factors": name, "attention_factor": shown_af, "needle_ppl": mean.exp(), "mean_nll": mean,
                    "answer_tokens": count, "samples": samples.len(), "target_length": l, "original_length": l0,
                    "per_sample_nll": per_sample, "depths": samples.iter().map(|s| s.depth).collect::<Vec<_>>(),
                    "seconds": secs,
                })
            );
        } else {
            println!("{label:<28} {shown_af:>9.4} {:>12.4} {mean:>10.4} {secs:>9.1}", mean.exp());
        }
    }
    Ok(())
}
