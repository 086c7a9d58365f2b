//! Every mistake a user can make with a model folder ends in one message naming the problem.

use std::path::{Path, PathBuf};

use longmix_model::{load_model, ModelConfig};
use tch::{Device, Kind};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity").join(case)
}

/// A writable copy of a fixture model folder.
fn copy_of(case: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(case).join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> String {
    match load_model(dir, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn missing_folder() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model") && e.contains("does not exist"), "{e}");
}

#[test]
fn missing_weights() {
    let tmp = copy_of("llama_gqa_tied");
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn corrupt_weights() {
    let tmp = copy_of("llama_gqa_tied");
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("corrupt or truncated"), "{e}");
}

#[test]
fn shape_mismatch_names_tensor_and_both_shapes() {
    let tmp = copy_of("llama_gqa_tied");
    edit_config(tmp.path(), |c| c["intermediate_size"] = 96.into());
    let e = load_err(tmp.path());
    assert!(e.contains("shape mismatch for tensor model.layers.") && e.contains(".mlp."), "{e}");
    let both = |a: &str, b: &str| e.contains(a) && e.contains(b);
    assert!(both("[128, 64]", "[96, 64]") || both("[64, 128]", "[64, 96]"), "{e}");
}

#[test]
fn unknown_architecture() {
    let tmp = copy_of("llama_gqa_tied");
    edit_config(tmp.path(), |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        c["model_type"] = "gpt2".into();
    });
    let e = load_err(tmp.path());
    assert!(e.contains("unsupported architecture") && e.contains("GPT2LMHeadModel"), "{e}");
    for class in ["LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"] {
        assert!(e.contains(class), "the error lists {class}: {e}");
    }
}

fn qwen(arch: &str, extra: serde_json::Value) -> anyhow::Result<ModelConfig> {
    let mut c = serde_json::json!({
        "architectures": [arch], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    });
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    ModelConfig::from_json_str(&c.to_string())
}

#[test]
fn qwen_sliding_windows_are_read_as_transformers_reads_them() {
    use serde_json::json;
    // use_sliding_window false (the published default): sliding_window is ignored.
    let off = qwen("Qwen2ForCausalLM", json!({"sliding_window": 8, "use_sliding_window": false})).unwrap();
    assert_eq!(off.sliding_window, None);
    // On, from max_window_layers = 0: every layer slides.
    let all = json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 0});
    assert_eq!(qwen("Qwen3ForCausalLM", all).unwrap().sliding_window, Some(8));
    // On, but no layer reaches max_window_layers: no window.
    let none = json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 4});
    assert_eq!(qwen("Qwen2ForCausalLM", none).unwrap().sliding_window, None);
    // Some layers only (layers 2 and 3 from max_window_layers = 2, or an explicit layer_types): refused.
    let some = json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 2});
    let e = format!("{:#}", qwen("Qwen2ForCausalLM", some).unwrap_err());
    for needle in ["use_sliding_window = true", "max_window_layers = 2", "2 of 4 layers", "per-layer windows"] {
        assert!(e.contains(needle), "{needle:?} missing: {e}");
    }
    let types = json!(["full_attention", "sliding_attention", "full_attention", "full_attention"]);
    let mixed = json!({"sliding_window": 8, "use_sliding_window": true, "layer_types": types});
    let e = format!("{:#}", qwen("Qwen3ForCausalLM", mixed).unwrap_err());
    assert!(e.contains("1 of 4 layers") && e.contains("Qwen3ForCausalLM"), "{e}");
}

#[test]
fn family_defaults_follow_their_config_classes() {
    use serde_json::json;
    // Qwen3Config declares head_dim 128 (not hidden / heads = 16); Qwen2 derives it.
    assert_eq!(qwen("Qwen3ForCausalLM", json!({})).unwrap().head_dim, 128);
    let q2 = qwen("Qwen2ForCausalLM", json!({"attention_bias": false})).unwrap();
    assert_eq!((q2.head_dim, q2.attention_bias, q2.o_proj_bias, q2.qk_norm), (16, true, false, false));
    // MistralConfig's window defaults to 4096 when the key is absent; null is no window.
    assert_eq!(qwen("MistralForCausalLM", json!({})).unwrap().sliding_window, Some(4096));
    let m = qwen("MistralForCausalLM", json!({"sliding_window": null, "attention_bias": true})).unwrap();
    assert_eq!((m.sliding_window, m.attention_bias, m.arch), (None, false, longmix_model::Architecture::Llama));
}

fn config_with_rope(rope: serde_json::Value) -> String {
    serde_json::json!({
        "architectures": ["Phi3ForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 128,
        "original_max_position_embeddings": 32, "partial_rotary_factor": 0.75, "rope_scaling": rope,
    })
    .to_string()
}

#[test]
fn unknown_rope_type() {
    let e = ModelConfig::from_json_str(&config_with_rope(serde_json::json!({"type": "ntk-by-parts", "factor": 2.0})))
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("unknown rope type \"ntk-by-parts\"") && e.contains("longrope"), "{e}");
}

#[test]
fn factor_list_of_wrong_length_names_d_rot_half() {
    // head_dim 16 x 0.75 = 12 rotated dims: 6 factors expected.
    let rope = serde_json::json!({"type": "longrope", "short_factor": vec![1.0; 6], "long_factor": vec![2.0; 8]});
    let e = format!("{:#}", ModelConfig::from_json_str(&config_with_rope(rope)).unwrap_err());
    assert!(e.contains("\"long_factor\" has 8 entries") && e.contains("d_rot/2 = 6"), "{e}");
}

#[test]
fn legacy_and_v5_spellings_resolve_alike() {
    let legacy = config_with_rope(
        serde_json::json!({"type": "longrope", "short_factor": vec![1.0; 6], "long_factor": vec![4.0; 6]}),
    );
    let mut v: serde_json::Value = serde_json::from_str(&legacy).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("rope_scaling");
    obj.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": vec![1.0; 6], "long_factor": vec![4.0; 6]}),
    );
    let a = ModelConfig::from_json_str(&legacy).unwrap().rope;
    let b = ModelConfig::from_json_str(&v.to_string()).unwrap().rope;
    assert_eq!(a, b);
    assert_eq!(a.d_rot, 12);
    assert_eq!(a.original_max_position_embeddings, 32);
    // sqrt(1 + ln 4 / ln 32)
    assert!((a.attention_factor() - (1.0f64 + 4f64.ln() / 32f64.ln()).sqrt()).abs() < 1e-12);
}
