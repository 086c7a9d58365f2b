// CUDA caching-allocator statistics (what torch.cuda.max_memory_allocated and friends read).
// Compiled with the CUDA headers when the build has them (LONGMIX_CUDA); otherwise every call
// says so. The calling convention is ffi.h's.

#include <cstdint>

#include "ffi.h"

#ifdef LONGMIX_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

extern "C" {

// Bytes on `device`: allocated now, reserved by the allocator now, and the peaks of both since
// the last reset.
char* lm_cuda_memory(int device, int64_t* allocated, int64_t* reserved, int64_t* peak_allocated,
                     int64_t* peak_reserved) {
  return lm::guard([&] {
#ifdef LONGMIX_CUDA
    auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = s.allocated_bytes[all].current;
    *reserved = s.reserved_bytes[all].current;
    *peak_allocated = s.allocated_bytes[all].peak;
    *peak_reserved = s.reserved_bytes[all].peak;
#else
    TORCH_CHECK(false, "this build of longmix has no CUDA headers: rebuild after launch/setup.sh installed them");
#endif
  });
}

// Start the peaks of `device` afresh (torch.cuda.reset_peak_memory_stats).
char* lm_cuda_reset_peak(int device) {
  return lm::guard([&] {
#ifdef LONGMIX_CUDA
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
#else
    TORCH_CHECK(false, "this build of longmix has no CUDA headers: rebuild after launch/setup.sh installed them");
#endif
  });
}

// Make `device` this thread's current CUDA device (torch.cuda.set_device): kernels, the flash
// kernel's device checks and NCCL's default device follow it.
char* lm_cuda_set_device(int device) {
  return lm::guard([&] {
#ifdef LONGMIX_CUDA
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
#else
    TORCH_CHECK(false, "this build of longmix has no CUDA headers: rebuild after launch/setup.sh installed them");
#endif
  });
}

}  // extern "C"
