//! Machine-readable metrics: one JSON object per line (`{"event": "step", ...}` or
//! `{"event": "eval", ...}`), flushed as written so a crash loses nothing already logged.
//! Each object also goes to the TensorBoard event files ([`crate::tensorboard`]) unless
//! `[log] tensorboard = false`, so both records hold the same numbers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use crate::tensorboard::EventWriter;
use crate::train::StepStats;

/// Where a run's metrics go: the JSONL file and, unless turned off, the TensorBoard folder.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsPaths {
    pub jsonl: PathBuf,
    pub tensorboard: Option<PathBuf>,
}

pub struct Metrics {
    file: File,
    events: Option<EventWriter>,
}

/// Peak resident memory of this process in MB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Start the peak resident memory afresh (Linux: `5` into `/proc/self/clear_refs` resets
/// `VmHWM` to the current RSS); a no-op elsewhere.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

impl Metrics {
    /// Open the metrics of a fresh run: earlier lines and event files are discarded.
    pub fn create(paths: &MetricsPaths) -> Result<Metrics> {
        let events = paths.tensorboard.as_deref().map(EventWriter::create).transpose()?;
        Ok(Metrics { file: Self::open(&paths.jsonl, false)?, events })
    }

    /// Open the metrics of a run resumed at `step`: lines of later steps (written by the run
    /// that went past the checkpoint being resumed) and a line torn by a crash are dropped
    /// first, so every step appears once and every line parses; the event files are cut back
    /// the same way.
    pub fn resume(paths: &MetricsPaths, step: u64) -> Result<Metrics> {
        let path = &paths.jsonl;
        if let Ok(text) = std::fs::read_to_string(path) {
            let kept: String = text
                .lines()
                .filter(|l| match serde_json::from_str::<serde_json::Value>(l) {
                    Ok(v) => v.get("step").and_then(|s| s.as_u64()).is_none_or(|s| s <= step),
                    Err(_) => false,
                })
                .map(|l| format!("{l}\n"))
                .collect();
            if kept.len() != text.len() {
                longmix_core::fsx::write_atomic(path, kept.as_bytes())?;
            }
        }
        let events = paths.tensorboard.as_deref().map(|d| EventWriter::resume(d, step)).transpose()?;
        Ok(Metrics { file: Self::open(path, true)?, events })
    }

    fn open(path: &Path, append: bool) -> Result<File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))
    }

    /// One line of the JSONL file, and the same object's numbers as TensorBoard scalars.
    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        if let Some(events) = self.events.as_mut() {
            events.write(&v)?;
        }
        Ok(())
    }

    /// One optimizer step's line: the step's figures as [`StepStats`] serialises them.
    pub fn step(&mut self, s: &StepStats) -> Result<()> {
        let mut line = serde_json::to_value(s)?;
        line["event"] = json!("step");
        self.write(line)
    }

    /// Something a person should look at (e.g. a collapsed gradient), with the step it concerns.
    pub fn warning(&mut self, step: u64, message: &str) -> Result<()> {
        self.write(json!({ "event": "warning", "step": step, "message": message }))
    }

    pub fn eval(&mut self, step: u64, short: Option<f64>, long: Option<f64>) -> Result<()> {
        self.write(json!({ "event": "eval", "step": step, "heldout_short": short, "heldout_long": long }))
    }
}
