//! `longmix score`: mean next-token NLL of a text file, for checking any model by hand.
//!
//! The text is tokenized as transformers' `tokenizer(text)` does (special tokens per the
//! tokenizer's post-processor) and cut into consecutive windows of at most `--max-len` tokens;
//! each window is scored on its own (positions 0..len), and the NLL is averaged over every
//! predicted token of every window.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::{Kind, Tensor};

use crate::device::ComputeArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens (default: the model's original context window).
    #[arg(long)]
    max_len: Option<i64>,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Save the first window's input ids and its logits at 32 spread positions (including the
    /// last) to this safetensors file, for cross-checks against other implementations.
    #[arg(long)]
    save_logits: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let (device, kind) = a.compute.resolve()?;
    let text =
        std::fs::read_to_string(&a.text).with_context(|| format!("cannot read text file {}", a.text.display()))?;
    let lm = longmix_model::load_model(&a.model, kind, device)?;
    let tok = longmix_model::load_tokenizer(&a.model)?;
    let ids: Vec<i64> = tok
        .encode(text.as_str(), true)
        .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", a.text.display()))?
        .get_ids()
        .iter()
        .map(|&i| i as i64)
        .collect();
    let max_len = a.max_len.unwrap_or(lm.model.config.original_max_position_embeddings());
    if max_len < 2 {
        bail!("--max-len must be at least 2 (got {max_len})");
    }
    if ids.len() < 2 {
        bail!("{} holds {} token(s); scoring needs at least 2", a.text.display(), ids.len());
    }
    let windows: Vec<&[i64]> = ids.chunks(max_len as usize).filter(|w| w.len() >= 2).collect();
    let bar = ProgressBar::new(windows.len() as u64).with_style(
        ProgressStyle::with_template("scoring {bar:30} {pos}/{len} windows  {per_sec}  eta {eta}").unwrap(),
    );
    if let Some(path) = &a.save_logits {
        save_logits(&lm.model, windows[0], device, path)?;
    }
    let t0 = std::time::Instant::now();
    let (mut nll, mut count) = (0.0f64, 0i64);
    for w in &windows {
        let input = Tensor::from_slice(w).unsqueeze(0).to_device(device);
        let pos = Tensor::arange(w.len() as i64, (Kind::Int64, device)).unsqueeze(0);
        let loss = lm.model.nll(&input, &pos, &longmix_model::batch_targets(&input, &pos));
        nll += loss.sum();
        count += loss.tokens();
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mean = nll / count as f64;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let out = json!({
            "model": a.model, "text": a.text, "tokens": ids.len(), "scored_tokens": count,
            "windows": windows.len(), "max_len": max_len, "mean_nll": mean, "perplexity": mean.exp(),
            "seconds": secs,
        });
        println!("{out}");
    } else {
        println!(
            "mean NLL {mean:.4}  perplexity {:.3}  tokens {}  scored {count}  windows {}  ({secs:.1}s)",
            mean.exp(),
            ids.len(),
            windows.len()
        );
    }
    Ok(())
}

fn save_logits(
    model: &longmix_model::CausalLm,
    ids: &[i64],
    device: tch::Device,
    path: &std::path::Path,
) -> Result<()> {
    let n = ids.len() as i64;
    let input = Tensor::from_slice(ids).unsqueeze(0);
    let pos = Tensor::arange(n, (Kind::Int64, device)).unsqueeze(0);
    let picks: Vec<i64> = {
        let mut p: Vec<i64> = (0..32).map(|i| i * (n - 1) / 31).collect();
        p.dedup();
        p
    };
    let logits = tch::no_grad(|| model.forward(&input.to_device(device), &pos));
    let at = logits.get(0).index_select(0, &Tensor::from_slice(&picks).to_device(device)).to_device(tch::Device::Cpu);
    Tensor::write_safetensors(&[("input_ids", input), ("positions", Tensor::from_slice(&picks)), ("logits", at)], path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
