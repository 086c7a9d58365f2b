//! Data parallelism across real processes on this machine: Gloo over loopback, ranks started
//! the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), on a
//! tiny random LLaMA (2 layers, L0 = 64) with mixed short and long rows.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{corpus, tiny_model};
use tch::Tensor;

/// One model and corpus shared by several runs, each with its own config and checkpoints.
/// Tests take turns (the guard): ranks of several tests at once on a small machine would make
/// a slow rank look like a hung one to the timeout tests.
struct Bench {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    _turn: std::sync::MutexGuard<'static, ()>,
}

static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Bench {
    fn new() -> Bench {
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        tiny_model(&root.join("model"));
        corpus(&root.join("corpus.jsonl"), 120);
        Bench { _tmp: tmp, root, _turn: turn }
    }

    /// A run named `name`: 6 rows per global step, mixed short/long rows, layer checkpointing
    /// (so gradient buckets overlap the backward); `extra` is appended as further sections.
    fn run(&self, name: &str, steps: u64, extra: &str) -> PathBuf {
        self.run_on(&self.root.join("model"), "", name, steps, extra)
    }

    /// [`Bench::run`] on the model in `model`, with `rope` added to the `[rope]` section.
    fn run_on(&self, model: &Path, rope: &str, name: &str, steps: u64, extra: &str) -> PathBuf {
        let root = self.root.display();
        let model = model.display();
        let cfg = format!(
            r#"
[model]
path = "{model}"
threads = 1
[rope]
target_length = 256
{rope}
[data]
sources = [{{ type = "jsonl", path = "{root}/corpus.jsonl" }}]
short_share = 0.5
eval_fraction = 0.1
cache_dir = "{root}/cache"
[train]
steps = {steps}
seq_len = 128
global_batch_rows = 6
micro_batch_rows = 1
checkpoint_layers = true
[optim]
lr = 1e-3
[checkpoint]
dir = "{root}/{name}/ckpt"
every = 2
keep = 0
[eval]
short_rows = 2
long_rows = 1
[log]
no_progress = true
{extra}
"#
        );
        let path = self.root.join(format!("{name}.toml"));
        std::fs::create_dir_all(self.root.join(name)).unwrap();
        std::fs::write(&path, cfg).unwrap();
        path
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Start `world` ranks of `longmix train --config cfg` (world 0: one plain process).
fn launch(cfg: &Path, world: usize, extra: &[&str]) -> Vec<Child> {
    let port = free_port().to_string();
    let ranks = if world == 0 { vec![None] } else { (0..world).map(Some).collect() };
    ranks
        .into_iter()
        .map(|rank| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_longmix"));
            c.args(["train", "--config", cfg.to_str().unwrap()]).args(extra).env("RUST_LOG", "warn");
            if let Some(r) = rank {
                c.env("RANK", r.to_string())
                    .env("LOCAL_RANK", r.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port);
            }
            c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect()
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Run to completion; every rank must succeed. Returns rank 0's output.
fn train(cfg: &Path, world: usize, extra: &[&str]) -> String {
    let outs: Vec<Output> = launch(cfg, world, extra).into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} of {world} failed:\n{}", text(o));
    }
    text(&outs[0])
}

fn weights(ckpt: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap().into_iter().collect()
}

/// Largest absolute difference between two sets of weights.
fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter().map(|(k, t)| (t - &b[k]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn step_lines(metrics: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .collect()
}

/// Block until rank 0 has logged its first step.
fn wait_for_a_step(metrics: &Path) {
    let t0 = Instant::now();
    while !metrics.exists() || step_lines(metrics).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step within 2 minutes");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// Summation order is the only difference between N ranks and one process: each rank sums its
// rows' gradients, then the all-reduce sums the ranks (one process sums all rows in turn).
// float32 addition reorderings change a gradient by a few ulps (~1e-7 relative); AdamW's
// normalised update turns that into at most ~lr * 1e-3 per step for near-zero gradients, so
// after 4 steps at lr 1e-3 the weights agree to well within 1e-5 (measured: 3e-7), while one
// row trained differently moves them by about lr per step (1e-3).
const TOL: f64 = 1e-5;

#[test]
fn two_and_three_ranks_train_what_one_process_trains() {
    let b = Bench::new();
    let one = b.run("one", 4, "");
    train(&one, 0, &[]);
    let reference = weights(&b.root.join("one/ckpt/step-00000004"));
    for world in [2, 3] {
        let name = format!("dp{world}");
        let cfg = b.run(&name, 4, "");
        let out = train(&cfg, world, &[]);
        assert!(out.contains(&format!("parameters identical on all {world} ranks")), "{out}");
        let w = weights(&b.root.join(format!("{name}/ckpt/step-00000004")));
        let d = max_diff(&reference, &w);
        eprintln!("{world} ranks vs one process: max |dw| = {d:.3e}");
        assert!(d < TOL, "{world} ranks differ from one process by {d}");
        assert!(d > 0.0 || world == 1, "bitwise equal is suspicious: are the ranks training the same rows?");
        let steps = step_lines(&b.root.join(format!("{name}/ckpt/metrics.jsonl")));
        assert_eq!(steps.len(), 4);
        for s in &steps {
            assert_eq!(s["rank_compute_s"].as_array().unwrap().len(), world, "{s}");
            assert_eq!(s["rows_short"].as_u64().unwrap() + s["rows_long"].as_u64().unwrap(), 6, "{s}");
        }
    }
    // The losses are the global step's, as one process computes them.
    let l1 = step_lines(&b.root.join("one/ckpt/metrics.jsonl"));
    let l3 = step_lines(&b.root.join("dp3/ckpt/metrics.jsonl"));
    for (a, c) in l1.iter().zip(&l3) {
        let (a, c) = (a["loss"].as_f64().unwrap(), c["loss"].as_f64().unwrap());
        assert!((a - c).abs() < 1e-4, "loss {a} vs {c}");
    }
}

#[test]
fn zero1_trains_what_plain_data_parallel_trains_and_resumes_on_another_world_size() {
    let b = Bench::new();
    let plain = b.run("plain", 4, "");
    train(&plain, 2, &[]);
    let zero = b.run("zero", 4, "[distributed]\nzero1 = true\n");
    train(&zero, 2, &[]);
    let ck = b.root.join("zero/ckpt/step-00000002");
    for r in 0..2 {
        assert!(ck.join(format!("optimizer-rank-{r:05}-of-00002.safetensors")).exists(), "shard {r}");
    }
    assert!(!ck.join("optimizer.safetensors").exists());
    let d =
        max_diff(&weights(&b.root.join("plain/ckpt/step-00000004")), &weights(&b.root.join("zero/ckpt/step-00000004")));
    eprintln!("ZeRO-1 vs plain: max |dw| = {d:.3e}");
    assert!(d < TOL, "ZeRO-1 differs from plain data parallelism by {d}");

    // Resume the 2-rank ZeRO-1 run's step 2 on 3 ranks: the shards are re-shared out.
    let three = b.run("zero", 4, "[distributed]\nzero1 = true\n");
    std::fs::remove_dir_all(b.root.join("zero/ckpt/step-00000004")).unwrap();
    std::fs::remove_dir_all(b.root.join("zero/ckpt/step-00000003")).ok();
    train(&three, 3, &["--resume", &ck.display().to_string()]);
    let d =
        max_diff(&weights(&b.root.join("plain/ckpt/step-00000004")), &weights(&b.root.join("zero/ckpt/step-00000004")));
    eprintln!("ZeRO-1 on 2 ranks resumed on 3 vs plain: max |dw| = {d:.3e}");
    assert!(d < TOL, "resumed on 3 ranks: {d}");
}

#[test]
fn a_damaged_zero1_shard_is_named_and_the_ranks_resume_the_previous_checkpoint() {
    let b = Bench::new();
    let cfg = b.run("shard", 4, "[distributed]\nzero1 = true\n");
    train(&cfg, 2, &[]);
    let ckpt = b.root.join("shard/ckpt");
    let (two, four) = (ckpt.join("step-00000002"), ckpt.join("step-00000004"));
    let before = weights(&four);
    let shard = "optimizer-rank-00001-of-00002.safetensors";
    let mut bytes = std::fs::read(four.join(shard)).unwrap();
    let at = bytes.len() - 9;
    bytes[at] ^= 0x01;
    std::fs::write(four.join(shard), bytes).unwrap();

    let v = common::bin().args(["verify", ckpt.to_str().unwrap()]).output().unwrap();
    let listed = text(&v);
    assert!(!v.status.success() && listed.contains(&format!("BAD  {shard}: xxh3-64 checksum is")), "{listed}");
    // Named explicitly: every rank refuses it, naming the shard and the previous checkpoint.
    let four_arg = four.display().to_string();
    for (r, o) in
        launch(&cfg, 2, &["--resume", &four_arg]).into_iter().map(|c| c.wait_with_output().unwrap()).enumerate()
    {
        let t = text(&o);
        assert!(
            !o.status.success() && t.contains(shard) && t.contains(&format!("--resume {}", two.display())),
            "{r}: {t}"
        );
    }
    // `--resume auto`: the ranks agree to skip it, resume step 2 and redo steps 3 and 4 exactly.
    let out = train(&cfg, 2, &["--resume", "auto"]);
    assert!(out.contains(&format!("skipping checkpoint {}: {shard}", four.display())), "{out}");
    assert_eq!(max_diff(&before, &weights(&four)), 0.0, "resumed past the damaged shard == uninterrupted");
}

/// `data.cache_dir` on node-local scratch: two "nodes" (rank 0 alone; ranks 1 and 2 as local
/// ranks 0 and 1), each its own working folder, so the relative cache folder of one is not the
/// other's. Each node's cache is tokenized once, by its local rank 0.
#[test]
fn a_node_local_cache_is_tokenized_once_per_node() {
    let b = Bench::new();
    let cfg = b.run("scratch", 2, "");
    let text_cfg = std::fs::read_to_string(&cfg).unwrap();
    let cache = format!("cache_dir = \"{}/cache\"", b.root.display());
    std::fs::write(&cfg, text_cfg.replace(&cache, "cache_dir = \"scratch/cache\"")).unwrap();
    let port = free_port().to_string();
    let nodes = [b.root.join("node-a"), b.root.join("node-b")];
    let kids: Vec<Child> = [(0, 0), (1, 1), (2, 1)]
        .into_iter()
        .map(|(rank, node)| {
            std::fs::create_dir_all(&nodes[node]).unwrap();
            let local = if rank == 2 { 1 } else { 0 };
            Command::new(env!("CARGO_BIN_EXE_longmix"))
                .args(["train", "--config", cfg.to_str().unwrap()])
                .current_dir(&nodes[node])
                .env("RUST_LOG", "info")
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("WORLD_SIZE", "3")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let logs: Vec<String> = kids
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "rank {r} failed:\n{}", text(&o));
            text(&o)
        })
        .collect();
    // The tokenizer's report ("sources[0]: N docs, T tokens in S s") is logged by whoever builds.
    let tokenized = |log: &str| log.lines().any(|l| l.contains("sources[0]: ") && l.contains(" tokens in "));
    assert!(tokenized(&logs[0]) && tokenized(&logs[1]), "rank 0 and node b's local rank 0 tokenize");
    assert!(logs[1].contains("rank 1, this node's local rank 0, tokenizes it"), "{}", logs[1]);
    assert!(!tokenized(&logs[2]), "node b's local rank 1 waits instead:\n{}", logs[2]);
    assert!(logs[2].contains("waiting for rank 1 (this node's local rank 0)"), "{}", logs[2]);
    for node in &nodes {
        assert!(node.join("scratch/cache").is_dir(), "{}", node.display());
    }
}

/// Data parallel and context parallel (the killed rank is the other half of every row).
#[test]
fn a_killed_rank_stops_the_others_with_its_name() {
    let b = Bench::new();
    for (name, cp) in [("kill", 1), ("cpkill", 2)] {
        let cfg = b.run(name, 200, &format!("[distributed]\ntimeout_s = 20\ncontext_parallel = {cp}\n"));
        let mut kids = launch(&cfg, 2, &[]);
        wait_for_a_step(&b.root.join(format!("{name}/ckpt/metrics.jsonl")));
        kids[1].kill().unwrap();
        let killed = Instant::now();
        let out = kids.remove(0).wait_with_output().unwrap();
        let took = killed.elapsed();
        let msg = text(&out);
        // An error return through the group's orderly drop, not a crash in its destructor (nor
        // a panic out of a failed all-to-all).
        assert_eq!(out.status.code(), Some(1), "rank 0 should fail with an error after rank 1 died:\n{msg}");
        assert!(!msg.contains("panicked"), "{msg}");
        assert!(took < Duration::from_secs(40), "rank 0 took {took:?} to stop");
        eprintln!("cp {cp}: rank 0 stopped {took:?} after rank 1 was killed:\n{msg}");
        assert!(msg.contains("rank(s) 1 did not answer"), "{msg}");
        assert!(msg.contains("--resume auto"), "{msg}");
        // Whatever is visible is complete: no half-written checkpoint.
        for e in std::fs::read_dir(b.root.join(format!("{name}/ckpt"))).unwrap().flatten() {
            let entry = e.file_name().to_string_lossy().into_owned();
            if entry.starts_with("step-") {
                assert!(e.path().join("MANIFEST.json").exists(), "{entry} is visible without its manifest");
            }
        }
    }
}

#[test]
fn a_hung_rank_stops_the_others_within_the_timeout() {
    let b = Bench::new();
    for (name, cp) in [("hang", 1), ("cphang", 2)] {
        let cfg = b.run(name, 200, &format!("[distributed]\ntimeout_s = 5\ncontext_parallel = {cp}\n"));
        let mut kids = launch(&cfg, 2, &[]);
        wait_for_a_step(&b.root.join(format!("{name}/ckpt/metrics.jsonl")));
        // SIGSTOP: the process stays alive, its sockets open, and answers nothing.
        unsafe { libc::kill(kids[1].id() as i32, libc::SIGSTOP) };
        let stopped = Instant::now();
        let out = kids.remove(0).wait_with_output().unwrap();
        let took = stopped.elapsed();
        kids[0].kill().unwrap();
        let msg = text(&out);
        eprintln!("cp {cp}: rank 0 stopped {took:?} after rank 1 hung:\n{msg}");
        assert!(!out.status.success(), "{msg}");
        assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(30), "took {took:?}");
        assert!(msg.contains("rank(s) 1 did not answer") && msg.contains("timeout_s = 5"), "{msg}");
    }
}

/// A SIGTERM to one rank of a context-parallel group stops both at the same step, with a
/// checkpoint, and both exit cleanly.
#[test]
fn a_signal_to_one_rank_of_a_context_parallel_group_stops_both_with_a_checkpoint() {
    let b = Bench::new();
    let cfg = b.run("cpsig", 200, "[distributed]\ncontext_parallel = 2\n");
    let kids = launch(&cfg, 2, &[]);
    wait_for_a_step(&b.root.join("cpsig/ckpt/metrics.jsonl"));
    unsafe { libc::kill(kids[1].id() as i32, libc::SIGTERM) };
    let outs: Vec<Output> = kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} should stop cleanly:\n{}", text(o));
    }
    let msg = text(&outs[0]);
    let step: u64 =
        msg.split("stopped at step ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap().parse().unwrap();
    assert!(step < 200, "{msg}");
    let ck = b.root.join(format!("cpsig/ckpt/step-{step:08}"));
    assert!(ck.join("MANIFEST.json").exists(), "no checkpoint of the step both ranks stopped at:\n{msg}");
    eprintln!("SIGTERM to rank 1: both ranks stopped at step {step} with a checkpoint");
}

#[test]
fn a_killed_two_rank_run_restarted_with_resume_auto_ends_where_the_uninterrupted_one_does() {
    let b = Bench::new();
    let whole = b.run("whole", 8, "");
    train(&whole, 2, &[]);
    // `--resume auto` starts fresh when there is no checkpoint; both ranks are killed as soon
    // as the first checkpoint is visible.
    let cut = b.run("cut", 8, "");
    let ckpt = b.root.join("cut/ckpt");
    let mut kids = launch(&cut, 2, &["--resume", "auto"]);
    let t0 = Instant::now();
    while !ckpt.join("step-00000002").exists() {
        assert!(t0.elapsed() < Duration::from_secs(180), "no checkpoint within 3 minutes");
        std::thread::sleep(Duration::from_millis(10));
    }
    for k in &mut kids {
        k.kill().unwrap();
        k.wait().unwrap();
    }
    assert!(!ckpt.join("step-00000008").exists(), "the run finished before it was killed");
    // A torn staging folder (a kill mid-save) is ignored.
    std::fs::create_dir_all(ckpt.join(".step-00000009.tmp")).unwrap();
    std::fs::write(ckpt.join(".step-00000009.tmp/model.safetensors"), b"torn").unwrap();
    // The restart (what torchrun --max-restarts does) resumes the newest good checkpoint.
    let out = train(&cut, 2, &["--resume", "auto"]);
    assert!(out.contains("parameters identical on all 2 ranks"), "{out}");
    let a = weights(&b.root.join("whole/ckpt/step-00000008"));
    assert_eq!(max_diff(&a, &weights(&ckpt.join("step-00000008"))), 0.0, "resumed 2-rank run == uninterrupted");

    // Plain data parallelism also resumes on another world size (the row stream is global):
    // step 4 of the 2-rank run, finished by one process.
    for s in 5..=8 {
        std::fs::remove_dir_all(ckpt.join(format!("step-{s:08}"))).ok();
    }
    train(&cut, 0, &["--resume", &ckpt.join("step-00000004").display().to_string()]);
    let d = max_diff(&a, &weights(&ckpt.join("step-00000008")));
    eprintln!("2 ranks resumed on 1 vs 2 ranks throughout: max |dw| = {d:.3e}");
    assert!(d < TOL, "2 ranks resumed on 1: {d}");
}

#[test]
fn torchrun_and_the_plain_launcher_start_the_same_run() {
    let b = Bench::new();
    let ws = common::workspace();
    let run = |name: &str, cmd: &mut Command| {
        let cfg = b.run(name, 2, "");
        let out = cmd
            .env("LONGMIX_BIN", env!("CARGO_BIN_EXE_longmix"))
            .env("MASTER_PORT", free_port().to_string())
            .env("LOGDIR", b.root.join(format!("{name}/logs")))
            .env("RUST_LOG", "warn")
            .args(["train", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}:\n{}", text(&out));
        assert!(text(&out).contains("parameters identical on all 2 ranks"), "{}", text(&out));
        weights(&b.root.join(format!("{name}/ckpt/step-00000002")))
    };
    let torchrun = ws.join(".venv/bin/torchrun");
    assert!(torchrun.exists(), "{} is missing: run launch/setup.sh", torchrun.display());
    // torchrun's agent serves the store (TORCHELASTIC_USE_AGENT_STORE): every rank is a client.
    let a = run(
        "torchrun",
        Command::new(&torchrun).args(["--nproc-per-node", "2", "--no-python", env!("CARGO_BIN_EXE_longmix")]),
    );
    let c = run("multi", Command::new(ws.join("launch/multi.sh")).arg("2"));
    assert_eq!(max_diff(&a, &c), 0.0, "the two launchers ran different numerics");
}

/// The losses of every step of a run.
fn losses(metrics: &Path) -> Vec<f64> {
    step_lines(metrics).iter().map(|s| s["loss"].as_f64().unwrap()).collect()
}

/// The held-out short and long losses of every evaluation of a run.
fn held_out(metrics: &Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "eval")
        .flat_map(|v| [v["heldout_short"].as_f64().unwrap(), v["heldout_long"].as_f64().unwrap()])
        .collect()
}

/// Context parallelism (cp 2, cp 4 with the tiny model's 2 KV heads repeated, and 2 data-parallel
/// groups of cp 2) trains what one process trains: the same rows, each row's tokens split over
/// its group, the gradients summed over all ranks.
#[test]
fn context_parallel_ranks_train_what_one_process_trains() {
    let b = Bench::new();
    let one = b.run("one", 4, "");
    train(&one, 0, &[]);
    let reference = weights(&b.root.join("one/ckpt/step-00000004"));
    let l1 = losses(&b.root.join("one/ckpt/metrics.jsonl"));
    for (world, cp) in [(2, 2), (4, 4), (4, 2)] {
        let name = format!("w{world}cp{cp}");
        let cfg = b.run(&name, 4, &format!("[distributed]\ncontext_parallel = {cp}\n"));
        let out = train(&cfg, world, &[]);
        assert!(out.contains(&format!("parameters identical on all {world} ranks")), "{out}");
        let d = max_diff(&reference, &weights(&b.root.join(format!("{name}/ckpt/step-00000004"))));
        let metrics = b.root.join(format!("{name}/ckpt/metrics.jsonl"));
        let steps = step_lines(&metrics);
        let worst_loss = l1.iter().zip(losses(&metrics)).map(|(a, c)| (a - c).abs()).fold(0.0, f64::max);
        eprintln!(
            "world {world} = dp {} x cp {cp} vs one process: max |dw| = {d:.3e}, max |dloss| = {worst_loss:.2e}, losses \
             {:?}, grad norms {:?}",
            world / cp,
            losses(&metrics),
            steps.iter().map(|s| s["grad_norm"].as_f64().unwrap()).collect::<Vec<_>>()
        );
        assert!(d < TOL, "dp {} x cp {cp} differs from one process by {d}", world / cp);
        assert!(worst_loss < 1e-4, "losses differ by {worst_loss}");
        // The held-out evaluation scores each row's slices on its group's ranks.
        let (e1, e) = (held_out(&b.root.join("one/ckpt/metrics.jsonl")), held_out(&metrics));
        assert!(!e1.is_empty() && e1.len() == e.len(), "held-out {e1:?} vs {e:?}");
        assert!(e1.iter().zip(&e).all(|(a, c)| (a - c).abs() < 1e-4), "held-out {e1:?} vs {e:?}");
        for s in &steps {
            // Each row counted once, whatever the number of ranks sharing it.
            assert_eq!(s["rows_short"].as_u64().unwrap() + s["rows_long"].as_u64().unwrap(), 6, "{s}");
            assert_eq!(s["window_mismatches"].as_u64().unwrap(), 0, "{s}");
            assert!(s["all_to_all_s"].as_f64().unwrap() > 0.0, "{s}");
        }
    }
}

/// A checkpoint written by a cp 2 run resumes on one process and on 2 data-parallel ranks (the
/// data cursor is the run's, the weights and optimizer state whole or re-shared out).
#[test]
fn a_context_parallel_checkpoint_resumes_on_one_process_and_on_data_parallel_ranks() {
    let b = Bench::new();
    let cp2 = b.run("cp2", 4, "[distributed]\ncontext_parallel = 2\nzero1 = true\n");
    train(&cp2, 2, &[]);
    let whole = weights(&b.root.join("cp2/ckpt/step-00000004"));
    let ck = b.root.join("cp2/ckpt/step-00000002");
    for (name, world, extra) in [("cp1", 0, ""), ("dp2", 2, "[distributed]\nzero1 = true\n")] {
        let cfg = b.run(name, 4, extra);
        train(&cfg, world, &["--resume", &ck.display().to_string()]);
        let d = max_diff(&whole, &weights(&b.root.join(format!("{name}/ckpt/step-00000004"))));
        eprintln!("cp 2 resumed at step 2 as {name}: max |dw| at step 4 vs cp 2 throughout = {d:.3e}");
        assert!(d < TOL, "cp 2 resumed as {name}: {d}");
    }
}

/// The embedded SmolLM2-135M (9 query heads, 3 KV heads) on real weights: cp 3, one KV head and
/// three query heads per rank.
#[test]
fn smollm2_at_context_parallel_3_trains_what_one_process_trains() {
    let b = Bench::new();
    let model = common::smollm2();
    // L0 64 as the tiny model's, so that rows of 128 tokens are short and long.
    let rope = "original_length = 64";
    let one = b.run_on(&model, rope, "smol1", 2, "");
    train(&one, 0, &[]);
    let cp3 = b.run_on(&model, rope, "smol3", 2, "[distributed]\ncontext_parallel = 3\n");
    train(&cp3, 3, &[]);
    let d = max_diff(
        &weights(&b.root.join("smol1/ckpt/step-00000002")),
        &weights(&b.root.join("smol3/ckpt/step-00000002")),
    );
    let (a, c) = (losses(&b.root.join("smol1/ckpt/metrics.jsonl")), losses(&b.root.join("smol3/ckpt/metrics.jsonl")));
    eprintln!("SmolLM2-135M cp 3 vs one process after 2 steps: max |dw| = {d:.3e}, losses {a:?} vs {c:?}");
    assert!(d < TOL, "cp 3 differs from one process by {d}");
}

/// ZeRO-2 (float32 gradients kept by their owners only, every micro-batch reduced) trains what
/// one process trains: 2 data-parallel ranks with 3 micro-batches each, and 2 x cp 2.
#[test]
fn zero2_trains_what_one_process_trains() {
    let b = Bench::new();
    let one = b.run("one", 4, "");
    train(&one, 0, &[]);
    let reference = weights(&b.root.join("one/ckpt/step-00000004"));
    for (world, cp) in [(2, 1), (4, 2)] {
        let name = format!("zero2-w{world}cp{cp}");
        let extra = format!("[distributed]\nzero1 = true\nzero2 = true\ncontext_parallel = {cp}\n");
        let out = train(&b.run(&name, 4, &extra), world, &[]);
        assert!(out.contains(&format!("parameters identical on all {world} ranks")), "{out}");
        let d = max_diff(&reference, &weights(&b.root.join(format!("{name}/ckpt/step-00000004"))));
        eprintln!("ZeRO-2, world {world} = dp {} x cp {cp} vs one process: max |dw| = {d:.3e}", world / cp);
        assert!(d < TOL, "ZeRO-2 on dp {} x cp {cp} differs from one process by {d}", world / cp);
    }
}
