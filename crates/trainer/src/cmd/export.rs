//! `longmix export`: a checkpoint -> a Hugging Face folder with the extended window.

use std::path::PathBuf;

use anyhow::Result;
use tch::Kind;

use crate::checkpoint::Checkpoint;
use crate::train::export;

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
    let c = Checkpoint::load(&a.checkpoint)?;
    let mut lm = longmix_model::load_model(&c.config.model.path, Kind::Float, tch::Device::Cpu)?;
    c.state.rope.apply(&mut lm.model.config);
    c.load_weights(&lm)?;
    export(&lm, &c.config.model.path, &c.state.rope, &a.out, &a.dtype, a.max_shard_mb)
}
