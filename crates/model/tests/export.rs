//! An export reloads with identical logits and a config that resolves to the trained RoPE.

use std::path::PathBuf;

use longmix_model::{
    export_hf, load_model, longrope_attention_factor, Architecture, ExportOptions, Extension, RopeScaling,
};
use tch::{Device, Kind, Tensor};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity").join(case)
}

#[test]
fn sharded_export_round_trips_with_longrope_config() {
    let src = load_model(&fixture("phi3_longrope_partial"), Kind::Float, Device::Cpu).unwrap();
    let out_root = tempfile::tempdir().unwrap();
    let out = out_root.path().join("export");
    let rope = Extension {
        target_length: 256,
        original_length: 32,
        short_factor: vec![1.0; 6],
        long_factor: vec![1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
        attention_factor: longrope_attention_factor(8.0, 32),
        explicit_attention_factor: false,
        keep_sliding_window: false,
    };
    let opts = ExportOptions { dtype: Kind::Float, max_shard_bytes: 100_000, rope: Some(rope.clone()) };
    export_hf(&src.vs, &src.model.config, Some(&fixture("phi3_longrope_partial")), &out, &opts).unwrap();

    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let files: std::collections::BTreeSet<&str> =
        index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 1, "a 100 kB shard bound must give several shards, got {files:?}");
    let first = out.join(files.iter().next().unwrap());
    let bytes = std::fs::read(&first).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");

    let back = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    let c = &back.model.config;
    assert_eq!(c.max_position_embeddings, 256);
    assert_eq!(c.rope.original_max_position_embeddings, 32);
    match &c.rope.scaling {
        RopeScaling::LongRope { short_factor, long_factor, attention_factor } => {
            assert_eq!(short_factor, &rope.short_factor);
            assert_eq!(long_factor, &rope.long_factor);
            assert!((attention_factor - (1.0f64 + 8f64.ln() / 32f64.ln()).sqrt()).abs() < 1e-12);
        }
        other => panic!("exported rope resolves to {other:?}"),
    }
    // Same weights: with the source's RoPE swapped in, the export gives identical logits.
    let mut src_cfg_model = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    src_cfg_model.model.config.rope = src.model.config.rope.clone();
    let ids = Tensor::randint(src.model.config.vocab_size, [1, 40], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(40, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let a = tch::no_grad(|| src.model.forward(&ids, &pos));
    let b = tch::no_grad(|| src_cfg_model.model.forward(&ids, &pos));
    assert!(a.equal(&b), "weights changed in the round trip");
    assert!(!out.with_extension("partial").exists());
}

#[test]
fn export_refuses_to_overwrite() {
    let src = load_model(&fixture("llama_gqa_tied"), Kind::Float, Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = ExportOptions { dtype: Kind::BFloat16, max_shard_bytes: 1 << 30, rope: None };
    let e = export_hf(&src.vs, &src.model.config, None, out.path(), &opts).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn tied_head_is_not_written_and_bf16_export_loads() {
    let src = load_model(&fixture("llama_gqa_tied"), Kind::Float, Device::Cpu).unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("bf16");
    let opts = ExportOptions { dtype: Kind::BFloat16, max_shard_bytes: 1 << 30, rope: None };
    export_hf(&src.vs, &src.model.config, None, &out, &opts).unwrap();
    let index = std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap();
    assert!(!index.contains("lm_head.weight"));
    let back = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    let w0 = src.vs.variables()["model.embed_tokens.weight"].to_kind(Kind::BFloat16).to_kind(Kind::Float);
    assert!(back.vs.variables()["model.embed_tokens.weight"].equal(&w0));
}

/// Phi-3 with an 8-token sliding window, extended 32 -> 256: the extended model attends over
/// the whole row (its logits past the window equal the windowless model's, not the windowed
/// one's) and the export says `"sliding_window": null`; `keep_sliding_window` keeps it, and a
/// window of at least L is kept as it is.
#[test]
fn an_extension_drops_a_sliding_window_shorter_than_l() {
    let mut lm = load_model(&fixture("phi3_sliding_window"), Kind::Float, Device::Cpu).unwrap();
    let own = lm.model.config.clone();
    assert_eq!(own.sliding_window, Some(8));
    let ext = Extension {
        target_length: 256,
        original_length: 32,
        short_factor: vec![1.0; 8],
        long_factor: vec![1.0; 8],
        attention_factor: 1.0,
        explicit_attention_factor: true,
        keep_sliding_window: false,
    };
    ext.apply(&mut lm.model.config);
    assert_eq!(lm.model.config.sliding_window, None);
    assert!(ext.sliding_window_note(Some(8)).unwrap().contains("dropped"));
    let keep = Extension { keep_sliding_window: true, ..ext.clone() };
    assert_eq!(keep.sliding_window(Some(8)), Some(8));
    assert_eq!(ext.sliding_window(Some(256)), Some(256), "a window >= L never bites and stays");

    // Factors of 1.0 and attention factor 1.0: only the window can make a difference.
    let ids = Tensor::randint(256, [1, 24], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(24, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let logits = |config: &longmix_model::ModelConfig| {
        let mut m = load_model(&fixture("phi3_sliding_window"), Kind::Float, Device::Cpu).unwrap();
        m.model.config = config.clone();
        tch::no_grad(|| m.model.forward(&ids, &pos))
    };
    let extended = logits(&lm.model.config);
    let windowless = logits(&longmix_model::ModelConfig { sliding_window: None, ..own.clone() });
    let windowed = logits(&own);
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    assert!(diff(&extended, &windowless) < 1e-5, "the extended model still uses a window");
    assert!(diff(&extended, &windowed) > 1e-3, "past 8 tokens the window must change the logits");

    let out_root = tempfile::tempdir().unwrap();
    for (e, want) in [(&ext, serde_json::Value::Null), (&keep, serde_json::json!(8))] {
        let out = out_root.path().join(format!("keep-{}", e.keep_sliding_window));
        let opts = ExportOptions { dtype: Kind::Float, max_shard_bytes: 1 << 30, rope: Some(e.clone()) };
        export_hf(&lm.vs, &own, Some(&fixture("phi3_sliding_window")), &out, &opts).unwrap();
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(c["sliding_window"], want, "keep = {}", e.keep_sliding_window);
        assert_eq!(c["max_position_embeddings"], 256);
    }
}

fn exported_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn qwen3_export_keeps_its_class_head_dim_and_qk_norms() {
    let src = load_model(&fixture("qwen3_default"), Kind::Float, Device::Cpu).unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("export");
    // head_dim 24: 12 rotated pairs.
    let long: Vec<f64> = (0..12).map(|i| 1.0 + i as f64 * 0.5).collect();
    let rope = Extension {
        target_length: 128,
        original_length: 32,
        short_factor: vec![1.0; 12],
        long_factor: long.clone(),
        attention_factor: longrope_attention_factor(4.0, 32),
        explicit_attention_factor: false,
        keep_sliding_window: false,
    };
    let opts = ExportOptions { dtype: Kind::Float, max_shard_bytes: 1 << 30, rope: Some(rope) };
    export_hf(&src.vs, &src.model.config, None, &out, &opts).unwrap();
    let cfg = exported_json(&out);
    assert_eq!(cfg["architectures"], serde_json::json!(["Qwen3ForCausalLM"]));
    assert_eq!((cfg["head_dim"].as_i64(), cfg["use_sliding_window"].as_bool()), (Some(24), Some(false)));
    assert_eq!(cfg["rope_parameters"]["rope_type"], "longrope");
    let back = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    let c = &back.model.config;
    assert_eq!((c.arch, c.head_dim, c.qk_norm, c.max_position_embeddings), (Architecture::Qwen3, 24, true, 128));
    assert!(matches!(&c.rope.scaling, RopeScaling::LongRope { long_factor, .. } if *long_factor == long));
    let vars = back.vs.variables();
    let name = "model.layers.1.self_attn.k_norm.weight";
    assert!(vars[name].equal(&src.vs.variables()[name]), "{name} lost in the round trip");
}

#[test]
fn qwen2_export_states_the_window_it_runs() {
    // A save_pretrained config (layer_types written out, no window) given a window in every layer,
    // then the windowed fixture with its window dropped: each export reloads as the model ran.
    let mut windowed = load_model(&fixture("qwen2_tied_yarn"), Kind::Float, Device::Cpu).unwrap();
    windowed.model.config.sliding_window = Some(8);
    let mut unwindowed = load_model(&fixture("qwen2_sliding_window"), Kind::Float, Device::Cpu).unwrap();
    assert_eq!(unwindowed.model.config.sliding_window, Some(8));
    unwindowed.model.config.sliding_window = None;
    let root = tempfile::tempdir().unwrap();
    let opts = ExportOptions { dtype: Kind::Float, max_shard_bytes: 1 << 30, rope: None };
    for (lm, name, want) in [(&windowed, "on", Some(8)), (&unwindowed, "off", None)] {
        let out = root.path().join(name);
        export_hf(&lm.vs, &lm.model.config, None, &out, &opts).unwrap();
        let cfg = exported_json(&out);
        assert_eq!(cfg["architectures"], serde_json::json!(["Qwen2ForCausalLM"]));
        assert_eq!(cfg["use_sliding_window"].as_bool(), Some(want.is_some()), "{name}: {cfg}");
        let back = load_model(&out, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(back.model.config.sliding_window, want, "{name}");
    }
    let types = exported_json(&root.path().join("on"))["layer_types"].clone();
    assert_eq!(types, serde_json::json!(["sliding_attention", "sliding_attention"]));
}
