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
//! Short rows (documents <= L0) run with the short factors, long rows with the long factors;
//! the model decides per row from its positions and reports the window it used.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longmix_data::{DataConfig, Loader, Prefetcher, Row};
use longmix_model::{export_hf, load_model, ExportOptions, Extension, LoadedModel, MemoryOptions, StepLoss, Window};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Checkpoint, TrainerState};
use crate::config::TrainConfig;
use crate::device::{parse_device, parse_dtype};
use crate::metrics::{peak_rss_mb, Metrics};
use crate::optim::AdamW;
use crate::schedule::Schedule;

#[derive(clap::Args)]
pub struct Args {
    /// The run's TOML file.
    #[arg(long)]
    pub config: PathBuf,
    /// Validate everything and print the plan without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Resume from the newest valid checkpoint (`--resume`) or from a given one (`--resume DIR`).
    #[arg(long, num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Stop (with a checkpoint) after this many steps of this invocation.
    #[arg(long)]
    pub stop_after: Option<u64>,
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
fn batch(rows: &[Row], device: Device) -> (Tensor, Tensor, Tensor) {
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

fn find_resume(cfg: &TrainConfig, arg: &str) -> Result<PathBuf> {
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
    /// Everything before the first step: model, extension, data, optimizer, resumed state.
    /// Returns the trainer and its data loader (positioned after the last trained row).
    pub fn setup(cfg: TrainConfig, resume: Option<&str>) -> Result<(Trainer, Loader)> {
        if let Some(n) = cfg.model.threads {
            tch::set_num_threads(n);
        }
        tch::manual_seed(cfg.train.seed as i64);
        let device = parse_device(&cfg.model.device).context("key `model.device`")?;
        let kind = parse_dtype(&cfg.model.dtype).context("key `model.dtype`")?;

        // Weights load in float32 (the optimizer's masters); the model then computes in `kind`.
        let mut lm = load_model(&cfg.model.path, Kind::Float, device)?;
        let resumed = resume.map(|a| find_resume(&cfg, a)).transpose()?.map(|d| Checkpoint::load(&d)).transpose()?;
        if resumed.is_none() && !checkpoint::list(&cfg.checkpoint.dir).is_empty() {
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
            None => Extension::resolve(&cfg.extension_spec(), &lm.model.config.rope).map_err(|e| {
                let e = format!("{e:#}");
                match e.strip_prefix("target length: ") {
                    Some(rest) => anyhow::anyhow!("key `rope.target_length`: {rest}"),
                    None => anyhow::anyhow!("key `rope`: {e}"),
                }
            })?,
        };
        extension.check(&lm.model.config.rope).context("the checkpoint's extension")?;
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
        let loader = match &resumed {
            Some(c) => Loader::restore(dcfg, &tok_path, &cfg.data.cache_dir, 0, 1, c.state.loader.clone())?,
            None => Loader::new(dcfg, &tok_path, &cfg.data.cache_dir, 0, 1)?,
        };
        let total_steps = cfg.total_steps(1);
        let eval_short = loader.eval_rows(Window::Short, cfg.eval.short_rows).unwrap_or_default();
        let eval_long = loader.eval_rows(Window::Long, cfg.eval.long_rows).unwrap_or_default();
        let mut opt = AdamW::new(cfg.optim.clone(), lm.vs.variables().into_iter().collect(), kind);
        lm.vs.set_kind(kind);
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
        };
        let trainer =
            Trainer { cfg, lm, extension, opt, schedule, mem, device, state, total_steps, eval_short, eval_long };
        Ok((trainer, loader))
    }

    /// Forward and backward of one micro-batch: accumulates the gradient of `scale * summed NLL`.
    pub fn forward_backward_step(&self, rows: &[Row], scale: f64) -> StepLoss {
        let (ids, pos, tgt) = batch(rows, self.device);
        self.lm.model.forward_backward(&ids, &pos, &tgt, scale, self.mem)
    }

    /// One optimizer step over `rows` (`micro_batch_rows * grad_accum` of them). The loss is the
    /// mean over all target tokens of the step. A non-finite loss or gradient stops the run
    /// before the weights change, so the last checkpoint stays the latest good one.
    pub fn train_step(&mut self, rows: &[Row]) -> Result<StepStats> {
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let step_targets: usize = rows.iter().map(|r| r.n_targets).sum();
        let scale = 1.0 / step_targets.max(1) as f64;
        self.opt.zero_grad();
        let mut by_window = [(0.0f64, 0i64, 0usize); 2];
        let mut mismatches = 0;
        for mb in rows.chunks(self.cfg.train.micro_batch_rows) {
            let out = self.forward_backward_step(mb, scale);
            for (i, w) in out.windows.iter().enumerate() {
                let k = &mut by_window[(*w == Window::Long) as usize];
                k.0 += out.loss.row_nll[i];
                k.1 += out.loss.row_tokens[i];
                k.2 += 1;
                mismatches += (mb[i].kind != *w) as usize;
            }
        }
        let nll: f64 = by_window.iter().map(|k| k.0).sum();
        let loss = nll / step_targets.max(1) as f64;
        let grad_norm = self.opt.grad_norm();
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "step {step}: the loss is {loss} and the gradient norm {grad_norm}: training diverged. Nothing was saved or \
                 exported for this step; the latest checkpoint is the last good one. Lower optim.lr, enable \
                 optim.grad_clip, or train in f32, then resume with --resume"
            );
        }
        let lr = self.schedule.lr(self.state.step);
        self.opt.step(lr, grad_norm);
        self.state.step = step;
        let tokens = (rows.len() * self.cfg.train.seq_len) as u64;
        self.state.tokens_seen += tokens;
        let kind_loss = |k: usize| (by_window[k].1 > 0).then(|| by_window[k].0 / by_window[k].1 as f64);
        Ok(StepStats {
            step,
            loss,
            loss_short: kind_loss(0),
            loss_long: kind_loss(1),
            rows_short: by_window[0].2,
            rows_long: by_window[1].2,
            window_mismatches: mismatches,
            lr,
            grad_norm,
            tokens,
            tokens_seen: self.state.tokens_seen,
            seconds: t0.elapsed().as_secs_f64(),
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

    /// Held-out mean NLL of the short and the long eval rows; `bar` counts rows (a long row's
    /// forward takes a minute on a small CPU).
    pub fn evaluate(&self, bar: &ProgressBar) -> HeldOut {
        let loss = |rows: &[Row]| {
            if rows.is_empty() {
                return None;
            }
            let (mut nll, mut n) = (0.0, 0);
            for r in rows {
                let (ids, pos, tgt) = batch(std::slice::from_ref(r), self.device);
                let l = self.lm.model.nll(&ids, &pos, &tgt);
                nll += l.sum();
                n += l.tokens();
                bar.inc(1);
            }
            Some(nll / n.max(1) as f64)
        };
        HeldOut { short: loss(&self.eval_short), long: loss(&self.eval_long) }
    }

    pub fn eval_rows(&self) -> usize {
        self.eval_short.len() + self.eval_long.len()
    }

    /// Write a checkpoint of the current step and prune old ones.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let dir = Checkpoint::save(&self.cfg.checkpoint.dir, &self.cfg, &self.lm, &self.opt, &self.state)?;
        checkpoint::prune(&self.cfg.checkpoint.dir, self.cfg.checkpoint.keep)?;
        Ok(dir)
    }

    /// A warning when the checkpoint folder's file system cannot hold `keep + 1` checkpoints.
    pub fn checkpoint_space_warning(&self) -> Option<String> {
        // The folder may not exist yet: ask the file system of its nearest existing ancestor.
        let dir = self.cfg.checkpoint.dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("."));
        let bytes = Checkpoint::size_estimate(&self.lm, &self.opt);
        checkpoint::space_warning(dir, bytes, self.cfg.checkpoint.keep)
    }

    /// Write the Hugging Face folder of the trained model.
    pub fn export(&self, out: &Path, dtype: &str, shard_mb: u64) -> Result<()> {
        export(&self.lm, &self.cfg.model.path, &self.extension, out, dtype, shard_mb)
    }

    fn print_plan(&self, loader: &Loader) {
        let (cfg, lm, ext) = (&self.cfg, &self.lm, &self.extension);
        let c = &lm.model.config;
        let params: i64 = lm.vs.variables().values().map(|t| t.numel() as i64).sum();
        let t = &cfg.train;
        let rows = t.micro_batch_rows * t.grad_accum;
        let kind = parse_dtype(&cfg.model.dtype).unwrap_or(Kind::Float);
        let bytes = kind.elt_size_in_bytes() as f64;
        // Weights + grads in the compute dtype, AdamW moments (+ masters unless f32) in float32.
        let state_gb = params as f64 * (2.0 * bytes + self.opt.state_bytes_per_element() as f64) / 1e9;
        // Activations: with layer checkpointing one hidden state per layer plus one layer's
        // working set (~34 hidden-sized tensors); without, all layers' working sets.
        let tokens = (t.micro_batch_rows * t.seq_len) as f64;
        let per_layer = tokens * c.hidden_size as f64 * bytes * 34.0;
        let act_gb = if t.checkpoint_layers {
            (tokens * c.hidden_size as f64 * bytes * c.num_hidden_layers as f64 + per_layer) / 1e9
        } else {
            per_layer * c.num_hidden_layers as f64 / 1e9
        };
        let head_tokens = if t.loss_chunk > 0 { (t.loss_chunk as f64).min(tokens) } else { tokens };
        let head_gb = head_tokens * c.vocab_size as f64 * 4.0 * 2.0 / 1e9;
        let (l0, l) = (ext.original_length, ext.target_length);
        println!("plan");
        println!(
            "  model          {} ({:?}, {:.1}M parameters, {} layers)",
            cfg.model.path.display(),
            c.arch,
            params as f64 / 1e6,
            c.num_hidden_layers
        );
        println!("  window         {l0} -> {l} (x{:.2}), attention factor {:.4}", ext.scale(), ext.attention_factor);
        println!(
            "  long factors   {:.3} .. {:.3}   short factors {:.3} .. {:.3}",
            ext.long_factor[0],
            ext.long_factor.last().unwrap(),
            ext.short_factor[0],
            ext.short_factor.last().unwrap()
        );
        println!(
            "  steps          {}, {rows} rows x {} tokens = {} tokens/step",
            self.total_steps,
            t.seq_len,
            cfg.tokens_per_step()
        );
        println!(
            "  rows           {:.0}% short (documents <= {l0}), {:.0}% long",
            cfg.data.short_share * 100.0,
            (1.0 - cfg.data.short_share) * 100.0
        );
        println!("  corpus         {} tokens in {} source(s)", loader.corpus().n_tokens(), loader.corpus().n_sources());
        println!(
            "  memory (est.)  {state_gb:.2} GB weights+optimizer, {act_gb:.2} GB activations, {head_gb:.2} GB LM head"
        );
        println!(
            "  checkpoints    {} every {} steps, keep {} (about {:.2} GB each)",
            cfg.checkpoint.dir.display(),
            cfg.checkpoint.every,
            cfg.checkpoint.keep,
            Checkpoint::size_estimate(lm, &self.opt) as f64 / 1e9
        );
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

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.4}"))
}

pub fn run(args: Args) -> Result<()> {
    let cfg = TrainConfig::read(&args.config)?;
    let (mut t, loader) = Trainer::setup(cfg, args.resume.as_deref())?;
    if args.dry_run {
        t.print_plan(&loader);
        if let Some(w) = t.checkpoint_space_warning() {
            println!("  warning        {w}");
        }
        println!("dry run: configuration is valid");
        return Ok(());
    }
    let mut metrics = match args.resume {
        Some(_) => Metrics::resume(&t.cfg.metrics_path(), t.state.step)?,
        None => Metrics::create(&t.cfg.metrics_path())?,
    };
    if let Some(w) = t.checkpoint_space_warning() {
        tracing::warn!("{w}");
        metrics.warning(t.state.step, &w)?;
    }
    let no_progress = t.cfg.log.no_progress;
    if t.state.step == 0 {
        let bar = eval_bar(t.eval_rows(), no_progress);
        let h = t.evaluate(&bar);
        bar.finish_and_clear();
        metrics.eval(0, h.short, h.long)?;
        println!("held-out loss before training: short {}  long {}", fmt_opt(h.short), fmt_opt(h.long));
    }

    install_signal_handlers();
    let mut prefetch = Prefetcher::new(loader, t.cfg.data.prefetch);
    let bar = if no_progress { ProgressBar::hidden() } else { ProgressBar::new(t.total_steps) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}").unwrap());
    bar.set_position(t.state.step);
    let run_start = t.state.step;
    let rows_per_step = t.cfg.train.micro_batch_rows * t.cfg.train.grad_accum;
    while t.state.step < t.total_steps {
        let mut rows = Vec::with_capacity(rows_per_step);
        let mut loader_after = None;
        for _ in 0..rows_per_step {
            let (row, after) = prefetch.next_row();
            rows.push(row);
            loader_after = Some(after);
        }
        let s = t.train_step(&rows)?;
        t.state.loader = loader_after.expect("a step has rows");
        metrics.step(&s)?;
        if s.window_mismatches > 0 {
            let w = format!(
                "step {}: {} row(s) were built for one RoPE window and run in the other (data l0 and model L0 disagree)",
                s.step, s.window_mismatches
            );
            bar.suspend(|| tracing::warn!("{w}"));
            metrics.warning(s.step, &w)?;
        }
        if let Some(w) = t.collapse_warning(&s) {
            bar.suspend(|| tracing::warn!("{w}"));
            metrics.warning(s.step, &w)?;
        }
        bar.set_message(format!(
            "loss {:.4}  {:.0} tok/s  peak RSS {:.0} MB",
            s.loss,
            s.tokens as f64 / s.seconds,
            peak_rss_mb()
        ));
        bar.inc(1);
        if t.cfg.eval.every > 0 && s.step % t.cfg.eval.every == 0 {
            bar.set_message(format!("held-out eval of {} rows", t.eval_rows()));
            let h = t.evaluate(&ProgressBar::hidden());
            metrics.eval(s.step, h.short, h.long)?;
            bar.println(format!("step {}: held-out loss short {}  long {}", s.step, fmt_opt(h.short), fmt_opt(h.long)));
        }
        let stop_now = STOP.load(Ordering::SeqCst) || args.stop_after.is_some_and(|n| s.step - run_start >= n);
        let periodic = t.cfg.checkpoint.every > 0 && s.step % t.cfg.checkpoint.every == 0;
        if periodic || stop_now || s.step == t.total_steps {
            let dir = t.save_checkpoint()?;
            bar.println(format!("checkpoint {}", dir.display()));
        }
        if stop_now {
            bar.abandon();
            println!("stopped at step {} (resume with --resume)", s.step);
            return Ok(());
        }
    }
    bar.finish();
    let bar = eval_bar(t.eval_rows(), no_progress);
    let h = t.evaluate(&bar);
    bar.finish_and_clear();
    metrics.eval(t.state.step, h.short, h.long)?;
    println!("held-out loss after training:  short {}  long {}", fmt_opt(h.short), fmt_opt(h.long));
    if let Some(e) = &t.cfg.export {
        t.export(&e.dir, &e.dtype, e.max_shard_mb)?;
    }
    Ok(())
}
