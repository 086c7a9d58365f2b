//! What a run shows and records: the progress bar, and on rank 0 the metrics sinks
//! (`metrics.jsonl`) with every step, held-out evaluation and warning.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use super::step::StepStats;
use super::Trainer;
use crate::metrics::Metrics;

pub struct RunLog {
    /// Rank 0's sinks (None on the other ranks).
    metrics: Option<Metrics>,
    bar: ProgressBar,
    /// Hide progress bars (`log.no_progress`, or not rank 0).
    hidden: bool,
}

impl RunLog {
    /// Open the sinks of `t`'s run (fresh, or rewound to the resumed step) and its progress bar,
    /// and warn when the checkpoint folder's disk is too small.
    pub fn open(t: &Trainer) -> Result<RunLog> {
        let main = t.engine.parallel.is_main();
        let metrics = match (main, t.state.step) {
            (false, _) => None,
            (true, 0) => Some(Metrics::create(&t.cfg.metrics_path())?),
            (true, step) => Some(Metrics::resume(&t.cfg.metrics_path(), step)?),
        };
        let hidden = t.cfg.log.no_progress || !main;
        let bar = if hidden { ProgressBar::hidden() } else { ProgressBar::new(t.total_steps) };
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}").unwrap());
        bar.set_position(t.state.step);
        let mut log = RunLog { metrics, bar, hidden };
        let params = t.engine.params.iter().map(|(_, p)| p.numel() as u64).sum();
        let kind = t.lm.model.lm_head_weight().kind();
        if let Some(w) = t.checkpointer.space_warning(params, kind).filter(|_| main) {
            log.warn(t.state.step, &w)?;
        }
        Ok(log)
    }

    /// A warning above the progress bar, recorded in the metrics.
    pub fn warn(&mut self, step: u64, w: &str) -> Result<()> {
        self.bar.suspend(|| tracing::warn!("{w}"));
        self.metrics.as_mut().map_or(Ok(()), |m| m.warning(step, w))
    }

    /// A line above the progress bar (rank 0).
    pub fn note(&self, line: &str) {
        if self.metrics.is_some() {
            self.bar.println(line);
        }
    }

    /// A finished step: its metrics line, its warnings, the bar.
    pub fn step(&mut self, t: &Trainer, s: &StepStats) -> Result<()> {
        if let Some(m) = self.metrics.as_mut() {
            m.step(s)?;
        }
        if s.window_mismatches > 0 {
            let w = format!(
                "step {}: {} row(s) were built for one RoPE window and run in the other (data l0 and model L0 disagree)",
                s.step, s.window_mismatches
            );
            self.warn(s.step, &w)?;
        }
        if let Some(w) = t.collapse_warning(s).filter(|_| self.metrics.is_some()) {
            self.warn(s.step, &w)?;
        }
        self.bar
            .set_message(format!("loss {:.4}  {:.0} tok/s  peak RSS {:.0} MB", s.loss, s.tokens_per_s, s.peak_rss_mb));
        self.bar.inc(1);
        Ok(())
    }

    /// The held-out evaluation of `t.evaluator`'s interval, under the step's bar.
    pub fn periodic_eval(&mut self, t: &Trainer) -> Result<()> {
        let step = t.state.step;
        self.bar.set_message(format!("held-out eval of {} rows", t.evaluator.rows_for(t.engine.parallel.data_group())));
        let h = t.evaluate(&ProgressBar::hidden())?;
        if let Some(m) = self.metrics.as_mut() {
            m.eval(step, h.short, h.long)?;
            self.bar.println(format!("step {step}: held-out loss {h}"));
        }
        Ok(())
    }

    /// The held-out evaluation before or after training, with a bar of its own; after
    /// training it also closes the step bar.
    pub fn held_out(&mut self, t: &Trainer, when: &str) -> Result<()> {
        if t.state.step > 0 {
            self.bar.finish();
        }
        let bar = t.evaluator.bar(&t.engine.parallel, self.hidden);
        let h = t.evaluate(&bar)?;
        bar.finish_and_clear();
        if let Some(m) = self.metrics.as_mut() {
            m.eval(t.state.step, h.short, h.long)?;
            let label = format!("{when}:");
            println!("held-out loss {label:<16} {h}");
            if let (Some(d), true) = (t.engine.parallel.dist(), when == "after training") {
                println!("parameters identical on all {} ranks (checked at every checkpoint)", d.world());
            }
        }
        Ok(())
    }

    /// The run stopped early at `step` (a signal or `--stop-after`).
    pub fn stopped(&self, step: u64) {
        self.bar.abandon();
        if self.metrics.is_some() {
            println!("stopped at step {step} (resume with --resume)");
        }
    }
}
