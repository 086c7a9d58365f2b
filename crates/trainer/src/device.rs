//! Device and dtype selection shared by the subcommands.

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// `--device` and `--dtype` of the commands that load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ComputeArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl ComputeArgs {
    pub fn resolve(&self) -> Result<(Device, Kind)> {
        Ok((parse_device(&self.device)?, parse_dtype(&self.dtype)?))
    }
}

/// `auto` (CUDA if available), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => require_cuda(0)?,
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => require_cuda(n)?,
            None => bail!("unknown device {s:?}: use auto, cpu, cuda or cuda:N"),
        },
    })
}

fn require_cuda(n: usize) -> Result<Device> {
    let count = tch::Cuda::device_count() as usize;
    if n >= count {
        bail!("device cuda:{n} requested but this machine has {count} CUDA device(s); use --device cpu or auto");
    }
    Ok(Device::Cuda(n))
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        _ => bail!("unknown dtype {s:?}: use f32, bf16 or f16"),
    })
}

/// LibTorch intra-op threads: `explicit` (a config key or flag) if given, else
/// `OMP_NUM_THREADS` (torchrun sets it), else the cores this process may use divided among
/// `local_processes` processes on this machine (one per GPU under data parallelism), at least 1.
/// Set explicitly rather than left to LibTorch's default, which counts every core of the
/// machine whatever the process's CPU affinity and however many ranks share it.
pub fn intra_op_threads(explicit: Option<i32>, local_processes: usize) -> i32 {
    if let Some(n) = explicit {
        return n.max(1);
    }
    if let Some(n) = std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.trim().parse::<i32>().ok()) {
        return n.max(1);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / local_processes.max(1)).max(1) as i32
}

/// The tch version pinned in the workspace `Cargo.toml`.
pub const TCH_VERSION: &str = "0.24.0";

/// The GPU's marketing name from the CUDA driver (`cuDeviceGetName`), looked up at run time so
/// the binary still starts on machines without a driver.
pub fn gpu_name(ordinal: i32) -> Option<String> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type CuDeviceGetName = unsafe extern "C" fn(*mut libc::c_char, i32, i32) -> i32;
    // SAFETY: plain dlopen/dlsym of the CUDA driver; the symbols have the C signatures above
    // (cuda.h), the buffer outlives the call and is NUL-terminated by the driver.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW);
        if lib.is_null() {
            return None;
        }
        let sym = |name: &std::ffi::CStr| libc::dlsym(lib, name.as_ptr());
        let (init, get, get_name) = (sym(c"cuInit"), sym(c"cuDeviceGet"), sym(c"cuDeviceGetName"));
        if init.is_null() || get.is_null() || get_name.is_null() {
            return None;
        }
        let init: CuInit = std::mem::transmute(init);
        let get: CuDeviceGet = std::mem::transmute(get);
        let get_name: CuDeviceGetName = std::mem::transmute(get_name);
        let mut dev = 0;
        if init(0) != 0 || get(&mut dev, ordinal) != 0 {
            return None;
        }
        let mut buf = [0 as libc::c_char; 256];
        if get_name(buf.as_mut_ptr(), buf.len() as i32, dev) != 0 {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned())
    }
}
