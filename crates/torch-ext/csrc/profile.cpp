// LibTorch's profiler (Kineto, what torch.profiler drives) from outside Python: record every
// operator this thread and autograd run, CPU and, where present, CUDA, then write a Chrome
// trace that chrome://tracing, Perfetto and benches/profile_ops.py read. The calling
// convention is ffi.h's.

#include <set>
#include <string>

#include "ffi.h"

#include <torch/csrc/autograd/profiler_kineto.h>

namespace prof = torch::profiler::impl;

static std::set<prof::ActivityType> activities(int cuda) {
  std::set<prof::ActivityType> a{prof::ActivityType::CPU};
  if (cuda) a.insert(prof::ActivityType::CUDA);
  return a;
}

extern "C" {

// Start recording (record input shapes so the trace can tell a [T, vocab] matmul from others).
char* lm_profiler_start(int cuda) {
  return lm::guard([&] {
    prof::ProfilerConfig config(prof::ProfilerState::KINETO, /*report_input_shapes=*/true);
    torch::autograd::profiler::prepareProfiler(config, activities(cuda));
    torch::autograd::profiler::enableProfiler(config, activities(cuda));
  });
}

// Stop recording and write the Chrome trace to `path`.
char* lm_profiler_stop(const char* path) {
  return lm::guard([&] { torch::autograd::profiler::disableProfiler()->save(path); });
}

}  // extern "C"
