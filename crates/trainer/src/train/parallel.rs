//! The parallel layout of a run, as torchtitan's `ParallelDims`: built once from the world size
//! and `[distributed]`, validated, and the one value the train step asks for its rows, the start
//! and finish of its gradient reduction, the reduction of its sums, the gradient norm and what
//! follows the update. Data parallelism is the one dimension today; another (context
//! parallelism) is another variant here, not a branch in the step.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use longmix_data::Row;
use longmix_model::ModelConfig;
use longmix_torch_ext::c10d::ReduceOp;
use tch::Tensor;

use super::step::StepSums;
use crate::checkpoint::Team;
use crate::config::DistributedSection;
use crate::distributed::{self, CommTimes, Dist, GradSync, InFlight};
use crate::grads::Grads;
use crate::optim;

/// The named dimensions of a world of ranks, checked against the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelDims {
    /// Data-parallel ranks: each trains its share of every global batch.
    pub dp: usize,
    /// Whether each data-parallel rank keeps the optimizer state of its share only (ZeRO-1).
    pub zero1: bool,
}

impl ParallelDims {
    /// The layout of `world` ranks training `rows_per_step` rows per step.
    pub fn new(world: usize, cfg: &DistributedSection, rows_per_step: usize) -> Result<ParallelDims> {
        if rows_per_step < world {
            bail!(
                "key `train.global_batch_rows`: {rows_per_step} rows per step cannot give each of {world} ranks a \
                 row; use at least {world}"
            );
        }
        Ok(ParallelDims { dp: world, zero1: world > 1 && cfg.zero1 })
    }

    pub fn world(&self) -> usize {
        self.dp
    }
}

/// Who updates which parameters.
enum Update {
    /// Every rank updates every parameter.
    Replicated,
    /// ZeRO-1: the rank updating each parameter, which broadcasts it afterwards.
    Sharded(BTreeMap<String, usize>),
}

/// Data parallelism over a process group.
pub struct DataParallel {
    pub dist: Dist,
    sync: GradSync,
    update: Update,
}

/// What the train step asks of the layout.
pub enum Parallel {
    /// One process: every row, gradients as they are.
    Single,
    Data(Box<DataParallel>),
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
    /// without `dist`, data parallelism with it.
    pub fn new(dist: Option<Dist>, params: &[(String, Tensor)]) -> Parallel {
        let Some(dist) = dist else { return Parallel::Single };
        let update = match dist.cfg.zero1 {
            true => Update::Sharded(distributed::owners(params, dist.world())),
            false => Update::Replicated,
        };
        let owner = match &update {
            Update::Sharded(o) => Some(o),
            Update::Replicated => None,
        };
        let sync = GradSync::new(params, (dist.cfg.bucket_mb * 1e6) as usize, owner);
        Parallel::Data(Box::new(DataParallel { dist, sync, update }))
    }

    pub fn dist(&self) -> Option<&Dist> {
        match self {
            Parallel::Single => None,
            Parallel::Data(d) => Some(&d.dist),
        }
    }

    /// ZeRO-1: the group and the owner of each parameter.
    fn sharded(&self) -> Option<(&Dist, &BTreeMap<String, usize>)> {
        match self {
            Parallel::Data(d) => match &d.update {
                Update::Sharded(owner) => Some((&d.dist, owner)),
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

    /// This rank's rows of a global batch, balanced by compute when `[distributed] balance`.
    pub fn rows<'r>(&self, rows: &'r [Row], model: &ModelConfig) -> Vec<&'r Row> {
        let Some(d) = self.dist() else { return rows.iter().collect() };
        let costs: Vec<f64> = rows.iter().map(|r| distributed::row_cost(r, model)).collect();
        let shares = distributed::assign_rows(&costs, d.world(), d.cfg.balance);
        shares[d.rank()].iter().map(|&i| &rows[i]).collect()
    }

    /// The parameters this rank's optimizer updates (all, or its ZeRO-1 share).
    pub fn optimizer_params(&self, params: &[(String, Tensor)]) -> BTreeMap<String, Tensor> {
        let rank = self.rank_world().0;
        let mine = |n: &String| match self {
            Parallel::Data(d) => match &d.update {
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
            Parallel::Data(d) => Reduction::InFlight(d.sync.begin(&d.dist.pg, grads), &d.dist),
        }
    }

    /// Whether the last micro-batch's layers start their reduction as their backward ends.
    pub fn overlaps(&self) -> bool {
        self.dist().is_some_and(|d| d.cfg.overlap)
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

    /// Data parallel: wait for every rank and shut the process group down in order.
    pub fn finish(&self) -> Result<()> {
        self.dist().map_or(Ok(()), Dist::finish)
    }
}
