//! Attention over packed rows: several documents back to back in one sequence, each attending
//! only to itself.
//!
//! [`varlen_attention`] takes the packed layout FlashAttention uses (q `[total, H, D]`, k and v
//! `[total, H_kv, D]`, and the documents' boundaries `cu_seqlens`). On CUDA in bf16/f16 it runs
//! `at::_flash_attention_forward` with `cu_seqlens` (one kernel for every document of the
//! batch, grouped KV heads without repeating them, autograd through the operator's registered
//! derivative); everywhere else each document goes through `scaled_dot_product_attention` on
//! its own, which is exact.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::ffi::check;

extern "C" {
    fn lm_op_has_kernel(name: *const c_char, key: *const c_char, out: *mut c_int) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn lm_flash_attention_varlen(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        cu_q: *const c_void,
        cu_k: *const c_void,
        max_q: i64,
        max_k: i64,
        causal: c_int,
        scale: f64,
        window_left: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
}

/// Whether operator `name` (`"aten::_flash_attention_forward"`) has a kernel for dispatch key
/// `key` (`"CUDA"`, `"AutogradCUDA"`, `"CPU"`) in this LibTorch; None when the operator is unknown.
pub fn op_has_kernel(name: &str, key: &str) -> Result<Option<bool>> {
    let (name, key) = (CString::new(name)?, CString::new(key)?);
    let mut out: c_int = 0;
    // SAFETY: two NUL-terminated strings and an out-pointer, as csrc/attention.cpp expects.
    check(unsafe { lm_op_has_kernel(name.as_ptr(), key.as_ptr(), &mut out) })?;
    Ok(match out {
        -1 => None,
        n => Some(n == 1),
    })
}

/// Whether this LibTorch has the CUDA flash kernel for packed sequences (checked once).
pub fn flash_varlen_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| op_has_kernel("aten::_flash_attention_forward", "CUDA").ok().flatten() == Some(true))
}

/// FlashAttention-2 over packed sequences (see [`varlen_attention`] for the layout);
/// `cu_seqlens` is int32 on the tensors' device. `window_left`: keys at most that many
/// positions back (None: all). Errors come from the kernel's own checks (dtype, device, shapes).
pub fn flash_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_len: i64,
    causal: bool,
    window_left: Option<i64>,
) -> Result<Tensor> {
    let scale = 1.0 / (*q.size().last().unwrap() as f64).sqrt();
    let mut out: *mut c_void = std::ptr::null_mut();
    let p = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: every pointer is a live tch tensor (tch's `Tensor` is a pointer to a heap
    // `at::Tensor`, which is what the C side reads); the output is a new heap `at::Tensor`
    // whose ownership passes to the returned `Tensor`.
    check(unsafe {
        lm_flash_attention_varlen(
            p(q),
            p(k),
            p(v),
            p(cu_seqlens),
            p(cu_seqlens),
            max_len,
            max_len,
            causal as c_int,
            scale,
            window_left.unwrap_or(-1),
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// The document boundaries of a packed batch: document `i` at rows `host[i]..host[i + 1]`
/// (starting at 0, ending at the total). On a CUDA device with the flash kernel they are also
/// copied to the device, once: a model builds one per forward and every layer (and every
/// recomputation) reads it, instead of each paying a host-to-device copy that waits for the GPU.
pub struct CuSeqlens {
    pub host: Vec<i64>,
    device: Option<Tensor>,
}

/// Host-to-device copies of `cu_seqlens` made so far by this process (see [`CuSeqlens::new`]).
static UPLOADS: AtomicUsize = AtomicUsize::new(0);

impl CuSeqlens {
    pub fn new(host: Vec<i64>, device: Device) -> CuSeqlens {
        let device = (device.is_cuda() && flash_varlen_available()).then(|| {
            UPLOADS.fetch_add(1, Ordering::Relaxed);
            Tensor::from_slice(&host).to_kind(Kind::Int).to_device(device)
        });
        CuSeqlens { host, device }
    }

    /// The longest document.
    pub fn max_len(&self) -> i64 {
        self.host.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    /// How many host-to-device copies of document boundaries this process has made.
    pub fn uploads() -> usize {
        UPLOADS.load(Ordering::Relaxed)
    }
}

/// Causal attention over packed documents: q `[total, H, D]`, k and v `[total, H_kv, D]`, the
/// documents at `cu`. A sliding window `w` (Hugging Face's meaning: key `j` visible to query `i`
/// when `i - w < j <= i`) applies where a document is longer than it. Output `[total, H, D]`.
pub fn varlen_attention(q: &Tensor, k: &Tensor, v: &Tensor, cu: &CuSeqlens, sliding_window: Option<i64>) -> Tensor {
    match &cu.device {
        Some(cu_device) if matches!(q.kind(), Kind::BFloat16 | Kind::Half) && cu_device.device() == q.device() => {
            let max_len = cu.max_len();
            let left = sliding_window.filter(|&w| w < max_len).map(|w| w - 1);
            flash_varlen(q, k, v, cu_device, max_len, true, left).expect("flash attention over packed rows")
        }
        _ => per_document(q, k, v, &cu.host, sliding_window),
    }
}

/// [`varlen_attention`] one document at a time through SDPA: exact on every device and dtype.
pub fn per_document(q: &Tensor, k: &Tensor, v: &Tensor, cu_seqlens: &[i64], sliding_window: Option<i64>) -> Tensor {
    let pieces: Vec<Tensor> = cu_seqlens
        .windows(2)
        .map(|w| {
            let (start, len) = (w[0], w[1] - w[0]);
            let heads = |x: &Tensor| x.narrow(0, start, len).transpose(0, 1).unsqueeze(0);
            causal_sdpa(&heads(q), &heads(k), &heads(v), sliding_window).squeeze_dim(0).transpose(0, 1)
        })
        .collect();
    Tensor::cat(&pieces, 0)
}

/// Causal `scaled_dot_product_attention` of one document per row (`[B, H, T, D]`, k and v may
/// have fewer heads), with a sliding-window mask only where the window bites.
pub fn causal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, sliding_window: Option<i64>) -> Tensor {
    let len = q.size()[2];
    let gqa = q.size()[1] != k.size()[1];
    match sliding_window {
        Some(w) if len > w => {
            let mask = sliding_window_mask(len, w, q.device());
            Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, None, gqa)
        }
        _ => Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, None, gqa),
    }
}

/// Boolean `[T, T]` mask, true where query i may see key j: `j <= i` and `j > i - w`.
pub fn sliding_window_mask(len: i64, w: i64, device: Device) -> Tensor {
    let i = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(1);
    let j = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(0);
    j.le_tensor(&i).logical_and(&j.gt_tensor(&(i - w)))
}
