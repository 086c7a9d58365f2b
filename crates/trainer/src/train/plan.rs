//! `longmix train --dry-run`: the plan of a run from its TOML and the model's `config.json`
//! alone. No weights are read and no tensor is made, so whatever device the config names, a
//! machine without it (a cluster's login node) plans an 8B run in seconds. The corpus figures
//! and the ranks' idle estimate need the tokenization cache; the plan uses it when it is already
//! there and says so when it is not.

use anyhow::{Context, Result};
use longmix_data::{DataConfig, Loader};
use longmix_model::{Extension, ModelConfig};
use longmix_torch_ext::optim::fused_adamw_available;
use tch::{Device, Kind};

use super::{check_run, data_config, memory_options, resolve_extension, ParallelDims};
use crate::checkpoint::Checkpoint;
use crate::config::TrainConfig;
use crate::device::{check_training_dtype, compute_dtype, named_device};
use crate::distributed::{self, Launch};
use crate::estimate::{MemoryEstimate, OptimizerMemory};

/// What a dry run knows of a run before anything is loaded.
struct RunPlan<'a> {
    cfg: &'a TrainConfig,
    /// The model's config as it will train (the extension applied).
    model: ModelConfig,
    /// The model's own sliding window, before the extension.
    own_window: Option<i64>,
    ext: Extension,
    dims: ParallelDims,
    device: Device,
    kind: Kind,
}

/// Validate the run of `cfg` and print its plan for `world` ranks (default: the launch's).
pub fn dry_run(cfg: &TrainConfig, launch: Option<&Launch>, world: Option<usize>) -> Result<()> {
    if launch.is_some_and(|l| l.rank != 0) {
        return Ok(());
    }
    let world = world.or(launch.map(|l| l.world_size)).unwrap_or(1);
    let plan = RunPlan::new(cfg, world)?;
    plan.print();
    println!("dry run: configuration is valid");
    Ok(())
}

impl<'a> RunPlan<'a> {
    fn new(cfg: &'a TrainConfig, world: usize) -> Result<RunPlan<'a>> {
        let path = cfg.model.path.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("key `model.path`: cannot read {}; point it at a Hugging Face folder", path.display())
        })?;
        let mut model = ModelConfig::from_json_str(&text).with_context(|| format!("{}", path.display()))?;
        let device = named_device(&cfg.model.device).context("key `model.device`")?;
        let kind = compute_dtype(&cfg.model.dtype, device).context("key `model.dtype`")?;
        check_training_dtype(kind, device, cfg.train.seq_len)?;
        let dims = ParallelDims::new(world, cfg, &model)?;
        let ext = resolve_extension(cfg, &model)?;
        let own_window = model.sliding_window;
        ext.apply(&mut model);
        check_run(cfg, &ext)?;
        for (i, source) in cfg.data.sources.iter().enumerate() {
            longmix_data::source::resolve_files(source, i).with_context(|| format!("key `data.sources[{i}]`"))?;
        }
        Ok(RunPlan { cfg, model, own_window, ext, dims, device, kind })
    }

    /// The peak memory of one rank.
    fn memory(&self) -> MemoryEstimate {
        let share = if self.dims.zero1 { 1.0 / self.dims.world() as f64 } else { 1.0 };
        let masters = if self.kind == Kind::Float { 0 } else { 4 };
        let opt = OptimizerMemory {
            bytes_per_element: 8 + masters,
            share,
            fused: self.cfg.optim.fused && fused_adamw_available(self.device),
            grad_share: if self.dims.zero2 { share } else { 1.0 },
        };
        let tokens = (self.cfg.train.micro_batch_rows * self.cfg.train.seq_len) as i64;
        MemoryEstimate::new(&self.model, self.kind, opt, tokens, self.dims.cp, memory_options(self.cfg), self.device)
    }

    /// The loader over the tokenization cache, when the cache of every source is already built
    /// (None otherwise: building it is the real run's first job, not the plan's).
    fn cached_loader(&self) -> Result<Option<Loader>> {
        let tok = self.cfg.model.path.join("tokenizer.json");
        let dcfg: DataConfig = data_config(self.cfg, &self.ext, &self.model);
        if !tok.is_file() || !longmix_data::cache::is_built(&dcfg, &tok, &self.cfg.data.cache_dir)? {
            return Ok(None);
        }
        Loader::new(dcfg, &tok, &self.cfg.data.cache_dir).map(Some)
    }

    /// Estimated mean rank idle fraction over the first `steps` global steps of `loader`'s rows,
    /// balanced and round-robin (from [`distributed::row_cost`]).
    fn idle_estimate(&self, loader: &mut Loader, steps: usize) -> (f64, f64) {
        let world = self.dims.dp;
        let mut idle = [0.0, 0.0];
        for _ in 0..steps {
            let costs: Vec<f64> = (0..self.cfg.rows_per_step(world))
                .map(|_| distributed::row_cost(&loader.next_row(), &self.model))
                .collect();
            for (k, balance) in [true, false].into_iter().enumerate() {
                let loads: Vec<f64> = distributed::assign_rows(&costs, world, balance)
                    .iter()
                    .map(|rows| rows.iter().map(|&i| costs[i]).sum())
                    .collect();
                let max = loads.iter().cloned().fold(0.0, f64::max);
                idle[k] += distributed::idle(&loads).iter().sum::<f64>() / max / world as f64 / steps as f64;
            }
        }
        (idle[0], idle[1])
    }

    fn print(&self) {
        let (cfg, c, ext) = (self.cfg, &self.model, &self.ext);
        let t = &cfg.train;
        let (world, dp) = (self.dims.world(), self.dims.dp);
        println!("plan");
        println!(
            "  model          {} ({:?}, {:.1}M parameters, {} layers), {:?} on {:?}",
            cfg.model.path.display(),
            c.arch,
            c.n_params() / 1e6,
            c.num_hidden_layers,
            self.kind,
            self.device
        );
        let (l0, l) = (ext.original_length, ext.target_length);
        println!("  window         {l0} -> {l} (x{:.2}), attention factor {:.4}", ext.scale(), ext.attention_factor);
        if let Some(note) = ext.sliding_window_note(self.own_window) {
            println!("  sliding window {note}");
        }
        println!(
            "  long factors   {:.3} .. {:.3}   short factors {:.3} .. {:.3}",
            ext.long_factor[0],
            ext.long_factor.last().unwrap(),
            ext.short_factor[0],
            ext.short_factor.last().unwrap()
        );
        let steps = cfg.total_steps(dp);
        let rows = cfg.rows_per_step(dp);
        println!(
            "  steps          {steps}, {rows} rows x {} tokens = {} tokens/step",
            t.seq_len,
            cfg.tokens_per_step(dp)
        );
        println!(
            "  rows           {:.0}% short (documents <= {l0}), {:.0}% long",
            cfg.data.short_share * 100.0,
            (1.0 - cfg.data.short_share) * 100.0
        );
        if world > 1 {
            let d = &cfg.distributed;
            println!(
                "  ranks          {world} = {dp} data parallel x {} context parallel; rows balanced by compute: {}, \
                 overlap: {}, ZeRO-1: {}, ZeRO-2: {}",
                self.dims.cp, d.balance, d.overlap, self.dims.zero1, self.dims.zero2
            );
        }
        if self.dims.cp > 1 {
            let (h, kv, cp) = (c.num_attention_heads, c.num_key_value_heads, self.dims.cp as i64);
            let kv_note = if kv >= cp {
                format!("{} KV head(s)", kv / cp)
            } else {
                format!("1 KV head (each of the {kv} repeated {}x)", cp / kv)
            };
            let groups = match self.dims.dp {
                1 => format!("ranks 0..{cp}"),
                dp => format!("{dp} groups of {cp} consecutive ranks (0..{cp}, {cp}..{}, ...)", 2 * cp),
            };
            println!(
                "  context        {groups} split each row: {} tokens of a {}-token row and {} query heads with \
                 {kv_note} per rank in attention",
                (t.seq_len as u64).div_ceil(cp as u64),
                t.seq_len,
                h / cp
            );
        }
        self.print_data();
        self.print_memory();
        let params = c.n_params() as u64;
        println!(
            "  checkpoints    {} every {} steps, keep {} (about {:.2} GB each)",
            cfg.checkpoint.dir.display(),
            cfg.checkpoint.every,
            cfg.checkpoint.keep,
            Checkpoint::size_for(params, self.kind) as f64 / 1e9
        );
        if let Some(w) = super::Checkpointer::new(&cfg.checkpoint).space_warning(params, self.kind) {
            println!("  warning        {w}");
        }
    }

    /// The corpus and the ranks' idle estimate, from the cache when it is there.
    fn print_data(&self) {
        match self.cached_loader() {
            Ok(Some(mut loader)) => {
                println!(
                    "  corpus         {} tokens in {} source(s)",
                    loader.corpus().n_tokens(),
                    loader.corpus().n_sources()
                );
                if self.dims.dp > 1 {
                    let (bal, rr) = self.idle_estimate(&mut loader, 16);
                    println!(
                        "  rank idle      {:.1}% with rows balanced by compute, {:.1}% round-robin (estimated, first 16 \
                         steps)",
                        bal * 100.0,
                        rr * 100.0
                    );
                }
            }
            Ok(None) => println!(
                "  corpus         not tokenized yet under {} (the run does it first); corpus size and rank idle \
                 estimate come with the cache",
                self.cfg.data.cache_dir.display()
            ),
            Err(e) => {
                println!("  corpus         the cache under {} cannot be read: {e:#}", self.cfg.data.cache_dir.display())
            }
        }
    }

    fn print_memory(&self) {
        let world = self.dims.world();
        let est = self.memory();
        let ranks = if world > 1 {
            let cp = (self.dims.cp > 1).then(|| format!("cp {}", self.dims.cp));
            let zero = match (self.dims.zero1, self.dims.zero2) {
                (_, true) => Some("ZeRO-2".to_string()),
                (true, false) => Some("ZeRO-1".to_string()),
                _ => None,
            };
            let notes: Vec<String> = cp.into_iter().chain(zero).collect();
            let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join(", ")) };
            format!(" per rank of {world}{notes}")
        } else {
            String::new()
        };
        let gb = |x: f64| x / 1e9;
        println!(
            "  memory (est.)  {:.2} GB peak{ranks}: {:.2} weights+grads+optimizer, {:.2} saved activations, {:.2} layer \
             working set, {:.2} LM head, {:.2} optimizer temporaries, {:.2} runtime",
            gb(est.total_bytes()),
            gb(est.state),
            gb(est.saved),
            gb(est.layer),
            gb(est.head),
            gb(est.optimizer),
            gb(est.runtime)
        );
    }
}
