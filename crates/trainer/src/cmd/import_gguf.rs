use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The .gguf file.
    file: PathBuf,
    /// Output folder (Hugging Face layout); must not exist or be a previous import.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    let r = longmix_gguf::import_gguf(&a.file, &a.out)?;
    println!(
        "imported {} ({} tensors, {:.1}M parameters, types {}) into {} in {:.1}s",
        r.architecture,
        r.n_tensors,
        r.n_params as f64 / 1e6,
        r.quant_types.join(","),
        r.out_dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
