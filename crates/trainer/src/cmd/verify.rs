//! `longmix verify DIR`: a checkpoint, every checkpoint of a run's folder, or an exported model
//! against the checksums written with it; one line a file, a non-zero exit on any damage.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use longmix_core::checksum::{check_files, Algo, Expected, Verdict};
use longmix_model::export::{expected_files, SUMS_FILE};

use crate::checkpoint::{self, Manifest, MANIFEST};

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint (`<checkpoint.dir>/step-N`), a run's checkpoint folder (each `step-N` in it),
    /// or a folder written by `longmix export`.
    dir: PathBuf,
    /// Files read at once (default: the cores, at most 8).
    #[arg(long)]
    threads: Option<usize>,
}

/// One folder to check: what it is, its files and how they were summed (None: lengths only).
struct Target {
    dir: PathBuf,
    what: String,
    algo: Option<Algo>,
    files: Vec<Expected>,
}

/// The folders `dir` names, each with its recorded files.
fn targets(dir: &Path) -> Result<Vec<Target>> {
    if dir.join(MANIFEST).exists() {
        let m = Manifest::read(dir)?;
        let what = format!("checkpoint step {}", m.step);
        return Ok(vec![Target { dir: dir.to_path_buf(), what, algo: m.checksum, files: m.files }]);
    }
    if let Some(files) = expected_files(dir)? {
        return Ok(vec![Target { dir: dir.to_path_buf(), what: "export".into(), algo: Some(Algo::Sha256), files }]);
    }
    let steps = checkpoint::list(dir);
    if steps.is_empty() {
        bail!(
            "{} holds no {MANIFEST} (a checkpoint), no {SUMS_FILE} (an export) and no step-N checkpoints: name a \
             checkpoint folder, a run's checkpoint.dir, or an export (exports written before checksums have no \
             {SUMS_FILE} and cannot be verified)",
            dir.display()
        );
    }
    steps.iter().map(|(_, d)| targets(d).map(|mut t| t.remove(0))).collect()
}

/// Check one target, printing a line a file; returns how many files are damaged.
fn check(t: &Target, threads: usize) -> usize {
    println!(
        "{} ({}, {}):",
        t.dir.display(),
        t.what,
        t.algo.map_or("lengths only: written before checksums", Algo::name)
    );
    let total: u64 = t.files.iter().map(|f| std::fs::metadata(t.dir.join(&f.name)).map_or(0, |m| m.len())).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("  {bar:30} {bytes}/{total_bytes}  {bytes_per_sec}  eta {eta}").unwrap(),
    );
    let algo = t.algo.unwrap_or(checkpoint::CHECKSUM);
    let verdicts = check_files(&t.dir, &t.files, algo, threads, &|n| bar.inc(n));
    bar.finish_and_clear();
    let mut damaged = 0;
    for (f, v) in t.files.iter().zip(&verdicts) {
        match (v, &f.hash) {
            (Verdict::Ok { bytes }, Some(h)) => println!("  ok   {}  {}  {algo} {h}", f.name, HumanBytes(*bytes)),
            (Verdict::Ok { bytes }, None) => println!("  ok   {}  {}  (length only)", f.name, HumanBytes(*bytes)),
            (bad, _) => {
                damaged += 1;
                println!("  BAD  {}", bad.describe(&f.name, algo));
            }
        }
    }
    damaged
}

pub fn run(a: Args) -> Result<()> {
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8));
    let start = Instant::now();
    let targets = targets(&a.dir)?;
    let damaged: Vec<&Target> = targets.iter().filter(|t| check(t, threads) > 0).collect();
    let files: usize = targets.iter().map(|t| t.files.len()).sum();
    let secs = start.elapsed().as_secs_f64();
    if !damaged.is_empty() {
        let names: Vec<String> = damaged.iter().map(|t| t.dir.display().to_string()).collect();
        bail!(
            "damaged: {} (see the BAD lines above); resume from an intact checkpoint (--resume auto skips damaged \
             ones) or copy the files again from their source",
            names.join(", ")
        );
    }
    println!("{files} file(s) in {} folder(s) intact ({secs:.1} s)", targets.len());
    Ok(())
}
