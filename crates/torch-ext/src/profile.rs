//! LibTorch's own profiler (Kineto, as `torch.profiler` uses it), so a Rust run gives the same
//! operator-level Chrome trace a PyTorch run does and the two can be compared op by op.

use std::ffi::{c_char, c_int, CString};
use std::path::Path;

use anyhow::Result;

use crate::ffi::check;

extern "C" {
    fn lm_profiler_start(cuda: c_int) -> *mut c_char;
    fn lm_profiler_stop(path: *const c_char) -> *mut c_char;
}

/// Start recording operators (CPU, and CUDA kernels when `cuda`), with input shapes.
pub fn start(cuda: bool) -> Result<()> {
    // SAFETY: a plain integer argument.
    check(unsafe { lm_profiler_start(cuda as c_int) })
}

/// Stop recording and write the Chrome trace to `path`.
pub fn stop(path: &Path) -> Result<()> {
    let p = CString::new(path.to_string_lossy().as_bytes())?;
    // SAFETY: a NUL-terminated path, read during the call.
    check(unsafe { lm_profiler_stop(p.as_ptr()) })
}
