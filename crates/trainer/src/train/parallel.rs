//! The parallel layout of a run, as torchtitan's `ParallelDims`: built once from the world size
//! and `[distributed]`, validated, and the one value the train step asks for its rows and their
//! tokens, the start and finish of its gradient reduction, the reduction of its sums, the
//! gradient norm and what follows the update.
//!
//! The ranks form a mesh, world = dp x cp: context-parallel groups of `cp` consecutive ranks (one
//! node, NVLink) each train the same rows, every rank its slice of each row's tokens
//! (`longmix_model::context`); the `dp` groups share out the rows of a global batch. Gradients
//! are summed over all ranks (each rank's share of the loss is scaled by the whole step's target
//! tokens), ZeRO-1 shards over all ranks, and the fingerprint, agreements and heartbeats span
//! the whole world, as they do for data parallelism alone.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use anyhow::{bail, Result};
use longmix_data::Row;
use longmix_model::context::EXCHANGE_FAILED;
use longmix_model::{check_context_parallel, CausalLm, ContextParallel, ModelConfig, Tokens};
use longmix_torch_ext::c10d::ReduceOp;
use tch::{Device, Tensor};

use super::step::{batch_tensors, StepSums};
use crate::checkpoint::Team;
use crate::config::TrainConfig;
use crate::distributed::{self, CommTimes, Dist, GradSync, InFlight};
use crate::grads::Grads;
use crate::optim;

/// The named dimensions of a world of ranks, checked against the run and the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelDims {
    /// Data-parallel groups: each trains its share of every global batch.
    pub dp: usize,
    /// Context-parallel size: the ranks of a group split each of its rows' tokens.
    pub cp: usize,
    /// Whether each rank keeps the optimizer state of its share only (ZeRO-1, over all ranks).
    pub zero1: bool,
    /// ZeRO-2: and the float32 gradients of its share only.
    pub zero2: bool,
}

impl ParallelDims {
    /// One process.
    pub const SINGLE: ParallelDims = ParallelDims { dp: 1, cp: 1, zero1: false, zero2: false };

    /// The layout of `world` ranks for the run of `cfg` on model `model`.
    pub fn new(world: usize, cfg: &TrainConfig, model: &ModelConfig) -> Result<ParallelDims> {
        let cp = cfg.distributed.context_parallel;
        if !world.is_multiple_of(cp) {
            let divisors: Vec<usize> = (1..=world).filter(|&d| world.is_multiple_of(d)).collect();
            bail!(
                "key `distributed.context_parallel`: {cp} does not divide the {world} ranks of the run (world = data \
                 parallel x context parallel); use one of {divisors:?}, or start a multiple of {cp} ranks"
            );
        }
        check_context_parallel(model, cp)?;
        let dp = world / cp;
        let rows_per_step = cfg.rows_per_step(dp);
        if rows_per_step < dp {
            bail!(
                "key `train.global_batch_rows`: {rows_per_step} rows per step cannot give each of {dp} data-parallel \
                 groups a row; use at least {dp}"
            );
        }
        let d = &cfg.distributed;
        Ok(ParallelDims { dp, cp, zero1: world > 1 && d.zero1, zero2: world > 1 && d.zero2 })
    }

    pub fn world(&self) -> usize {
        self.dp * self.cp
    }

    /// A rank's data-parallel group and its index in its context-parallel group.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        (rank / self.cp, rank % self.cp)
    }
}

/// Who updates which parameters.
enum Update {
    /// Every rank updates every parameter.
    Replicated,
    /// ZeRO-1: the rank updating each parameter, which broadcasts it afterwards.
    Sharded(BTreeMap<String, usize>),
}

/// Ranks of a dp x cp mesh over a process group.
pub struct Mesh {
    pub dist: Dist,
    pub dims: ParallelDims,
    /// This rank's context-parallel group (cp > 1).
    context: Option<ContextParallel>,
    sync: GradSync,
    update: Update,
}

/// What the train step asks of the layout.
pub enum Parallel {
    /// One process: every row, gradients as they are.
    Single,
    Mesh(Box<Mesh>),
}

/// A step's gradient reduction (none for a single process), with the group that names its
/// failures.
pub enum Reduction<'a> {
    None,
    InFlight(InFlight<'a>, &'a Dist),
}

impl Reduction<'_> {
    /// Decoder layer `layer`'s gradients are complete (and folded into float32).
    pub fn layer_done(&mut self, layer: usize) {
        if let Reduction::InFlight(f, _) = self {
            f.layer_done(layer);
        }
    }

    /// Launch what is left and wait for every bucket.
    pub fn finish(self) -> Result<CommTimes> {
        match self {
            Reduction::InFlight(f, d) => f.finish().map_err(|e| d.failure("gradient all-reduce", e)),
            Reduction::None => Ok(CommTimes::default()),
        }
    }
}

impl Parallel {
    /// The layout for `params` (sorted by name, as every rank sorts them): a single process
    /// without `dist`, the mesh of `dims` with it (its context-parallel groups are made here).
    pub fn new(dist: Option<Dist>, dims: ParallelDims, params: &[(String, Tensor)]) -> Result<Parallel> {
        let Some(dist) = dist else { return Ok(Parallel::Single) };
        let context = if dims.cp > 1 { Some(context_group(&dist, dims)?) } else { None };
        let update = match dist.cfg.zero1 {
            true => Update::Sharded(distributed::owners(params, dist.world())),
            false => Update::Replicated,
        };
        let owner = match &update {
            Update::Sharded(o) => Some(o),
            Update::Replicated => None,
        };
        let sync = GradSync::new(params, (dist.cfg.bucket_mb * 1e6) as usize, owner, dims.zero2);
        Ok(Parallel::Mesh(Box::new(Mesh { dist, dims, context, sync, update })))
    }

    pub fn dist(&self) -> Option<&Dist> {
        match self {
            Parallel::Single => None,
            Parallel::Mesh(m) => Some(&m.dist),
        }
    }

    /// This rank's context-parallel group (None without context parallelism).
    pub fn context(&self) -> Option<&ContextParallel> {
        match self {
            Parallel::Mesh(m) => m.context.as_ref(),
            Parallel::Single => None,
        }
    }

    /// Seconds this rank has spent in context-parallel all-to-alls so far (0 without them).
    pub fn all_to_all_seconds(&self) -> f64 {
        self.context().map_or(0.0, |cp| cp.group().all_to_all_seconds())
    }

    /// This rank's data-parallel group and the number of groups ((0, 1) for a single process).
    pub fn data_group(&self) -> (usize, usize) {
        match self {
            Parallel::Mesh(m) => (m.dims.coords(m.dist.rank()).0, m.dims.dp),
            Parallel::Single => (0, 1),
        }
    }

    /// Whether this rank counts whole-row figures (rows, window labels): one rank per
    /// context-parallel group, as every rank of it trains the same rows.
    pub fn counts_rows(&self) -> bool {
        self.context().is_none_or(|cp| cp.rank() == 0)
    }

    /// The model's input for `rows` on `device`: the whole rows, or this rank's slice of them.
    pub fn tokens(&self, model: &CausalLm, rows: &[&Row], device: Device) -> Tokens {
        let (ids, pos, tgt) = batch_tensors(rows, device);
        match self.context() {
            Some(cp) => model.slice_tokens(&ids, &pos, &tgt, cp),
            None => model.tokens(&ids, &pos, &tgt),
        }
    }

    /// Run `f` (a forward, or a forward and backward); under context parallelism a failed
    /// all-to-all inside it (a dead or hung peer of the group) becomes the error naming the
    /// rank, as a failed collective does. Other panics go on as they were.
    pub fn guard<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let (Some(d), Some(_)) = (self.dist(), self.context()) else { return Ok(f()) };
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => Ok(v),
            Err(payload) => match panic_text(payload.as_ref()) {
                Some(text) if text.contains(EXCHANGE_FAILED) => {
                    Err(d.failure(&format!("context-parallel all-to-all of the {what}"), anyhow::anyhow!("{text}")))
                }
                _ => resume_unwind(payload),
            },
        }
    }

    /// ZeRO-1: the group and the owner of each parameter.
    fn sharded(&self) -> Option<(&Dist, &BTreeMap<String, usize>)> {
        match self {
            Parallel::Mesh(m) => match &m.update {
                Update::Sharded(owner) => Some((&m.dist, owner)),
                Update::Replicated => None,
            },
            Parallel::Single => None,
        }
    }

    /// This process's rank and the world size ((0, 1) for a single process).
    pub fn rank_world(&self) -> (usize, usize) {
        self.dist().map_or((0, 1), |d| (d.rank(), d.world()))
    }

    /// Whether this rank prints, writes metrics and exports.
    pub fn is_main(&self) -> bool {
        self.rank_world().0 == 0
    }

    /// Tell the group which step its collectives belong to (for their error messages).
    pub fn at_step(&self, step: u64) {
        if let Some(d) = self.dist() {
            d.at_step(step);
        }
    }

    /// This rank's rows of a global batch (its data-parallel group's), balanced by compute when
    /// `[distributed] balance`.
    pub fn rows<'r>(&self, rows: &'r [Row], model: &ModelConfig) -> Vec<&'r Row> {
        let Some(d) = self.dist() else { return rows.iter().collect() };
        let (group, groups) = self.data_group();
        let costs: Vec<f64> = rows.iter().map(|r| distributed::row_cost(r, model)).collect();
        let shares = distributed::assign_rows(&costs, groups, d.cfg.balance);
        shares[group].iter().map(|&i| &rows[i]).collect()
    }

    /// The parameters this rank's optimizer updates (all, or its ZeRO-1 share).
    pub fn optimizer_params(&self, params: &[(String, Tensor)]) -> BTreeMap<String, Tensor> {
        let rank = self.rank_world().0;
        let mine = |n: &String| match self {
            Parallel::Mesh(d) => match &d.update {
                Update::Sharded(owner) => owner[n] == rank,
                Update::Replicated => true,
            },
            _ => true,
        };
        params.iter().filter(|(n, _)| mine(n)).map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    /// Start the step's gradient reduction over `grads`; with `overlap` it follows the layers.
    pub fn begin_reduction<'a>(&'a self, grads: &'a Grads) -> Reduction<'a> {
        match self {
            Parallel::Single => Reduction::None,
            Parallel::Mesh(d) => Reduction::InFlight(d.sync.begin(&d.dist.pg, grads), &d.dist),
        }
    }

    /// Whether the reduced micro-batch's layers start their reduction as their backward ends.
    pub fn overlaps(&self) -> bool {
        self.dist().is_some_and(|d| d.cfg.overlap)
    }

    /// Whether every micro-batch is reduced (ZeRO-2), not only a step's last.
    pub fn reduces_every_micro_batch(&self) -> bool {
        matches!(self, Parallel::Mesh(m) if m.dims.zero2)
    }

    /// ZeRO-2: which parameters this rank keeps float32 gradients of (None: all).
    pub fn gradient_owners(&self, params: &[(String, Tensor)]) -> Option<Vec<bool>> {
        match self {
            Parallel::Mesh(m) if m.dims.zero2 => match &m.update {
                Update::Sharded(owner) => Some(params.iter().map(|(n, _)| owner[n] == m.dist.rank()).collect()),
                Update::Replicated => unreachable!("ZeRO-2 is validated to come with ZeRO-1"),
            },
            _ => None,
        }
    }

    /// Sum the step's figures over the ranks (one collective).
    pub fn reduce_sums(&self, sums: &mut StepSums) -> Result<()> {
        let Some(d) = self.dist() else { return Ok(()) };
        let mut flat = sums.to_flat();
        d.reduce_f64(&mut flat, ReduceOp::Sum, "step statistics reduction")?;
        *sums = StepSums::from_flat(&flat, d.world());
        Ok(())
    }

    /// The global gradient norm before clipping (ZeRO-1: from each owner's share).
    pub fn grad_norm(&self, params: &[(String, Tensor)], grads: &[Tensor]) -> Result<f64> {
        match self.sharded() {
            Some((dist, owner)) => {
                let mine = params.iter().zip(grads).filter(|((n, _), _)| owner[n] == dist.rank());
                let norm = optim::grad_norm(mine.map(|(_, g)| g));
                let mut sq = [norm * norm];
                dist.reduce_f64(&mut sq, ReduceOp::Sum, "gradient norm reduction")?;
                Ok(sq[0].sqrt())
            }
            _ => Ok(optim::grad_norm(grads)),
        }
    }

    /// After the update: ZeRO-1 owners broadcast their parameters.
    pub fn after_update(&self, params: &[(String, Tensor)]) -> Result<()> {
        match self.sharded() {
            Some((dist, owner)) => distributed::broadcast_owned(&dist.pg, params, owner)
                .map_err(|e| dist.failure("ZeRO-1 parameter broadcast", e)),
            _ => Ok(()),
        }
    }

    /// Fail unless every rank holds bitwise the same parameters (an exact fingerprint, compared
    /// with one small all-reduce).
    pub fn check_ranks_agree(&self, params: &[(String, Tensor)], when: &str) -> Result<()> {
        let Some(d) = self.dist() else { return Ok(()) };
        // 52 bits, so the fingerprint travels exactly as a float64.
        let fp = (distributed::fingerprint(params) & ((1 << 52) - 1)) as f64;
        let (lo, hi) = d.min_max(fp, "parameter agreement check")?;
        if lo != hi {
            bail!(
                "rank {} ({when}): the ranks hold different parameters (fingerprints {lo} .. {hi}); the model files or \
                 checkpoint differ between ranks, or a collective misbehaved",
                d.rank(),
            );
        }
        Ok(())
    }

    /// The ranks writing a checkpoint together (None for a single process).
    pub fn team(&self) -> Option<&dyn Team> {
        self.dist().map(|d| d as &dyn Team)
    }

    /// Sum `values` over the ranks (a no-op for a single process).
    pub fn sum_f64(&self, values: &mut [f64], what: &str) -> Result<()> {
        self.dist().map_or(Ok(()), |d| d.reduce_f64(values, ReduceOp::Sum, what))
    }

    /// Wait for every rank and shut the process groups down in order.
    pub fn finish(&self) -> Result<()> {
        self.dist().map_or(Ok(()), Dist::finish)?;
        self.context().map_or(Ok(()), |cp| cp.group().shutdown())
    }
}

/// This rank's context-parallel group: `cp` consecutive ranks, built together by its members.
fn context_group(dist: &Dist, dims: ParallelDims) -> Result<ContextParallel> {
    let (group, index) = dims.coords(dist.rank());
    let pg = dist
        .pg
        .subgroup(&format!("cp/{group}/"), index, dims.cp)
        .map_err(|e| dist.failure(&format!("set-up of context-parallel group {group}"), e))?;
    quiet_exchange_panics();
    Ok(ContextParallel::new(pg))
}

/// The text of a panic's payload, when it has one.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
}

/// Leave a failed all-to-all's panic unprinted: [`Parallel::guard`] turns it into the run's
/// error. Every other panic prints as before.
fn quiet_exchange_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !panic_text(info.payload()).is_some_and(|t| t.contains(EXCHANGE_FAILED)) {
                default(info)
            }
        }));
    });
}
