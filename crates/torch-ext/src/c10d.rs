//! c10d process groups from Rust: a thin, safe layer over `csrc/c10d.cpp`.
//!
//! A [`ProcessGroup`] is built from a [`Rendezvous`] (host, port, rank, world size, whether this
//! process hosts the store) and a [`Backend`]. Collectives take tch tensors (contiguous, on
//! the group's device) and either wait or return a [`Work`] to wait on later, which is how
//! gradient buckets overlap the backward pass. Every failure, a peer's timeout included,
//! comes back as an error carrying c10d's own message.

use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::ffi::check;
use tch::Tensor;

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}
#[repr(C)]
struct RawWork {
    _private: [u8; 0],
}

extern "C" {
    fn lm_nccl_compiled() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn lm_group_new(
        backend: c_int,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        is_server: c_int,
        timeout_ms: i64,
        prefix: *const c_char,
        device: c_int,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn lm_group_sub(
        parent: *mut RawGroup,
        backend: c_int,
        name: *const c_char,
        rank: c_int,
        size: c_int,
        device: c_int,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn lm_all_to_all(g: *mut RawGroup, x: *mut c_void, out: *mut *mut c_void) -> *mut c_char;
    fn lm_group_exchange_ns(g: *mut RawGroup) -> i64;
    fn lm_group_shutdown(g: *mut RawGroup) -> *mut c_char;
    fn lm_group_free(g: *mut RawGroup);
    fn lm_store_add(g: *mut RawGroup, key: *const c_char, delta: i64, value: *mut i64) -> *mut c_char;
    fn lm_allreduce(g: *mut RawGroup, t: *mut c_void, op: c_int, work: *mut *mut RawWork) -> *mut c_char;
    fn lm_broadcast(g: *mut RawGroup, t: *mut c_void, root: c_int, work: *mut *mut RawWork) -> *mut c_char;
    fn lm_reduce(g: *mut RawGroup, t: *mut c_void, root: c_int, work: *mut *mut RawWork) -> *mut c_char;
    fn lm_barrier(g: *mut RawGroup) -> *mut c_char;
    fn lm_work_wait(w: *mut RawWork) -> *mut c_char;
    fn lm_work_is_completed(w: *mut RawWork) -> c_int;
    fn lm_work_free(w: *mut RawWork);
    fn lm_heartbeat_start(g: *mut RawGroup, key: *const c_char, interval_ms: i64) -> *mut c_char;
    fn lm_store_set(g: *mut RawGroup, key: *const c_char, value: *const c_char) -> *mut c_char;
    fn lm_store_get(g: *mut RawGroup, key: *const c_char, timeout_ms: i64, value: *mut *mut c_char) -> *mut c_char;
}

/// How the message of a failed [`ProcessGroup::all_to_all`] starts (written by `csrc/c10d.cpp`).
pub const EXCHANGE_FAILED: &str = "context-parallel all-to-all failed";

fn c_string(s: &str) -> CString {
    CString::new(s).expect("no NUL in c10d strings")
}

/// Whether this build compiled the NCCL path (it does whenever the set-up installed its headers).
pub fn nccl_compiled() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { lm_nccl_compiled() != 0 }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors (tests, CI, CPU runs).
    Gloo,
    /// CUDA tensors.
    Nccl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// Where and as whom to join: the `TCPStore` at `host:port`, which rank 0 hosts in a plain
/// launch (`is_server`) and torchrun's agent serves otherwise.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub host: String,
    pub port: u16,
    pub rank: usize,
    pub world_size: usize,
    pub is_server: bool,
    /// For connecting, for every collective and for store reads.
    pub timeout: Duration,
    /// Namespace of this group's keys in the store (a restarted run under torchrun's agent
    /// store, which outlives the ranks, takes a new one).
    pub prefix: String,
    /// NCCL: the CUDA device the group is bound to (the caller makes it current first).
    pub device: Option<usize>,
}

/// One process group (every rank of the run, or a subgroup of them).
pub struct ProcessGroup {
    raw: *mut RawGroup,
    pub rank: usize,
    pub world_size: usize,
    pub backend: Backend,
    pub timeout: Duration,
    /// NCCL: the CUDA device the group is bound to.
    device: Option<usize>,
}

// SAFETY: c10d's store and backends are used from one thread at a time here (the trainer's);
// moving the handle between threads is fine.
unsafe impl Send for ProcessGroup {}

/// An operation in flight; [`Work::wait`] completes it. It keeps its tensor alive.
pub struct Work {
    raw: *mut RawWork,
    _tensor: Tensor,
}

// SAFETY: as for ProcessGroup.
unsafe impl Send for Work {}

impl Work {
    /// Whether the operation has finished (successfully or not); never blocks.
    pub fn is_completed(&self) -> bool {
        // SAFETY: `raw` is a live work handle.
        unsafe { lm_work_is_completed(self.raw) != 0 }
    }

    pub fn wait(self) -> Result<()> {
        // SAFETY: `raw` is a live work handle (freed only in Drop).
        check(unsafe { lm_work_wait(self.raw) })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: created by lm_allreduce/lm_broadcast, freed once.
        unsafe { lm_work_free(self.raw) }
    }
}

fn tensor_ptr(t: &Tensor) -> Result<*mut c_void> {
    if !t.is_contiguous() {
        bail!("c10d collectives need contiguous tensors");
    }
    Ok(t.as_ptr() as *mut c_void)
}

impl ProcessGroup {
    /// Join the group (blocks until the store answers; the backend connects to every peer).
    pub fn new(backend: Backend, rv: &Rendezvous) -> Result<ProcessGroup> {
        let host = c_string(&rv.host);
        let prefix = c_string(&rv.prefix);
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C strings and out-pointer for the duration of the call.
        check(unsafe {
            lm_group_new(
                matches!(backend, Backend::Nccl) as c_int,
                host.as_ptr(),
                rv.port as c_int,
                rv.rank as c_int,
                rv.world_size as c_int,
                rv.is_server as c_int,
                rv.timeout.as_millis() as i64,
                prefix.as_ptr(),
                rv.device.map_or(-1, |d| d as c_int),
                &mut raw,
            )
        })?;
        Ok(ProcessGroup {
            raw,
            rank: rv.rank,
            world_size: rv.world_size,
            backend,
            timeout: rv.timeout,
            device: rv.device,
        })
    }

    /// A group of `size` ranks of this group's run, this process being `rank` in it, with the
    /// same backend, device and timeout. `name` (unique per group in the run) namespaces its
    /// keys in the store; only the members build it, together.
    pub fn subgroup(&self, name: &str, rank: usize, size: usize) -> Result<ProcessGroup> {
        let n = c_string(name);
        let mut raw = std::ptr::null_mut();
        // SAFETY: live parent group, valid C string and out-pointer for the call.
        check(unsafe {
            lm_group_sub(
                self.raw,
                matches!(self.backend, Backend::Nccl) as c_int,
                n.as_ptr(),
                rank as c_int,
                size as c_int,
                self.device.map_or(-1, |d| d as c_int),
                &mut raw,
            )
        })?;
        Ok(ProcessGroup {
            raw,
            rank,
            world_size: size,
            backend: self.backend,
            timeout: self.timeout,
            device: self.device,
        })
    }

    /// Seconds this group has spent in [`ProcessGroup::all_to_all`] so far, forward and backward
    /// (as the host waited for them).
    pub fn all_to_all_seconds(&self) -> f64 {
        // SAFETY: live group; an atomic read.
        unsafe { lm_group_exchange_ns(self.raw) as f64 / 1e9 }
    }

    /// The all-to-all exchange, differentiable: chunk `i` of `x` along dim 0 (equal chunks, one
    /// per rank) goes to rank `i`, and chunk `i` of the result came from rank `i`. Autograd
    /// records it; its backward is the same exchange of the gradient (it is its own inverse),
    /// so every rank must run the backward too. A failure's message starts with
    /// [`EXCHANGE_FAILED`], also when it comes out of the backward.
    pub fn all_to_all(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.size().first().copied().unwrap_or(0);
        if rows % self.world_size as i64 != 0 {
            bail!("all_to_all: dim 0 ({rows}) is not a multiple of the group's {} ranks", self.world_size);
        }
        let mut out = std::ptr::null_mut();
        // SAFETY: live group, a valid tensor pointer; on success `out` is a new at::Tensor owned
        // by the returned Tensor.
        check(unsafe { lm_all_to_all(self.raw, x.as_ptr() as *mut c_void, &mut out) })?;
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }

    /// Reduce `t` in place across ranks.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        // SAFETY: live group, a valid tensor pointer; NULL work = wait inside.
        check(unsafe { lm_allreduce(self.raw, tensor_ptr(t)?, op as c_int, std::ptr::null_mut()) })
    }

    /// Run `start` (one of the C calls above) on `t` with an out-pointer for its handle.
    fn started(&self, t: &Tensor, start: impl FnOnce(*mut c_void, *mut *mut RawWork) -> *mut c_char) -> Result<Work> {
        let mut w = std::ptr::null_mut();
        check(start(tensor_ptr(t)?, &mut w))?;
        Ok(Work { raw: w, _tensor: t.shallow_clone() })
    }

    /// Start a sum all-reduce of `t` in place; wait on the returned [`Work`].
    pub fn all_reduce_async(&self, t: &Tensor) -> Result<Work> {
        // SAFETY: live group, a valid tensor pointer; `w` receives a handle the Work owns.
        self.started(t, |p, w| unsafe { lm_allreduce(self.raw, p, ReduceOp::Sum as c_int, w) })
    }

    /// Start summing every rank's `t` into rank `root`'s (the others' `t` is left unspecified);
    /// wait on the returned [`Work`].
    pub fn reduce_async(&self, t: &Tensor, root: usize) -> Result<Work> {
        // SAFETY: as for all_reduce_async.
        self.started(t, |p, w| unsafe { lm_reduce(self.raw, p, root as c_int, w) })
    }

    /// Copy rank `root`'s `t` into every rank's `t`.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        // SAFETY: as for all_reduce.
        check(unsafe { lm_broadcast(self.raw, tensor_ptr(t)?, root as c_int, std::ptr::null_mut()) })
    }

    /// Start a broadcast from `root`; wait on the returned [`Work`].
    pub fn broadcast_async(&self, t: &Tensor, root: usize) -> Result<Work> {
        // SAFETY: as for all_reduce_async.
        self.started(t, |p, w| unsafe { lm_broadcast(self.raw, p, root as c_int, w) })
    }

    pub fn barrier(&self) -> Result<()> {
        // SAFETY: live group.
        check(unsafe { lm_barrier(self.raw) })
    }

    /// Count `key` up in the store every `interval` from a thread of its own until the group is
    /// dropped; a peer whose counter stops moving has died or hangs.
    pub fn start_heartbeat(&self, key: &str, interval: Duration) -> Result<()> {
        let k = c_string(key);
        // SAFETY: live group, valid key; the thread stops before the group is freed.
        check(unsafe { lm_heartbeat_start(self.raw, k.as_ptr(), interval.as_millis() as i64) })
    }

    /// Add `delta` to the store counter `key` (0 at first) and return its new value (`delta` 0
    /// reads it).
    pub fn store_add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = c_string(key);
        let mut value = 0i64;
        // SAFETY: valid key and out-pointer for the call.
        check(unsafe { lm_store_add(self.raw, k.as_ptr(), delta, &mut value) })?;
        Ok(value)
    }

    /// End the group in order (NCCL: finalize and destroy its communicators) once every rank is
    /// done with it; dropping the group does it too, ignoring errors.
    pub fn shutdown(&self) -> Result<()> {
        // SAFETY: live group; the C side does it once.
        check(unsafe { lm_group_shutdown(self.raw) })
    }

    /// Set `key` in the run's store (seen by every rank).
    pub fn store_set(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (c_string(key), c_string(value));
        // SAFETY: valid C strings for the call.
        check(unsafe { lm_store_set(self.raw, k.as_ptr(), v.as_ptr()) })
    }

    /// Read `key` from the store, waiting at most `timeout` for it to appear.
    pub fn store_get(&self, key: &str, timeout: Duration) -> Result<String> {
        let k = c_string(key);
        let mut out = std::ptr::null_mut();
        // SAFETY: valid key and out-pointer; on success `out` is a malloc'ed C string.
        check(unsafe { lm_store_get(self.raw, k.as_ptr(), timeout.as_millis() as i64, &mut out) })?;
        Ok(crate::ffi::take_string(out))
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by lm_group_new, freed once.
        unsafe { lm_group_free(self.raw) }
    }
}
