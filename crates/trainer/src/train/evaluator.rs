//! Held-out evaluation: the mean NLL of the short and of the long held-out rows, before
//! training, every `eval.every` steps and at the end, the rows shared out over the data-parallel
//! groups (under context parallelism each rank of a group scores its slice of every row).

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use longmix_data::{Loader, Row, Window};
use longmix_model::CausalLm;

use super::parallel::Parallel;
use crate::config::EvalSection;

/// Held-out mean NLL of the short and of the long rows (None for a kind without rows).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOut {
    pub short: Option<f64>,
    pub long: Option<f64>,
}

impl std::fmt::Display for HeldOut {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let v = |x: Option<f64>| x.map_or("n/a".into(), |v| format!("{v:.4}"));
        write!(f, "short {}  long {}", v(self.short), v(self.long))
    }
}

pub struct Evaluator {
    short: Vec<Row>,
    long: Vec<Row>,
    every: u64,
}

impl Evaluator {
    /// The held-out rows `cfg` asks for, from `loader`'s held-out documents.
    pub fn new(loader: &Loader, cfg: &EvalSection) -> Evaluator {
        Evaluator {
            short: loader.eval_rows(Window::Short, cfg.short_rows).unwrap_or_default(),
            long: loader.eval_rows(Window::Long, cfg.long_rows).unwrap_or_default(),
            every: cfg.every,
        }
    }

    /// Whether the periodic evaluation falls after step `step`.
    pub fn due(&self, step: u64) -> bool {
        self.every > 0 && step.is_multiple_of(self.every)
    }

    /// Rows data-parallel group `rank` of `world` evaluates.
    pub fn rows_for(&self, (rank, world): (usize, usize)) -> usize {
        let mine = |n: usize| (n + world - 1 - rank) / world;
        mine(self.short.len()) + mine(self.long.len())
    }

    /// A progress bar counting this rank's rows on its own line (hidden when `hidden`).
    pub fn bar(&self, parallel: &Parallel, hidden: bool) -> ProgressBar {
        let rows = self.rows_for(parallel.data_group()) as u64;
        let bar = if hidden { ProgressBar::hidden() } else { ProgressBar::new(rows) };
        bar.set_style(
            ProgressStyle::with_template("held-out eval {bar:20} {pos}/{len} rows  {elapsed}  eta {eta}").unwrap(),
        );
        bar
    }

    /// Held-out mean NLL of the short and the long rows, each rank its share; `bar` counts this
    /// rank's rows (a long row's forward takes a minute on a small CPU).
    pub fn evaluate(&self, model: &CausalLm, parallel: &Parallel, bar: &ProgressBar) -> Result<HeldOut> {
        let (group, groups) = parallel.data_group();
        let device = model.lm_head_weight().device();
        let sums = |rows: &[Row]| -> Result<(f64, f64)> {
            let (mut nll, mut n) = (0.0, 0);
            for r in rows.iter().skip(group).step_by(groups) {
                let tokens = parallel.tokens(model, &[r], device);
                let l = parallel.guard("held-out evaluation", || model.nll_of(&tokens))?;
                nll += l.sum();
                n += l.tokens();
                bar.inc(1);
            }
            Ok((nll, n as f64))
        };
        let (s, l) = (sums(&self.short)?, sums(&self.long)?);
        let mut v = [s.0, s.1, l.0, l.1];
        parallel.sum_f64(&mut v, "held-out evaluation")?;
        let mean = |rows: &[Row], nll: f64, n: f64| (!rows.is_empty()).then(|| nll / n.max(1.0));
        Ok(HeldOut { short: mean(&self.short, v[0], v[1]), long: mean(&self.long, v[2], v[3]) })
    }
}
