//! The training run's TOML file. Every section denies unknown keys; every error names the key
//! path, the bad value and what is allowed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
pub use longmix_core::config::ModelSection;
use longmix_data::SourceConfig;
use longmix_model::{AttentionFactor, ExtensionSpec, FactorSet, LongFactors};
use serde::{Deserialize, Serialize};

use crate::metrics::MetricsPaths;
use crate::optim::AdamWConfig;
use crate::schedule::Decay;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub rope: RopeSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub optim: AdamWConfig,
    #[serde(default)]
    pub schedule: ScheduleSection,
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub export: Option<ExportSection>,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub distributed: DistributedSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeSection {
    /// The new window L.
    pub target_length: i64,
    /// L0; defaults to the model's original window.
    #[serde(default)]
    pub original_length: Option<i64>,
    /// Long factors given inline (d_rot/2 numbers) ...
    #[serde(default)]
    pub long_factor: Option<Vec<f64>>,
    /// ... or read from a factors file written by `longmix search` ...
    #[serde(default)]
    pub factors_file: Option<PathBuf>,
    /// ... or a closed-form factor set (default longrope2: LongRoPE2's initial factors).
    #[serde(default)]
    pub init: Option<FactorSet>,
    /// Short factors (default: a factors file's own, else the model's own short-window
    /// frequencies, all 1.0 for plain RoPE: short rows keep the original RoPE, as LongRoPE2 does).
    #[serde(default)]
    pub short_factor: Option<Vec<f64>>,
    /// "longrope" (default: sqrt(1 + ln(L/L0) / ln L0), what transformers derives when the
    /// config has none), "native" (the factor set's own), "none" (1.0) or a number; applied to
    /// short and long rows alike, as transformers applies the exported one.
    #[serde(default)]
    pub attention_factor: AttentionFactor,
    /// Keep the model's sliding window when it is shorter than L (only for a model really
    /// trained with sliding-window attention). By default the extension drops it, in training
    /// and in the export, so the extended model sees its whole window.
    #[serde(default)]
    pub keep_sliding_window: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub sources: Vec<SourceConfig>,
    /// Fraction of rows that are short rows (documents <= L0, original RoPE).
    #[serde(default = "default_short_share")]
    pub short_share: f64,
    /// Fraction of documents held out for `[eval]`.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Prepend BOS to every document (default: false).
    #[serde(default)]
    pub add_bos: bool,
    /// Append EOS to every document (default: true).
    #[serde(default = "default_true")]
    pub add_eos: bool,
    /// Where tokenized sources are cached.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Rows built ahead on a background thread.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps (or give `tokens`).
    #[serde(default)]
    pub steps: Option<u64>,
    /// Total training tokens, converted to steps.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Tokens per row (T); every row, short or long, has exactly this many.
    pub seq_len: usize,
    /// Rows per forward/backward.
    #[serde(default = "default_one")]
    pub micro_batch_rows: usize,
    /// Micro-batches per optimizer step and rank.
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Rows per optimizer step over all data-parallel ranks (default: micro_batch_rows x
    /// grad_accum x world size). Fixing it keeps the run's numerics whatever the world size:
    /// each rank then trains its share in micro-batches of `micro_batch_rows`.
    #[serde(default)]
    pub global_batch_rows: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    /// Recompute each layer in the backward pass (less memory, about a third more compute).
    #[serde(default)]
    pub checkpoint_layers: bool,
    /// LM head + loss this many scored tokens at a time (0 = all at once: the whole
    /// `[tokens, vocab]` logits, 59 GB in float32 at 32k tokens and a 128k vocabulary).
    #[serde(default = "default_loss_chunk")]
    pub loss_chunk: i64,
    /// Earlier spelling of `model.threads` (still read).
    #[serde(default)]
    pub threads: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_decay")]
    pub decay: Decay,
    /// Final learning rate as a fraction of `optim.lr`.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection { warmup_steps: 0, decay: Decay::Cosine, min_lr_ratio: 0.1 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub dir: PathBuf,
    /// Save every N steps (0: only at the end and on SIGINT/SIGTERM).
    #[serde(default)]
    pub every: u64,
    /// Keep the newest K checkpoints (0: all).
    #[serde(default = "default_keep")]
    pub keep: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// Where the final Hugging Face folder goes (must not exist).
    pub dir: PathBuf,
    #[serde(default = "default_bf16")]
    pub dtype: String,
    /// Shard size bound in MB.
    #[serde(default = "default_shard_mb")]
    pub max_shard_mb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Held-out loss every N steps (0: only before and after training).
    #[serde(default)]
    pub every: u64,
    #[serde(default = "default_eval_rows")]
    pub short_rows: usize,
    #[serde(default = "default_eval_rows")]
    pub long_rows: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { every: 0, short_rows: 2, long_rows: 2 }
    }
}

/// `[distributed]`: how the ranks started by torchrun, SLURM or `launch/multi.sh` work together
/// (a run started as one plain process ignores it). See docs/distributed.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedSection {
    /// "auto" (nccl on CUDA, gloo on CPU), "gloo" or "nccl".
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Seconds a collective waits for the slowest rank before the run stops with an error
    /// naming the ranks that did not answer.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Seconds the ranks wait for each other at a phase whose length has no bound but the disk's
    /// (writing a checkpoint, the export at the end). They wait on the rendezvous store, not in
    /// a collective, so a slow disk is not a failure; a rank whose heartbeat stops for
    /// `timeout_s` is still named as dead.
    #[serde(default = "default_phase_timeout_s")]
    pub phase_timeout_s: u64,
    /// Shard AdamW moments and float32 masters across ranks (ZeRO stage 1).
    #[serde(default)]
    pub zero1: bool,
    /// Also shard the float32 gradients (ZeRO stage 2): every micro-batch's gradients are
    /// reduced to the rank that updates them as the backward produces them. Needs `zero1`.
    #[serde(default)]
    pub zero2: bool,
    /// Assign rows to ranks by estimated compute (linear + causal attention FLOPs) instead of
    /// round-robin.
    #[serde(default = "default_true")]
    pub balance: bool,
    /// Start reducing a layer's gradients as soon as its backward is done (needs
    /// `train.checkpoint_layers`; otherwise the reduction follows the backward).
    #[serde(default = "default_true")]
    pub overlap: bool,
    /// Gradient bucket size in MB (float32).
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Context-parallel size: each row's tokens are split over this many consecutive ranks,
    /// which train the same rows (world = data parallel x context parallel).
    #[serde(default = "default_one")]
    pub context_parallel: usize,
}

impl Default for DistributedSection {
    fn default() -> Self {
        toml::from_str("").unwrap()
    }
}

fn default_backend() -> String {
    "auto".into()
}
fn default_timeout_s() -> u64 {
    600
}
fn default_phase_timeout_s() -> u64 {
    4 * 3600
}
fn default_bucket_mb() -> f64 {
    25.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// JSONL metrics file (default: `<checkpoint.dir>/metrics.jsonl`).
    #[serde(default)]
    pub metrics: Option<PathBuf>,
    /// Hide the progress bar (logs still go to stderr).
    #[serde(default)]
    pub no_progress: bool,
    /// TensorBoard event files of every step and held-out evaluation in
    /// `<checkpoint.dir>/tensorboard/` (default true; false writes none).
    #[serde(default = "default_true")]
    pub tensorboard: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { metrics: None, no_progress: false, tensorboard: true }
    }
}

fn default_bf16() -> String {
    "bf16".into()
}
fn default_short_share() -> f64 {
    0.3
}
fn default_eval_fraction() -> f64 {
    0.01
}
fn default_true() -> bool {
    true
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from(".cache/tokens")
}
fn default_prefetch() -> usize {
    4
}
fn default_loss_chunk() -> i64 {
    longmix_model::HEAD_CHUNK
}

fn default_one() -> usize {
    1
}
fn default_decay() -> Decay {
    Decay::Cosine
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_keep() -> usize {
    3
}
fn default_shard_mb() -> u64 {
    5000
}
fn default_eval_rows() -> usize {
    2
}

impl TrainConfig {
    /// Parse and validate `path`; relative paths inside are taken from the current directory.
    pub fn read(path: &Path) -> Result<TrainConfig> {
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| e.context(format!("invalid config {}", path.display())))
    }

    pub fn parse(text: &str) -> Result<TrainConfig> {
        let mut cfg: TrainConfig = longmix_core::config::from_toml(text)?;
        cfg.validate()?;
        if cfg.model.threads.is_none() {
            cfg.model.threads = cfg.train.threads.take();
        }
        Ok(cfg)
    }

    /// `[rope]` as an extension to resolve against the model.
    pub fn extension_spec(&self) -> ExtensionSpec {
        let r = &self.rope;
        let long = match (&r.long_factor, &r.factors_file, r.init) {
            (Some(list), _, _) => LongFactors::List(list.clone()),
            (None, Some(path), _) => LongFactors::File(path.clone()),
            (None, None, init) => LongFactors::Set(init.unwrap_or(FactorSet::Longrope2)),
        };
        ExtensionSpec {
            target_length: Some(r.target_length),
            original_length: r.original_length,
            long,
            short: r.short_factor.clone(),
            attention: r.attention_factor,
        }
    }

    /// Checks that need no files.
    fn validate(&self) -> Result<()> {
        let r = &self.rope;
        let given =
            [r.long_factor.is_some(), r.factors_file.is_some(), r.init.is_some()].iter().filter(|x| **x).count();
        if given > 1 {
            bail!("key `rope`: give only one of `long_factor`, `factors_file` or `init`");
        }
        let t = &self.train;
        match (t.steps, t.tokens) {
            (Some(_), Some(_)) => bail!("key `train`: give `steps` or `tokens`, not both"),
            (None, None) => bail!("key `train`: give `steps` (optimizer steps) or `tokens` (total training tokens)"),
            (Some(0), _) | (_, Some(0)) => bail!("key `train.steps`/`train.tokens`: must be > 0"),
            _ => {}
        }
        if t.micro_batch_rows == 0 || t.grad_accum == 0 {
            bail!("keys `train.micro_batch_rows` and `train.grad_accum` must be >= 1");
        }
        if let Some(g) = t.global_batch_rows {
            if g == 0 {
                bail!("key `train.global_batch_rows`: must be >= 1");
            }
            if t.grad_accum != 1 {
                bail!(
                    "keys `train.global_batch_rows` and `train.grad_accum`: give one (with a global batch each rank \
                     accumulates its share in micro-batches of `train.micro_batch_rows`)"
                );
            }
        }
        let d = &self.distributed;
        if !matches!(d.backend.as_str(), "auto" | "gloo" | "nccl") {
            bail!("key `distributed.backend`: {:?} is not one of auto, gloo, nccl", d.backend);
        }
        if d.timeout_s == 0 {
            bail!("key `distributed.timeout_s`: must be >= 1");
        }
        if d.phase_timeout_s < d.timeout_s {
            bail!(
                "key `distributed.phase_timeout_s`: {} is below distributed.timeout_s = {}; it bounds the slow phases \
                 (checkpoints, export), so give it at least timeout_s",
                d.phase_timeout_s,
                d.timeout_s
            );
        }
        if !(d.bucket_mb.is_finite() && d.bucket_mb > 0.0) {
            bail!("key `distributed.bucket_mb`: {} must be > 0", d.bucket_mb);
        }
        if d.zero2 && !d.zero1 {
            bail!("key `distributed.zero2`: shards the gradients of ZeRO-1's parameter owners; set zero1 = true too");
        }
        if d.context_parallel == 0 {
            bail!("key `distributed.context_parallel`: must be >= 1 (1: no context parallelism)");
        }
        if t.loss_chunk < 0 {
            bail!("key `train.loss_chunk`: {} must be >= 0 (0 = no chunking)", t.loss_chunk);
        }
        if t.threads.is_some() && self.model.threads.is_some() {
            bail!("keys `train.threads` and `model.threads`: give only `model.threads`");
        }
        if !(self.optim.lr.is_finite() && self.optim.lr > 0.0) {
            bail!("key `optim.lr`: {} must be > 0", self.optim.lr);
        }
        if !(0.0..=1.0).contains(&self.schedule.min_lr_ratio) {
            bail!("key `schedule.min_lr_ratio`: {} must be in [0, 1]", self.schedule.min_lr_ratio);
        }
        Ok(())
    }

    /// Rows per optimizer step over all `world` data-parallel ranks.
    pub fn rows_per_step(&self, world: usize) -> usize {
        let t = &self.train;
        t.global_batch_rows.unwrap_or(t.micro_batch_rows * t.grad_accum * world)
    }

    /// Tokens per optimizer step over all `world` ranks.
    pub fn tokens_per_step(&self, world: usize) -> u64 {
        (self.train.seq_len * self.rows_per_step(world)) as u64
    }

    /// Optimizer steps of the run (with `world` data-parallel ranks).
    pub fn total_steps(&self, world: usize) -> u64 {
        self.train.steps.unwrap_or_else(|| self.train.tokens.unwrap().div_ceil(self.tokens_per_step(world)))
    }

    /// Where the metrics go: `[log] metrics` (default `<checkpoint.dir>/metrics.jsonl`) and,
    /// unless `[log] tensorboard = false`, `<checkpoint.dir>/tensorboard/`.
    pub fn metrics_path(&self) -> MetricsPaths {
        MetricsPaths {
            jsonl: self.log.metrics.clone().unwrap_or_else(|| self.checkpoint.dir.join("metrics.jsonl")),
            tensorboard: self.log.tensorboard.then(|| self.checkpoint.dir.join("tensorboard")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "m"
[rope]
target_length = 32768
[data]
sources = [{ type = "text", path = "corpus" }]
[train]
steps = 10
seq_len = 16384
[checkpoint]
dir = "runs/x"
"#;

    fn err(text: &str) -> String {
        format!("{:#}", TrainConfig::parse(text).unwrap_err())
    }

    #[test]
    fn minimal_config_has_sane_defaults() {
        let c = TrainConfig::parse(MINIMAL).unwrap();
        assert_eq!(c.optim.lr, 2e-5);
        assert_eq!(c.data.short_share, 0.3);
        assert_eq!(c.rope.attention_factor, AttentionFactor::Longrope);
        assert_eq!(c.total_steps(1), 10);
        let paths = MetricsPaths {
            jsonl: PathBuf::from("runs/x/metrics.jsonl"),
            tensorboard: Some(PathBuf::from("runs/x/tensorboard")),
        };
        assert_eq!(c.metrics_path(), paths);
        let off = TrainConfig::parse(&format!("{MINIMAL}[log]\ntensorboard = false\n")).unwrap();
        assert_eq!(off.metrics_path().tensorboard, None);
        // The LM head runs in chunks unless asked otherwise; the dtype follows the device.
        assert_eq!(c.train.loss_chunk, 2048);
        assert_eq!(c.model.dtype, "auto");
        assert!(!c.rope.keep_sliding_window);
        let whole = TrainConfig::parse(&MINIMAL.replace("seq_len = 16384", "seq_len = 16384\nloss_chunk = 0")).unwrap();
        assert_eq!(whole.train.loss_chunk, 0);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let e = err(&MINIMAL.replace("steps = 10", "steps = 10\nstesp = 3"));
        assert!(e.contains("train") && e.contains("stesp"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_value() {
        let e = err(&MINIMAL.replace("seq_len = 16384", "seq_len = \"long\""));
        assert!(e.contains("`train.seq_len`") && e.contains("long"), "{e}");
    }

    #[test]
    fn bad_values_say_what_is_allowed() {
        let e = err(&MINIMAL.replace("[rope]\n", "[rope]\nattention_factor = \"su\"\n"));
        assert!(
            e.contains("rope.attention_factor")
                && e.contains("\"longrope\", \"native\", \"none\" or a positive number"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("[rope]\n", "[rope]\ninit = \"ntk\"\nlong_factor = [1.0]\n"));
        assert!(e.contains("only one of"), "{e}");
        let e = err(&MINIMAL.replace("[rope]\n", "[rope]\ninit = \"ntk-by-parts\"\n"));
        assert!(e.contains("rope.init") && e.contains("ntk-by-parts") && e.contains("longrope2"), "{e}");
        // The earlier spelling of the LongRoPE2 initial factors still reads.
        let c = TrainConfig::parse(&MINIMAL.replace("[rope]\n", "[rope]\ninit = \"longrope-ntk-init\"\n")).unwrap();
        assert_eq!(c.rope.init, Some(FactorSet::Longrope2));
        let e = err(&MINIMAL.replace("steps = 10", "steps = 10\ntokens = 5"));
        assert!(e.contains("not both"), "{e}");
        let e = err(&format!("{MINIMAL}\n[distributed]\nzero2 = true\n"));
        assert!(e.contains("`distributed.zero2`") && e.contains("set zero1 = true too"), "{e}");
        let e = err(&format!("{MINIMAL}\n[distributed]\ncontext_parallel = 0\n"));
        assert!(e.contains("`distributed.context_parallel`") && e.contains("must be >= 1"), "{e}");
    }

    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".toml") && !name.starts_with("search") {
                TrainConfig::read(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                n += 1;
            }
        }
        assert!(n >= 3, "expected the demo and the two real-size recipes, found {n}");
    }

    #[test]
    fn tokens_become_steps() {
        let c = TrainConfig::parse(&MINIMAL.replace("steps = 10", "tokens = 100000")).unwrap();
        assert_eq!(c.total_steps(1), 7); // ceil(100000 / 16384)
        assert_eq!(c.total_steps(2), 4);
    }
}
