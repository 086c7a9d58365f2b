//! The CUDA caching allocator's memory statistics (`torch.cuda.memory_allocated`,
//! `max_memory_allocated`, `memory_reserved`, `max_memory_reserved`, `reset_peak_memory_stats`),
//! and the current device (`torch.cuda.set_device`).

use std::ffi::{c_char, c_int};

use anyhow::Result;

use crate::ffi::check;

extern "C" {
    fn lm_cuda_memory(
        device: c_int,
        allocated: *mut i64,
        reserved: *mut i64,
        peak_a: *mut i64,
        peak_r: *mut i64,
    ) -> *mut c_char;
    fn lm_cuda_reset_peak(device: c_int) -> *mut c_char;
    fn lm_cuda_set_device(device: c_int) -> *mut c_char;
}

/// Make GPU `device` this thread's current CUDA device.
pub fn set_device(device: usize) -> Result<()> {
    // SAFETY: a plain integer argument.
    check(unsafe { lm_cuda_set_device(device as c_int) })
}

/// Bytes held on one GPU, now and at the peak since the last [`reset_peak`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaMemory {
    pub allocated: i64,
    pub reserved: i64,
    pub peak_allocated: i64,
    pub peak_reserved: i64,
}

/// The allocator's statistics for GPU `device`.
pub fn memory(device: usize) -> Result<CudaMemory> {
    let mut m = CudaMemory::default();
    // SAFETY: four out-pointers to live i64s.
    check(unsafe {
        lm_cuda_memory(device as c_int, &mut m.allocated, &mut m.reserved, &mut m.peak_allocated, &mut m.peak_reserved)
    })?;
    Ok(m)
}

/// Start GPU `device`'s peaks afresh.
pub fn reset_peak(device: usize) -> Result<()> {
    // SAFETY: a plain integer argument.
    check(unsafe { lm_cuda_reset_peak(device as c_int) })
}
