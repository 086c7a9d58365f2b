//! `longmix search --config search.toml`: LongRoPE2 critical-dimension (or LongRoPE v1) search
//! of the long rescale factors with needle-driven perplexity as fitness. The result is a factors
//! file for `[rope] factors_file`. A search started again on the same `output.state_dir`
//! resumes where it stopped and reaches the same result; `--restart` discards that state.
//! See `docs/search.md`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use longmix_search::{run_search, RunOptions, SearchConfig};

use crate::device::{compute_dtype, parse_device};

#[derive(clap::Args)]
pub struct Args {
    /// The search's TOML file (see docs/search.md and configs/search-*.toml).
    #[arg(long)]
    config: PathBuf,
    /// Discard the state folder's checkpoint and start afresh.
    #[arg(long)]
    restart: bool,
    /// Stop (with a checkpoint) once this many iterations are complete; run again to continue.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Hide the progress bar (logs still go to stderr).
    #[arg(long)]
    no_progress: bool,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = SearchConfig::read(&a.config)?;
    let device = parse_device(&cfg.model.device).context("key `model.device`")?;
    let kind = compute_dtype(&cfg.model.dtype, device).context("key `model.dtype`")?;
    let opts = RunOptions { stop_after: a.stop_after, progress: !a.no_progress };
    let out = run_search(&cfg, device, kind, &opts, a.restart)?;
    let r = &out.result;
    let cd = out.critical_dim.map_or(String::new(), |cd| format!(", critical dim {cd}"));
    println!(
        "{} search{cd}: {} needle samples of {} tokens, attention factor {:.4}",
        cfg.search.mode.name(),
        out.samples,
        cfg.rope.target_length,
        out.attention_factor
    );
    println!(
        "  first population: best needle PPL {:.4}, mean {:.4} ({} individuals)",
        r.initial.best, r.initial.mean, r.initial.size
    );
    println!(
        "  after {} iteration(s): best needle PPL {:.4}, parents' mean {:.4}; {} model evaluations{}",
        r.iteration,
        r.best.fitness,
        r.final_parents_mean,
        r.evaluations,
        r.resumed_from.map_or(String::new(), |i| format!(" (resumed after iteration {i})"))
    );
    let f = &out.factors.long_factor;
    println!("  long factors {:.3} .. {:.3}", f[0], f[f.len() - 1]);
    match &out.output {
        Some(path) => println!("  wrote {}", path.display()),
        None => println!(
            "stopped after iteration {}; run the same command again to continue (state in {})",
            r.iteration,
            cfg.output.state_dir.display()
        ),
    }
    Ok(())
}
