//! Device and dtype selection shared by the subcommands.

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// `--device` and `--dtype` of the commands that load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ComputeArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl ComputeArgs {
    pub fn resolve(&self) -> Result<(Device, Kind)> {
        let device = parse_device(&self.device)?;
        Ok((device, compute_dtype(&self.dtype, device)?))
    }
}

/// `auto` (CUDA if available), `cpu`, `cuda` or `cuda:N`, on this machine.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = named_device(s)?;
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            bail!("device cuda:{n} requested but this machine has {count} CUDA device(s); use --device cpu or auto");
        }
    }
    Ok(device)
}

/// The device `s` names, whether or not this machine has it (a plan made on a login node).
pub fn named_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("unknown device {s:?}: use auto, cpu, cuda or cuda:N"),
        },
    })
}

/// `f32`, `bf16` or `f16` (an export's or a fixed choice; a compute dtype may also be `auto`,
/// see [`compute_dtype`]).
pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        _ => bail!("unknown dtype {s:?}: use f32, bf16 or f16"),
    })
}

/// The compute dtype `s` names on `device`: `auto` is bf16 on CUDA (where float32 attention
/// falls to PyTorch's O(T^2) math kernel: flash takes only bf16/f16, and the memory-efficient
/// kernel refuses grouped KV heads) and f32 elsewhere; otherwise [`parse_dtype`].
pub fn compute_dtype(s: &str, device: Device) -> Result<Kind> {
    match s {
        "auto" if device.is_cuda() => Ok(Kind::BFloat16),
        "auto" => Ok(Kind::Float),
        _ => parse_dtype(s).map_err(|_| anyhow::anyhow!("unknown dtype {s:?}: use auto, f32, bf16 or f16")),
    }
}

/// Longest rows float32 may train on CUDA: its attention runs on the math kernel, whose dense
/// `[rows, heads, T, T]` scores outgrow a GPU a few thousand tokens on.
pub const F32_CUDA_MAX_SEQ_LEN: usize = 4096;

/// Refuse what training cannot do well in `kind` on `device` for rows of `seq_len` tokens, with
/// the fix: f16 (no loss scaling here, so small gradients underflow) and long float32 rows on
/// CUDA (dense attention scores).
pub fn check_training_dtype(kind: Kind, device: Device, seq_len: usize) -> Result<()> {
    if kind == Kind::Half {
        bail!(
            "key `model.dtype`: f16 training needs loss scaling, which longmix does not do (small gradients would \
             underflow to zero); use bf16 (or auto: bf16 on CUDA)"
        );
    }
    if kind == Kind::Float && device.is_cuda() && seq_len > F32_CUDA_MAX_SEQ_LEN {
        let gb = (seq_len as f64).powi(2) * 4.0 / 1e9;
        bail!(
            "key `model.dtype`: f32 on CUDA with train.seq_len = {seq_len}: float32 attention runs on PyTorch's math \
             kernel (flash takes bf16/f16 only), which holds dense scores of {gb:.1} GB per head and row; use \
             dtype = \"bf16\" (what auto picks on CUDA) or seq_len <= {F32_CUDA_MAX_SEQ_LEN}"
        );
    }
    Ok(())
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

/// Dense bf16 peak TFLOP/s of GPUs by marketing name (no sparsity).
fn known_peak_tflops(name: &str) -> Option<f64> {
    [("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0)]
        .iter()
        .find(|(n, _)| name.contains(n))
        .map(|(_, p)| *p)
}

/// The dense bf16 peak of `device` for MFU (known GPUs by name; None on CPU and unknown GPUs).
pub fn peak_tflops(device: Device) -> Option<f64> {
    match device {
        Device::Cuda(i) => gpu_name(i as i32).as_deref().and_then(known_peak_tflops),
        Device::Cpu | Device::Mps | Device::Vulkan => None,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dtype_follows_the_device_and_bad_training_dtypes_are_refused() {
        assert_eq!(compute_dtype("auto", Device::Cuda(0)).unwrap(), Kind::BFloat16);
        assert_eq!(compute_dtype("auto", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(compute_dtype("f32", Device::Cuda(0)).unwrap(), Kind::Float);
        assert!(compute_dtype("fp8", Device::Cpu).unwrap_err().to_string().contains("use auto, f32"));
        check_training_dtype(Kind::Float, Device::Cuda(0), 4096).unwrap();
        check_training_dtype(Kind::Float, Device::Cpu, 131072).unwrap();
        check_training_dtype(Kind::BFloat16, Device::Cuda(0), 131072).unwrap();
        let e = check_training_dtype(Kind::Float, Device::Cuda(0), 8192).unwrap_err().to_string();
        assert!(e.contains("seq_len = 8192") && e.contains("math") && e.contains("bf16"), "{e}");
        let e = check_training_dtype(Kind::Half, Device::Cpu, 128).unwrap_err().to_string();
        assert!(e.contains("loss scaling") && e.contains("use bf16"), "{e}");
    }
}
