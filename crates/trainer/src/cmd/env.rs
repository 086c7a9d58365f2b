//! `longmix env`: what this binary links and what it can run on.

use anyhow::Result;
use serde_json::json;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Whether a small bf16 matmul runs on `device`, and its error if not.
fn bf16_works(device: Device) -> bool {
    let a = Tensor::f_ones([8, 8], (Kind::BFloat16, device));
    a.and_then(|a| a.f_matmul(&a))
        .and_then(|c| c.f_sum(Kind::Float))
        .map(|s| s.double_value(&[]) == 512.0)
        .unwrap_or(false)
}

pub fn run(a: Args) -> Result<()> {
    let cuda = tch::Cuda::is_available();
    let n = tch::Cuda::device_count();
    let gpus: Vec<_> = (0..n)
        .map(|i| {
            json!({
                "index": i,
                "name": crate::device::gpu_name(i as i32).unwrap_or_else(|| "unknown".into()),
                "bf16": bf16_works(Device::Cuda(i as usize)),
            })
        })
        .collect();
    let info = json!({
        "longmix": env!("CARGO_PKG_VERSION"),
        "tch": crate::device::TCH_VERSION,
        "libtorch": env!("LONGMIX_LIBTORCH_VERSION"),
        "cuda_available": cuda,
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "cuda_device_count": n,
        "gpus": gpus,
        "cpu_bf16": bf16_works(Device::Cpu),
        "threads": tch::get_num_threads(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("longmix   {}", info["longmix"].as_str().unwrap());
    println!("tch       {}", info["tch"].as_str().unwrap());
    println!("libtorch  {}", info["libtorch"].as_str().unwrap());
    println!("threads   {}", info["threads"]);
    println!("cpu bf16  {}", info["cpu_bf16"]);
    println!("cuda      {} ({} device(s), cudnn {})", cuda, n, info["cudnn_available"]);
    for g in info["gpus"].as_array().unwrap() {
        println!("  cuda:{}  {}  bf16 {}", g["index"], g["name"].as_str().unwrap(), g["bf16"]);
    }
    Ok(())
}
