//! `longmix bench` on a tiny checkpoint: the JSON's figures are consistent with each other and
//! with the FLOP formula, packed rows change the attention FLOPs, and bad flags are refused.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/llama_gqa_tied")
}

fn bench(extra: &[&str]) -> std::process::Output {
    bench_model(&model(), extra)
}

fn bench_model(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_longmix"))
        .args(["bench", "--device", "cpu", "--threads", "1", "--steps", "2", "--warmup", "1", "--seq-len", "32"])
        .arg("--model")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

fn report(extra: &[&str]) -> Value {
    report_of(&model(), extra)
}

fn report_of(dir: &std::path::Path, extra: &[&str]) -> Value {
    let out = bench_model(dir, extra);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_report_adds_up() {
    let r = report(&["--rows", "2", "--checkpoint-layers"]);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
    assert_eq!(f("tokens_per_step"), 64.0);
    assert!((f("tokens_per_s") - 64.0 / f("step_s")).abs() < 1e-6 * f("tokens_per_s"));
    assert!((f("tflops") - f("flops_per_step") / f("step_s") / 1e12).abs() < 1e-9);
    let split: f64 = r["split_s"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
    assert!(split > 0.0 && split <= f("step_s") * 1.05, "split {split} vs step {}", f("step_s"));
    assert_eq!(r["steps"], 2);
    assert_eq!(r["optimizer"], "fused");
    assert!(r["mfu"].is_null(), "no peak is known for a CPU");
    assert!(f("peak_rss_mb") > 0.0 && f("memory_estimate_mb") > 0.0);

    // Packed rows of 8-token documents: same matmul FLOPs, attention FLOPs down 4x.
    let packed = report(&["--rows", "2", "--packed-share", "1", "--doc-len", "8"]);
    let c: Value = serde_json::from_str(&std::fs::read_to_string(model().join("config.json")).unwrap()).unwrap();
    let attn = 6.0 * (c["num_hidden_layers"].as_f64().unwrap() * c["hidden_size"].as_f64().unwrap());
    let drop = f("flops_per_step") - packed["flops_per_step"].as_f64().unwrap();
    let want = attn * 2.0 * (32.0f64.powi(2) - 4.0 * 8.0f64.powi(2));
    assert!((drop - want).abs() < 1e-6 * want, "attention FLOPs fell by {drop}, expected {want}");
}

#[test]
fn bad_flags_are_refused_with_the_fix() {
    for (args, says) in [
        (&["--packed-share", "1.5"][..], "--packed-share 1.5: give a share from 0 to 1"),
        (&["--rows", "0"][..], "--rows 0"),
    ] {
        let out = bench(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_longmix")).args(["bench", "--preset", "gpt2"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preset \"gpt2\": use one of smollm2-135m"));
}

#[test]
fn a_qwen3_checkpoint_counts_attention_with_its_own_head_dim() {
    // 4 heads of head_dim 24: 96 query dims against a hidden size of 64.
    let dir = model().parent().unwrap().join("qwen3_default");
    let whole = report_of(&dir, &["--rows", "2"]);
    let packed = report_of(&dir, &["--rows", "2", "--packed-share", "1", "--doc-len", "8"]);
    let drop = whole["flops_per_step"].as_f64().unwrap() - packed["flops_per_step"].as_f64().unwrap();
    let want = 6.0 * (2.0 * 4.0 * 24.0) * 2.0 * (32.0f64.powi(2) - 4.0 * 8.0f64.powi(2));
    assert!((drop - want).abs() < 1e-6 * want, "attention FLOPs fell by {drop}, expected {want}");
}
