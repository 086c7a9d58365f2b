//! `longmix train`: mixed context window training.
//!
//! The run is split the way torchtitan splits it:
//!
//! * [`Trainer::setup`]: config -> compute target -> process group -> model -> resume point ->
//!   [`Extension`] -> data loader -> [`StepEngine`] (parameters, float32 gradients, AdamW, the
//!   [`Parallel`] layout) -> resumed state;
//! * [`StepEngine::step`] (`step.rs`): one optimizer step over a global batch, the code
//!   `longmix bench` runs too;
//! * [`Evaluator`]: held-out loss of the short and the long rows, and its interval;
//! * [`Checkpointer`]: resume lookup, its interval, the team save, the space warning;
//! * [`RunLog`]: the progress bar and the metrics sinks (rank 0);
//! * [`run`]: the loop.
//!
//! Data and context parallelism live in the layout (`parallel.rs`): every rank plans the same
//! global batch of rows, trains its data-parallel group's share (under context parallelism its
//! slice of those rows' tokens), and the gradients are summed over the ranks while the backward
//! runs; the loss is normalised by the target tokens of the whole global step, so N ranks
//! compute what one process would with the same global batch.
//!
//! Short rows (documents <= L0) run with the short factors, long rows with the long factors;
//! the model decides per row from its positions and reports the window it used.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use longmix_data::{DataConfig, Loader, LoaderState, Prefetcher, Row};
use longmix_model::{export_hf, load_model, ExportOptions, Extension, LoadedModel, MemoryOptions, ModelConfig};
use tch::{Device, Kind};

use crate::checkpoint::{Checkpoint, Team, TrainerState};
use crate::config::TrainConfig;
use crate::device::{check_training_dtype, compute_dtype, parse_device, parse_dtype};
use crate::distributed::{self, Dist, Launch};
use crate::schedule::Schedule;

mod checkpointer;
mod evaluator;
mod log;
mod parallel;
mod plan;
mod step;

pub use checkpointer::Checkpointer;
pub use evaluator::{Evaluator, HeldOut};
pub use log::RunLog;
pub use parallel::ParallelDims;
pub use step::{Batch, CudaPeaks, StepEngine, StepOutcome, StepStats};

#[derive(clap::Args)]
pub struct Args {
    /// The run's TOML file.
    #[arg(long)]
    pub config: PathBuf,
    /// Validate everything and print the plan without training (reads only the TOML, the
    /// model's config.json and, when it is there, the tokenization cache).
    #[arg(long)]
    pub dry_run: bool,
    /// Resume from the newest valid checkpoint (`--resume`), from a given one (`--resume DIR`),
    /// or, with `--resume auto`, from the newest one if there is one and fresh otherwise (what
    /// `torchrun --max-restarts` and SLURM `--requeue` need).
    #[arg(long, num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Stop (with a checkpoint) after this many steps of this invocation.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// With --dry-run: plan for this many ranks (the mesh with `distributed.context_parallel`,
    /// memory per rank with ZeRO-1/2; estimated idle time with and without row balancing).
    #[arg(long, requires = "dry_run")]
    pub world_size: Option<usize>,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub lm: LoadedModel,
    pub extension: Extension,
    pub engine: StepEngine,
    schedule: Schedule,
    pub state: TrainerState,
    pub total_steps: u64,
    pub evaluator: Evaluator,
    pub checkpointer: Checkpointer,
}

/// The run's data as the loader reads it.
pub fn data_config(cfg: &TrainConfig, ext: &Extension, model: &ModelConfig) -> DataConfig {
    DataConfig {
        sources: cfg.data.sources.clone(),
        seq_len: cfg.train.seq_len,
        l0: ext.original_length as usize,
        short_share: cfg.data.short_share,
        seed: cfg.train.seed,
        eval_fraction: cfg.data.eval_fraction,
        add_bos: cfg.data.add_bos,
        bos_id: model.bos_token_id.map(|x| x as u32),
        add_eos: cfg.data.add_eos,
        eos_id: model.eos_token_id.map(|x| x as u32),
        pad_id: None,
    }
}

/// The run's memory savers.
pub fn memory_options(cfg: &TrainConfig) -> MemoryOptions {
    MemoryOptions {
        checkpoint_layers: cfg.train.checkpoint_layers,
        loss_chunk: (cfg.train.loss_chunk > 0).then_some(cfg.train.loss_chunk),
        sync_phases: false,
    }
}

/// `[rope]` resolved against the model's own RoPE (with `rope.keep_sliding_window`), errors
/// named by key.
pub fn resolve_extension(cfg: &TrainConfig, model: &ModelConfig) -> Result<Extension> {
    let ext = Extension::resolve(&cfg.extension_spec(), &model.rope).map_err(|e| {
        let e = format!("{e:#}");
        match e.strip_prefix("target length: ") {
            Some(rest) => anyhow::anyhow!("key `rope.target_length`: {rest}"),
            None => anyhow::anyhow!("key `rope`: {e}"),
        }
    })?;
    Ok(Extension { keep_sliding_window: cfg.rope.keep_sliding_window, ..ext })
}

/// The checks of a run that need the extension but no weights or data.
pub fn check_run(cfg: &TrainConfig, ext: &Extension) -> Result<()> {
    if cfg.train.seq_len as i64 > ext.target_length {
        bail!("key `train.seq_len`: {} exceeds rope.target_length {}", cfg.train.seq_len, ext.target_length);
    }
    if let Some(e) = &cfg.export {
        if e.dir.exists() {
            bail!("key `export.dir`: {} already exists; remove it or choose another folder", e.dir.display());
        }
    }
    Ok(())
}

/// Threads, seed, and the device and dtype this rank computes in.
fn compute_target(cfg: &TrainConfig, launch: Option<&Launch>) -> Result<(Device, Kind)> {
    // Several ranks on one machine share its cores instead of each spinning on all of them.
    let local = launch
        .map_or(1, |l| std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(l.world_size));
    tch::set_num_threads(crate::device::intra_op_threads(cfg.model.threads, local));
    tch::manual_seed(cfg.train.seed as i64);
    let mut device = parse_device(&cfg.model.device).context("key `model.device`")?;
    if let Some(l) = launch {
        device = distributed::rank_device(device, l, tch::Cuda::device_count() as usize)?;
    }
    let kind = compute_dtype(&cfg.model.dtype, device).context("key `model.dtype`")?;
    check_training_dtype(kind, device, cfg.train.seq_len)?;
    Ok((device, kind))
}

/// Every rank must resume the same step (a checkpoint folder not shared by all ranks would make
/// them disagree).
fn agree_on_resume(dist: Option<&Dist>, resumed: Option<&Checkpoint>) -> Result<()> {
    let Some(d) = dist else { return Ok(()) };
    let step = resumed.map_or(-1.0, |c| c.state.step as f64);
    let (oldest, newest) = d.min_max(step, "agreement on the checkpoint to resume")?;
    if oldest != newest {
        bail!(
            "rank {}: the ranks found different checkpoints to resume (this one {step}, newest {newest}, oldest \
             {oldest}): checkpoint.dir must be one folder shared by every rank",
            d.rank(),
        );
    }
    Ok(())
}

/// The data loader, positioned after the last trained row of the global row stream (which every
/// rank reads whole). Under data parallelism the cache is prepared first ([`prepare_cache`]).
fn open_loader(
    cfg: &TrainConfig,
    dcfg: DataConfig,
    dist: Option<&Dist>,
    resumed: Option<&Checkpoint>,
) -> Result<Loader> {
    let tok_path = cfg.model.path.join("tokenizer.json");
    if let Some(d) = dist {
        prepare_cache(d, &dcfg, &tok_path, &cfg.data.cache_dir)?;
    }
    match resumed {
        Some(c) => Loader::restore(dcfg, &tok_path, &cfg.data.cache_dir, c.state.loader.clone()),
        None => Loader::new(dcfg, &tok_path, &cfg.data.cache_dir),
    }
}

/// Tokenize a missing cache once per file system that holds it, the other ranks waiting for the
/// word in the store (hours for a big corpus, longer than any collective timeout): rank 0 first;
/// then, where a node does not see rank 0's cache (`data.cache_dir` on node-local scratch), that
/// node's local rank 0 tokenizes the node's copy while the node's other ranks wait for it.
fn prepare_cache(d: &Dist, dcfg: &DataConfig, tok_path: &Path, cache_dir: &Path) -> Result<()> {
    let wait = |key: &str, who: &str| -> Result<()> {
        let word = d.pg.store_get(key, std::time::Duration::from_secs(7 * 24 * 3600))?;
        if word != "ok" {
            bail!("{who} could not prepare the data cache: {word}");
        }
        Ok(())
    };
    let prepare_and_post = |key: &str| -> Result<()> {
        let prepared = longmix_data::prepare_cache(dcfg, tok_path, cache_dir);
        let word = prepared.as_ref().map_or_else(|e| format!("failed: {e:#}"), |_| "ok".into());
        d.pg.store_set(key, &word)?;
        prepared.map(|_| ())
    };
    // Ranks are numbered node by node (torchrun, SLURM's block distribution).
    let lead = d.rank() - d.launch.local_rank;
    let node_key = format!("data_cache/node-of-rank-{lead}");
    if d.rank() == 0 {
        return prepare_and_post("data_cache");
    }
    wait("data_cache", "rank 0")?;
    if lead == 0 {
        return Ok(());
    }
    if d.rank() == lead {
        if longmix_data::cache::is_built(dcfg, tok_path, cache_dir)? {
            tracing::info!("data cache: rank 0's copy is visible on this node at {}", cache_dir.display());
            return d.pg.store_set(&node_key, "ok");
        }
        tracing::info!(
            "data cache: {} does not hold rank 0's copy on this node (node-local scratch): rank {lead}, this node's \
             local rank 0, tokenizes it while the node's other ranks wait",
            cache_dir.display()
        );
        return prepare_and_post(&node_key);
    }
    tracing::info!("data cache: waiting for rank {lead} (this node's local rank 0) to prepare {}", cache_dir.display());
    wait(&node_key, &format!("rank {lead} (this node's local rank 0)"))
}

/// The model's tokenizer must not name tokens the model lacks.
fn check_tokenizer(cfg: &TrainConfig, model: &ModelConfig) -> Result<()> {
    let tok_vocab = longmix_model::load_tokenizer(&cfg.model.path)?.get_vocab_size(true) as i64;
    if tok_vocab > model.vocab_size {
        bail!(
            "tokenizer.json has {tok_vocab} tokens but the model only {}: tokenizer and model do not match",
            model.vocab_size
        );
    }
    Ok(())
}

impl Trainer {
    /// Everything before the first step. Returns the trainer and its data loader.
    pub fn setup(cfg: TrainConfig, resume: Option<&str>, launch: Option<Launch>) -> Result<(Trainer, Loader)> {
        let (device, kind) = compute_target(&cfg, launch.as_ref())?;
        let world = launch.as_ref().map_or(1, |l| l.world_size);
        let dims = ParallelDims::new(world, &cfg, &ModelConfig::from_dir(&cfg.model.path)?)?;
        let dist = launch.as_ref().map(|l| Dist::init(l, &cfg.distributed, device)).transpose()?;
        // Weights load in float32 (the optimizer's masters); the model then computes in `kind`.
        let mut lm = load_model(&cfg.model.path, Kind::Float, device)?;
        let checkpointer = Checkpointer::new(&cfg.checkpoint);
        let resumed = checkpointer.resume_point(resume, dist.as_ref().map(|d| d as &dyn Team))?;
        agree_on_resume(dist.as_ref(), resumed.as_ref())?;
        let extension = match &resumed {
            Some(c) => c.state.rope.clone(),
            None => resolve_extension(&cfg, &lm.model.config)?,
        };
        extension.check(&lm.model.config.rope).context("the checkpoint's extension")?;
        if let Some(note) = extension.sliding_window_note(lm.model.config.sliding_window) {
            tracing::info!("{note}");
        }
        extension.apply(&mut lm.model.config);
        check_run(&cfg, &extension)?;
        check_tokenizer(&cfg, &lm.model.config)?;
        let dcfg = data_config(&cfg, &extension, &lm.model.config);
        let loader = open_loader(&cfg, dcfg, dist.as_ref(), resumed.as_ref())?;
        let evaluator = Evaluator::new(&loader, &cfg.eval);
        let mem = memory_options(&cfg);
        let mut engine =
            StepEngine::new(&mut lm.vs, dist, dims, cfg.optim.clone(), kind, mem, cfg.train.micro_batch_rows)?;
        let mut state = TrainerState { step: 0, tokens_seen: 0, loader: loader.state(), rope: extension.clone() };
        if let Some(c) = resumed {
            c.load_weights(&lm)?;
            c.load_optimizer(&mut engine.opt)?;
            tracing::info!("resumed from {} at step {}", c.dir.display(), c.state.step);
            state = c.state;
        }
        let total_steps = cfg.total_steps(dims.dp);
        let schedule = Schedule::new(&cfg, total_steps);
        engine.parallel.check_ranks_agree(&engine.params, "set-up")?;
        let trainer = Trainer { cfg, lm, extension, engine, schedule, state, total_steps, evaluator, checkpointer };
        Ok((trainer, loader))
    }

    /// Rows of one global step.
    pub fn rows_per_step(&self) -> usize {
        self.cfg.rows_per_step(self.engine.parallel.data_group().1)
    }

    /// One optimizer step over the global batch `rows`; `stop` is this rank's stop request.
    pub fn train_step(&mut self, rows: &[Row], stop: bool, data_wait_s: f64) -> Result<StepOutcome> {
        let batch = Batch {
            rows,
            step: self.state.step + 1,
            lr: self.schedule.lr(self.state.step),
            stop,
            data_wait_s,
            tokens_seen: self.state.tokens_seen,
        };
        let out = self.engine.step(&self.lm.model, &batch)?;
        self.state.step = out.stats.step;
        self.state.tokens_seen = out.stats.tokens_seen;
        Ok(out)
    }

    /// A warning when a finished step shows a model that stopped learning: a gradient norm of
    /// exactly 0 while the loss is not 0 (seen with a far too high learning rate: the weights
    /// collapse and the loss sits at ln(vocabulary), a uniform guess).
    pub fn collapse_warning(&self, s: &StepStats) -> Option<String> {
        if s.grad_norm != 0.0 || s.loss == 0.0 {
            return None;
        }
        let uniform = (self.lm.model.config.vocab_size as f64).ln();
        let note = if (s.loss - uniform).abs() < 0.01 * uniform {
            " = ln(vocabulary), a uniform guess".to_string()
        } else {
            String::new()
        };
        Some(format!(
            "step {}: the gradient norm is 0 at loss {:.4}{note}: the model has collapsed and stopped learning; \
             lower optim.lr or enable optim.grad_clip and restart from an earlier checkpoint",
            s.step, s.loss
        ))
    }

    /// Held-out loss of the current weights.
    pub fn evaluate(&self, bar: &indicatif::ProgressBar) -> Result<HeldOut> {
        self.evaluator.evaluate(&self.lm.model, &self.engine.parallel, bar)
    }

    /// Write a checkpoint of the current step (every rank together).
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let (parallel, step) = (&self.engine.parallel, self.state.step);
        parallel.at_step(step);
        parallel.check_ranks_agree(&self.engine.params, "checkpoint")?;
        self.checkpointer.save(&self.cfg, &self.lm, &self.engine.opt, &self.state, parallel.team())
    }

    /// Write the Hugging Face folder of the trained model.
    pub fn export(&self, out: &Path, dtype: &str, shard_mb: u64) -> Result<()> {
        export(&self.lm, &self.cfg.model.path, &self.extension, out, dtype, shard_mb)
    }

    /// Data parallel: wait for every rank and shut the process group down in order.
    pub fn finish(&self) -> Result<()> {
        self.engine.parallel.finish()
    }
}

/// Write the Hugging Face folder of `lm` (loaded from `source`) with its extension.
pub fn export(lm: &LoadedModel, source: &Path, ext: &Extension, out: &Path, dtype: &str, shard_mb: u64) -> Result<()> {
    let opts =
        ExportOptions { dtype: parse_dtype(dtype)?, max_shard_bytes: shard_mb * 1_000_000, rope: Some(ext.clone()) };
    export_hf(&lm.vs, &lm.model.config, Some(source), out, &opts)?;
    println!("exported {} (window {} -> {})", out.display(), ext.original_length, ext.target_length);
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // Second signal: leave at once (the last completed checkpoint stays valid).
        unsafe { libc::_exit(130) };
    }
}

fn install_signal_handlers() {
    // SAFETY: the handler only touches an atomic and calls the async-signal-safe `_exit`.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// The next global batch from the prefetcher: its rows, the loader state after them, and how
/// long the loop waited for them.
fn next_batch(prefetch: &mut Prefetcher, rows: usize) -> (Vec<Row>, LoaderState, f64) {
    let wait = Instant::now();
    let (batch, states): (Vec<Row>, Vec<LoaderState>) = (0..rows).map(|_| prefetch.next_row()).unzip();
    (batch, states.into_iter().last().expect("a step has rows"), wait.elapsed().as_secs_f64())
}

pub fn run(args: Args) -> Result<()> {
    let cfg = TrainConfig::read(&args.config)?;
    let launch = Launch::from_env()?;
    if args.dry_run {
        return plan::dry_run(&cfg, launch.as_ref(), args.world_size);
    }
    let (mut t, loader) = Trainer::setup(cfg, args.resume.as_deref(), launch)?;
    let mut log = RunLog::open(&t)?;
    if t.state.step == 0 {
        log.held_out(&t, "before training")?;
    }
    install_signal_handlers();
    let mut prefetch = Prefetcher::new(loader, t.cfg.data.prefetch);
    let run_start = t.state.step;
    while t.state.step < t.total_steps {
        let (rows, loader_after, data_wait_s) = next_batch(&mut prefetch, t.rows_per_step());
        let out = t.train_step(&rows, STOP.load(Ordering::SeqCst), data_wait_s)?;
        t.state.loader = loader_after;
        let step = out.stats.step;
        log.step(&t, &out.stats)?;
        // The last step's held-out loss comes with the final evaluation below.
        if t.evaluator.due(step) && step < t.total_steps {
            log.periodic_eval(&t)?;
        }
        let stop = out.stop_requested || args.stop_after.is_some_and(|n| step - run_start >= n);
        if t.checkpointer.due(step, t.total_steps, stop) {
            let dir = t.save_checkpoint()?;
            log.note(&format!("checkpoint {}", dir.display()));
        }
        if stop {
            log.stopped(step);
            return t.finish();
        }
    }
    log.held_out(&t, "after training")?;
    if let (Some(e), true) = (&t.cfg.export, t.engine.parallel.is_main()) {
        t.export(&e.dir, &e.dtype, e.max_shard_mb)?;
    }
    t.finish()
}
