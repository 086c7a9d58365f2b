//! `longmix train` end to end on a tiny random LLaMA (L0 = 64) with SmolLM2's tokenizer.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{corpus, run_ok, tiny_model, tiny_model_of, tiny_qwen3};
use longmix_model::{load_model, Architecture, RopeScaling};
use tch::{Device, Kind, Tensor};

struct Run {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Run {
    /// A model, a corpus and a config (`extra` is appended to the [train] section).
    fn new(train_extra: &str) -> Run {
        Run::with_model(tiny_model, train_extra)
    }

    /// As [`Run::new`] with the model `make_model` writes.
    fn with_model(make_model: fn(&Path), train_extra: &str) -> Run {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        make_model(&root.join("model"));
        corpus(&root.join("corpus.jsonl"), 120);
        let cfg = format!(
            r#"
[model]
path = "{root}/model"
[rope]
target_length = 256
[data]
sources = [{{ type = "jsonl", path = "{root}/corpus.jsonl" }}]
short_share = 0.5
eval_fraction = 0.1
cache_dir = "{root}/cache"
[train]
steps = 6
seq_len = 128
threads = 1
{train_extra}
[optim]
lr = 1e-3
[schedule]
warmup_steps = 2
[checkpoint]
dir = "{root}/ckpt"
every = 2
keep = 2
[eval]
short_rows = 1
long_rows = 1
[log]
no_progress = true
"#,
            root = root.display()
        );
        std::fs::write(root.join("run.toml"), cfg).unwrap();
        Run { _tmp: tmp, root }
    }

    fn config(&self) -> String {
        self.root.join("run.toml").display().to_string()
    }

    fn train(&self, extra: &[&str]) -> String {
        let cfg = self.config();
        let mut args = vec!["train", "--config", &cfg];
        args.extend_from_slice(extra);
        String::from_utf8(run_ok(&args).stdout).unwrap()
    }

    /// (step, loss) of every logged step.
    fn losses(&self) -> Vec<(u64, f64)> {
        metrics(&self.root.join("ckpt/metrics.jsonl"))
            .into_iter()
            .filter(|v| v["event"] == "step")
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    }
}

fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn resume_is_bitwise_exact() {
    let full = Run::new("");
    full.train(&[]);
    let reference = full.losses();
    assert_eq!(reference.len(), 6);
    assert!(reference.iter().all(|(_, l)| l.is_finite()));

    let split = Run::new("");
    let out = split.train(&["--stop-after", "3"]);
    assert!(out.contains("stopped at step 3"), "{out}");
    split.train(&["--resume"]);
    let again = common::bin().args(["train", "--config", &split.config()]).output().unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("already holds checkpoints"), "{err}");
    let resumed = split.losses();
    assert_eq!(resumed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    for ((s, a), (_, b)) in reference.iter().zip(&resumed) {
        assert_eq!(a.to_bits(), b.to_bits(), "step {s}: uninterrupted loss {a} vs resumed {b}");
    }
    // Training moved the loss (the check above is not comparing constants).
    assert_ne!(reference[0].1, reference[5].1);
    // keep = 2: only the newest two checkpoints remain.
    let ckpts: Vec<_> = std::fs::read_dir(split.root.join("ckpt"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .collect();
    assert_eq!(ckpts.len(), 2);

    // Going back to an older checkpoint rewinds the metrics: steps 5 and 6 are logged once, by
    // the run that redid them, and they match the first run's.
    // A line torn by a crash is dropped too.
    let log = full.root.join("ckpt/metrics.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"event\":\"step\",\"st");
    std::fs::write(&log, text).unwrap();
    let older = full.root.join("ckpt/step-00000004");
    full.train(&["--resume", older.to_str().unwrap()]);
    let rewound = full.losses();
    assert_eq!(rewound.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    for ((s, a), (_, b)) in reference.iter().zip(&rewound) {
        assert_eq!(a.to_bits(), b.to_bits(), "step {s}: first run {a} vs rerun from step 4 {b}");
    }
}

#[test]
fn loss_is_normalised_over_the_whole_step() {
    // Two rows per step as one micro-batch of two, or as two micro-batches of one: the loss and
    // the update must agree (a mean of per-micro-batch means would not, since rows carry
    // different numbers of targets).
    let together = Run::new("micro_batch_rows = 2\ngrad_accum = 1");
    together.train(&[]);
    let split = Run::new("micro_batch_rows = 1\ngrad_accum = 2");
    split.train(&[]);
    let (a, b) = (together.losses(), split.losses());
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5 * x.abs(), "step {s}: {x} vs {y}");
    }
    let rows = metrics(&split.root.join("ckpt/metrics.jsonl"));
    // short_share = 0.5 with two rows per step: every step holds one short and one long row.
    let steps: Vec<_> = rows.iter().filter(|v| v["event"] == "step").collect();
    assert_eq!(steps.len(), 6);
    for v in steps {
        assert!(v["loss_short"].is_number() && v["loss_long"].is_number(), "a step without both kinds: {v}");
        // The model ran one row with each factor set, and on every row its window agreed with
        // the kind the loader built the row for.
        assert_eq!((v["rows_short"].as_u64(), v["rows_long"].as_u64()), (Some(1), Some(1)), "{v}");
        assert_eq!(v["window_mismatches"], 0, "loader and model disagree on a row's window: {v}");
    }
}

#[test]
fn a_diverged_run_stops_before_saving_or_exporting() {
    let run = Run::new("steps = 4");
    let cfg = run.config();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("steps = 6\n", "").replace("every = 2", "every = 1");
    // A learning rate that blows the weights up to infinity on the first update, no clipping.
    let text = text.replace("lr = 1e-3", "lr = 1e37\ngrad_clip = 0.0");
    let text = format!("{text}\n[export]\ndir = \"{}/export\"\n", run.root.display());
    std::fs::write(&cfg, text).unwrap();
    let o = common::bin().args(["train", "--config", &cfg]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a diverged run must fail");
    assert!(err.contains("training diverged") && err.contains("step 2") && err.contains("--resume"), "{err}");
    // Step 1 was still finite and is the latest checkpoint; nothing after it, no export.
    assert!(run.root.join("ckpt/step-00000001").is_dir());
    assert_eq!(longmix_ckpts(&run.root.join("ckpt")), 1);
    assert!(!run.root.join("export").exists());
}

#[test]
fn a_collapsed_run_is_warned_in_the_log_and_the_metrics() {
    let run = Run::new("steps = 3");
    let cfg = run.config();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("steps = 6\n", "");
    std::fs::write(&cfg, text.replace("lr = 1e-3", "lr = 1e6\ngrad_clip = 0.0")).unwrap();
    let o = common::bin().args(["train", "--config", &cfg]).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let warnings: Vec<_> =
        metrics(&run.root.join("ckpt/metrics.jsonl")).into_iter().filter(|v| v["event"] == "warning").collect();
    // Step 1 still learns; from step 2 on the gradient is exactly 0 at the uniform loss.
    assert_eq!(warnings.iter().map(|w| w["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 3], "{out}\n{err}");
    let msg = warnings[0]["message"].as_str().unwrap();
    assert!(msg.contains("collapsed") && msg.contains("ln(vocabulary)") && msg.contains("optim.lr"), "{msg}");
    assert!(err.contains("the gradient norm is 0"), "the warning is shown in the log:\n{err}");
}

#[test]
fn killed_while_checkpointing_leaves_a_resumable_run() {
    let run = Run::new("steps = 40");
    let cfg = run.config();
    let cfg_text = std::fs::read_to_string(&cfg).unwrap().replace("steps = 6\n", "").replace("every = 2", "every = 1");
    std::fs::write(&cfg, cfg_text).unwrap();
    let mut child =
        common::bin().args(["train", "--config", &cfg]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Wait for a few checkpoints, then kill -9 at an arbitrary moment (often mid-save).
    let t0 = Instant::now();
    while longmix_ckpts(&run.root.join("ckpt")) < 3 && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(37));
    child.kill().unwrap();
    child.wait().unwrap();
    let out = run.train(&["--resume", "--stop-after", "1"]);
    assert!(out.contains("stopped at step"), "{out}");
}

/// Flip one bit of `file`, `at` bytes in (counted from the end when negative).
fn flip(file: &Path, at: i64) {
    let mut bytes = std::fs::read(file).unwrap();
    let i = if at < 0 { bytes.len() - (-at) as usize } else { at as usize };
    bytes[i] ^= 0x01;
    std::fs::write(file, bytes).unwrap();
}

/// `longmix ARGS` that must succeed, logging at info level: its log.
fn run_logged(args: &[&str]) -> String {
    let out = common::bin().env("RUST_LOG", "info").args(args).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "longmix {args:?} failed:\n{log}");
    log
}

/// `longmix ARGS` that must fail: its stdout and stderr.
fn run_fails(args: &[&str]) -> String {
    let out = common::bin().args(args).output().unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "longmix {args:?} should have failed:\n{text}");
    text
}

#[test]
fn a_flipped_bit_in_the_latest_checkpoint_is_caught_and_the_previous_one_resumes_exactly() {
    let run = Run::new("");
    run.train(&[]);
    let reference = run.losses();
    let (four, six) = (run.root.join("ckpt/step-00000004"), run.root.join("ckpt/step-00000006"));
    let six_arg = six.to_str().unwrap().to_string();
    let verified = String::from_utf8(run_ok(&["verify", run.root.join("ckpt").to_str().unwrap()]).stdout).unwrap();
    assert!(verified.contains("ok   model.safetensors") && verified.contains("intact"), "{verified}");
    // Inside the tensor data, inside the optimizer state, and a digit of the JSON state (which
    // would still parse, as another step or position in the data).
    for (file, at) in [("model.safetensors", -1000), ("optimizer.safetensors", -5), ("trainer_state.json", 12)] {
        flip(&six.join(file), at);
        let v = run_fails(&["verify", &six_arg]);
        assert!(v.contains(&format!("BAD  {file}: xxh3-64 checksum is")) && v.contains("damaged"), "{v}");
        assert_eq!(v.matches("  BAD  ").count(), 1, "only {file} is named:\n{v}");
        let refused = run_fails(&["train", "--config", &run.config(), "--resume", &six_arg]);
        assert!(
            refused.contains(file) && refused.contains(&format!("--resume {}", four.display())),
            "an explicit --resume of the damaged checkpoint is refused naming {file} and the previous one:\n{refused}"
        );
        let log = run_logged(&["train", "--config", &run.config(), "--resume", "auto"]);
        assert!(log.contains(&format!("skipping checkpoint {}: {file}", six.display())), "{log}");
        assert!(log.contains(&format!("resumed from {} at step 4", four.display())), "{log}");
        for ((s, a), (_, b)) in reference.iter().zip(&run.losses()) {
            assert_eq!(a.to_bits(), b.to_bits(), "step {s}: uninterrupted {a} vs resumed past a damaged {file} {b}");
        }
        run_ok(&["verify", &six_arg]);
    }
    // The export checks what it reads, and writes checksums `sha256sum -c` checks.
    flip(&six.join("config.toml"), 3);
    let out = run.root.join("export");
    let e = run_fails(&["export", "--checkpoint", &six_arg, "--out", out.to_str().unwrap()]);
    assert!(e.contains("config.toml: xxh3-64 checksum is"), "{e}");
    run_ok(&["export", "--checkpoint", four.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    run_ok(&["verify", out.to_str().unwrap()]);
    let sha = std::process::Command::new("sha256sum").args(["-c", "SHA256SUMS"]).current_dir(&out).output().unwrap();
    let listed = String::from_utf8_lossy(&sha.stdout);
    assert!(sha.status.success() && listed.contains("model-00001-of-00001.safetensors: OK"), "{listed}");
    flip(&out.join("model-00001-of-00001.safetensors"), -77);
    let v = run_fails(&["verify", out.to_str().unwrap()]);
    assert!(v.contains("BAD  model-00001-of-00001.safetensors: sha256 checksum is"), "{v}");

    // A checkpoint written before checksums (lengths only) still resumes, with a note.
    let manifest = four.join("MANIFEST.json");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let lengths: serde_json::Map<String, serde_json::Value> =
        m["files"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v["bytes"].clone())).collect();
    std::fs::write(&manifest, serde_json::json!({ "step": 4, "files": lengths }).to_string()).unwrap();
    let log = run_logged(&["train", "--config", &run.config(), "--resume", four.to_str().unwrap()]);
    assert!(log.contains("written without checksums") && log.contains("resumed from"), "{log}");
}

fn longmix_ckpts(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("step-")).count())
        .unwrap_or(0)
}

#[test]
fn export_round_trips_with_the_trained_rope() {
    let run = Run::new("steps = 2");
    let cfg = run.config();
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("steps = 6\n", "")).unwrap();
    run.train(&[]);
    let ckpt = run.root.join("ckpt/step-00000002");
    let out = run.root.join("export");
    run_ok(&["export", "--checkpoint", ckpt.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dtype", "f32"]);
    let back = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    let c = &back.model.config;
    assert_eq!((c.max_position_embeddings, c.rope.original_max_position_embeddings), (256, 64));
    let RopeScaling::LongRope { short_factor, long_factor, .. } = &c.rope.scaling else {
        panic!("{:?}", c.rope.scaling)
    };
    assert!(short_factor.iter().all(|&x| x == 1.0));
    assert!(long_factor.windows(2).all(|w| w[1] > w[0]) && (long_factor[long_factor.len() - 1] - 4.0).abs() < 0.1);
    assert!(out.join("tokenizer.json").exists());

    // The export holds the trained weights (not the initial ones) ...
    let trained: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap().into_iter().collect();
    for (name, t) in back.vs.variables() {
        assert!(t.equal(&trained[&name]), "{name} differs from the checkpoint");
    }
    let initial = load_model(&run.root.join("model"), Kind::Float, Device::Cpu).unwrap();
    assert!(!initial.vs.variables()["model.norm.weight"].equal(&back.vs.variables()["model.norm.weight"]));
    // ... and the long path differs from the short path (the RoPE really changed).
    let ids = Tensor::randint(1000, [1, 100], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(100, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mut plain = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    plain.model.config.rope.scaling = RopeScaling::Default;
    let d = tch::no_grad(|| {
        (back.model.forward(&ids, &pos) - plain.model.forward(&ids, &pos)).abs().max().double_value(&[])
    });
    assert!(d > 1e-3, "long rows should use the long factors (diff {d})");
}

/// A Phi-3 with a 16-token sliding window, extended 64 -> 256: the window is dropped in
/// training and in the export unless `rope.keep_sliding_window`; the plan says which.
#[test]
fn the_extension_drops_a_sliding_window_shorter_than_l() {
    let run = Run::new("steps = 1");
    let cfg = run.config();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("steps = 6\n", "");
    std::fs::remove_dir_all(run.root.join("model")).unwrap();
    tiny_model_of(
        &run.root.join("model"),
        serde_json::json!({
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "sliding_window": 16,
            "original_max_position_embeddings": 64,
        }),
    );
    for (keep, window, note) in [(false, None, "16 < L = 256 is dropped"), (true, Some(16), "16 < L = 256 is kept")] {
        let name = if keep { "kept" } else { "dropped" };
        let export = run.root.join(format!("export-{name}"));
        let this = text
            .replace("target_length = 256", &format!("target_length = 256\nkeep_sliding_window = {keep}"))
            .replace("/ckpt\"", &format!("/ckpt-{name}\""))
            + &format!("[export]\ndir = \"{}\"\ndtype = \"f32\"\n", export.display());
        std::fs::write(&cfg, this).unwrap();
        let plan = run.train(&["--dry-run"]);
        assert!(plan.contains(note), "the plan should say {note:?}:\n{plan}");
        run.train(&[]);
        let exported: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap()).unwrap();
        assert_eq!(exported["sliding_window"].as_i64(), window, "keep = {keep}: {}", exported["sliding_window"]);
        assert_eq!(load_model(&export, Kind::Float, Device::Cpu).unwrap().model.config.sliding_window, window);
    }
}

#[test]
fn dry_run_prints_the_plan_and_config_errors_are_clear() {
    let run = Run::new("");
    let out = run.train(&["--dry-run"]);
    for needle in ["64 -> 256", "tokens/step", "short", "memory (est.)", "configuration is valid"] {
        assert!(out.contains(needle), "plan lacks {needle:?}:\n{out}");
    }
    assert!(!run.root.join("ckpt").exists(), "a dry run writes nothing");

    let cfg = run.config();
    let good = std::fs::read_to_string(&cfg).unwrap();
    let cases = [
        (good.replace("seq_len = 128", "seq_len = 128\nsteps_typo = 1"), "steps_typo"),
        (good.replace("target_length = 256", "target_length = 32"), "must exceed the original window"),
        (good.replace("corpus.jsonl", "missing.jsonl"), "missing.jsonl"),
        (good.replace("seq_len = 128", "seq_len = 512"), "exceeds rope.target_length"),
        (good.replace("target_length = 256", "target_length = 256\nlong_factor = [1.0, 2.0]"), "d_rot/2 = 8"),
    ];
    for (text, needle) in cases {
        std::fs::write(&cfg, &text).unwrap();
        let o = common::bin().args(["train", "--config", &cfg, "--dry-run"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "expected an error naming {needle:?}, got:\n{err}");
    }
}

#[test]
fn a_tiny_qwen3_trains_both_windows_and_exports_as_qwen3() {
    // Two rows per step, one short (original RoPE) and one long (rescaled), through q/k norms and
    // a head_dim unlike hidden / heads.
    let run = Run::with_model(tiny_qwen3, "micro_batch_rows = 2");
    let cfg = run.config();
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("steps = 6", "steps = 3")).unwrap();
    let plan = run.train(&["--dry-run"]);
    assert!(plan.contains("Qwen3") && plan.contains("64 -> 256"), "{plan}");
    run.train(&[]);
    let steps: Vec<_> =
        metrics(&run.root.join("ckpt/metrics.jsonl")).into_iter().filter(|v| v["event"] == "step").collect();
    assert_eq!(steps.len(), 3);
    for v in &steps {
        assert_eq!((v["rows_short"].as_u64(), v["rows_long"].as_u64()), (Some(1), Some(1)), "{v}");
        assert_eq!(v["window_mismatches"], 0, "{v}");
        assert!(v["loss"].as_f64().unwrap().is_finite(), "{v}");
    }
    let ckpt = run.root.join("ckpt/step-00000002");
    let out = run.root.join("export");
    run_ok(&["export", "--checkpoint", ckpt.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dtype", "f32"]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["architectures"], serde_json::json!(["Qwen3ForCausalLM"]));
    assert_eq!(json["rope_scaling"]["rope_type"], "longrope");
    let back = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    let c = &back.model.config;
    assert_eq!((c.arch, c.head_dim, c.qk_norm, c.max_position_embeddings), (Architecture::Qwen3, 24, true, 256));
    assert!(matches!(&c.rope.scaling, RopeScaling::LongRope { long_factor, .. } if long_factor.len() == 12));
    // The trained q/k norms are exported, and they moved during training.
    let trained: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap().into_iter().collect();
    let name = "model.layers.0.self_attn.q_norm.weight";
    assert!(back.vs.variables()[name].equal(&trained[name]));
    let initial = load_model(&run.root.join("model"), Kind::Float, Device::Cpu).unwrap();
    assert!(!initial.vs.variables()[name].equal(&trained[name]), "{name} did not train");
}
