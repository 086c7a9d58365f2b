//! `longmix train`: mixed context window training, top to bottom.
//!
//! config -> model (+ extended RoPE) -> data rows -> forward/backward per micro-batch -> AdamW
//! -> metrics / eval / checkpoint -> export. Short rows (documents <= L0) run with the short
//! factors, long rows with the long factors, decided per row inside the model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longmix_data::{DataConfig, Loader, LoaderState, Prefetcher, Row, RowKind};
use longmix_model::{
    export_hf, init_factors, load_model, ExportOptions, FactorInit, FactorsFile, LoadedModel,
    LongRopeExport, MemoryOptions, RopeConfig, RopeScaling,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::config::{AttentionFactor, TrainConfig};
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

/// The extended RoPE of the run, as trained and as exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRope {
    pub target_length: i64,
    pub original_length: i64,
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub attention_factor: f64,
    /// Whether the exported config states the factor (false: transformers derives the same value).
    pub explicit_attention_factor: bool,
}

impl RunRope {
    /// Resolve `[rope]` against the loaded model.
    pub fn resolve(cfg: &TrainConfig, model_rope: &RopeConfig) -> Result<RunRope> {
        let r = &cfg.rope;
        let l0 = r.original_length.unwrap_or(model_rope.original_max_position_embeddings);
        let l = r.target_length;
        if l <= l0 {
            bail!("key `rope.target_length`: {l} must exceed the original window L0 = {l0}");
        }
        let n = model_rope.n_pairs() as usize;
        let long_factor = if let Some(f) = &r.long_factor {
            f.clone()
        } else if let Some(path) = &r.factors_file {
            let f = FactorsFile::read(path)?;
            if (f.target_length, f.original_length) != (l, l0) {
                bail!(
                    "key `rope.factors_file`: {} was made for {} -> {}, but this run extends {l0} -> {l}",
                    path.display(),
                    f.original_length,
                    f.target_length
                );
            }
            f.long_factor
        } else {
            init_factors(r.init.unwrap_or(FactorInit::LongropeNtkInit), model_rope.theta, model_rope.d_rot, l0, l)
        };
        // Default short factors keep the model's own short-window frequencies exactly: all 1.0
        // for plain RoPE, the equivalent factors for llama3/linear/longrope-short checkpoints.
        let short_factor = match &r.short_factor {
            Some(f) => f.clone(),
            None => {
                let plain = RopeConfig { scaling: RopeScaling::Default, ..model_rope.clone() }.inv_freq(1, Device::Cpu);
                let own = model_rope.inv_freq(1, Device::Cpu);
                Vec::<f64>::try_from((plain.to_kind(Kind::Double) / own.to_kind(Kind::Double)).to_kind(Kind::Double))?
            }
        };
        for (key, list) in [("long_factor", &long_factor), ("short_factor", &short_factor)] {
            if list.len() != n {
                bail!("key `rope.{key}`: {} entries, but this model needs d_rot/2 = {n}", list.len());
            }
            if list.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                bail!("key `rope.{key}`: every factor must be a finite number > 0");
            }
        }
        // The longrope default is what transformers derives from the exported config; any other
        // choice is written into the export.
        let attention_factor = r.attention_factor.value(l as f64 / l0 as f64, l0);
        let explicit = r.attention_factor != AttentionFactor::Longrope;
        Ok(RunRope {
            target_length: l,
            original_length: l0,
            short_factor,
            long_factor,
            attention_factor,
            explicit_attention_factor: explicit,
        })
    }

    /// Put this RoPE into the model.
    pub fn apply(&self, lm: &mut LoadedModel) {
        let c = &mut lm.model.config;
        c.rope.original_max_position_embeddings = self.original_length;
        c.rope.scaling = RopeScaling::LongRope {
            short_factor: self.short_factor.clone(),
            long_factor: self.long_factor.clone(),
            attention_factor: self.attention_factor,
        };
        c.max_position_embeddings = self.target_length;
    }

    pub fn export(&self) -> LongRopeExport {
        LongRopeExport {
            max_position_embeddings: self.target_length,
            original_max_position_embeddings: self.original_length,
            short_factor: self.short_factor.clone(),
            long_factor: self.long_factor.clone(),
            attention_factor: self.explicit_attention_factor.then_some(self.attention_factor),
        }
    }
}

/// Everything besides weights and optimizer that a checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub tokens_seen: u64,
    pub loader: LoaderState,
    pub rope: RunRope,
}

pub fn data_config(cfg: &TrainConfig, rope: &RunRope, lm: &LoadedModel) -> DataConfig {
    DataConfig {
        sources: cfg.data.sources.clone(),
        seq_len: cfg.train.seq_len,
        l0: rope.original_length as usize,
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

/// Held-out mean NLL of the short and of the long rows (None for a kind without rows). `bar`
/// counts rows: a long row's forward takes a minute on a small CPU.
fn held_out(lm: &LoadedModel, short: &[Row], long: &[Row], device: Device, bar: &ProgressBar) -> (Option<f64>, Option<f64>) {
    let loss = |rows: &[Row]| {
        if rows.is_empty() {
            return None;
        }
        let (mut nll, mut n) = (0.0, 0);
        for r in rows {
            let (ids, pos, tgt) = batch(std::slice::from_ref(r), device);
            let (s, c) = tch::no_grad(|| lm.model.nll(&ids, &pos, &tgt));
            nll += s.double_value(&[]);
            n += c;
            bar.inc(1);
        }
        Some(nll / n.max(1) as f64)
    };
    (loss(short), loss(long))
}

/// A progress bar for a held-out evaluation of `rows` rows on its own line.
fn eval_bar(rows: usize, hidden: bool) -> ProgressBar {
    let bar = if hidden { ProgressBar::hidden() } else { ProgressBar::new(rows as u64) };
    bar.set_style(ProgressStyle::with_template("held-out eval {bar:20} {pos}/{len} rows  {elapsed}  eta {eta}").unwrap());
    bar
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

fn save_checkpoint(cfg: &TrainConfig, lm: &LoadedModel, opt: &AdamW, state: &TrainerState) -> Result<PathBuf> {
    let dir = checkpoint::save(&cfg.checkpoint.dir, state.step, |d| {
        let named: Vec<(String, Tensor)> =
            lm.vs.variables().into_iter().map(|(k, v)| (k, v.detach().to_device(Device::Cpu))).collect();
        Tensor::write_safetensors(&named, d.join("model.safetensors"))?;
        opt.save(d)?;
        std::fs::write(d.join("trainer_state.json"), serde_json::to_string_pretty(state)?)?;
        std::fs::write(d.join("config.toml"), toml::to_string(cfg)?)?;
        Ok(())
    })?;
    checkpoint::prune(&cfg.checkpoint.dir, cfg.checkpoint.keep)?;
    Ok(dir)
}

fn find_resume(cfg: &TrainConfig, arg: &str) -> Result<PathBuf> {
    if arg == "latest" {
        return checkpoint::latest_valid(&cfg.checkpoint.dir).ok_or_else(|| {
            anyhow::anyhow!("--resume: no valid checkpoint under {}; start without --resume", cfg.checkpoint.dir.display())
        });
    }
    let dir = PathBuf::from(arg);
    checkpoint::verify(&dir).with_context(|| format!("--resume {}: not a complete checkpoint", dir.display()))?;
    Ok(dir)
}

fn print_plan(cfg: &TrainConfig, lm: &LoadedModel, rope: &RunRope, loader: &Loader, steps: u64) {
    let c = &lm.model.config;
    let params: i64 = lm.vs.variables().values().map(|t| t.numel() as i64).sum();
    let t = &cfg.train;
    let rows = t.micro_batch_rows * t.grad_accum;
    let kind = parse_dtype(&cfg.model.dtype).unwrap_or(Kind::Float);
    let bytes = kind.elt_size_in_bytes() as f64;
    // Weights + grads in the compute dtype, AdamW moments (+ masters unless f32) in float32.
    let state_gb = params as f64 * (2.0 * bytes + 8.0 + if kind == Kind::Float { 0.0 } else { 4.0 }) / 1e9;
    // Activations: with layer checkpointing one hidden state per layer plus one layer's working
    // set (~34 hidden-sized tensors); without, all layers' working sets.
    let tokens = (t.micro_batch_rows * t.seq_len) as f64;
    let per_layer = tokens * c.hidden_size as f64 * bytes * 34.0;
    let act_gb = if t.checkpoint_layers {
        (tokens * c.hidden_size as f64 * bytes * c.num_hidden_layers as f64 + per_layer) / 1e9
    } else {
        per_layer * c.num_hidden_layers as f64 / 1e9
    };
    let head_tokens = if t.loss_chunk > 0 { (t.loss_chunk as f64).min(tokens) } else { tokens };
    let head_gb = head_tokens * c.vocab_size as f64 * 4.0 * 2.0 / 1e9;
    println!("plan");
    println!("  model          {} ({:?}, {:.1}M parameters, {} layers)", cfg.model.path.display(), c.arch, params as f64 / 1e6, c.num_hidden_layers);
    println!("  window         {} -> {} (x{:.2}), attention factor {:.4}", rope.original_length, rope.target_length, rope.target_length as f64 / rope.original_length as f64, rope.attention_factor);
    println!("  long factors   {:.3} .. {:.3}   short factors {:.3} .. {:.3}", rope.long_factor[0], rope.long_factor.last().unwrap(), rope.short_factor[0], rope.short_factor.last().unwrap());
    println!("  steps          {steps}, {rows} rows x {} tokens = {} tokens/step", t.seq_len, cfg.tokens_per_step());
    println!("  rows           {:.0}% short (documents <= {}), {:.0}% long", cfg.data.short_share * 100.0, rope.original_length, (1.0 - cfg.data.short_share) * 100.0);
    println!("  corpus         {} tokens in {} source(s)", loader.corpus().n_tokens(), loader.corpus().n_sources());
    println!("  memory (est.)  {state_gb:.2} GB weights+optimizer, {act_gb:.2} GB activations, {head_gb:.2} GB LM head");
    println!("  checkpoints    {} every {} steps, keep {}", cfg.checkpoint.dir.display(), cfg.checkpoint.every, cfg.checkpoint.keep);
}

pub fn run(args: Args) -> Result<()> {
    let cfg = TrainConfig::read(&args.config)?;
    if let Some(n) = cfg.train.threads {
        tch::set_num_threads(n);
    }
    tch::manual_seed(cfg.train.seed as i64);
    let device = parse_device(&cfg.model.device).context("key `model.device`")?;
    let kind = parse_dtype(&cfg.model.dtype).context("key `model.dtype`")?;

    // Weights load in float32 (the optimizer's masters); the model then computes in `kind`.
    let mut lm = load_model(&cfg.model.path, Kind::Float, device)?;
    let resume_dir = args.resume.as_deref().map(|a| find_resume(&cfg, a)).transpose()?;
    if resume_dir.is_none() && !checkpoint::list(&cfg.checkpoint.dir).is_empty() {
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
    let resumed: Option<TrainerState> = match &resume_dir {
        Some(d) => Some(serde_json::from_str(&std::fs::read_to_string(d.join("trainer_state.json"))?)?),
        None => None,
    };
    let rope = match &resumed {
        Some(s) => s.rope.clone(),
        None => RunRope::resolve(&cfg, &lm.model.config.rope)?,
    };
    rope.apply(&mut lm);
    if cfg.train.seq_len as i64 > rope.target_length {
        bail!("key `train.seq_len`: {} exceeds rope.target_length {}", cfg.train.seq_len, rope.target_length);
    }
    let tok_path = cfg.model.path.join("tokenizer.json");
    let tok_vocab = longmix_model::load_tokenizer(&cfg.model.path)?.get_vocab_size(true) as i64;
    if tok_vocab > lm.model.config.vocab_size {
        bail!("tokenizer.json has {tok_vocab} tokens but the model only {}: tokenizer and model do not match", lm.model.config.vocab_size);
    }
    let dcfg = data_config(&cfg, &rope, &lm);
    let loader = match &resumed {
        Some(s) => Loader::restore(dcfg, &tok_path, &cfg.data.cache_dir, 0, 1, s.loader.clone())?,
        None => Loader::new(dcfg, &tok_path, &cfg.data.cache_dir, 0, 1)?,
    };
    let total_steps = cfg.total_steps(1);
    if args.dry_run {
        print_plan(&cfg, &lm, &rope, &loader, total_steps);
        println!("dry run: configuration is valid");
        return Ok(());
    }

    let eval_short = loader.eval_rows(RowKind::Short, cfg.eval.short_rows).unwrap_or_default();
    let eval_long = loader.eval_rows(RowKind::Long, cfg.eval.long_rows).unwrap_or_default();
    let mut opt = AdamW::new(cfg.optim.clone(), lm.vs.variables().into_iter().collect(), kind);
    lm.vs.set_kind(kind);
    let mut state = TrainerState { step: 0, tokens_seen: 0, loader: loader.state(), rope: rope.clone() };
    if let (Some(dir), Some(s)) = (&resume_dir, resumed) {
        longmix_model::load::load_weights(&lm.vs, dir)?;
        opt.load(dir)?;
        tracing::info!("resumed from {} at step {}", dir.display(), s.step);
        state = s;
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
    let mut metrics = match resume_dir {
        Some(_) => Metrics::resume(&cfg.metrics_path(), state.step)?,
        None => Metrics::create(&cfg.metrics_path())?,
    };
    let n_eval = eval_short.len() + eval_long.len();
    if state.step == 0 {
        let bar = eval_bar(n_eval, cfg.log.no_progress);
        let (s, l) = held_out(&lm, &eval_short, &eval_long, device, &bar);
        bar.finish_and_clear();
        metrics.eval(0, s, l)?;
        println!("held-out loss before training: short {}  long {}", fmt_opt(s), fmt_opt(l));
    }

    install_signal_handlers();
    let mut prefetch = Prefetcher::new(loader, cfg.data.prefetch);
    let bar = if cfg.log.no_progress { ProgressBar::hidden() } else { ProgressBar::new(total_steps) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}").unwrap());
    bar.set_position(state.step);
    let run_start = state.step;
    let rows_per_step = cfg.train.micro_batch_rows * cfg.train.grad_accum;
    while state.step < total_steps {
        let t0 = Instant::now();
        let mut rows = Vec::with_capacity(rows_per_step);
        for _ in 0..rows_per_step {
            let (row, after) = prefetch.next_row();
            rows.push(row);
            state.loader = after;
        }
        // The loss of the step is the mean over all its target tokens (design notes §4).
        let step_targets: usize = rows.iter().map(|r| r.n_targets).sum();
        let scale = 1.0 / step_targets.max(1) as f64;
        opt.zero_grad();
        let (mut nll, mut by_kind) = (0.0, [(0.0, 0i64); 2]);
        for mb in rows.chunks(cfg.train.micro_batch_rows) {
            let (ids, pos, tgt) = batch(mb, device);
            let out = lm.model.forward_backward(&ids, &pos, &tgt, scale, mem);
            nll += out.nll_sum;
            for (r, (n, c)) in mb.iter().zip(out.row_nll.iter().zip(&out.row_tokens)) {
                let k = (r.kind == RowKind::Long) as usize;
                by_kind[k].0 += n;
                by_kind[k].1 += c;
            }
        }
        let lr = schedule.lr(state.step);
        let grad_norm = opt.step(lr);
        state.step += 1;
        let tokens = (rows.len() * cfg.train.seq_len) as u64;
        state.tokens_seen += tokens;
        let secs = t0.elapsed().as_secs_f64();
        let loss = nll / step_targets.max(1) as f64;
        let kind_loss = |k: usize| (by_kind[k].1 > 0).then(|| by_kind[k].0 / by_kind[k].1 as f64);
        metrics.step(state.step, loss, kind_loss(0), kind_loss(1), lr, grad_norm, tokens as f64 / secs, secs, state.tokens_seen)?;
        bar.set_message(format!("loss {loss:.4}  {:.0} tok/s  peak RSS {:.0} MB", tokens as f64 / secs, peak_rss_mb()));
        bar.inc(1);
        if cfg.eval.every > 0 && state.step % cfg.eval.every == 0 {
            bar.set_message(format!("held-out eval of {n_eval} rows"));
            let (s, l) = held_out(&lm, &eval_short, &eval_long, device, &ProgressBar::hidden());
            metrics.eval(state.step, s, l)?;
            bar.println(format!("step {}: held-out loss short {}  long {}", state.step, fmt_opt(s), fmt_opt(l)));
        }
        let stop_now = STOP.load(Ordering::SeqCst) || args.stop_after.is_some_and(|n| state.step - run_start >= n);
        let periodic = cfg.checkpoint.every > 0 && state.step % cfg.checkpoint.every == 0;
        if periodic || stop_now || state.step == total_steps {
            let dir = save_checkpoint(&cfg, &lm, &opt, &state)?;
            bar.println(format!("checkpoint {}", dir.display()));
        }
        if stop_now {
            bar.abandon();
            println!("stopped at step {} (resume with --resume)", state.step);
            return Ok(());
        }
    }
    bar.finish();
    let bar = eval_bar(n_eval, cfg.log.no_progress);
    let (s, l) = held_out(&lm, &eval_short, &eval_long, device, &bar);
    bar.finish_and_clear();
    metrics.eval(state.step, s, l)?;
    println!("held-out loss after training:  short {}  long {}", fmt_opt(s), fmt_opt(l));
    if let Some(e) = &cfg.export {
        export(&lm, &cfg, &rope, &e.dir, &e.dtype, e.max_shard_mb)?;
    }
    Ok(())
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.4}"))
}

/// Write the Hugging Face folder of a trained model.
pub fn export(lm: &LoadedModel, cfg: &TrainConfig, rope: &RunRope, out: &Path, dtype: &str, shard_mb: u64) -> Result<()> {
    let opts = ExportOptions { dtype: parse_dtype(dtype)?, max_shard_bytes: shard_mb * 1_000_000, rope: Some(rope.export()) };
    export_hf(&lm.vs, &lm.model.config, Some(&cfg.model.path), out, &opts)?;
    println!("exported {} (window {} -> {})", out.display(), rope.original_length, rope.target_length);
    Ok(())
}
