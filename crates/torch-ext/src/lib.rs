//! What tch lacks, written in C++ against LibTorch and wrapped safely here.
//!
//! * [`c10d`]: rendezvous on a `TCPStore` (torchrun's agent store or our own), Gloo process
//!   groups on CPU and NCCL on CUDA, and the collectives data parallelism needs: the engine
//!   PyTorch's own DDP uses, not a home-made transport.

pub mod c10d;
