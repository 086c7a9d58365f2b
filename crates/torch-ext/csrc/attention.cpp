// Attention kernels tch does not bind: FlashAttention-2 over packed (variable-length) sequences,
// called through the dispatcher so autograd records its registered derivative
// (`_flash_attention_backward`), and a dispatcher probe saying which kernels this LibTorch has.
// The calling convention is ffi.h's.

#include "ffi.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

extern "C" {

// `*out` = 1 when operator `name` (e.g. "aten::_flash_attention_forward", default overload) has
// a kernel for dispatch key `key` (e.g. "CUDA", "CPU", "AutogradCUDA"), 0 when it has none, -1
// when this LibTorch does not know the operator.
char* lm_op_has_kernel(const char* name, const char* key, int* out) {
  return lm::guard([&] {
    auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    *out = !op ? -1 : op->hasKernelForDispatchKey(c10::parseDispatchKey(key)) ? 1 : 0;
  });
}

// q `[total_q, H, D]`, k and v `[total_k, H_kv, D]` (H a multiple of H_kv: grouped KV heads
// without repeating them), every sequence's start and end in `cu_q` / `cu_k` (int32
// `[n + 1]`, on the device), the longest sequences `max_q` / `max_k`. Causal when `causal`;
// `window_left` >= 0 limits each query to keys at most that many positions back (-1: no
// limit). Output `[total_q, H, D]`.
char* lm_flash_attention_varlen(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, const at::Tensor* cu_q,
                                const at::Tensor* cu_k, int64_t max_q, int64_t max_k, int causal, double scale,
                                int64_t window_left, at::Tensor** out) {
  return lm::guard([&] {
    std::optional<int64_t> left, right;
    if (window_left >= 0) {
      left = window_left;
      right = 0;
    }
    auto r = at::_flash_attention_forward(*q, *k, *v, *cu_q, *cu_k, max_q, max_k, 0.0, causal != 0, false, scale,
                                          left, right);
    *out = new at::Tensor(std::get<0>(r));
  });
}

}  // extern "C"
