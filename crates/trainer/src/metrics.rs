//! Machine-readable metrics: one JSON object per line (`{"event": "step", ...}` or
//! `{"event": "eval", ...}`), flushed as written so a crash loses nothing already logged.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

pub struct Metrics {
    file: File,
}

/// Peak resident memory of this process in MB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

impl Metrics {
    /// Open `path` for a fresh run: earlier lines are discarded.
    pub fn create(path: &Path) -> Result<Metrics> {
        Self::open(path, false)
    }

    /// Open `path` for a run resumed at `step`: lines of later steps (written by the run that went
    /// past the checkpoint being resumed) and a line torn by a crash are dropped first, so every
    /// step appears once and every line parses.
    pub fn resume(path: &Path, step: u64) -> Result<Metrics> {
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
                let tmp = path.with_extension("jsonl.tmp");
                std::fs::write(&tmp, kept).with_context(|| format!("cannot write {}", tmp.display()))?;
                std::fs::rename(&tmp, path)?;
            }
        }
        Self::open(path, true)
    }

    fn open(path: &Path, append: bool) -> Result<Metrics> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        Ok(Metrics { file })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        step: u64,
        loss: f64,
        loss_short: Option<f64>,
        loss_long: Option<f64>,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
        step_s: f64,
        tokens_seen: u64,
    ) -> Result<()> {
        self.write(json!({
            "event": "step", "step": step, "loss": loss, "loss_short": loss_short, "loss_long": loss_long,
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "step_s": step_s,
            "tokens_seen": tokens_seen, "peak_rss_mb": peak_rss_mb(),
        }))
    }

    pub fn eval(&mut self, step: u64, short: Option<f64>, long: Option<f64>) -> Result<()> {
        self.write(json!({ "event": "eval", "step": step, "heldout_short": short, "heldout_long": long }))
    }
}
