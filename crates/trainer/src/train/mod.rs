//! `longmix train`: mixed context window training.
//!
//! The run is split the way torchtitan splits it, so data parallelism can wrap the step without
//! touching the rest:
//!
//! * [`Trainer::setup`]: config -> model with its [`Extension`] -> data loader -> optimizer,
//!   fresh or from a [`Checkpoint`];
//! * [`Trainer::train_step`]: one optimizer step over its rows, each micro-batch through
//!   [`Trainer::forward_backward_step`]; returns [`StepStats`];
//! * [`Trainer::evaluate`]: held-out loss of the short and the long rows;
//! * [`Trainer::save_checkpoint`] and [`Trainer::export`];
//! * [`run`]: the loop (progress, metrics, periodic eval and checkpoints, signals, finish).
//!
//! Data parallelism wraps the step (see `distributed.rs`): every rank plans the same global
//! batch of rows, trains its share, and the gradients are summed over the ranks while the
//! backward runs; the loss is normalised by the target tokens of the whole global step, so
//! N ranks compute what one process would with the same global batch.
//!
//! Short rows (documents <= L0) run with the short factors, long rows with the long factors;
//! the model decides per row from its positions and reports the window it used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longmix_data::{DataConfig, Loader, Prefetcher, Row};
use longmix_model::{
    export_hf, load_model, ExportOptions, Extension, LoadedModel, MemoryOptions, Phases, StepLoss, Window,
};
use longmix_torch_ext::c10d::ReduceOp;
use longmix_torch_ext::cuda::{self, CudaMemory};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Checkpoint, Team, TrainerState};
use crate::config::TrainConfig;
use crate::device::{check_training_dtype, compute_dtype, parse_device, parse_dtype};
use crate::distributed::{self, Dist, GradSync, Launch};
use crate::grads::Grads;
use crate::metrics::{peak_rss_mb, Metrics};
use crate::optim::{self, AdamW};

mod plan;
use crate::schedule::Schedule;

#[derive(clap::Args)]
pub struct Args {
    /// The run's TOML file.
    #[arg(long)]
    pub config: PathBuf,
    /// Validate everything and print the plan without training.
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
    /// With --dry-run in one process: plan for this many data-parallel ranks (memory per rank,
    /// with `distributed.zero1`; estimated idle time with and without row balancing).
    #[arg(long, requires = "dry_run")]
    pub world_size: Option<usize>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// The step just completed (1-based).
    pub step: u64,
    /// Mean NLL over every target token of the step.
    pub loss: f64,
    pub loss_short: Option<f64>,
    pub loss_long: Option<f64>,
    /// Rows the model ran with the short / long factors.
    pub rows_short: usize,
    pub rows_long: usize,
    /// Rows whose loader label disagrees with the model's window (a data bug when not 0).
    pub window_mismatches: usize,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Row tokens of the step (padding included).
    pub tokens: u64,
    pub tokens_seen: u64,
    pub seconds: f64,
    /// This rank's forward + backward time.
    pub compute_s: f64,
    /// This rank's time building gradient buckets and launching their reductions.
    pub comm_launch_s: f64,
    /// This rank's wait for the gradient reduction after its backward (unhidden
    /// communication plus waiting for slower ranks).
    pub comm_wait_s: f64,
    /// Per rank (data parallel only): forward + backward seconds and reduction wait seconds.
    pub rank_compute_s: Vec<f64>,
    pub rank_wait_s: Vec<f64>,
    /// Per rank (data parallel only): peak resident memory in MB.
    pub rank_peak_rss_mb: Vec<f64>,
    /// Whether any rank was asked to stop (SIGINT/SIGTERM); all ranks stop at the same step.
    pub stop_requested: bool,
    /// This rank's forward / LM head / backward seconds, summed over its micro-batches (on CUDA
    /// as the host saw them: kernels still queued count in the next phase).
    pub phases: Phases,
    /// Gradient norm, AdamW update and (ZeRO-1) parameter broadcast, seconds.
    pub optimizer_s: f64,
    /// This rank's GPU memory, its peak over this step (None on CPU).
    pub cuda_memory: Option<CudaMemory>,
    /// Seconds the loop waited for the prefetcher's rows before the step (set by the loop).
    pub data_wait_s: f64,
}

/// Held-out mean NLL of the short and of the long rows (None for a kind without rows).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOut {
    pub short: Option<f64>,
    pub long: Option<f64>,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub lm: LoadedModel,
    pub extension: Extension,
    opt: AdamW,
    schedule: Schedule,
    mem: MemoryOptions,
    device: Device,
    pub state: TrainerState,
    pub total_steps: u64,
    eval_short: Vec<Row>,
    eval_long: Vec<Row>,
    /// Every parameter, sorted by name (the order all ranks share).
    params: Vec<(String, Tensor)>,
    /// Their float32 gradients, in that order.
    grads: Grads,
    /// Data parallelism (None for a single process).
    pub dist: Option<Dist>,
    sync: Option<GradSync>,
    /// ZeRO-1: the rank updating each parameter.
    owner: Option<BTreeMap<String, usize>>,
}

impl Team for Dist {
    fn rank(&self) -> usize {
        Dist::rank(self)
    }
    fn world(&self) -> usize {
        Dist::world(self)
    }
    fn sharded_optimizer(&self) -> bool {
        self.cfg.zero1
    }
    fn failed(&self, ok: bool, step: u64) -> Result<Vec<usize>> {
        // On the store: rank 0 writes the weights and may take longer than a collective waits.
        self.agree(ok, &format!("checkpoint of step {step}"))
    }
}

pub fn data_config(cfg: &TrainConfig, ext: &Extension, lm: &LoadedModel) -> DataConfig {
    DataConfig {
        sources: cfg.data.sources.clone(),
        seq_len: cfg.train.seq_len,
        l0: ext.original_length as usize,
        short_share: cfg.data.short_share,
        seed: cfg.train.seed,
        eval_fraction: cfg.data.eval_fraction,
        add_bos: cfg.data.add_bos,
        bos_id: lm.model.config.bos_token_id.map(|x| x as u32),
        add_eos: cfg.data.add_eos,
        eos_id: lm.model.config.eos_token_id.map(|x| x as u32),
        pad_id: None,
    }
}

/// Rows -> `[B, T]` input, position and target tensors on `device`.
fn batch(rows: &[&Row], device: Device) -> (Tensor, Tensor, Tensor) {
    let stack = |f: fn(&Row) -> &Vec<i64>| {
        let parts: Vec<Tensor> = rows.iter().map(|r| Tensor::from_slice(f(r))).collect();
        Tensor::stack(&parts, 0).to_device(device)
    };
    (stack(|r| &r.input_ids), stack(|r| &r.position_ids), stack(|r| &r.targets))
}

/// A progress bar for a held-out evaluation of `rows` rows on its own line.
fn eval_bar(rows: usize, hidden: bool) -> ProgressBar {
    let bar = if hidden { ProgressBar::hidden() } else { ProgressBar::new(rows as u64) };
    bar.set_style(
        ProgressStyle::with_template("held-out eval {bar:20} {pos}/{len} rows  {elapsed}  eta {eta}").unwrap(),
    );
    bar
}

/// The checkpoint `--resume ARG` names (None: `auto` with no checkpoint yet, start fresh).
fn find_resume(cfg: &TrainConfig, arg: &str) -> Result<Option<PathBuf>> {
    if arg == "auto" {
        return Ok(checkpoint::latest_valid(&cfg.checkpoint.dir));
    }
    find_named(cfg, arg).map(Some)
}

fn find_named(cfg: &TrainConfig, arg: &str) -> Result<PathBuf> {
    if arg == "latest" {
        return checkpoint::latest_valid(&cfg.checkpoint.dir).ok_or_else(|| {
            anyhow::anyhow!(
                "--resume: no valid checkpoint under {}; start without --resume",
                cfg.checkpoint.dir.display()
            )
        });
    }
    let dir = PathBuf::from(arg);
    checkpoint::verify(&dir).with_context(|| format!("--resume {}: not a complete checkpoint", dir.display()))?;
    Ok(dir)
}

impl Trainer {
    /// Everything before the first step: process group, model, extension, data, optimizer,
    /// resumed state. Returns the trainer and its data loader (positioned after the last
    /// trained row of the global row stream, which every rank reads whole).
    pub fn setup(cfg: TrainConfig, resume: Option<&str>, launch: Option<Launch>) -> Result<(Trainer, Loader)> {
        // Several ranks on one machine share its cores instead of each spinning on all of them.
        let local = launch
            .as_ref()
            .map_or(1, |l| std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(l.world_size));
        tch::set_num_threads(crate::device::intra_op_threads(cfg.model.threads, local));
        tch::manual_seed(cfg.train.seed as i64);
        let mut device = parse_device(&cfg.model.device).context("key `model.device`")?;
        if let Some(l) = &launch {
            device = distributed::rank_device(device, l, tch::Cuda::device_count() as usize)?;
        }
        let kind = compute_dtype(&cfg.model.dtype, device).context("key `model.dtype`")?;
        check_training_dtype(kind, device, cfg.train.seq_len)?;
        let dist = launch.as_ref().map(|l| Dist::init(l, &cfg.distributed, device)).transpose()?;
        let world = dist.as_ref().map_or(1, |d| d.world());
        if cfg.rows_per_step(world) < world {
            bail!(
                "key `train.global_batch_rows`: {} rows per step cannot give each of {world} ranks a row; use at least {world}",
                cfg.rows_per_step(world)
            );
        }

        // Weights load in float32 (the optimizer's masters); the model then computes in `kind`.
        let mut lm = load_model(&cfg.model.path, Kind::Float, device)?;
        let resumed = match resume {
            Some(a) => find_resume(&cfg, a)?.map(|d| Checkpoint::load(&d)).transpose()?,
            None => None,
        };
        if let Some(d) = &dist {
            // Every rank must resume the same step (a checkpoint folder not shared by all ranks
            // would make them disagree).
            let step = resumed.as_ref().map_or(-1.0, |c| c.state.step as f64);
            let (oldest, newest) = d.min_max(step, 0, "agreement on the checkpoint to resume")?;
            if oldest != newest {
                bail!(
                    "rank {}: the ranks found different checkpoints to resume (this one {step}, newest {newest}, oldest \
                     {oldest}): checkpoint.dir must be one folder shared by every rank",
                    d.rank(),
                );
            }
        }
        if resumed.is_none() && !checkpoint::list(&cfg.checkpoint.dir).is_empty() && resume != Some("auto") {
            bail!(
                "{} already holds checkpoints: pass --resume to continue that run, or set checkpoint.dir to a new folder",
                cfg.checkpoint.dir.display()
            );
        }
        if let Some(e) = &cfg.export {
            if e.dir.exists() {
                bail!("key `export.dir`: {} already exists; remove it or choose another folder", e.dir.display());
            }
        }
        let extension = match &resumed {
            Some(c) => c.state.rope.clone(),
            None => Extension {
                keep_sliding_window: cfg.rope.keep_sliding_window,
                ..Extension::resolve(&cfg.extension_spec(), &lm.model.config.rope).map_err(|e| {
                    let e = format!("{e:#}");
                    match e.strip_prefix("target length: ") {
                        Some(rest) => anyhow::anyhow!("key `rope.target_length`: {rest}"),
                        None => anyhow::anyhow!("key `rope`: {e}"),
                    }
                })?
            },
        };
        extension.check(&lm.model.config.rope).context("the checkpoint's extension")?;
        if let Some(note) = extension.sliding_window_note(lm.model.config.sliding_window) {
            tracing::info!("{note}");
        }
        extension.apply(&mut lm.model.config);
        if cfg.train.seq_len as i64 > extension.target_length {
            bail!("key `train.seq_len`: {} exceeds rope.target_length {}", cfg.train.seq_len, extension.target_length);
        }
        let tok_path = cfg.model.path.join("tokenizer.json");
        let tok_vocab = longmix_model::load_tokenizer(&cfg.model.path)?.get_vocab_size(true) as i64;
        if tok_vocab > lm.model.config.vocab_size {
            bail!(
                "tokenizer.json has {tok_vocab} tokens but the model only {}: tokenizer and model do not match",
                lm.model.config.vocab_size
            );
        }
        let dcfg = data_config(&cfg, &extension, &lm);
        if let Some(d) = &dist {
            // Rank 0 tokenizes a missing cache (hours for a big corpus, longer than any
            // collective timeout); the others wait for its word in the store, then open it.
            if d.rank() == 0 {
                let prepared = longmix_data::prepare_cache(&dcfg, &tok_path, &cfg.data.cache_dir);
                let word = prepared.as_ref().map_or_else(|e| format!("failed: {e:#}"), |_| "ok".into());
                d.pg.store_set("data_cache", &word)?;
                prepared?;
            } else {
                let word = d.pg.store_get("data_cache", std::time::Duration::from_secs(7 * 24 * 3600))?;
                if word != "ok" {
                    bail!("rank 0 could not prepare the data cache: {word}");
                }
            }
        }
        let loader = match &resumed {
            Some(c) => Loader::restore(dcfg, &tok_path, &cfg.data.cache_dir, c.state.loader.clone())?,
            None => Loader::new(dcfg, &tok_path, &cfg.data.cache_dir)?,
        };
        let total_steps = cfg.total_steps(world);
        let eval_short = loader.eval_rows(Window::Short, cfg.eval.short_rows).unwrap_or_default();
        let eval_long = loader.eval_rows(Window::Long, cfg.eval.long_rows).unwrap_or_default();
        let mut params: Vec<(String, Tensor)> = lm.vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let owner = dist.as_ref().filter(|d| d.cfg.zero1).map(|d| distributed::owners(&params, d.world()));
        let rank = dist.as_ref().map_or(0, |d| d.rank());
        let mine: BTreeMap<String, Tensor> = params
            .iter()
            .filter(|(n, _)| owner.as_ref().is_none_or(|o| o[n] == rank))
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let mut opt = AdamW::new(cfg.optim.clone(), mine, kind);
        lm.vs.set_kind(kind);
        let grads = Grads::new(&params);
        let sync = dist.as_ref().map(|d| GradSync::new(&params, (d.cfg.bucket_mb * 1e6) as usize, owner.as_ref()));
        let mut state = TrainerState { step: 0, tokens_seen: 0, loader: loader.state(), rope: extension.clone() };
        if let Some(c) = resumed {
            c.load_weights(&lm)?;
            c.load_optimizer(&mut opt)?;
            tracing::info!("resumed from {} at step {}", c.dir.display(), c.state.step);
            state = c.state;
        }
        let schedule = Schedule {
            peak_lr: cfg.optim.lr,
            min_lr: cfg.optim.lr * cfg.schedule.min_lr_ratio,
            warmup_steps: cfg.schedule.warmup_steps,
            total_steps,
            decay: cfg.schedule.decay,
        };
        let mem = MemoryOptions {
            checkpoint_layers: cfg.train.checkpoint_layers,
            loss_chunk: (cfg.train.loss_chunk > 0).then_some(cfg.train.loss_chunk),
            sync_phases: false,
        };
        let trainer = Trainer {
            cfg,
            lm,
            extension,
            opt,
            schedule,
            mem,
            device,
            state,
            total_steps,
            eval_short,
            eval_long,
            params,
            grads,
            dist,
            sync,
            owner,
        };
        trainer.check_ranks_agree("set-up")?;
        Ok((trainer, loader))
    }

    /// This process's rank and the world size ((0, 1) for a single process).
    fn rank_world(&self) -> (usize, usize) {
        self.dist.as_ref().map_or((0, 1), |d| (d.rank(), d.world()))
    }

    fn world(&self) -> usize {
        self.rank_world().1
    }

    /// Whether this process prints, writes metrics and exports (rank 0, or the only process).
    pub fn is_main(&self) -> bool {
        self.rank_world().0 == 0
    }

    /// Data parallel: fail unless every rank holds bitwise the same parameters (an exact
    /// fingerprint, compared with one small all-reduce).
    pub fn check_ranks_agree(&self, when: &str) -> Result<()> {
        let Some(d) = &self.dist else { return Ok(()) };
        // 52 bits, so the fingerprint travels exactly as a float64.
        let fp = (distributed::fingerprint(&self.params) & ((1 << 52) - 1)) as f64;
        let (lo, hi) = d.min_max(fp, self.state.step, "parameter agreement check")?;
        if lo != hi {
            bail!(
                "rank {} at step {} ({when}): the ranks hold different parameters (fingerprints {lo} .. {hi}); the \
                 model files or checkpoint differ between ranks, or a collective misbehaved",
                d.rank(),
                self.state.step,
            );
        }
        Ok(())
    }

    /// Forward and backward of one micro-batch: accumulates the gradient of `scale * summed NLL`,
    /// calling `layer_done(i)` when decoder layer `i`'s gradients are complete.
    pub fn forward_backward_step(&self, rows: &[&Row], scale: f64, layer_done: &mut dyn FnMut(usize)) -> StepLoss {
        let (ids, pos, tgt) = batch(rows, self.device);
        self.lm.model.forward_backward_with(&ids, &pos, &tgt, scale, self.mem, layer_done)
    }

    /// This rank's rows of a global batch (all of them for a single process).
    fn my_rows<'r>(&self, rows: &'r [Row]) -> Vec<&'r Row> {
        let Some(d) = &self.dist else { return rows.iter().collect() };
        let costs: Vec<f64> = rows.iter().map(|r| distributed::row_cost(r, &self.lm.model.config)).collect();
        let shares = distributed::assign_rows(&costs, d.world(), d.cfg.balance);
        shares[d.rank()].iter().map(|&i| &rows[i]).collect()
    }

    /// One optimizer step over the global batch `rows` (this rank trains its share). The loss
    /// is the mean over all target tokens of the global step. A non-finite loss or gradient
    /// stops the run (on every rank) before the weights change, so the last checkpoint stays
    /// the latest good one. `stop` is this rank's stop request, agreed on with the others.
    pub fn train_step(&mut self, rows: &[Row], stop: bool) -> Result<StepStats> {
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let step_targets: usize = rows.iter().map(|r| r.n_targets).sum();
        let scale = 1.0 / step_targets.max(1) as f64;
        let mine = self.my_rows(rows);
        self.grads.zero();
        // Per window: summed NLL, scored tokens, rows; then window mismatches.
        let mut sums = [0.0f64; 7];
        let mut phases = Phases::default();
        let micro: Vec<&[&Row]> = mine.chunks(self.cfg.train.micro_batch_rows).collect();
        let overlap = self.dist.as_ref().is_some_and(|d| d.cfg.overlap);
        let mut inflight = match (&self.sync, &self.dist) {
            (Some(s), Some(d)) => Some(s.begin(&d.pg, &self.grads)),
            _ => None,
        };
        for (k, mb) in micro.iter().enumerate() {
            // The last micro-batch's gradients are final: reduce them layer by layer.
            let grads = &self.grads;
            let out = match inflight.as_mut().filter(|_| overlap && k + 1 == micro.len()) {
                Some(f) => self.forward_backward_step(mb, scale, &mut |i| {
                    grads.fold_layer(i);
                    f.layer_done(i)
                }),
                None => self.forward_backward_step(mb, scale, &mut |i| grads.fold_layer(i)),
            };
            grads.fold_all();
            phases.add(&out.phases);
            for (i, w) in out.windows.iter().enumerate() {
                let o = 3 * (*w == Window::Long) as usize;
                sums[o] += out.loss.row_nll[i];
                sums[o + 1] += out.loss.row_tokens[i] as f64;
                sums[o + 2] += 1.0;
                sums[6] += (mb[i].kind != *w) as usize as f64;
            }
        }
        let compute_s = t0.elapsed().as_secs_f64();
        let (mut comm_wait_s, mut comm_launch_s) = (0.0, 0.0);
        let (mut rank_compute_s, mut rank_wait_s, mut rank_peak_rss_mb) = (Vec::new(), Vec::new(), Vec::new());
        let mut stop_requested = stop;
        if let (Some(f), Some(d)) = (inflight, &self.dist) {
            let times = f.finish().map_err(|e| d.failure(step, "gradient all-reduce", e))?;
            (comm_wait_s, comm_launch_s) = (times.wait_s, times.launch_s);
            // Losses, counts, timings and stop requests of every rank in one reduction.
            let w = d.world();
            let mut v = vec![0.0; 8 + 3 * w];
            v[..7].copy_from_slice(&sums);
            v[7] = stop as u8 as f64;
            v[8 + d.rank()] = compute_s;
            v[8 + w + d.rank()] = comm_wait_s;
            v[8 + 2 * w + d.rank()] = peak_rss_mb();
            d.reduce_f64(&mut v, ReduceOp::Sum, step, "step statistics reduction")?;
            sums.copy_from_slice(&v[..7]);
            stop_requested = v[7] > 0.0;
            rank_compute_s = v[8..8 + w].to_vec();
            rank_wait_s = v[8 + w..8 + 2 * w].to_vec();
            rank_peak_rss_mb = v[8 + 2 * w..].to_vec();
        }
        let loss = (sums[0] + sums[3]) / step_targets.max(1) as f64;
        let t_opt = Instant::now();
        let all_grads = self.grads.all();
        let grad_norm = match (&self.owner, &self.dist) {
            // ZeRO-1: each rank holds the summed gradients of its own parameters only.
            (Some(owner), Some(d)) => {
                let mine = self.params.iter().zip(&all_grads).filter(|((n, _), _)| owner[n] == d.rank());
                let norm = optim::grad_norm(mine.map(|(_, g)| g));
                let mut sq = [norm * norm];
                d.reduce_f64(&mut sq, ReduceOp::Sum, step, "gradient norm reduction")?;
                sq[0].sqrt()
            }
            _ => optim::grad_norm(&all_grads),
        };
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "step {step}: the loss is {loss} and the gradient norm {grad_norm}: training diverged. Nothing was saved or \
                 exported for this step; the latest checkpoint is the last good one. Lower optim.lr, enable \
                 optim.grad_clip, or train in f32, then resume with --resume"
            );
        }
        let lr = self.schedule.lr(self.state.step);
        let by_name: BTreeMap<String, Tensor> =
            self.params.iter().zip(all_grads).map(|((n, _), g)| (n.clone(), g)).collect();
        self.opt.step(lr, grad_norm, &by_name);
        if let (Some(owner), Some(d)) = (&self.owner, &self.dist) {
            distributed::broadcast_owned(&d.pg, &self.params, owner)
                .map_err(|e| d.failure(step, "ZeRO-1 parameter broadcast", e))?;
        }
        let optimizer_s = t_opt.elapsed().as_secs_f64();
        let cuda_memory = match self.device {
            Device::Cuda(d) => {
                let m = cuda::memory(d)?;
                cuda::reset_peak(d)?;
                Some(m)
            }
            _ => None,
        };
        self.state.step = step;
        let tokens = (rows.len() * self.cfg.train.seq_len) as u64;
        self.state.tokens_seen += tokens;
        let kind_loss = |o: usize| (sums[o + 1] > 0.0).then(|| sums[o] / sums[o + 1]);
        Ok(StepStats {
            step,
            loss,
            loss_short: kind_loss(0),
            loss_long: kind_loss(3),
            rows_short: sums[2] as usize,
            rows_long: sums[5] as usize,
            window_mismatches: sums[6] as usize,
            lr,
            grad_norm,
            tokens,
            tokens_seen: self.state.tokens_seen,
            seconds: t0.elapsed().as_secs_f64(),
            compute_s,
            comm_launch_s,
            comm_wait_s,
            rank_compute_s,
            rank_wait_s,
            rank_peak_rss_mb,
            stop_requested,
            phases,
            optimizer_s,
            cuda_memory,
            data_wait_s: 0.0,
        })
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

    /// Held-out mean NLL of the short and the long eval rows (shared out over the ranks);
    /// `bar` counts this rank's rows (a long row's forward takes a minute on a small CPU).
    pub fn evaluate(&self, bar: &ProgressBar) -> Result<HeldOut> {
        let (rank, world) = self.rank_world();
        let sums = |rows: &[Row]| {
            let (mut nll, mut n) = (0.0, 0);
            for r in rows.iter().skip(rank).step_by(world) {
                let (ids, pos, tgt) = batch(&[r], self.device);
                let l = self.lm.model.nll(&ids, &pos, &tgt);
                nll += l.sum();
                n += l.tokens();
                bar.inc(1);
            }
            (nll, n as f64)
        };
        let (s, l) = (sums(&self.eval_short), sums(&self.eval_long));
        let mut v = [s.0, s.1, l.0, l.1];
        if let Some(d) = &self.dist {
            d.reduce_f64(&mut v, ReduceOp::Sum, self.state.step, "held-out evaluation")?;
        }
        let mean = |rows: &[Row], nll: f64, n: f64| (!rows.is_empty()).then(|| nll / n.max(1.0));
        Ok(HeldOut { short: mean(&self.eval_short, v[0], v[1]), long: mean(&self.eval_long, v[2], v[3]) })
    }

    /// Rows this rank evaluates.
    pub fn eval_rows(&self) -> usize {
        let (rank, world) = self.rank_world();
        let mine = |n: usize| (n + world - 1 - rank) / world;
        mine(self.eval_short.len()) + mine(self.eval_long.len())
    }

    /// Write a checkpoint of the current step (every rank together) and prune old ones.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        self.check_ranks_agree("checkpoint")?;
        let team = self.dist.as_ref().map(|d| d as &dyn Team);
        let dir = Checkpoint::save(&self.cfg.checkpoint.dir, &self.cfg, &self.lm, &self.opt, &self.state, team)?;
        if self.is_main() {
            checkpoint::prune(&self.cfg.checkpoint.dir, self.cfg.checkpoint.keep)?;
        }
        Ok(dir)
    }

    /// A warning when the checkpoint folder's file system cannot hold `keep + 1` checkpoints.
    pub fn checkpoint_space_warning(&self) -> Option<String> {
        // The folder may not exist yet: ask the file system of its nearest existing ancestor.
        let dir = self.cfg.checkpoint.dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("."));
        let bytes = Checkpoint::size_estimate(&self.lm, &self.opt);
        checkpoint::space_warning(dir, bytes, self.cfg.checkpoint.keep)
    }

    /// Data parallel: wait for every rank and shut the process group down in order.
    pub fn finish(&self) -> Result<()> {
        self.dist.as_ref().map_or(Ok(()), Dist::finish)
    }

    /// Write the Hugging Face folder of the trained model.
    pub fn export(&self, out: &Path, dtype: &str, shard_mb: u64) -> Result<()> {
        export(&self.lm, &self.cfg.model.path, &self.extension, out, dtype, shard_mb)
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

/// Log a warning (above the progress bar) and record it in the metrics.
fn warn(metrics: &mut Option<Metrics>, step: u64, w: &str, bar: Option<&ProgressBar>) -> Result<()> {
    match bar {
        Some(b) => b.suspend(|| tracing::warn!("{w}")),
        None => tracing::warn!("{w}"),
    }
    metrics.as_mut().map_or(Ok(()), |m| m.warning(step, w))
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.4}"))
}

pub fn run(args: Args) -> Result<()> {
    let cfg = TrainConfig::read(&args.config)?;
    let launch = Launch::from_env()?;
    let (mut t, loader) = Trainer::setup(cfg, args.resume.as_deref(), launch)?;
    let main = t.is_main();
    if args.dry_run {
        if main {
            let world = args.world_size.unwrap_or(t.world());
            if t.dist.is_some() && world != t.world() {
                bail!("--world-size {world}: this run already has {} ranks; leave --world-size out", t.world());
            }
            t.print_plan(loader, world);
            if let Some(w) = t.checkpoint_space_warning() {
                println!("  warning        {w}");
            }
            println!("dry run: configuration is valid");
        }
        return Ok(());
    }
    // Rank 0 alone writes metrics and shows progress.
    let mut metrics = match (main, t.state.step) {
        (false, _) => None,
        (true, 0) => Some(Metrics::create(&t.cfg.metrics_path())?),
        (true, step) => Some(Metrics::resume(&t.cfg.metrics_path(), step)?),
    };
    if let Some(w) = t.checkpoint_space_warning().filter(|_| main) {
        warn(&mut metrics, t.state.step, &w, None)?;
    }
    let hide = t.cfg.log.no_progress || !main;
    if t.state.step == 0 {
        let bar = eval_bar(t.eval_rows(), hide);
        let h = t.evaluate(&bar)?;
        bar.finish_and_clear();
        if let Some(m) = metrics.as_mut() {
            m.eval(0, h.short, h.long)?;
            println!("held-out loss before training: short {}  long {}", fmt_opt(h.short), fmt_opt(h.long));
        }
    }

    install_signal_handlers();
    let mut prefetch = Prefetcher::new(loader, t.cfg.data.prefetch);
    let bar = if hide { ProgressBar::hidden() } else { ProgressBar::new(t.total_steps) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}").unwrap());
    bar.set_position(t.state.step);
    let run_start = t.state.step;
    let rows_per_step = t.cfg.rows_per_step(t.world());
    while t.state.step < t.total_steps {
        let mut rows = Vec::with_capacity(rows_per_step);
        let mut loader_after = None;
        let wait = Instant::now();
        for _ in 0..rows_per_step {
            let (row, after) = prefetch.next_row();
            rows.push(row);
            loader_after = Some(after);
        }
        let data_wait_s = wait.elapsed().as_secs_f64();
        let s = StepStats { data_wait_s, ..t.train_step(&rows, STOP.load(Ordering::SeqCst))? };
        t.state.loader = loader_after.expect("a step has rows");
        if let Some(m) = metrics.as_mut() {
            m.step(&s)?;
        }
        if s.window_mismatches > 0 {
            let w = format!(
                "step {}: {} row(s) were built for one RoPE window and run in the other (data l0 and model L0 disagree)",
                s.step, s.window_mismatches
            );
            warn(&mut metrics, s.step, &w, Some(&bar))?;
        }
        if let Some(w) = t.collapse_warning(&s).filter(|_| main) {
            warn(&mut metrics, s.step, &w, Some(&bar))?;
        }
        bar.set_message(format!(
            "loss {:.4}  {:.0} tok/s  peak RSS {:.0} MB",
            s.loss,
            s.tokens as f64 / s.seconds,
            peak_rss_mb()
        ));
        bar.inc(1);
        if t.cfg.eval.every > 0 && s.step.is_multiple_of(t.cfg.eval.every) {
            bar.set_message(format!("held-out eval of {} rows", t.eval_rows()));
            let h = t.evaluate(&ProgressBar::hidden())?;
            if let Some(m) = metrics.as_mut() {
                m.eval(s.step, h.short, h.long)?;
                bar.println(format!(
                    "step {}: held-out loss short {}  long {}",
                    s.step,
                    fmt_opt(h.short),
                    fmt_opt(h.long)
                ));
            }
        }
        let stop_now = s.stop_requested || args.stop_after.is_some_and(|n| s.step - run_start >= n);
        let periodic = t.cfg.checkpoint.every > 0 && s.step.is_multiple_of(t.cfg.checkpoint.every);
        if periodic || stop_now || s.step == t.total_steps {
            let dir = t.save_checkpoint()?;
            if main {
                bar.println(format!("checkpoint {}", dir.display()));
            }
        }
        if stop_now {
            bar.abandon();
            if main {
                println!("stopped at step {} (resume with --resume)", s.step);
            }
            return t.finish();
        }
    }
    bar.finish();
    let bar = eval_bar(t.eval_rows(), hide);
    let h = t.evaluate(&bar)?;
    bar.finish_and_clear();
    if let Some(m) = metrics.as_mut() {
        m.eval(t.state.step, h.short, h.long)?;
        println!("held-out loss after training:  short {}  long {}", fmt_opt(h.short), fmt_opt(h.long));
    }
    if let Some(d) = &t.dist {
        if main {
            println!("parameters identical on all {} ranks (checked at every checkpoint)", d.world());
        }
    }
    if let (Some(e), true) = (&t.cfg.export, main) {
        t.export(&e.dir, &e.dtype, e.max_shard_mb)?;
    }
    t.finish()
}
