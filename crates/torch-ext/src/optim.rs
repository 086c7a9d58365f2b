//! PyTorch's fused AdamW kernel (`_fused_adamw_`) over tensors the caller owns.

use std::ffi::{c_char, c_void};

use anyhow::{ensure, Result};
use tch::Tensor;

use crate::ffi::check;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn lm_fused_adamw(
        params: *const *const c_void,
        grads: *const *const c_void,
        exp_avgs: *const *const c_void,
        exp_avg_sqs: *const *const c_void,
        n: i64,
        step: *const c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        wd: f64,
        eps: f64,
        grad_scale: *const c_void,
    ) -> *mut c_char;
    fn lm_grad_reset(t: *mut c_void) -> *mut c_char;
}

/// Drop `t`'s gradient (Python's `p.grad = None`), freeing its memory; the next backward starts
/// a new one.
pub fn reset_grad(t: &Tensor) {
    // SAFETY: a live tch tensor, read and modified by csrc/optim.cpp for the call only.
    check(unsafe { lm_grad_reset(t.as_ptr() as *mut c_void) }).expect("resetting a gradient cannot fail");
}

/// The hyper-parameters of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// Whether this LibTorch has a fused AdamW kernel for `device`'s dispatch key.
pub fn fused_adamw_available(device: tch::Device) -> bool {
    let key = if device.is_cuda() { "CUDA" } else { "CPU" };
    crate::attention::op_has_kernel("aten::_fused_adamw_", key).ok().flatten() == Some(true)
}

/// One AdamW update of `params` in place, with their gradients and moments (all float32 or all
/// of one dtype, on one device). `step` is a float32 scalar tensor on that device holding the
/// 1-based update count. Gradients are divided by `grad_scale` when given (a clip factor `c`
/// is `grad_scale = 1 / c`); the kernel may leave them divided.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: &Tensor,
    h: AdamWStep,
    grad_scale: Option<&Tensor>,
) -> Result<()> {
    let n = params.len();
    ensure!(
        grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n,
        "fused AdamW: {n} parameters but {} gradients, {} and {} moments",
        grads.len(),
        exp_avgs.len(),
        exp_avg_sqs.len()
    );
    let ptrs = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as *const c_void).collect::<Vec<_>>();
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let scale = grad_scale.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void);
    // SAFETY: four arrays of `n` live tensors and two more live tensors (or NULL), read by
    // csrc/optim.cpp only for the duration of the call.
    check(unsafe {
        lm_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n as i64,
            step.as_ptr() as *const c_void,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            scale,
        )
    })
}
