//! Learning-rate schedule: linear warmup, then cosine, linear or constant decay to `min_lr`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The schedule of a run of `total_steps` steps (`optim.lr` and `[schedule]`).
    pub fn new(cfg: &crate::config::TrainConfig, total_steps: u64) -> Schedule {
        Schedule {
            peak_lr: cfg.optim.lr,
            min_lr: cfg.optim.lr * cfg.schedule.min_lr_ratio,
            warmup_steps: cfg.schedule.warmup_steps,
            total_steps,
            decay: cfg.schedule.decay,
        }
    }

    /// Learning rate of optimizer step `step` (0-based: the first update uses `lr(0)`).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let frac = match self.decay {
            Decay::Constant => return self.peak_lr,
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.min_lr + (self.peak_lr - self.min_lr) * frac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> Schedule {
        Schedule { peak_lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, total_steps: 110, decay }
    }

    #[test]
    fn warmup_is_linear_to_peak() {
        let s = sched(Decay::Cosine);
        assert!((s.lr(0) - 1e-4).abs() < 1e-15);
        assert!((s.lr(4) - 5e-4).abs() < 1e-15);
        assert!((s.lr(9) - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn cosine_reaches_min_at_the_end_and_half_way_is_the_mean() {
        let s = sched(Decay::Cosine);
        assert!((s.lr(10) - 1e-3).abs() < 1e-15);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-12);
        assert!((s.lr(110) - 1e-4).abs() < 1e-15);
        assert!((s.lr(500) - 1e-4).abs() < 1e-15, "stays at min past the end");
    }

    #[test]
    fn linear_and_constant() {
        assert!((sched(Decay::Linear).lr(60) - 5.5e-4).abs() < 1e-12);
        assert_eq!(sched(Decay::Constant).lr(100), 1e-3);
    }
}
