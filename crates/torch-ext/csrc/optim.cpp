// PyTorch's fused AdamW kernel (`_fused_adamw_`: one pass over each parameter, moments and
// gradient; CUDA and, since 2.4, CPU) over tensors the caller owns. The calling convention is
// ffi.h's.

#include <vector>

#include "ffi.h"

#include <ATen/ATen.h>

extern "C" {

// One AdamW update of `n` parameters in place (decoupled weight decay `wd`). `step` is a float32
// scalar tensor on the parameters' device holding the update's 1-based count (the kernel's bias
// corrections read it; one tensor serves every parameter). Gradients are divided by
// `grad_scale` (a float32 scalar tensor) when it is not NULL, which is how a global clip factor
// rides along without a pass of its own.
char* lm_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                     at::Tensor* const* exp_avg_sqs, int64_t n, const at::Tensor* step, double lr, double beta1,
                     double beta2, double wd, double eps, const at::Tensor* grad_scale) {
  return lm::guard([&] {
    std::vector<at::Tensor> p, g, m, v, steps;
    for (int64_t i = 0; i < n; ++i) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      steps.push_back(*step);
    }
    std::optional<at::Tensor> scale;
    if (grad_scale) scale = *grad_scale;
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, wd, eps, false, false, scale, std::nullopt);
  });
}

}  // extern "C"

extern "C" {

// Drop a tensor's `.grad` (Python's `p.grad = None`): its memory goes back to the allocator,
// and the next backward allocates a fresh one.
char* lm_grad_reset(at::Tensor* t) {
  return lm::guard([&] { t->mutable_grad().reset(); });
}

}  // extern "C"
