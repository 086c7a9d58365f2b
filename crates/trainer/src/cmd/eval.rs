//! `longmix eval ppl|passkey|niah`: long-context evaluation under any RoPE override.
//!
//! Every task prints a table, and with `--out FILE.json` writes the full results (settings,
//! the exact command, per-sample records) and a PNG next to it (`--plot` to choose its path):
//! a line chart of perplexity by length (`--compare` overlays earlier runs) or a heatmap of
//! the score by length x depth.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longmix_eval::plot;
use longmix_eval::{
    GridOptions, GridResult, Haystack, NeedleValue, PplMode, PplOptions, RopeChoice, RopeOverride, StringChoice, TchLm,
};
use serde_json::{json, Value};

use crate::device::ComputeArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(clap::Subcommand)]
enum Task {
    /// Perplexity by length on a text corpus (.txt = one document; .jsonl with --field/--group-by).
    Ppl(PplArgs),
    /// Passkey retrieval (greedy, 10 new tokens, first integer vs the key) by length x depth.
    Passkey(PasskeyArgs),
    /// RULER niah_single (numbers / words / UUIDs in a noise or real-text haystack) by length x depth.
    Niah(NiahArgs),
    /// Redraw plots from earlier --out files: several ppl runs in one chart, or a grid's heatmap.
    Plot(PlotArgs),
}

#[derive(clap::Args)]
struct PlotArgs {
    /// `eval ... --out` JSON files (ppl files are drawn together; one passkey/niah file as a heatmap).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "perplexity by length")]
    title: String,
}

/// How positions are encoded: the checkpoint's own RoPE or an override, optionally STRING.
#[derive(clap::Args, Clone, Debug)]
pub struct RopeArgs {
    /// own (the checkpoint's config), pi, ntk (static NTK base change), dynamic (HF dynamic NTK),
    /// yarn, or a LongRoPE factor set: longrope2 (LongRoPE2's initial factors) or original;
    /// all but own need --target-length.
    #[arg(long, default_value = "own")]
    pub rope: String,
    /// The window L to extend to (s = L / L0, L0 = the model's original window).
    #[arg(long)]
    pub target_length: Option<i64>,
    /// A LongRoPE factors file (`longmix search` output) to evaluate instead of --rope.
    #[arg(long)]
    pub factors: Option<PathBuf>,
    /// Attend with STRING (shifted relative positions, training-free).
    #[arg(long)]
    pub string: bool,
    /// STRING's shifted offset S (default int(0.33 x max_position_embeddings)).
    #[arg(long, requires = "string")]
    pub string_offset: Option<i64>,
    /// STRING's local window W (default 128).
    #[arg(long, requires = "string")]
    pub string_window: Option<i64>,
    /// STRING's extra cos/sin factor (default 0.1 ln 2 + 1 as in the reference; 1 = bare rewrite).
    #[arg(long, requires = "string")]
    pub string_temperature: Option<f64>,
}

impl RopeArgs {
    pub fn choice(&self) -> Result<RopeChoice> {
        let rope = match &self.factors {
            Some(f) => {
                if self.rope != "own" {
                    bail!("give either --rope {} or --factors, not both", self.rope);
                }
                RopeOverride::Extension(longmix_model::LongFactors::File(f.clone()))
            }
            None => RopeOverride::parse(&self.rope)?,
        };
        let string = self.string.then_some(StringChoice {
            shifted_offset: self.string_offset,
            local_window: self.string_window,
            attention_factor: self.string_temperature,
        });
        Ok(RopeChoice { rope, target_length: self.target_length, string })
    }
}

#[derive(clap::Args)]
struct Common {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    rope: RopeArgs,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Write the results as JSON to this file (and the plot beside it as .png).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the plot here (default: --out with the extension .png).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Seed of every sampled prompt (same seed, same prompts for every model and setting).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Name of this run in tables and plots (default: the RoPE setting).
    #[arg(long)]
    label: Option<String>,
    /// Print the JSON to stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PplArgs {
    #[command(flatten)]
    common: Common,
    /// Corpus: a .jsonl file (one object per line) or any text file (one document).
    #[arg(long)]
    text: PathBuf,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    field: String,
    /// JSONL fields whose consecutive equal values make one document (e.g. book), comma-separated;
    /// grouped records are joined with a newline, as `train` joins them.
    #[arg(long, value_delimiter = ',')]
    group_by: Vec<String>,
    /// Lengths in tokens, comma-separated (k = 1024): e.g. 1k,2k,4k,8k,16k.
    #[arg(long, default_value = "1k,2k,4k")]
    lengths: String,
    /// Documents per length.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Sliding windows with this stride (default: one window per document, truncated to L).
    #[arg(long)]
    stride: Option<usize>,
    /// With --stride: at most this many windows per document.
    #[arg(long, default_value_t = 10)]
    max_windows: usize,
    /// Earlier `eval ppl --out` JSON files to draw in the same plot.
    #[arg(long, value_delimiter = ',')]
    compare: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct GridArgs {
    /// Prompt lengths in tokens, exact, comma-separated (k = 1024).
    #[arg(long, default_value = "1k,2k,4k")]
    lengths: String,
    /// Needle depths in percent, comma-separated.
    #[arg(long, default_value = "0,25,50,75,100")]
    depths: String,
    /// Prompts per (length, depth) cell.
    #[arg(long, default_value_t = 2)]
    samples: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
}

#[derive(clap::Args)]
struct PasskeyArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    grid: GridArgs,
    /// New tokens generated per prompt.
    #[arg(long, default_value_t = 10)]
    max_new_tokens: usize,
}

#[derive(clap::Args)]
struct NiahArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    grid: GridArgs,
    /// Needle values: numbers (7 digits), words (adjective-noun) or uuids.
    #[arg(long, default_value = "numbers")]
    values: String,
    /// Haystack: noise (RULER's repeated sentences) or a text / .jsonl file (its sentences).
    #[arg(long, default_value = "noise")]
    haystack: String,
    /// JSONL field holding the haystack text.
    #[arg(long, default_value = "text")]
    field: String,
    /// New tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
}

/// `512,1k,16K` -> [512, 1024, 16384].
pub fn parse_lengths(s: &str) -> Result<Vec<usize>> {
    let out: Vec<usize> = s
        .split(',')
        .map(|p| {
            let p = p.trim();
            let (num, mul) = match p.strip_suffix(['k', 'K']) {
                Some(n) => (n, 1024),
                None => (p, 1),
            };
            num.parse::<usize>()
                .map(|n| n * mul)
                .map_err(|_| anyhow::anyhow!("bad length {p:?} in {s:?} (use e.g. 512,1k,16k)"))
        })
        .collect::<Result<_>>()?;
    if out.is_empty() || out.contains(&0) {
        bail!("--lengths needs positive lengths, got {s:?}");
    }
    Ok(out)
}

/// `0,50,100` (percent) -> [0.0, 0.5, 1.0].
fn parse_depths(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|p| {
            let v: f64 = p
                .trim()
                .trim_end_matches('%')
                .parse()
                .map_err(|_| anyhow::anyhow!("bad depth {p:?} in {s:?} (percent, e.g. 0,50,100)"))?;
            if !(0.0..=100.0).contains(&v) {
                bail!("depth {v} is not a percentage in [0, 100]");
            }
            Ok(v / 100.0)
        })
        .collect()
}

fn fmt_len(l: usize) -> String {
    if l >= 1024 && l.is_multiple_of(1024) {
        format!("{}K", l / 1024)
    } else {
        l.to_string()
    }
}

fn bar(what: &str) -> ProgressBar {
    ProgressBar::new(0).with_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}}  {{elapsed}} elapsed, eta {{eta}}"))
            .unwrap(),
    )
}

/// The loaded model with the override applied, and what it resolved to.
struct Session {
    lm: longmix_model::LoadedModel,
    tok: longmix_eval::Tokenizer,
    applied: longmix_eval::Applied,
    label: String,
    started: std::time::Instant,
}

fn open(c: &Common) -> Result<Session> {
    let (device, kind) = c.compute.resolve()?;
    let choice = c.rope.choice()?;
    let mut lm = longmix_model::load_model(&c.model, kind, device)?;
    let tok = longmix_model::load_tokenizer(&c.model)?;
    let applied = choice.apply(&mut lm.model.config)?;
    let label = c.label.clone().unwrap_or_else(|| applied.label.clone());
    eprintln!("model {}  rope: {}  device {device:?}", c.model.display(), applied.label);
    Ok(Session { lm, tok, applied, label, started: std::time::Instant::now() })
}

fn envelope(c: &Common, s: &Session, task: &str, result: Value) -> Value {
    json!({
        "task": task,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "model": c.model,
        "label": s.label,
        "rope": s.applied.details,
        "seed": c.seed,
        "device": c.compute.device,
        "dtype": c.compute.dtype,
        "seconds": s.started.elapsed().as_secs_f64(),
        "result": result,
    })
}

fn write_outputs(c: &Common, report: &Value, table: &str, canvas: Option<plot::Canvas>) -> Result<()> {
    if c.json {
        println!("{report}");
    } else {
        print!("{table}");
        println!("({:.1}s)", report["seconds"].as_f64().unwrap_or(0.0));
    }
    if let Some(out) = &c.out {
        std::fs::write(out, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    let plot_path = c.plot.clone().or_else(|| c.out.as_ref().map(|o| o.with_extension("png")));
    if let (Some(path), Some(canvas)) = (plot_path, canvas) {
        canvas.save_png(&path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    match a.task {
        Task::Ppl(a) => run_ppl(a),
        Task::Passkey(a) => run_passkey(a),
        Task::Niah(a) => run_niah(a),
        Task::Plot(a) => run_plot(a),
    }
}

fn run_plot(a: PlotArgs) -> Result<()> {
    let first: Value = serde_json::from_str(
        &std::fs::read_to_string(&a.inputs[0]).with_context(|| format!("cannot read {}", a.inputs[0].display()))?,
    )
    .with_context(|| format!("{} is not JSON", a.inputs[0].display()))?;
    let canvas = if first["task"] == "ppl" {
        let series = a.inputs.iter().map(|p| ppl_series(p)).collect::<Result<Vec<_>>>()?;
        for (label, points) in &series {
            let pts: Vec<String> = points.iter().map(|(l, p)| format!("{}: {p:.3}", *l as usize)).collect();
            println!("{label:<40} {}", pts.join("  "));
        }
        plot::line_chart(&a.title, "length (tokens)", "perplexity", &series)
    } else {
        if a.inputs.len() != 1 {
            bail!("passkey / niah results are drawn one file at a time");
        }
        let r: GridResult = serde_json::from_value(first["result"].clone())
            .with_context(|| format!("{} is not an `eval passkey|niah --out` file", a.inputs[0].display()))?;
        heatmap(&grid_title(&r, first["label"].as_str().unwrap_or("?")), &r)
    };
    canvas.save_png(&a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn run_ppl(a: PplArgs) -> Result<()> {
    let lengths = parse_lengths(&a.lengths)?;
    let mode = match a.stride {
        Some(0) => bail!("--stride must be positive"),
        Some(stride) => PplMode::Sliding { stride, max_windows: a.max_windows.max(1) },
        None => PplMode::Truncate,
    };
    if lengths.iter().any(|&l| l < 2) {
        bail!("perplexity needs lengths of at least 2 tokens");
    }
    let s = open(&a.common)?;
    let docs = longmix_eval::ppl::load_documents(&a.text, &a.field, &a.group_by)?;
    let longest = *lengths.iter().max().unwrap();
    let tokenized = longmix_eval::ppl::tokenize_documents(&s.tok, &docs, longest, a.samples)?;
    let mut lm = TchLm::new(&s.lm.model, s.applied.string);
    let opts = PplOptions { lengths: lengths.clone(), samples: a.samples.max(1), mode };
    let b = bar("perplexity");
    let result = longmix_eval::perplexity(&mut lm, &tokenized, &opts, &b)?;
    b.finish_and_clear();
    let mut report = envelope(&a.common, &s, "ppl", serde_json::to_value(&result)?);
    report["text"] = json!(a.text);
    let mut series = Vec::new();
    for f in &a.compare {
        series.push(ppl_series(f)?);
    }
    series.push((s.label.clone(), result.points.iter().map(|p| (p.length as f64, p.ppl)).collect()));
    let canvas = plot::line_chart("perplexity by length", "length (tokens)", "perplexity", &series);
    let table = format!("{}\n{}", s.label, result.table());
    write_outputs(&a.common, &report, &table, Some(canvas))
}

/// (label, points) of an earlier `eval ppl --out` file.
fn ppl_series(path: &Path) -> Result<(String, Vec<(f64, f64)>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if v["task"] != "ppl" {
        bail!("{} is not the output of `longmix eval ppl --out`", path.display());
    }
    let label = v["label"].as_str().unwrap_or("?").to_string();
    let points = v["result"]["points"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| Some((p["length"].as_f64()?, p["ppl"].as_f64()?))).collect())
        .unwrap_or_default();
    Ok((label, points))
}

fn grid_options(g: &GridArgs, seed: u64, max_new_tokens: usize) -> Result<GridOptions> {
    Ok(GridOptions {
        lengths: parse_lengths(&g.lengths)?,
        depths: parse_depths(&g.depths)?,
        samples: g.samples.max(1),
        seed,
        max_new_tokens,
        batch_size: g.batch_size.max(1),
    })
}

fn grid_title(r: &GridResult, label: &str) -> String {
    let task = if r.task == "passkey" { "passkey accuracy" } else { r.task.as_str() };
    format!("{task} - {label}")
}

fn heatmap(title: &str, r: &GridResult) -> plot::Canvas {
    let cols: Vec<String> = r.lengths.iter().map(|&l| fmt_len(l)).collect();
    let rows: Vec<String> = r.depths.iter().map(|d| format!("{:.0}%", d * 100.0)).collect();
    plot::heatmap(title, "length (tokens)", "depth", &cols, &rows, &r.scores)
}

fn run_passkey(a: PasskeyArgs) -> Result<()> {
    let opts = grid_options(&a.grid, a.common.seed, a.max_new_tokens)?;
    let s = open(&a.common)?;
    let mut lm = TchLm::new(&s.lm.model, s.applied.string);
    let b = bar("passkey");
    let result = longmix_eval::passkey(&mut lm, &s.tok, &opts, &b)?;
    b.finish_and_clear();
    let report = envelope(&a.common, &s, "passkey", serde_json::to_value(&result)?);
    let canvas = heatmap(&grid_title(&result, &s.label), &result);
    let table = format!("{}\n{}", s.label, result.table());
    write_outputs(&a.common, &report, &table, Some(canvas))
}

fn run_niah(a: NiahArgs) -> Result<()> {
    let opts = grid_options(&a.grid, a.common.seed, a.max_new_tokens)?;
    let values = NeedleValue::parse(&a.values)?;
    let s = open(&a.common)?;
    let haystack = if a.haystack == "noise" {
        Haystack::noise(&s.tok)?
    } else {
        let path = PathBuf::from(&a.haystack);
        let docs = longmix_eval::ppl::load_documents(&path, &a.field, &[])?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Enough sentences for a few different stretches of the longest prompt.
        let longest = opts.lengths.iter().copied().max().unwrap_or(0);
        Haystack::text(&s.tok, &docs.join(" "), &name, 4 * longest)?
    };
    let mut lm = TchLm::new(&s.lm.model, s.applied.string);
    let b = bar("niah");
    let result = longmix_eval::niah(&mut lm, &s.tok, &haystack, values, &opts, &b)?;
    b.finish_and_clear();
    let report = envelope(&a.common, &s, "niah", serde_json::to_value(&result)?);
    let canvas = heatmap(&grid_title(&result, &s.label), &result);
    let table = format!("{}\n{}", s.label, result.table());
    write_outputs(&a.common, &report, &table, Some(canvas))
}
