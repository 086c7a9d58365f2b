//! What tch lacks, written in C++ against LibTorch and wrapped safely here.
//!
//! * [`c10d`]: rendezvous on a `TCPStore` (torchrun's agent store or our own), Gloo process
//!   groups on CPU and NCCL on CUDA, and the collectives data parallelism needs: the engine
//!   PyTorch's own DDP uses, not a home-made transport.
//! * [`attention`]: FlashAttention-2 over packed variable-length sequences on CUDA (autograd
//!   through the dispatcher), with an exact per-sequence fallback elsewhere.
//! * [`optim`]: PyTorch's fused AdamW kernel over tensors we own.
//! * [`cuda`]: the CUDA caching allocator's current and peak memory.
//! * [`profile`]: LibTorch's profiler, writing the Chrome trace `torch.profiler` writes.

pub mod attention;
pub mod c10d;
pub mod cuda;
mod ffi;
pub mod optim;
pub mod profile;
