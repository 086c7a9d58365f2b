//! `longmix plot RUN_DIR`: a run's training curves as one PNG of four panels, read from
//! `RUN_DIR/metrics.jsonl`: the short and long rows' training loss with the held-out
//! evaluation points, the learning rate, the gradient norm and tokens/s, each by step. Drawn on
//! the evaluation charts' canvas (`longmix_eval::plot`), so no imaging crate is needed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use longmix_eval::plot::{text_width, Canvas, Rgb};
use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// The run's folder (its `[checkpoint] dir`, holding metrics.jsonl) or a metrics file.
    run_dir: PathBuf,
    /// The PNG to write (default `<RUN_DIR>/curves.png`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Size of the picture: four panels of 700 x 450 pixels.
pub const WIDTH: usize = 1400;
pub const HEIGHT: usize = 900;

const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [210, 210, 210];
const SHORT: Rgb = [31, 119, 180];
const LONG: Rgb = [255, 127, 14];
const HELDOUT_SHORT: Rgb = [20, 50, 110];
const HELDOUT_LONG: Rgb = [190, 40, 20];
const OTHER: Rgb = [44, 160, 44];

/// One curve of a panel: lines through its points, or marked points joined by a thin line.
struct Series {
    name: &'static str,
    colour: Rgb,
    points: Vec<(f64, f64)>,
    marked: bool,
}

pub fn run(a: Args) -> Result<()> {
    let path = metrics_file(&a.run_dir)?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    // A line torn by a crash is skipped, as `--resume` drops it.
    let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    if !lines.iter().any(|v| v["event"] == "step") {
        bail!("{} holds no step yet: plot a run once it has made a step", path.display());
    }
    let out = a.out.unwrap_or_else(|| longmix_core::fsx::parent_dir(&path).join("curves.png"));
    draw(&lines).save_png(&out)?;
    println!("{}", out.display());
    Ok(())
}

/// `run_dir` itself when it is a file, else `run_dir/metrics.jsonl`.
fn metrics_file(run_dir: &Path) -> Result<PathBuf> {
    if run_dir.is_file() {
        return Ok(run_dir.to_path_buf());
    }
    let path = run_dir.join("metrics.jsonl");
    if !path.is_file() {
        bail!(
            "{} holds no metrics.jsonl: pass the folder of a run (the `[checkpoint] dir` of its config, where \
             `longmix train` writes metrics.jsonl) or the metrics file itself (as `[log] metrics` names it)",
            run_dir.display()
        );
    }
    Ok(path)
}

/// (step, value) of `key` on every line of `event`, leaving out missing and non-finite values.
fn points(lines: &[Value], event: &str, key: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter(|v| v["event"] == event)
        .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64().filter(|x| x.is_finite())?)))
        .collect()
}

fn draw(lines: &[Value]) -> Canvas {
    let curve = |name, colour, event, key, marked| Series { name, colour, points: points(lines, event, key), marked };
    let panels = [
        (
            "loss",
            vec![
                curve("short", SHORT, "step", "loss_short", false),
                curve("long", LONG, "step", "loss_long", false),
                curve("held-out short", HELDOUT_SHORT, "eval", "heldout_short", true),
                curve("held-out long", HELDOUT_LONG, "eval", "heldout_long", true),
            ],
        ),
        ("learning rate", vec![curve("lr", OTHER, "step", "lr", false)]),
        ("gradient norm", vec![curve("grad norm", OTHER, "step", "grad_norm", false)]),
        ("tokens/s", vec![curve("tokens/s", OTHER, "step", "tokens_per_s", false)]),
    ];
    let steps: Vec<f64> = panels.iter().flat_map(|p| p.1.iter().flat_map(|s| s.points.iter().map(|q| q.0))).collect();
    let x_range = padded(steps.iter().fold((f64::MAX, f64::MIN), |r, &x| (r.0.min(x), r.1.max(x))), 0.0);
    let mut c = Canvas::new(WIDTH, HEIGHT);
    let (w, h) = (WIDTH as i64 / 2, HEIGHT as i64 / 2);
    for (i, (title, series)) in panels.iter().enumerate() {
        let (x, y) = (i as i64 % 2 * w, i as i64 / 2 * h);
        panel(&mut c, (x, y, w, h), title, x_range, series);
    }
    c
}

/// One panel in `area` (x, y, width, height): title, legend, axes with labelled grid lines
/// and the curves, steps over `x_range` across.
fn panel(c: &mut Canvas, area: (i64, i64, i64, i64), title: &str, x_range: (f64, f64), series: &[Series]) {
    let (ax, ay, aw, ah) = area;
    let (left, top) = (ax + 110, ay + 64);
    let (pw, ph) = (aw - 110 - 30, ah - 64 - 56);
    c.text(ax + 16, ay + 10, title, 2, BLACK);
    let mut lx = ax + 16;
    for s in series {
        c.rect(lx, ay + 36, 16, 14, s.colour);
        c.text(lx + 22, ay + 36, s.name, 2, BLACK);
        lx += 22 + text_width(s.name, 2) + 24;
    }
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let y_range = padded(values.fold((f64::MAX, f64::MIN), |r, y| (r.0.min(y), r.1.max(y))), 0.06);
    let px = |x: f64| left + ((x - x_range.0) / (x_range.1 - x_range.0) * pw as f64).round() as i64;
    let py = |y: f64| top + ph - ((y - y_range.0) / (y_range.1 - y_range.0) * ph as f64).round() as i64;
    for fx in step_ticks(x_range) {
        let xl = format!("{fx}");
        c.line(px(fx), top, px(fx), top + ph, 1, GREY);
        c.text(px(fx) - text_width(&xl, 2) / 2, top + ph + 10, &xl, 2, BLACK);
    }
    for k in 0..=4 {
        let fy = y_range.0 + (y_range.1 - y_range.0) * k as f64 / 4.0;
        let yl = fmt_tick(fy, (y_range.1 - y_range.0) / 4.0);
        c.line(left, py(fy), left + pw, py(fy), 1, GREY);
        c.text(left - 8 - text_width(&yl, 2), py(fy) - 7, &yl, 2, BLACK);
    }
    c.line(left, top, left, top + ph, 2, BLACK);
    c.line(left, top + ph, left + pw, top + ph, 2, BLACK);
    c.text(left + pw / 2 - text_width("step", 2) / 2, top + ph + 32, "step", 2, BLACK);
    for s in series {
        let pts: Vec<(i64, i64)> = s.points.iter().map(|&(x, y)| (px(x), py(y))).collect();
        for w in pts.windows(2) {
            c.line(w[0].0, w[0].1, w[1].0, w[1].1, if s.marked { 1 } else { 2 }, s.colour);
        }
        for &(x, y) in pts.iter().filter(|_| s.marked || s.points.len() == 1) {
            c.rect(x - 4, y - 4, 9, 9, s.colour);
        }
    }
}

/// (min, max) widened by `share` of its span on each side; an empty or zero span becomes a
/// small interval around its value.
fn padded((lo, hi): (f64, f64), share: f64) -> (f64, f64) {
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = match (hi > lo, hi != 0.0) {
        (true, _) => (hi - lo) * share,
        (false, true) => hi.abs() * 0.05,
        (false, false) => 0.5,
    };
    (lo - pad, hi + pad)
}

/// Whole steps across `(lo, hi)`, at most about five of them.
fn step_ticks((lo, hi): (f64, f64)) -> Vec<f64> {
    let every = ((hi - lo) / 4.0).ceil().max(1.0);
    let first = (lo / every).ceil() * every;
    (0..).map(|k| first + k as f64 * every).take_while(|&x| x <= hi).collect()
}

/// A tick label of an axis whose ticks are `spacing` apart: scientific for values under 0.01
/// (learning rates), else as many decimals as the spacing needs.
fn fmt_tick(v: f64, spacing: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() < 0.01 && spacing < 0.01 {
        return format!("{v:.1e}");
    }
    let decimals = (1.0 - spacing.log10().floor()).clamp(0.0, 4.0) as usize;
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_and_ranges() {
        assert_eq!(fmt_tick(0.0, 1.0), "0");
        assert_eq!(fmt_tick(2e-5, 1e-5), "2.0e-5");
        assert_eq!(fmt_tick(10.873, 0.44), "10.87");
        assert_eq!(fmt_tick(3.25, 0.05), "3.250");
        assert_eq!(fmt_tick(12345.6, 300.0), "12346");
        assert_eq!(step_ticks((0.0, 2.0)), vec![0.0, 1.0, 2.0]);
        assert_eq!(step_ticks((0.0, 1000.0)), vec![0.0, 250.0, 500.0, 750.0, 1000.0]);
        let (lo, hi) = padded((5e-5, 5e-5), 0.06);
        assert!(lo > 4e-5 && hi < 6e-5, "a constant learning rate gets an axis of its own scale: {lo} {hi}");
        assert_eq!(padded((2.0, 2.0), 0.1), (1.9, 2.1));
        assert_eq!(padded((f64::MAX, f64::MIN), 0.1), (0.0, 1.0));
        assert_eq!(padded((0.0, 10.0), 0.1), (-1.0, 11.0));
    }
}
