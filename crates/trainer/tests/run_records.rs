//! A run's records besides `metrics.jsonl`, end to end on a tiny random LLaMA (L0 = 64): the
//! TensorBoard event files (read back here by a reader of their own), `longmix plot`, and the
//! log redirected to a file.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{corpus, run_ok, tiny_model};

struct Run {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Run {
    /// A model, a corpus and a config of `steps` steps, a checkpoint every 3 and a held-out
    /// evaluation every 5; `log_extra` is appended to the [log] section.
    fn new(steps: u64, log_extra: &str) -> Run {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        tiny_model(&root.join("model"));
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
steps = {steps}
seq_len = 128
threads = 1
[optim]
lr = 1e-3
[schedule]
warmup_steps = 2
[checkpoint]
dir = "{root}/ckpt"
every = 3
keep = 2
[eval]
every = 5
short_rows = 1
long_rows = 1
[log]
no_progress = true
{log_extra}
"#,
            root = root.display()
        );
        std::fs::write(root.join("run.toml"), cfg).unwrap();
        Run { _tmp: tmp, root }
    }

    fn config(&self) -> String {
        self.root.join("run.toml").display().to_string()
    }

    fn ckpt(&self) -> PathBuf {
        self.root.join("ckpt")
    }

    fn metrics(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.ckpt().join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn newest_checkpoint(&self) -> u64 {
        std::fs::read_dir(self.ckpt())
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
            .max()
            .unwrap_or(0)
    }
}

/// One scalar: (step, tag, value bits).
type Scalar = (i64, String, u32);

#[test]
fn tensorboard_matches_the_metrics_and_survives_a_kill_and_resume() {
    let run = Run::new(8, "");
    let mut child = common::bin()
        .args(["train", "--config", &run.config()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 once step 4 is logged: past the checkpoint of step 3.
    let t0 = Instant::now();
    let logged = |run: &Run| std::fs::read_to_string(run.ckpt().join("metrics.jsonl")).unwrap_or_default();
    while !logged(&run).contains("\"step\":4,") && t0.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (before, _) = tensorboard(&run.ckpt().join("tensorboard"));
    let killed_at = before.iter().map(|s| s.0).max().unwrap();
    assert!(killed_at >= 4, "the killed run logged step 4: {killed_at}");
    eprintln!("killed at step {killed_at}, newest checkpoint step {}", run.newest_checkpoint());

    run_ok(&["train", "--config", &run.config(), "--resume"]);
    check_against_metrics(&run, 2);
    // Back to an older checkpoint: the event files hold steps 7 and 8 that the rerun redoes.
    let older = run.ckpt().join("step-00000006");
    run_ok(&["train", "--config", &run.config(), "--resume", older.to_str().unwrap()]);
    check_against_metrics(&run, 3);

    let out = run_ok(&["plot", run.ckpt().to_str().unwrap()]);
    let png = run.ckpt().join("curves.png");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), png.display().to_string());
    assert_eq!(png_size(&png), (1400, 900));
}

/// The event files hold exactly the numbers of metrics.jsonl, each step once, in `files` files.
fn check_against_metrics(run: &Run, files: usize) {
    let (mut got, n) = tensorboard(&run.ckpt().join("tensorboard"));
    assert_eq!(n, files, "one event file per start of the run");
    let keys: BTreeSet<(i64, &str)> = got.iter().map(|s| (s.0, s.1.as_str())).collect();
    assert_eq!(keys.len(), got.len(), "a (step, tag) appears twice");
    let mut want = expected(&run.metrics());
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let steps: Vec<i64> = got.iter().filter(|s| s.1 == "train/loss").map(|s| s.0).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let evals: Vec<i64> = got.iter().filter(|s| s.1 == "eval/long").map(|s| s.0).collect();
    assert_eq!(evals, [0, 5, 8], "before training, every 5 steps, after training");
    for tag in ["train/lr", "train/grad_norm", "train/tokens_per_s"] {
        assert_eq!(got.iter().filter(|s| s.1 == tag).count(), 8, "{tag}");
    }
    // A step without short (long) rows has no short (long) loss: null in the metrics, no scalar.
    assert!(got.iter().any(|s| s.1 == "train/loss_short") && got.iter().any(|s| s.1 == "train/loss_long"));
    assert!(got.iter().any(|s| s.1 == "memory/peak_rss_mb" && f32::from_bits(s.2) > 0.0));
    assert!(got.iter().any(|s| s.1 == "eval/short"));
}

/// What the event files must hold for these metrics lines: each number of a step line as
/// `train/KEY` (`memory/KEY` for `*_mb`, `rank/KEY/RANK` per rank), a held-out evaluation's
/// as `eval/short` and `eval/long`, as float32.
fn expected(lines: &[serde_json::Value]) -> Vec<Scalar> {
    let mut out = Vec::new();
    for line in lines {
        let step = line["step"].as_i64().unwrap();
        for (key, v) in line.as_object().unwrap() {
            let tag = match line["event"].as_str().unwrap() {
                "eval" => format!("eval/{}", key.trim_start_matches("heldout_")),
                _ if key.ends_with("_mb") && !key.starts_with("rank_") => format!("memory/{key}"),
                _ => format!("train/{key}"),
            };
            match v {
                serde_json::Value::Number(n) if key != "step" => {
                    out.push((step, tag, (n.as_f64().unwrap() as f32).to_bits()))
                }
                serde_json::Value::Array(a) => {
                    for (rank, x) in a.iter().enumerate() {
                        let tag = format!("rank/{}/{rank}", key.trim_start_matches("rank_"));
                        out.push((step, tag, (x.as_f64().unwrap() as f32).to_bits()));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Every scalar of the event files in `dir` (read in name order, as TensorBoard does) and the
/// number of files; each record's framing and both checksums are checked, and each file starts
/// with the file version.
fn tensorboard(dir: &Path) -> (Vec<Scalar>, usize) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let bytes = std::fs::read(f).unwrap();
        let events: Vec<Event> = tf_records(&bytes).into_iter().map(decode_event).collect();
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"), "{name}");
        assert!(events.iter().all(|e| e.wall_time > 1.6e9), "{name}: wall times are Unix seconds");
        for e in events {
            out.extend(e.values.into_iter().map(|(tag, v)| (e.step, tag, v.to_bits())));
        }
    }
    (out, files.len())
}

/// The data of each TFRecord, asserting the file is whole records with matching checksums.
fn tf_records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(le32(&bytes[at + 8..at + 12]), masked_crc32c(&bytes[at..at + 8]), "length checksum at {at}");
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(le32(&bytes[at + 12 + len..at + 16 + len]), masked_crc32c(data), "data checksum at {at}");
        out.push(data);
        at += 16 + len;
    }
    out
}

/// CRC-32C bit by bit (independent of the writer's table), masked as TFRecord does.
fn masked_crc32c(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    let c = !c;
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

#[derive(Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    values: Vec<(String, f32)>,
}

/// The protobuf fields of a message: (field number, varint value or bytes of fixed/length-delimited).
fn proto_fields(d: &[u8]) -> Vec<(u64, u64, &[u8])> {
    let varint = |at: &mut usize| {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = d[*at];
            *at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                break;
            }
        }
        v
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < d.len() {
        let key = varint(&mut at);
        let len = match key & 7 {
            0 => {
                out.push((key >> 3, varint(&mut at), &d[at..at]));
                continue;
            }
            1 => 8,
            5 => 4,
            2 => varint(&mut at) as usize,
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, 0, &d[at..at + len]));
        at += len;
    }
    out
}

fn decode_event(d: &[u8]) -> Event {
    let mut e = Event::default();
    for (field, v, bytes) in proto_fields(d) {
        match field {
            1 => e.wall_time = f64::from_le_bytes(bytes.try_into().unwrap()),
            2 => e.step = v as i64,
            3 => e.file_version = Some(String::from_utf8(bytes.to_vec()).unwrap()),
            5 => {
                for (_, _, value) in proto_fields(bytes) {
                    let (mut tag, mut x) = (String::new(), f32::NAN);
                    for (f, _, b) in proto_fields(value) {
                        match f {
                            1 => tag = String::from_utf8(b.to_vec()).unwrap(),
                            2 => x = f32::from_le_bytes(b.try_into().unwrap()),
                            _ => panic!("unexpected Summary.Value field {f}"),
                        }
                    }
                    e.values.push((tag, x));
                }
            }
            _ => panic!("unexpected Event field {field}"),
        }
    }
    e
}

/// (width, height) from a PNG's IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&b[12..16], b"IHDR");
    let be32 = |r: std::ops::Range<usize>| u32::from_be_bytes(b[r].try_into().unwrap());
    (be32(16..20), be32(20..24))
}

#[test]
fn plot_draws_a_metrics_file_and_names_a_folder_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for step in 0..=50u64 {
        let loss = 3.0 - step as f64 * 0.02;
        if step % 10 == 0 {
            lines += &format!(
                "{{\"event\":\"eval\",\"step\":{step},\"heldout_short\":{loss},\"heldout_long\":{}}}\n",
                loss - 0.5
            );
        }
        if step > 0 {
            lines += &format!(
                "{{\"event\":\"step\",\"step\":{step},\"loss_short\":{loss},\"loss_long\":{},\"lr\":{},\"grad_norm\":1.5,\"tokens_per_s\":{}}}\n",
                loss - 0.4,
                2e-5 * (step as f64 / 50.0),
                1000 + step * 7
            );
        }
    }
    let metrics = tmp.path().join("m.jsonl");
    std::fs::write(&metrics, lines).unwrap();
    let out = tmp.path().join("out/c.png");
    std::fs::create_dir(tmp.path().join("out")).unwrap();
    run_ok(&["plot", metrics.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(png_size(&out), (1400, 900));
    assert!(std::fs::metadata(&out).unwrap().len() > 5000, "the picture is more than a blank page");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let failed = common::bin().args(["plot", empty.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(err.contains(&empty.display().to_string()) && err.contains("no metrics.jsonl"), "{err}");
    assert!(err.contains("[checkpoint] dir"), "says what to pass: {err}");
}

#[test]
fn a_log_redirected_to_a_file_holds_no_escape_codes() {
    let run = Run::new(2, "tensorboard = false");
    let log = run.root.join("run.log");
    // RUST_LOG still filters: INFO of the data crate only.
    let status = common::bin()
        .env("RUST_LOG", "warn,longmix_data=info")
        .args(["train", "--config", &run.config()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    let bytes = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(status.success(), "{text}");
    let info: Vec<&str> = text.lines().filter(|l| l.contains(" INFO ")).collect();
    assert!(!info.is_empty(), "the log holds INFO lines:\n{text}");
    assert!(info.iter().all(|l| l.contains("longmix_data")), "RUST_LOG is obeyed:\n{text}");
    assert!(!bytes.contains(&0x1b), "escape byte in {text}");
    // `[log] tensorboard = false`: the metrics alone.
    assert!(run.ckpt().join("metrics.jsonl").is_file());
    assert!(!run.ckpt().join("tensorboard").exists());
}
