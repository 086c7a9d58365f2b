//! `longmix export`: a checkpoint -> a Hugging Face folder with the extended window.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tch::Kind;

use crate::config::TrainConfig;
use crate::train::{export, TrainerState};

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint folder (`<checkpoint.dir>/step-N`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The new model folder (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Weights dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Shard size bound in MB.
    #[arg(long, default_value_t = 5000)]
    max_shard_mb: u64,
}

pub fn run(a: Args) -> Result<()> {
    crate::checkpoint::verify(&a.checkpoint).with_context(|| format!("{} is not a complete checkpoint", a.checkpoint.display()))?;
    let cfg = TrainConfig::read(&a.checkpoint.join("config.toml"))?;
    let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(a.checkpoint.join("trainer_state.json"))?)?;
    let mut lm = longmix_model::load_model(&cfg.model.path, Kind::Float, tch::Device::Cpu)?;
    state.rope.apply(&mut lm);
    longmix_model::load::load_weights(&lm.vs, &a.checkpoint)?;
    export(&lm, &cfg, &state.rope, &a.out, &a.dtype, a.max_shard_mb)
}
