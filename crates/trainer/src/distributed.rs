//! Data parallelism over c10d (Gloo on CPU, NCCL on CUDA; `longmix-torch-ext`).
//!
//! * [`Launch::from_env`]: rank, world size and rendezvous from torchrun's variables (`RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_USE_AGENT_STORE`), or
//!   SLURM's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, first host of `SLURM_JOB_NODELIST`).
//! * [`Dist`]: the process group plus what the trainer needs from it: small f64 reductions
//!   (losses, counts, timings), agreement on failures, and errors that name the ranks that did
//!   not answer.
//! * [`assign_rows`]: every rank plans the same global batch and keeps its share; with
//!   balancing, shares are even in estimated compute ([`row_cost`]), not in row count.
//! * [`GradSync`]: the float32 gradients ([`Grads`]) all-reduced in buckets, launched layer by
//!   layer while the backward runs on (see `CausalLm::forward_backward_with`).
//! * [`owners`]: ZeRO-1's assignment of whole parameters to ranks (as torch's
//!   `ZeroRedundancyOptimizer` does): a rank keeps AdamW state for its parameters only and
//!   broadcasts them after its update ([`broadcast_owned`]).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use longmix_data::Row;
use longmix_model::ModelConfig;
use longmix_torch_ext::c10d::{Backend, ProcessGroup, ReduceOp, Rendezvous, Work};
use tch::{Device, Kind, Tensor};

use crate::config::DistributedSection;
use crate::grads::Grads;

/// How this process was started as one rank of many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the store: every rank connects as a client.
    pub agent_store: bool,
    /// "torchrun" (or a launcher setting the same variables) or "slurm".
    pub launcher: &'static str,
    /// torchrun's restart count (`TORCHELASTIC_RESTART_COUNT`), 0 otherwise.
    pub restart: u64,
}

const DEFAULT_PORT: u16 = 29500;

fn parse_var<T: std::str::FromStr>(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<T>> {
    match get(name) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).map_err(|_| anyhow::anyhow!("environment variable {name}={v:?} is not a number"))
        }
    }
}

/// The first host of a SLURM node list: `gpu[003-004,7],cpu1` -> `gpu003`.
pub fn first_slurm_host(list: &str) -> String {
    let first = match list.find('[') {
        Some(b) if list[..b].find(',').is_none() => {
            let inner = &list[b + 1..];
            let end = inner.find([',', '-', ']']).unwrap_or(inner.len());
            format!("{}{}", &list[..b], &inner[..end])
        }
        _ => list.split(',').next().unwrap_or(list).to_string(),
    };
    first.trim().to_string()
}

impl Launch {
    /// None for a plain single process (no `WORLD_SIZE`, no SLURM job of several tasks).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(&|k| std::env::var(k).ok())
    }

    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let port = parse_var::<u16>(get, "MASTER_PORT")?.unwrap_or(DEFAULT_PORT);
        if let Some(world) = parse_var::<usize>(get, "WORLD_SIZE")? {
            let rank = parse_var::<usize>(get, "RANK")?
                .context("WORLD_SIZE is set but RANK is not: start the ranks with torchrun or launch/multi.sh")?;
            let local_rank = parse_var::<usize>(get, "LOCAL_RANK")?.unwrap_or(rank);
            let launch = Launch {
                rank,
                world_size: world,
                local_rank,
                master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: port,
                agent_store: get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
                launcher: "torchrun",
                restart: parse_var::<u64>(get, "TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0),
            };
            return launch.validated().map(Some);
        }
        let Some(world) = parse_var::<usize>(get, "SLURM_NTASKS")? else { return Ok(None) };
        if world <= 1 {
            return Ok(None);
        }
        let rank = parse_var::<usize>(get, "SLURM_PROCID")?.context("SLURM_NTASKS is set but SLURM_PROCID is not")?;
        let nodes = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST"));
        let master_addr = get("MASTER_ADDR").or_else(|| nodes.map(|n| first_slurm_host(&n))).context(
            "SLURM job without SLURM_JOB_NODELIST or MASTER_ADDR: export MASTER_ADDR=<first node> in the batch script",
        )?;
        Launch {
            rank,
            world_size: world,
            local_rank: parse_var::<usize>(get, "SLURM_LOCALID")?.unwrap_or(0),
            master_addr,
            master_port: port,
            agent_store: false,
            launcher: "slurm",
            restart: 0,
        }
        .validated()
        .map(Some)
    }

    fn validated(self) -> Result<Launch> {
        if self.world_size == 0 || self.rank >= self.world_size {
            bail!("rank {} of world size {}: the rank must be below the world size", self.rank, self.world_size);
        }
        Ok(self)
    }
}

/// The device rank `launch` computes on when the run asks for `requested`, seeing `visible` CUDA
/// devices: one GPU per rank, `LOCAL_RANK`'s, or the only one a task sees (SLURM with
/// `--gpus-per-task=1`, or `CUDA_VISIBLE_DEVICES` set per rank), where `cuda:LOCAL_RANK` would
/// not exist.
pub fn rank_device(requested: Device, launch: &Launch, visible: usize) -> Result<Device> {
    match requested {
        Device::Cuda(_) if visible == 1 => Ok(Device::Cuda(0)),
        Device::Cuda(_) if launch.local_rank < visible => Ok(Device::Cuda(launch.local_rank)),
        Device::Cuda(_) => bail!(
            "rank {} (local rank {}) needs a GPU of its own, but this process sees {visible} CUDA device(s): start \
             at most one rank per visible GPU (torchrun --nproc-per-node, SLURM --ntasks-per-node) or make each \
             rank see one GPU (SLURM --gpus-per-task=1)",
            launch.rank,
            launch.local_rank
        ),
        other => Ok(other),
    }
}

/// The process group and the trainer's uses of it.
pub struct Dist {
    pub pg: ProcessGroup,
    pub cfg: DistributedSection,
    pub launch: Launch,
    device: Device,
    /// Agreements held so far ([`Dist::agree`]); each names its store keys by this count.
    agreements: Cell<u64>,
    /// The step the collectives belong to, for their error messages ([`Dist::at_step`]).
    step: Cell<u64>,
}

impl Dist {
    /// Join the run's group on `device` (from [`rank_device`], made current here); the backend
    /// follows `cfg.backend` ("auto": NCCL on CUDA).
    pub fn init(launch: &Launch, cfg: &DistributedSection, device: Device) -> Result<Dist> {
        let backend = match (cfg.backend.as_str(), device) {
            ("gloo", _) | ("auto", Device::Cpu) => Backend::Gloo,
            ("nccl", Device::Cpu) => {
                bail!("key `distributed.backend`: nccl needs CUDA tensors but model.device is cpu; use gloo or auto")
            }
            _ => Backend::Nccl,
        };
        let rv = Rendezvous {
            host: launch.master_addr.clone(),
            port: launch.master_port,
            rank: launch.rank,
            world_size: launch.world_size,
            is_server: launch.rank == 0 && !launch.agent_store,
            timeout: Duration::from_secs(cfg.timeout_s),
            prefix: format!("longmix/{}/", launch.restart),
            device: match (backend, device) {
                (Backend::Nccl, Device::Cuda(d)) => Some(d),
                _ => None,
            },
        };
        if let Some(d) = rv.device {
            // Before the group exists: NCCL's communicator, its barrier and the flash kernel's
            // device checks follow the current device.
            longmix_torch_ext::cuda::set_device(d)?;
        }
        let pg = ProcessGroup::new(backend, &rv).with_context(|| {
            format!(
                "rank {} of {}: cannot join the run's process group at {}:{} ({backend:?}, {} s timeout); check \
                 MASTER_ADDR/MASTER_PORT and that every rank was started",
                launch.rank, launch.world_size, launch.master_addr, launch.master_port, cfg.timeout_s
            )
        })?;
        pg.start_heartbeat(&format!("heartbeat/{}", launch.rank), HEARTBEAT)?;
        Ok(Dist {
            pg,
            cfg: cfg.clone(),
            launch: launch.clone(),
            device,
            agreements: Default::default(),
            step: Default::default(),
        })
    }

    /// The collectives from now on belong to `step` (their errors name it).
    pub fn at_step(&self, step: u64) {
        self.step.set(step);
    }

    /// The ranks whose `ok` was false at the end of `what` (see [`Dist::gather`]).
    pub fn agree(&self, ok: bool, what: &str) -> Result<Vec<usize>> {
        let words = self.gather(if ok { "ok" } else { "failed" }, what)?;
        Ok(words.iter().enumerate().filter(|(_, w)| *w != "ok").map(|(r, _)| r).collect())
    }

    /// Every rank's `word` at the end of `what`, a phase that may last as long as a disk takes
    /// (a checkpoint write or its verification): every rank posts its word in the rendezvous
    /// store and waits there for all the others, up to `phase_timeout_s`, rather than in a
    /// collective bounded by `timeout_s`. A rank whose heartbeat stands still for `timeout_s`
    /// meanwhile is named as dead.
    pub fn gather(&self, word: &str, what: &str) -> Result<Vec<String>> {
        let n = self.agreements.replace(self.agreements.get() + 1);
        let key = |k: &str| format!("agree/{n}/{k}");
        let store = |e: anyhow::Error| {
            anyhow::anyhow!("rank {}: the rendezvous store failed in the {what}: {e:#}", self.rank())
        };
        self.pg.store_set(&key(&self.rank().to_string()), word).map_err(store)?;
        self.pg.store_add(&key("arrived"), 1).map_err(store)?;
        let (start, mut beats) = (Instant::now(), Heartbeats::new(self));
        while self.pg.store_add(&key("arrived"), 0).map_err(store)? < self.world() as i64 {
            let dead = beats.still_for(Duration::from_secs(self.cfg.timeout_s));
            if !dead.is_empty() || start.elapsed() > Duration::from_secs(self.cfg.phase_timeout_s) {
                let who = if dead.is_empty() { "a rank".to_string() } else { format!("rank(s) {dead:?}") };
                bail!(
                    "rank {} of {}: {who} did not finish the {what} (heartbeat still for distributed.timeout_s = {} s, \
                     or the phase ran past distributed.phase_timeout_s = {} s); restart the run with --resume auto",
                    self.rank(),
                    self.world(),
                    self.cfg.timeout_s,
                    self.cfg.phase_timeout_s
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let word = |r: usize| self.pg.store_get(&key(&r.to_string()), Duration::from_secs(self.cfg.timeout_s));
        (0..self.world()).map(word).collect::<Result<Vec<String>>>().map_err(store)
    }

    /// The end of a run on every exit path that gets here: wait for every rank (rank 0 may still
    /// be exporting), then shut the group down in order. An error path drops the group instead,
    /// which shuts it down without waiting for peers.
    pub fn finish(&self) -> Result<()> {
        self.agree(true, "end of the run")?;
        // The rank hosting the store leaves last: the others may still be reading the agreement.
        self.pg.store_add("finished", 1)?;
        if self.rank() == 0 && !self.launch.agent_store {
            let start = Instant::now();
            while self.pg.store_add("finished", 0)? < self.world() as i64 {
                if start.elapsed() > Duration::from_secs(self.cfg.timeout_s) {
                    tracing::warn!("not every rank confirmed the end of the run within distributed.timeout_s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.pg.shutdown()
    }

    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    pub fn world(&self) -> usize {
        self.launch.world_size
    }

    /// Reduce `values` across ranks in place (float64, on the group's device).
    pub fn reduce_f64(&self, values: &mut [f64], op: ReduceOp, what: &str) -> Result<()> {
        let t = Tensor::from_slice(values).to_device(self.device);
        self.pg.all_reduce(&t, op).map_err(|e| self.failure(what, e))?;
        let out = Vec::<f64>::try_from(t.to_device(Device::Cpu))?;
        values.copy_from_slice(&out);
        Ok(())
    }

    /// The smallest and the largest `x` over the ranks (one all-reduce).
    pub fn min_max(&self, x: f64, what: &str) -> Result<(f64, f64)> {
        let mut v = [-x, x];
        self.reduce_f64(&mut v, ReduceOp::Max, what)?;
        Ok((-v[0], v[1]))
    }

    /// Turn a failed collective into one error naming the ranks that did not answer (those
    /// whose heartbeat stopped moving), the timeout, and what to do.
    pub fn failure(&self, what: &str, e: anyhow::Error) -> anyhow::Error {
        let step = self.step.get();
        let quick = Duration::from_secs(2);
        let peers: Vec<usize> = (0..self.world()).filter(|&r| r != self.rank()).collect();
        let read = |r: usize| self.pg.store_get(&format!("heartbeat/{r}"), quick).ok();
        let before: Vec<Option<String>> = peers.iter().map(|&r| read(r)).collect();
        std::thread::sleep(HEARTBEAT * 3);
        let after: Vec<Option<String>> = peers.iter().map(|&r| read(r)).collect();
        let store_down = !peers.is_empty() && before.iter().chain(&after).all(|b| b.is_none());
        let missing: Vec<String> = peers
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a.is_none() || b == a)
            .map(|(r, _)| r.to_string())
            .collect();
        let who = if store_down && !self.launch.agent_store {
            "rank 0 (which hosts the rendezvous store) did not answer".to_string()
        } else if missing.is_empty() {
            "a peer closed its connection or stopped answering".to_string()
        } else {
            format!("rank(s) {} did not answer", missing.join(", "))
        };
        anyhow::anyhow!(
            "rank {} of {}, step {step}: {who} in the {what} within distributed.timeout_s = {} s: it died or hangs \
             (see its log). No checkpoint was left half-written; restart the run with --resume auto. c10d said: {e:#}",
            self.rank(),
            self.world(),
            self.cfg.timeout_s
        )
    }
}

impl crate::checkpoint::Team for Dist {
    fn rank(&self) -> usize {
        Dist::rank(self)
    }
    fn world(&self) -> usize {
        Dist::world(self)
    }
    fn sharded_optimizer(&self) -> bool {
        self.cfg.zero1
    }
    fn gather(&self, word: &str, what: &str) -> Result<Vec<String>> {
        // On the store: rank 0 writes the weights and may take longer than a collective waits.
        Dist::gather(self, word, what)
    }
}

/// How often each rank's heartbeat counter moves (see [`Dist::failure`]).
const HEARTBEAT: Duration = Duration::from_millis(500);

/// The peers' heartbeat counters and when each last moved.
struct Heartbeats<'a> {
    dist: &'a Dist,
    seen: BTreeMap<usize, (Option<String>, Instant)>,
    read_at: Instant,
}

impl<'a> Heartbeats<'a> {
    fn new(dist: &'a Dist) -> Heartbeats<'a> {
        let now = Instant::now();
        let seen = (0..dist.world()).filter(|&r| r != dist.rank()).map(|r| (r, (None, now))).collect();
        Heartbeats { dist, seen, read_at: now - HEARTBEAT }
    }

    /// The peers whose counter has not moved for `limit` (read at most once a heartbeat).
    fn still_for(&mut self, limit: Duration) -> Vec<usize> {
        if self.read_at.elapsed() >= HEARTBEAT {
            self.read_at = Instant::now();
            for (r, (last, since)) in self.seen.iter_mut() {
                let now = self.dist.pg.store_get(&format!("heartbeat/{r}"), Duration::from_millis(200)).ok();
                if now.is_some() && now != *last {
                    (*last, *since) = (now, Instant::now());
                }
            }
        }
        self.seen.iter().filter(|(_, (_, since))| since.elapsed() > limit).map(|(r, _)| *r).collect()
    }
}

/// How long each rank waited for the slowest one, given each rank's work (seconds or cost).
pub fn idle(loads: &[f64]) -> Vec<f64> {
    let slowest = loads.iter().cloned().fold(0.0, f64::max);
    loads.iter().map(|l| slowest - l).collect()
}

/// Training FLOPs of one row ([`ModelConfig::train_flops`] over its documents; padding runs as
/// tokens too).
pub fn row_cost(row: &Row, model: &ModelConfig) -> f64 {
    let doc_len_sq: f64 = row.pieces.iter().map(|p| (p.len as f64).powi(2)).sum();
    model.train_flops(row.input_ids.len() as f64, doc_len_sq)
}

/// Which rows (indices into the global batch) each of `world` ranks trains. Balanced: longest
/// processing time first (the costliest row to the least-loaded rank; ties to the rank with
/// fewer rows, then the lower rank), which keeps the slowest rank within 4/3 of the optimum.
/// Not balanced: round-robin. Deterministic, so every rank computes the same assignment; each
/// rank's rows stay in batch order.
pub fn assign_rows(costs: &[f64], world: usize, balance: bool) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); world];
    if !balance {
        for i in 0..costs.len() {
            out[i % world].push(i);
        }
        return out;
    }
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0.0f64; world];
    for i in order {
        let r = (0..world)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(out[a].len().cmp(&out[b].len())).then(a.cmp(&b)))
            .unwrap();
        load[r] += costs[i];
        out[r].push(i);
    }
    for rows in &mut out {
        rows.sort_unstable();
    }
    out
}

/// Decoder layer of an HF parameter name (`model.layers.7.mlp...` -> 7); None for the
/// embedding, final norm and LM head.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Gradient buckets in the order the backward completes them: the last layer's first, the
/// embedding, final norm and LM head last. Plain data parallelism all-reduces each bucket;
/// ZeRO-1 reduces it to the rank owning its parameters (a bucket never spans two owners).
pub struct GradSync {
    /// Parameter indices per bucket.
    buckets: Vec<Vec<usize>>,
    /// ZeRO-1: the rank each bucket is reduced to.
    bucket_owner: Option<Vec<usize>>,
    /// ZeRO-2: every micro-batch is reduced, from autograd's fresh gradients, and added to the
    /// owner's float32 sums (otherwise the step's float32 sums are reduced once, in place).
    pub per_micro_batch: bool,
    /// The lowest decoder layer in each bucket (None: holds a parameter completed only at the end).
    ready_at: Vec<Option<usize>>,
}

/// Time spent on the gradient reduction of one step.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommTimes {
    /// Building buckets and launching their all-reduces (on this thread, during backward).
    pub launch_s: f64,
    /// Waiting for reductions after the backward finished (communication not hidden, plus
    /// waiting for slower ranks).
    pub wait_s: f64,
}

impl CommTimes {
    pub fn add(&mut self, o: CommTimes) {
        self.launch_s += o.launch_s;
        self.wait_s += o.wait_s;
    }
}

/// Parameter indices in the order the backward completes them: layers from last to first,
/// then the parameters completed only at the end; by (sorted) name within.
fn backward_order(params: &[(String, Tensor)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..params.len()).collect();
    order.sort_by_key(|&i| {
        let l = layer_of(&params[i].0);
        (l.is_none(), std::cmp::Reverse(l.unwrap_or(0)), i)
    });
    order
}

impl GradSync {
    /// `params` sorted by name (as every rank sorts them); `owner` for ZeRO-1 ([`owners`]);
    /// `per_micro_batch` for ZeRO-2.
    pub fn new(
        params: &[(String, Tensor)],
        bucket_bytes: usize,
        owner: Option<&BTreeMap<String, usize>>,
        per_micro_batch: bool,
    ) -> GradSync {
        let order = backward_order(params);
        let mut bucket_owner: Vec<usize> = Vec::new();
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut ready_at: Vec<Option<usize>> = Vec::new();
        let mut bytes = 0usize;
        for i in order {
            let layer = layer_of(&params[i].0);
            let size = params[i].1.numel() * 4;
            let full = bytes > 0 && bytes + size > bucket_bytes;
            let end_group_starts = layer.is_none() && ready_at.last().is_some_and(|r| r.is_some());
            let rank = owner.map_or(0, |o| o[&params[i].0]);
            let owner_changes = bucket_owner.last().is_some_and(|&r| r != rank);
            if buckets.is_empty() || full || end_group_starts || owner_changes {
                buckets.push(Vec::new());
                ready_at.push(layer);
                bucket_owner.push(rank);
                bytes = 0;
            }
            buckets.last_mut().unwrap().push(i);
            let r = ready_at.last_mut().unwrap();
            *r = match (*r, layer) {
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            };
            bytes += size;
        }
        GradSync { buckets, bucket_owner: owner.map(|_| bucket_owner), per_micro_batch, ready_at }
    }

    /// Start a step's reduction of `grads` (the parameters' order given to [`GradSync::new`]);
    /// feed it [`InFlight::layer_done`] and finish it.
    pub fn begin<'a>(&'a self, pg: &'a ProcessGroup, grads: &'a Grads) -> InFlight<'a> {
        InFlight { sync: self, pg, grads, works: Default::default(), launched: 0, error: None, launch_s: 0.0 }
    }
}

/// One step's gradient reduction in flight. A bucket's flat buffer lives only while its
/// all-reduce runs: finished buckets are written back (and their buffers freed) as later layers
/// complete, so the buffers never add up to a full copy of the gradients.
pub struct InFlight<'a> {
    sync: &'a GradSync,
    pg: &'a ProcessGroup,
    grads: &'a Grads,
    /// (bucket, its all-reduce, its buffer), oldest first.
    works: std::collections::VecDeque<(usize, Work, Tensor)>,
    launched: usize,
    error: Option<anyhow::Error>,
    launch_s: f64,
}

impl InFlight<'_> {
    fn launch_next(&mut self) {
        let b = self.launched;
        self.launched += 1;
        let t0 = Instant::now();
        let flat: Vec<Tensor> = self.sync.buckets[b]
            .iter()
            .map(|&i| match self.sync.per_micro_batch {
                true => self.grads.take_fresh(i),
                false => self.grads.get(i).detach().reshape([-1]),
            })
            .collect();
        let buf = Tensor::cat(&flat, 0);
        let work = match &self.sync.bucket_owner {
            Some(owner) => self.pg.reduce_async(&buf, owner[b]),
            None => self.pg.all_reduce_async(&buf),
        };
        match work {
            Ok(w) => self.works.push_back((b, w, buf)),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self.launch_s += t0.elapsed().as_secs_f64();
    }

    /// Wait for the oldest bucket and copy its sum into the float32 gradients (ZeRO-1: on its
    /// owner; the other ranks' gradients of those parameters stay partial and are not used;
    /// ZeRO-2: added to the owner's sums, dropped elsewhere).
    fn complete_oldest(&mut self) -> Result<()> {
        let (b, work, buf) = self.works.pop_front().expect("a bucket in flight");
        work.wait()?;
        if self.sync.bucket_owner.as_ref().is_some_and(|o| o[b] != self.pg.rank) {
            return Ok(());
        }
        let mut off = 0;
        tch::no_grad(|| {
            for &i in &self.sync.buckets[b] {
                let mut g = self.grads.get(i);
                let n = g.numel() as i64;
                let piece = buf.narrow(0, off, n);
                if self.sync.per_micro_batch {
                    self.grads.add(i, &piece);
                } else {
                    g.copy_(&piece.view_as(&g));
                }
                off += n;
            }
        });
        Ok(())
    }

    /// Decoder layer `layer` (and so every later one) has its gradients complete.
    pub fn layer_done(&mut self, layer: usize) {
        while self.launched < self.sync.buckets.len() && self.error.is_none() {
            match self.sync.ready_at[self.launched] {
                Some(lowest) if lowest >= layer => self.launch_next(),
                _ => break,
            }
        }
        // Write back what has already finished (without waiting), freeing its buffer.
        while self.error.is_none() && self.works.front().is_some_and(|(_, w, _)| w.is_completed()) {
            if let Err(e) = self.complete_oldest() {
                self.error = Some(e);
            }
        }
    }

    /// Launch what is left (the parameters completed last), wait for every bucket and write
    /// the summed gradients back.
    pub fn finish(mut self) -> Result<CommTimes> {
        while self.launched < self.sync.buckets.len() && self.error.is_none() {
            self.launch_next();
        }
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let t0 = Instant::now();
        while !self.works.is_empty() {
            self.complete_oldest()?;
        }
        Ok(CommTimes { launch_s: self.launch_s, wait_s: t0.elapsed().as_secs_f64() })
    }
}

/// ZeRO-1: the rank that owns each parameter. Ranks own contiguous runs of the backward
/// order with about the same number of elements (as DeepSpeed partitions its flat buffer, but
/// by whole parameters), so each gradient bucket goes to one owner. Depends only on names,
/// sizes and `world`.
pub fn owners(params: &[(String, Tensor)], world: usize) -> BTreeMap<String, usize> {
    let total: usize = params.iter().map(|(_, t)| t.numel()).sum();
    let mut seen = 0usize;
    let mut out = BTreeMap::new();
    for i in backward_order(params) {
        let size = params[i].1.numel();
        // The rank whose share holds this parameter's middle element.
        let mid = seen + size / 2;
        out.insert(params[i].0.clone(), (mid * world / total.max(1)).min(world - 1));
        seen += size;
    }
    out
}

/// After each owner updated its parameters, copy them to every rank: one broadcast per owner,
/// of its parameters flattened (all broadcasts in flight at once).
pub fn broadcast_owned(pg: &ProcessGroup, params: &[(String, Tensor)], owner: &BTreeMap<String, usize>) -> Result<()> {
    let mut works = Vec::new();
    for root in 0..pg.world_size {
        let mine: Vec<&Tensor> = params.iter().filter(|(n, _)| owner[n] == root).map(|(_, t)| t).collect();
        if mine.is_empty() {
            continue;
        }
        let flat: Vec<Tensor> = mine.iter().map(|t| t.detach().reshape([-1])).collect();
        let buf = Tensor::cat(&flat, 0);
        works.push((pg.broadcast_async(&buf, root)?, buf, mine));
    }
    for (work, buf, mine) in works {
        work.wait()?;
        let mut off = 0;
        tch::no_grad(|| {
            for t in mine {
                let n = t.numel() as i64;
                let mut t = t.shallow_clone();
                t.copy_(&buf.narrow(0, off, n).view_as(&t));
                off += n;
            }
        });
    }
    Ok(())
}

/// An exact fingerprint of the parameters: the sum of their float32 bit patterns as integers
/// (order-independent, so equal on ranks holding bitwise-equal weights).
pub fn fingerprint(params: &[(String, Tensor)]) -> i64 {
    params
        .iter()
        .map(|(_, t)| {
            let bits = t.detach().to_kind(Kind::Float).contiguous().view_dtype(Kind::Int).to_kind(Kind::Int64);
            bits.sum(Kind::Int64).int64_value(&[])
        })
        .fold(0i64, |a, b| a.wrapping_add(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(map: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| map.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn torchrun_and_slurm_variables_are_read() {
        assert_eq!(Launch::from_vars(&vars(&[])).unwrap(), None);
        let l = Launch::from_vars(&vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank, l.master_port, l.agent_store), (3, 8, 1, 1234, true));
        let s = Launch::from_vars(&vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("SLURM_JOB_NODELIST", "gpu[017-018,020]"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.rank, s.world_size, s.local_rank, s.master_addr.as_str(), s.launcher),
            (5, 16, 5, "gpu017", "slurm")
        );
        assert_eq!(Launch::from_vars(&vars(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")])).unwrap(), None);
        let e = Launch::from_vars(&vars(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("below the world size"), "{e}");
        let e = Launch::from_vars(&vars(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE"), "{e}");
    }

    #[test]
    fn each_rank_gets_its_gpu_or_the_only_one_it_sees() {
        let launch = |local: usize| Launch {
            rank: 8 + local,
            world_size: 16,
            local_rank: local,
            master_addr: "n0".into(),
            master_port: 1,
            agent_store: false,
            launcher: "torchrun",
            restart: 0,
        };
        // torchrun, 8 GPUs per node: LOCAL_RANK's.
        assert_eq!(rank_device(Device::Cuda(0), &launch(3), 8).unwrap(), Device::Cuda(3));
        // SLURM with --gpus-per-task=1: the one visible GPU, whatever SLURM_LOCALID says.
        let slurm = Launch::from_vars(&vars(&[
            ("SLURM_PROCID", "13"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("MASTER_ADDR", "n0"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(rank_device(Device::Cuda(0), &slurm, 1).unwrap(), Device::Cuda(0));
        // More ranks on a node than GPUs it shows them: one clear error.
        let e = rank_device(Device::Cuda(0), &launch(5), 4).unwrap_err().to_string();
        assert!(
            e.contains("local rank 5") && e.contains("sees 4 CUDA device(s)") && e.contains("--gpus-per-task=1"),
            "{e}"
        );
        assert_eq!(rank_device(Device::Cpu, &launch(5), 0).unwrap(), Device::Cpu);
    }

    /// Two ranks as threads of this process on Gloo, joined the way the trainer joins them.
    fn two_ranks(timeout_s: u64, each: impl Fn(Dist) -> Result<Vec<usize>> + Sync) -> Vec<Result<Vec<usize>>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = DistributedSection { timeout_s, phase_timeout_s: 60, ..Default::default() };
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let (cfg, each) = (&cfg, &each);
                    s.spawn(move || {
                        let launch = Launch {
                            rank,
                            world_size: 2,
                            local_rank: rank,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            agent_store: false,
                            launcher: "torchrun",
                            restart: 0,
                        };
                        each(Dist::init(&launch, cfg, Device::Cpu)?)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_phase_longer_than_the_collective_timeout_is_not_a_failure_but_a_dead_rank_is_named() {
        // Rank 0 "writes a checkpoint" for 3 s, three times the collective timeout.
        let slow = two_ranks(1, |d| {
            if d.rank() == 0 {
                std::thread::sleep(Duration::from_secs(3));
            }
            let failed = d.agree(d.rank() == 0, "checkpoint of step 1")?;
            d.finish()?;
            Ok(failed)
        });
        for r in slow {
            assert_eq!(r.unwrap(), vec![1], "both ranks learn that rank 1 reported a failure");
        }
        // Rank 1 dies instead (its group and heartbeat go away): rank 0 names it.
        let t0 = Instant::now();
        let dead = two_ranks(1, |d| if d.rank() == 1 { Ok(vec![]) } else { d.agree(true, "checkpoint of step 1") });
        let e = format!("{:#}", dead[0].as_ref().unwrap_err());
        assert!(e.contains("rank(s) [1] did not finish the checkpoint of step 1"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_slurm_host("node7"), "node7");
        assert_eq!(first_slurm_host("a1,b2"), "a1");
        assert_eq!(first_slurm_host("gpu[003-004,7],cpu1"), "gpu003");
        assert_eq!(first_slurm_host("gpu[12,14]"), "gpu12");
    }

    #[test]
    fn balancing_evens_compute_not_row_count() {
        // One long row costs as much as three short ones.
        let costs = [3.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0];
        let rr = assign_rows(&costs, 2, false);
        let bal = assign_rows(&costs, 2, true);
        let load = |a: &Vec<Vec<usize>>| a.iter().map(|r| r.iter().map(|&i| costs[i]).sum::<f64>()).collect::<Vec<_>>();
        assert_eq!(load(&rr), vec![8.0, 4.0]);
        assert_eq!(load(&bal), vec![6.0, 6.0]);
        let mut all: Vec<usize> = bal.concat();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>(), "every row exactly once");
        assert!(assign_rows(&[1.0; 3], 3, true).iter().all(|r| r.len() == 1));
    }

    #[test]
    fn buckets_follow_the_backward_and_owners_balance_elements() {
        let p = |n: &str, k: i64| (n.to_string(), Tensor::zeros([k], (Kind::Float, Device::Cpu)));
        let params = vec![
            p("lm_head.weight", 10),
            p("model.embed_tokens.weight", 10),
            p("model.layers.0.a", 4),
            p("model.layers.0.b", 4),
            p("model.layers.1.a", 4),
            p("model.layers.1.b", 4),
            p("model.norm.weight", 1),
        ];
        let s = GradSync::new(&params, 32, None, false);
        // 32 bytes = 8 floats: layer 1's two, then layer 0's two, then the end-only group.
        assert_eq!(s.buckets, vec![vec![4, 5], vec![2, 3], vec![0], vec![1], vec![6]]);
        assert_eq!(s.ready_at, vec![Some(1), Some(0), None, None, None]);
        assert_eq!(GradSync::new(&params, 1 << 20, None, false).buckets, vec![vec![4, 5, 2, 3], vec![0, 1, 6]]);
        // ZeRO-1 over 2 ranks: the layers (16 elements) to rank 0, the end group (21) to rank 1;
        // a bucket never spans two owners.
        let o = owners(&params, 2);
        let load: Vec<usize> =
            (0..2).map(|r| params.iter().filter(|(n, _)| o[n] == r).map(|(_, t)| t.numel()).sum()).collect();
        assert_eq!(load, vec![16, 21]);
        let z = GradSync::new(&params, 1 << 20, Some(&o), false);
        assert_eq!(z.buckets, vec![vec![4, 5, 2, 3], vec![0, 1, 6]]);
        assert_eq!(z.bucket_owner, Some(vec![0, 1]));
        let o3 = owners(&params, 3);
        let z3 = GradSync::new(&params, 1 << 20, Some(&o3), false);
        assert!(z3.bucket_owner.as_ref().unwrap().windows(2).all(|w| w[0] <= w[1]), "contiguous runs");
        assert_eq!(o3.values().collect::<std::collections::BTreeSet<_>>().len(), 3, "every rank owns something");
    }
}
