//! `longmix generate`: greedy or sampled continuation of one or more prompts with a KV cache,
//! under the checkpoint's RoPE or any override (`--rope`, `--factors`, `--string`).
//!
//! Several `--prompt`s are decoded as one left-padded batch. Long-window RoPE (longrope) is
//! switched per row when a row first exceeds L0, with a re-prefill of that row (reported).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use longmix_model::{DecodeOptions, GenerateOptions, Sampling};
use serde_json::json;

use super::eval::RopeArgs;
use crate::device::ComputeArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (repeat for a batch).
    #[arg(long)]
    prompt: Vec<String>,
    /// Read the prompt from a file instead.
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Maximum new tokens per prompt.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at the model's EOS token.
    #[arg(long)]
    ignore_eos: bool,
    /// Recompute every step from scratch instead of using the KV cache (slow; for checking).
    #[arg(long)]
    no_cache: bool,
    #[command(flatten)]
    rope: RopeArgs,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let prompts: Vec<String> = match &a.prompt_file {
        Some(f) => vec![std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?],
        None => a.prompt.clone(),
    };
    if prompts.is_empty() {
        bail!("give a --prompt TEXT (or --prompt-file FILE)");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    let (device, kind) = a.compute.resolve()?;
    let mut lm = longmix_model::load_model(&a.model, kind, device)?;
    let tok = longmix_model::load_tokenizer(&a.model)?;
    let applied = a.rope.choice()?.apply(&mut lm.model.config)?;
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            let enc = tok.encode(p.as_str(), true).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
            Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
        })
        .collect::<Result<_>>()?;
    if ids.iter().any(|p: &Vec<i64>| p.is_empty()) {
        bail!("a prompt tokenizes to no token");
    }
    let sampling = if a.temperature > 0.0 {
        Sampling::Sample { temperature: a.temperature, top_p: a.top_p, seed: a.seed }
    } else {
        Sampling::Greedy
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_tokens: if a.ignore_eos { vec![] } else { lm.model.config.eos_token_id.into_iter().collect() },
        decode: DecodeOptions { string: applied.string, refresh_on_table_change: true },
        use_cache: !a.no_cache,
    };
    let t0 = std::time::Instant::now();
    let out = longmix_model::generate(&lm.model, &ids, &opts)?;
    let secs = t0.elapsed().as_secs_f64();
    let new_tokens: usize = out.tokens.iter().map(Vec::len).sum();
    let texts: Vec<String> = out
        .tokens
        .iter()
        .map(|t| {
            let t: Vec<u32> = t.iter().map(|&i| i as u32).collect();
            tok.decode(&t, true).map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
        })
        .collect::<Result<_>>()?;
    if a.json {
        let rows: Vec<_> = (0..prompts.len())
            .map(|r| {
                json!({
                    "prompt": prompts[r], "prompt_tokens": ids[r].len(), "completion": texts[r],
                    "tokens": out.tokens[r], "stopped": out.stopped[r], "reprefills": out.reprefills[r],
                })
            })
            .collect();
        println!(
            "{}",
            json!({ "model": a.model, "rope": applied.details, "seconds": secs, "new_tokens": new_tokens, "outputs": rows })
        );
    } else {
        for (r, text) in texts.iter().enumerate() {
            if prompts.len() > 1 {
                println!("--- [{r}] {} prompt tokens", ids[r].len());
            }
            println!("{}{}", prompts[r], text);
        }
        eprintln!(
            "{new_tokens} new tokens in {secs:.2}s ({:.1} tok/s), rope {}, re-prefills {:?}",
            new_tokens as f64 / secs.max(1e-9),
            applied.label,
            out.reprefills
        );
    }
    Ok(())
}
