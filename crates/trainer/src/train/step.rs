//! One optimizer step over a global batch of rows, the same code for `longmix train` and
//! `longmix bench`: this rank's rows -> forward and backward per micro-batch (gradients folded
//! into float32, reduced over the ranks as the layers finish) -> the step's sums over the ranks
//! -> gradient norm and finiteness check -> AdamW update.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use longmix_data::Row;
use longmix_model::{CausalLm, MemoryOptions, Phases, StepLoss, Window};
use longmix_torch_ext::cuda::{self, CudaMemory};
use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use super::parallel::{Parallel, ParallelDims};
use crate::device::peak_tflops;
use crate::distributed::{self, CommTimes, Dist};
use crate::grads::Grads;
use crate::metrics::peak_rss_mb;
use crate::optim::{AdamW, AdamWConfig};

/// Summed NLL, scored tokens and rows of one RoPE window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowSums {
    pub nll: f64,
    pub tokens: f64,
    pub rows: f64,
}

impl WindowSums {
    /// Mean NLL per scored token (None without rows of this window).
    fn mean(&self) -> Option<f64> {
        (self.tokens > 0.0).then(|| self.nll / self.tokens)
    }
}

/// What a step adds up over its rows and its ranks, reduced in one collective.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepSums {
    pub short: WindowSums,
    pub long: WindowSums,
    /// Rows whose loader label disagrees with the model's window (a data bug when not 0).
    pub window_mismatches: f64,
    /// Ranks asked to stop (SIGINT/SIGTERM): all stop at the same step.
    pub stop_requests: f64,
    /// Per rank (index = rank; each rank fills its own slot): forward + backward seconds,
    /// reduction wait seconds, peak resident memory in MB.
    pub rank_compute_s: Vec<f64>,
    pub rank_wait_s: Vec<f64>,
    pub rank_peak_rss_mb: Vec<f64>,
}

impl StepSums {
    fn new(world: usize) -> StepSums {
        StepSums {
            rank_compute_s: vec![0.0; world],
            rank_wait_s: vec![0.0; world],
            rank_peak_rss_mb: vec![0.0; world],
            ..Default::default()
        }
    }

    /// Add a micro-batch: its rows' NLL and tokens (this rank's share of them) under the window
    /// the model used for each; the rows themselves only when `count_rows` (one rank of a
    /// context-parallel group counts them).
    fn add(&mut self, out: &StepLoss, rows: &[&Row], count_rows: bool) {
        let count = count_rows as u8 as f64;
        for (i, w) in out.windows.iter().enumerate() {
            let sums = if *w == Window::Long { &mut self.long } else { &mut self.short };
            sums.nll += out.loss.row_nll[i];
            sums.tokens += out.loss.row_tokens[i] as f64;
            sums.rows += count;
            self.window_mismatches += count * (rows[i].kind != *w) as u8 as f64;
        }
    }

    /// The flat vector one all-reduce sums: the one place its layout is written.
    pub fn to_flat(&self) -> Vec<f64> {
        let (s, l) = (&self.short, &self.long);
        let mut v = vec![s.nll, s.tokens, s.rows, l.nll, l.tokens, l.rows, self.window_mismatches, self.stop_requests];
        v.extend(self.rank_compute_s.iter().chain(&self.rank_wait_s).chain(&self.rank_peak_rss_mb));
        v
    }

    /// [`StepSums::to_flat`] read back, for `world` ranks.
    pub fn from_flat(v: &[f64], world: usize) -> StepSums {
        let ranks = |k: usize| v[8 + k * world..8 + (k + 1) * world].to_vec();
        StepSums {
            short: WindowSums { nll: v[0], tokens: v[1], rows: v[2] },
            long: WindowSums { nll: v[3], tokens: v[4], rows: v[5] },
            window_mismatches: v[6],
            stop_requests: v[7],
            rank_compute_s: ranks(0),
            rank_wait_s: ranks(1),
            rank_peak_rss_mb: ranks(2),
        }
    }
}

/// Where a step's seconds went on this rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepTiming {
    pub step_s: f64,
    /// The loop's wait for the prefetcher's rows before the step.
    pub data_wait_s: f64,
    /// Forward + backward of this rank's micro-batches.
    pub compute_s: f64,
    /// Building gradient buckets and launching their reductions (during the backward).
    pub comm_launch_s: f64,
    /// Waiting for the reduction after the backward (unhidden communication plus slower ranks).
    pub comm_wait_s: f64,
    /// Context parallelism: the all-to-alls around attention (forward, recomputation and
    /// backward), part of `compute_s`.
    pub all_to_all_s: f64,
    /// Forward / LM head / backward, summed over the micro-batches (on CUDA as the host saw
    /// them: kernels still queued count in the next phase).
    pub forward_s: f64,
    pub head_s: f64,
    pub backward_s: f64,
    /// Gradient norm, AdamW update and (ZeRO-1) parameter broadcast.
    pub optimizer_s: f64,
}

/// This rank's GPU memory at its peak over the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CudaPeaks {
    pub cuda_peak_allocated_mb: f64,
    pub cuda_peak_reserved_mb: f64,
}

/// Every rank's figures (data parallel).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankStats {
    pub rank_compute_s: Vec<f64>,
    pub rank_wait_s: Vec<f64>,
    /// How long each rank waited for the slowest one's compute.
    pub rank_idle_s: Vec<f64>,
    pub rank_peak_rss_mb: Vec<f64>,
}

/// What one optimizer step did: a `metrics.jsonl` step line as it is serialised.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    pub window_mismatches: usize,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Row tokens of the step (padding included) per second.
    pub tokens_per_s: f64,
    /// Training FLOP/s per rank, 10^12 (`ModelConfig::train_flops` of the global batch over the
    /// ranks and the step's seconds), and as a share of the GPU's bf16 peak where it is known.
    pub tflops: f64,
    pub mfu: Option<f64>,
    pub tokens_seen: u64,
    pub peak_rss_mb: f64,
    #[serde(flatten)]
    pub timing: StepTiming,
    #[serde(flatten)]
    pub cuda: Option<CudaPeaks>,
    #[serde(flatten)]
    pub ranks: Option<RankStats>,
}

/// One step's input: the global batch (every rank the same rows) and what the loop knows.
pub struct Batch<'a> {
    pub rows: &'a [Row],
    /// The step about to run (1-based).
    pub step: u64,
    pub lr: f64,
    /// This rank's stop request (SIGINT/SIGTERM), agreed on with the others.
    pub stop: bool,
    pub data_wait_s: f64,
    /// Tokens seen before this step.
    pub tokens_seen: u64,
}

/// A finished step, and whether any rank asked to stop.
pub struct StepOutcome {
    pub stats: StepStats,
    pub stop_requested: bool,
}

/// The parameters, their float32 gradients, the optimizer and the parallel layout: what a step
/// changes.
pub struct StepEngine {
    /// Every parameter, sorted by name (the order all ranks share).
    pub params: Vec<(String, Tensor)>,
    grads: Grads,
    pub opt: AdamW,
    pub mem: MemoryOptions,
    micro_batch_rows: usize,
    device: Device,
    /// The device's bf16 peak TFLOP/s (for MFU), where known.
    peak_tflops: Option<f64>,
    pub parallel: Parallel,
}

/// Rows -> `[B, T]` input, position and target tensors on `device`.
pub fn batch_tensors(rows: &[&Row], device: Device) -> (Tensor, Tensor, Tensor) {
    let stack = |f: fn(&Row) -> &Vec<i64>| {
        let parts: Vec<Tensor> = rows.iter().map(|r| Tensor::from_slice(f(r))).collect();
        Tensor::stack(&parts, 0).to_device(device)
    };
    (stack(|r| &r.input_ids), stack(|r| &r.position_ids), stack(|r| &r.targets))
}

impl StepEngine {
    /// Over the float32 variables of `vs`, which then compute in `kind`: AdamW keeps float32
    /// masters of this rank's share, the model's copies are cast, the gradients accumulate in
    /// float32. `dist` makes the layout the mesh of `dims`.
    pub fn new(
        vs: &mut nn::VarStore,
        dist: Option<Dist>,
        dims: ParallelDims,
        optim: AdamWConfig,
        kind: Kind,
        mem: MemoryOptions,
        micro_batch_rows: usize,
    ) -> Result<StepEngine> {
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let parallel = Parallel::new(dist, dims, &params)?;
        let opt = AdamW::new(optim, parallel.optimizer_params(&params), kind);
        vs.set_kind(kind);
        let grads = Grads::new(&params, parallel.gradient_owners(&params).as_deref());
        let device = vs.device();
        Ok(StepEngine { params, grads, opt, mem, micro_batch_rows, device, peak_tflops: peak_tflops(device), parallel })
    }

    /// One optimizer step over `batch` (this rank trains its share). The loss is the mean over
    /// all target tokens of the global step. A non-finite loss or gradient fails before the
    /// weights change, so the last checkpoint stays the latest good one.
    pub fn step(&mut self, model: &CausalLm, batch: &Batch) -> Result<StepOutcome> {
        let t0 = Instant::now();
        let exchanged = self.parallel.all_to_all_seconds();
        self.parallel.at_step(batch.step);
        let step_targets: usize = batch.rows.iter().map(|r| r.n_targets).sum();
        let mine = self.parallel.rows(batch.rows, &model.config);
        let (mut sums, phases, comm, compute_s) = self.forward_backward(model, &mine, step_targets)?;
        sums.stop_requests = batch.stop as u8 as f64;
        self.parallel.reduce_sums(&mut sums)?;
        let loss = (sums.short.nll + sums.long.nll) / step_targets.max(1) as f64;
        let t_opt = Instant::now();
        let grad_norm = self.update(batch, loss)?;
        if let (true, Device::Cuda(d)) = (self.mem.sync_phases, self.device) {
            tch::Cuda::synchronize(d as i64);
        }
        let optimizer_s = t_opt.elapsed().as_secs_f64();
        let tokens = batch.rows.iter().map(|r| r.input_ids.len() as u64).sum::<u64>();
        let seconds = t0.elapsed().as_secs_f64();
        let flops: f64 = batch.rows.iter().map(|r| distributed::row_cost(r, &model.config)).sum();
        let tflops = flops / self.parallel.rank_world().1 as f64 / seconds / 1e12;
        let timing = StepTiming {
            step_s: seconds,
            data_wait_s: batch.data_wait_s,
            compute_s,
            comm_launch_s: comm.launch_s,
            comm_wait_s: comm.wait_s,
            all_to_all_s: self.parallel.all_to_all_seconds() - exchanged,
            forward_s: phases.forward_s,
            head_s: phases.head_s,
            backward_s: phases.backward_s,
            optimizer_s,
        };
        let stats = StepStats {
            step: batch.step,
            loss,
            loss_short: sums.short.mean(),
            loss_long: sums.long.mean(),
            rows_short: sums.short.rows as usize,
            rows_long: sums.long.rows as usize,
            window_mismatches: sums.window_mismatches as usize,
            lr: batch.lr,
            grad_norm,
            tokens_per_s: tokens as f64 / seconds,
            tflops,
            mfu: self.peak_tflops.map(|p| tflops / p),
            tokens_seen: batch.tokens_seen + tokens,
            peak_rss_mb: peak_rss_mb(),
            timing,
            cuda: self.cuda_peaks()?,
            ranks: self.parallel.dist().map(|_| RankStats {
                rank_idle_s: distributed::idle(&sums.rank_compute_s),
                rank_compute_s: sums.rank_compute_s,
                rank_wait_s: sums.rank_wait_s,
                rank_peak_rss_mb: sums.rank_peak_rss_mb,
            }),
        };
        Ok(StepOutcome { stats, stop_requested: sums.stop_requests > 0.0 })
    }

    /// Forward and backward of this rank's rows in micro-batches, each layer's gradients folded
    /// into float32 as its backward ends (and, in the last micro-batch or with ZeRO-2 in every
    /// one, reduced right away; a rank without rows still joins the reduction).
    /// Returns the step's sums (this rank's), phases, communication times and compute seconds.
    fn forward_backward(
        &self,
        model: &CausalLm,
        mine: &[&Row],
        step_targets: usize,
    ) -> Result<(StepSums, Phases, CommTimes, f64)> {
        let t0 = Instant::now();
        let scale = 1.0 / step_targets.max(1) as f64;
        let (rank, world) = self.parallel.rank_world();
        let (mut sums, mut phases, mut comm) = (StepSums::new(world), Phases::default(), CommTimes::default());
        self.grads.zero();
        let every = self.parallel.reduces_every_micro_batch();
        let micro: Vec<&[&Row]> = mine.chunks(self.micro_batch_rows).collect();
        let mut reduction = micro.is_empty().then(|| self.parallel.begin_reduction(&self.grads));
        for (k, mb) in micro.iter().enumerate() {
            let reduced = every || k + 1 == micro.len();
            if reduced {
                reduction = Some(self.parallel.begin_reduction(&self.grads));
            }
            let reduce_now = reduced && self.parallel.overlaps();
            let tokens = self.parallel.tokens(model, mb, self.device);
            let out = self.parallel.guard("forward and backward", || {
                model.forward_backward_with(&tokens, scale, self.mem, &mut |layer| {
                    self.grads.fold_layer(layer);
                    if let (true, Some(r)) = (reduce_now, reduction.as_mut()) {
                        r.layer_done(layer);
                    }
                })
            })?;
            self.grads.fold_all();
            phases.add(&out.phases);
            sums.add(&out, mb, self.parallel.counts_rows());
            if every {
                comm.add(reduction.take().expect("begun above").finish()?);
            }
        }
        let compute_s = t0.elapsed().as_secs_f64();
        if let Some(r) = reduction {
            comm.add(r.finish()?);
        }
        sums.rank_compute_s[rank] = compute_s;
        sums.rank_wait_s[rank] = comm.wait_s;
        sums.rank_peak_rss_mb[rank] = peak_rss_mb();
        Ok((sums, phases, comm, compute_s))
    }

    /// Gradient norm, the finiteness check, AdamW, and what the layout does after it.
    fn update(&mut self, batch: &Batch, loss: f64) -> Result<f64> {
        let grads = self.grads.all();
        let grad_norm = self.parallel.grad_norm(&self.params, &grads)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "step {}: the loss is {loss} and the gradient norm {grad_norm}: training diverged. Nothing was saved \
                 or exported for this step; the latest checkpoint is the last good one. Lower optim.lr, enable \
                 optim.grad_clip, or train in f32, then resume with --resume",
                batch.step
            );
        }
        let by_name: BTreeMap<String, Tensor> =
            self.params.iter().zip(grads).map(|((n, _), g)| (n.clone(), g)).collect();
        self.opt.step(batch.lr, grad_norm, &by_name);
        self.parallel.after_update(&self.params)?;
        Ok(grad_norm)
    }

    /// This GPU's peaks since the last step, started afresh (None on CPU).
    fn cuda_peaks(&self) -> Result<Option<CudaPeaks>> {
        let Device::Cuda(d) = self.device else { return Ok(None) };
        let m: CudaMemory = cuda::memory(d)?;
        cuda::reset_peak(d)?;
        Ok(Some(CudaPeaks {
            cuda_peak_allocated_mb: m.peak_allocated as f64 / 1e6,
            cuda_peak_reserved_mb: m.peak_reserved as f64 / 1e6,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longmix_model::{next_token_targets, ModelConfig};

    const TINY: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
      "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#;

    /// Four rows of 96 tokens from fixed formulas: two long (one document past L0 = 64), two
    /// packed with documents of 32.
    fn rows() -> Vec<Row> {
        (0..4)
            .map(|r| {
                let doc = if r < 2 { 96 } else { 32 };
                let input_ids: Vec<i64> = (0..96).map(|t| (t * 7919 + r * 131) % 512).collect();
                let position_ids: Vec<i64> = (0..96).map(|t| t % doc).collect();
                let targets = next_token_targets(&input_ids, &position_ids);
                Row {
                    n_targets: targets.iter().filter(|&&t| t >= 0).count(),
                    kind: if r < 2 { Window::Long } else { Window::Short },
                    input_ids,
                    position_ids,
                    targets,
                    source_tokens: vec![],
                    pieces: vec![],
                    index: r as u64,
                    source: None,
                }
            })
            .collect()
    }

    /// One step over `rows()` in micro-batches of `micro` rows, from the same weights.
    fn one_step(micro: usize, weights: &[(String, Tensor)]) -> StepStats {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let model = CausalLm::new(&vs.root(), ModelConfig::from_json_str(TINY).unwrap());
        let vars = vs.variables();
        tch::no_grad(|| weights.iter().for_each(|(n, w)| vars[n].shallow_clone().copy_(w)));
        let mem = MemoryOptions { checkpoint_layers: true, loss_chunk: Some(64), sync_phases: false };
        let mut engine =
            StepEngine::new(&mut vs, None, ParallelDims::SINGLE, AdamWConfig::default(), Kind::Float, mem, micro)
                .unwrap();
        let rows = rows();
        let batch = Batch { rows: &rows, step: 1, lr: 1e-3, stop: false, data_wait_s: 0.0, tokens_seen: 0 };
        engine.step(&model, &batch).unwrap().stats
    }

    /// `longmix bench` runs a step as one micro-batch of every row, `longmix train` in micro-batches
    /// of `train.micro_batch_rows`: the same engine must give the same loss and gradient norm.
    #[test]
    fn one_micro_batch_and_four_give_the_same_step() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = CausalLm::new(&vs.root(), ModelConfig::from_json_str(TINY).unwrap());
        let weights: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .enumerate()
            .map(|(k, (n, t))| {
                let x = (Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu)) * 0.37 + k as f64).sin() * 0.05;
                let x = if n.ends_with("norm.weight") { x + 1.0 } else { x };
                (n, x.view(t.size().as_slice()))
            })
            .collect();
        let (bench, train) = (one_step(4, &weights), one_step(1, &weights));
        assert!((bench.loss - train.loss).abs() < 1e-6 * train.loss, "loss {} vs {}", bench.loss, train.loss);
        let dn = (bench.grad_norm - train.grad_norm).abs() / train.grad_norm;
        assert!(dn < 1e-5, "gradient norm {} vs {}", bench.grad_norm, train.grad_norm);
        assert_eq!((bench.rows_short, bench.rows_long, train.rows_short, train.rows_long), (2, 2, 2, 2));
        assert!(bench.loss_short.is_some() && bench.loss_long.is_some());
    }
}
