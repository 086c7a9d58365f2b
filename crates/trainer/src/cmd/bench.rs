//! `longmix bench`: train a few steps of one shape and print what they cost, as JSON.
//!
//! The step is the trainer's own [`StepEngine::step`] (a single process, one micro-batch of all
//! rows): forward and backward with the run's memory options, float32 gradients, the global
//! gradient norm and AdamW (the fused kernel where the device has one). Rows are random tokens: long rows are one document of `--seq-len` tokens, packed rows hold documents
//! of `--doc-len` tokens back to back (positions restart at each). `benches/reference.py` runs
//! the same shape with PyTorch + transformers and `benches/compare.py` alternates the two.
//!
//! Reported: tokens/s, achieved TFLOP/s and MFU ([`ModelConfig::train_flops`]: `6 N` per token
//! for the matmul weights plus causal attention; layer recomputation is not counted, as in
//! PaLM's MFU), peak memory next to the plan's estimate, and the median time split (data,
//! forward, LM head, backward, optimizer). Medians are over the steps after `--warmup`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use longmix_data::{Piece, Row, Window};
use longmix_model::{load_model, next_token_targets, CausalLm, MemoryOptions, ModelConfig, IGNORE_INDEX};
use serde_json::json;
use tch::{nn, Device, Kind, Tensor};

use crate::device::{gpu_name, intra_op_threads, peak_tflops, ComputeArgs};
use crate::estimate::MemoryEstimate;
use crate::metrics::{peak_rss_mb, reset_peak_rss};
use crate::optim::AdamWConfig;
use crate::train::{Batch, CudaPeaks, ParallelDims, StepEngine, StepStats};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model folder (its weights are loaded).
    #[arg(long, required_unless_present = "preset", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// An architecture with random weights: smollm2-135m, llama3.2-1b, phi3-mini-4k, llama3-8b,
    /// qwen2.5-7b, qwen3-8b.
    #[arg(long)]
    pub preset: Option<String>,
    /// The preset with this many decoder layers (its width unchanged): an 8B-shaped step whose
    /// weights and optimizer fit one GPU, to measure the per-layer activation memory.
    #[arg(long, requires = "preset")]
    pub layers: Option<i64>,
    /// Tokens per row.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: i64,
    /// Rows per optimizer step (one micro-batch).
    #[arg(long, default_value_t = 1)]
    pub rows: i64,
    /// Share of the rows made of packed documents of --doc-len tokens (the rest are long rows).
    #[arg(long, default_value_t = 0.0)]
    pub packed_share: f64,
    /// Document length in packed rows.
    #[arg(long, default_value_t = 1024)]
    pub doc_len: i64,
    /// Measured steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Steps run first and not measured.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Recompute each decoder layer in the backward (activation checkpointing).
    #[arg(long)]
    pub checkpoint_layers: bool,
    /// LM-head positions per chunk (0: all at once).
    #[arg(long, default_value_t = 2048)]
    pub loss_chunk: i64,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// LibTorch intra-op threads (default: as `longmix train` chooses them).
    #[arg(long)]
    pub threads: Option<i32>,
    /// The tensor-op AdamW instead of the fused kernel.
    #[arg(long)]
    pub reference_adamw: bool,
    /// The device's peak dense TFLOP/s for MFU (default: known GPUs by name; none on CPU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Record the last measured step with LibTorch's profiler and write its Chrome trace here
    /// (`benches/profile_ops.py` compares two traces op by op).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Also write the JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The rows of one step (random tokens; each row's window as the model will judge it from
/// `l0`), and their summed squared document lengths (for the FLOP count).
fn rows(a: &Args, vocab: i64, l0: i64) -> (Vec<Row>, f64) {
    let packed = (a.packed_share * a.rows as f64).round() as i64;
    let doc = a.doc_len.clamp(1, a.seq_len);
    let mut doc_len_sq = 0.0;
    let rows = (0..a.rows)
        .map(|r| {
            let len = if r < packed { doc } else { a.seq_len };
            let position_ids: Vec<i64> = (0..a.seq_len).map(|t| t % len).collect();
            let (full, rest) = (a.seq_len / len, a.seq_len % len);
            doc_len_sq += full as f64 * (len as f64).powi(2) + (rest as f64).powi(2);
            let input_ids =
                Vec::<i64>::try_from(Tensor::randint(vocab, [a.seq_len], (Kind::Int64, Device::Cpu))).unwrap();
            let targets = next_token_targets(&input_ids, &position_ids);
            let pieces = std::iter::repeat_n(len as usize, full as usize)
                .chain((rest > 0).then_some(rest as usize))
                .map(|len| Piece { len, origin: None })
                .collect();
            Row {
                n_targets: targets.iter().filter(|&&t| t != IGNORE_INDEX).count(),
                kind: Window::of_positions(&position_ids, l0),
                input_ids,
                position_ids,
                targets,
                source_tokens: vec![],
                pieces,
                index: r as u64,
                source: None,
            }
        })
        .collect();
    (rows, doc_len_sq)
}

/// One step's wall time (data included) and the step's own figures.
struct StepRecord {
    step_s: f64,
    data_s: f64,
    stats: StepStats,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The flags' ranges, each error naming the flag and what it takes.
fn check(a: &Args) -> Result<()> {
    ensure!(a.seq_len >= 2, "--seq-len {}: a row needs at least 2 tokens", a.seq_len);
    ensure!(a.rows >= 1, "--rows {}: a step needs at least one row", a.rows);
    ensure!((0.0..=1.0).contains(&a.packed_share), "--packed-share {}: give a share from 0 to 1", a.packed_share);
    ensure!(a.doc_len >= 2, "--doc-len {}: a document needs at least 2 tokens", a.doc_len);
    ensure!(a.steps >= 1, "--steps 0: measure at least one step");
    ensure!(a.loss_chunk >= 0, "--loss-chunk {}: give a positive chunk, or 0 for all positions at once", a.loss_chunk);
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    check(&a)?;
    let threads = intra_op_threads(a.threads, 1);
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let (device, kind) = a.compute.resolve()?;
    let (mut vs, model, name) = match (&a.model, &a.preset) {
        (Some(dir), _) => {
            let lm = load_model(dir, Kind::Float, device)?;
            (lm.vs, lm.model, dir.display().to_string())
        }
        (None, Some(p)) => {
            let mut config = longmix_model::presets::preset(p)?;
            config.num_hidden_layers = a.layers.unwrap_or(config.num_hidden_layers);
            let vs = nn::VarStore::new(device);
            let model = CausalLm::new(&vs.root(), config);
            let name = a.layers.map_or(p.clone(), |n| format!("{p} ({n} layers)"));
            (vs, model, name)
        }
        (None, None) => unreachable!("clap requires --model or --preset"),
    };
    let c: ModelConfig = model.config.clone();
    let mem = MemoryOptions {
        checkpoint_layers: a.checkpoint_layers,
        loss_chunk: (a.loss_chunk > 0).then_some(a.loss_chunk),
        sync_phases: true,
    };
    let optim_cfg = AdamWConfig { fused: !a.reference_adamw, ..Default::default() };
    // The trainer's step: one micro-batch of every row, a single process.
    let mut engine = StepEngine::new(&mut vs, None, ParallelDims::SINGLE, optim_cfg, kind, mem, a.rows as usize)?;
    let tokens = a.rows * a.seq_len;
    let estimate = MemoryEstimate::new(&c, kind, engine.opt.memory(1.0), tokens, 1, mem, device);
    let bar = indicatif::ProgressBar::new((a.warmup + a.steps) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("bench {bar:30} {pos}/{len} steps  {per_sec}  eta {eta}  {msg}")
            .unwrap(),
    );
    let mut rec: Vec<StepRecord> = Vec::new();
    let mut doc_len_sq = 0.0;
    for i in 0..a.warmup + a.steps {
        if i == a.warmup {
            reset_peak_rss();
        }
        let profiled = a.profile.as_ref().filter(|_| i + 1 == a.warmup + a.steps);
        if profiled.is_some() {
            longmix_torch_ext::profile::start(device.is_cuda())?;
        }
        let t0 = Instant::now();
        let (batch, sq) = rows(&a, c.vocab_size, c.rope.original_max_position_embeddings);
        doc_len_sq = sq;
        let data_s = t0.elapsed().as_secs_f64();
        let step =
            Batch { rows: &batch, step: i as u64 + 1, lr: 1e-5, stop: false, data_wait_s: data_s, tokens_seen: 0 };
        let s = engine.step(&model, &step)?.stats;
        rec.push(StepRecord { step_s: t0.elapsed().as_secs_f64(), data_s, stats: s.clone() });
        if let Some(path) = profiled {
            longmix_torch_ext::profile::stop(path)?;
        }
        bar.set_message(format!("loss {:.3}", s.loss));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let measured = &rec[a.warmup.min(rec.len())..];
    let step_s = median(measured.iter().map(|r| r.step_s).collect());
    let tokens = tokens as f64;
    let flops = c.train_flops(tokens, doc_len_sq);
    let gpu = match device {
        Device::Cuda(i) => gpu_name(i as i32),
        _ => None,
    };
    let peak_tflops = a.peak_tflops.or_else(|| peak_tflops(device));
    let tflops = flops / step_s / 1e12;
    // Each step starts the GPU's peaks afresh: the run's peak is the largest step's.
    let peak = |f: fn(&CudaPeaks) -> f64| measured.iter().filter_map(|r| r.stats.cuda.as_ref().map(f)).reduce(f64::max);
    let split = |f: &dyn Fn(&StepRecord) -> f64| median(measured.iter().map(f).collect());
    let report = json!({
        "tool": "longmix",
        "model": name,
        "params": c.n_params(),
        "seq_len": a.seq_len,
        "rows": a.rows,
        "packed_share": a.packed_share,
        "doc_len": a.doc_len,
        "dtype": format!("{kind:?}"),
        "device": format!("{device:?}"),
        "gpu": gpu,
        "threads": threads,
        "checkpoint_layers": a.checkpoint_layers,
        "loss_chunk": a.loss_chunk,
        "optimizer": if engine.opt.is_fused() { "fused" } else { "reference" },
        "steps": measured.len(),
        "tokens_per_step": tokens,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "flops_per_step": flops,
        "tflops": tflops,
        "peak_tflops": peak_tflops,
        "mfu": peak_tflops.map(|p| tflops / p),
        "split_s": {
            "data": split(&|r| r.data_s),
            "forward": split(&|r| r.stats.timing.forward_s),
            "head": split(&|r| r.stats.timing.head_s),
            "backward": split(&|r| r.stats.timing.backward_s),
            "optimizer": split(&|r| r.stats.timing.optimizer_s),
        },
        "step_times_s": measured.iter().map(|r| r.step_s).collect::<Vec<_>>(),
        "losses": measured.iter().map(|r| r.stats.loss).collect::<Vec<_>>(),
        "grad_norms": measured.iter().map(|r| r.stats.grad_norm).collect::<Vec<_>>(),
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_allocated_mb": peak(|p| p.cuda_peak_allocated_mb),
        "cuda_peak_reserved_mb": peak(|p| p.cuda_peak_reserved_mb),
        "memory_estimate_mb": estimate.total_bytes() / 1e6,
        "memory_estimate": estimate.to_json(),
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &a.json {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
