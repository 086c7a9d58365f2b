//! `longmix`: mixed-context-window fine-tuning of LLaMA, Mistral, Phi-3, Qwen2 and Qwen3 checkpoints.

mod checkpoint;
mod cmd;
mod config;
mod device;
mod distributed;
mod estimate;
mod grads;
mod metrics;
mod optim;
mod schedule;
mod tensorboard;
mod train;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "longmix", version, about = "Stretch an LLM's context window the LongRoPE2 way")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print tch/LibTorch versions, CUDA availability, GPU names and bf16 support.
    Env(cmd::env::Args),
    /// Convert a llama.cpp GGUF file (LLaMA architecture) into a Hugging Face model folder.
    ImportGguf(cmd::import_gguf::Args),
    /// Mean next-token NLL and token count of a text file under a model.
    Score(cmd::score::Args),
    /// Train a few steps of one shape (a model folder or a preset) and print speed, MFU, memory and time split as JSON.
    Bench(cmd::bench::Args),
    /// Fine-tune to a longer window with mixed short/long rows, from a TOML config.
    Train(train::Args),
    /// Training curves of a run (loss with held-out points, learning rate, gradient norm, tokens/s) as a PNG.
    Plot(cmd::plot::Args),
    /// Turn a training checkpoint into a Hugging Face folder with the extended window.
    Export(cmd::export::Args),
    /// Long-context evaluation: ppl, passkey, niah
    Eval(cmd::eval::Args),
    /// Greedy/sampled generation with a KV cache
    Generate(cmd::generate::Args),
    /// Search LongRoPE rescale factors (LongRoPE2 critical-dimension or LongRoPE v1)
    Search(cmd::search::Args),
    /// Needle-driven perplexity at a target length under closed-form or searched factors.
    NeedlePpl(cmd::needle_ppl::Args),
    /// Check a checkpoint, a run's checkpoints or an export against the checksums written with it.
    Verify(cmd::verify::Args),
}

/// Keep freed tensor memory up to 32 MB a block in the C heap for reuse instead of handing it
/// back to the kernel after every layer and step. glibc's default moves its mmap threshold and
/// trims the heap as it goes, so a training step page-faults its working set in afresh; fixed
/// thresholds cut the step's page faults by about a sixth and its system time by a fifth on
/// the CPU benchmark (docs/performance.md). Blocks above 32 MB still come from mmap.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

fn main() {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log redirected to a file (nohup, SLURM) stays plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Env(a) => cmd::env::run(a),
        Command::ImportGguf(a) => cmd::import_gguf::run(a),
        Command::Score(a) => cmd::score::run(a),
        Command::Train(a) => train::run(a),
        Command::Plot(a) => cmd::plot::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Search(a) => cmd::search::run(a),
        Command::NeedlePpl(a) => cmd::needle_ppl::run(a),
        Command::Verify(a) => cmd::verify::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
