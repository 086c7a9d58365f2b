//! The real SmolLM2-135M-Instruct Q4_1 GGUF, imported and checked against references computed by
//! transformers, tokenizers and gguf-py (tests/fixtures/make_smollm2_reference.py).
//!
//! These tests fail when the file is missing: run launch/setup.sh.

mod common;

use common::{fixtures, imported_smollm2, read_json, smollm2_gguf};
use longmix_gguf::llama::unpermute_rows;
use longmix_gguf::GgufFile;
use safetensors::SafeTensors;
use serde_json::Value;

fn f32s(values: &Value) -> Vec<f32> {
    values.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn ids(values: &Value) -> Vec<u32> {
    values.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn check_reference_source(reference: &Value) {
    let size = std::fs::metadata(smollm2_gguf()).unwrap().len();
    assert_eq!(
        reference["source"]["gguf_bytes"].as_u64(),
        Some(size),
        "the fixtures were made from another file; rerun tests/fixtures/make_smollm2_reference.py"
    );
}

#[test]
fn tokenizer_matches_reference_ids() {
    let (_, out) = imported_smollm2();
    let reference = read_json(&fixtures().join("tokenizer_reference.json"));
    check_reference_source(&reference);
    let add_special = reference["add_special_tokens"].as_bool().unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();

    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["expected_ids"]);
        let got = tokenizer.encode(text, add_special).unwrap().get_ids().to_vec();
        if got != expected {
            failures.push(format!("{text:?}\n  expected {expected:?}\n  got      {got:?}"));
        }
        // transformers' GGUF tokenizer does not split off digits first (see the fixture script);
        // everywhere else the two must agree.
        if !text.chars().any(char::is_numeric) {
            assert_eq!(ids(&case["transformers_gguf_ids"]), expected, "{text:?}");
        }
        // llama.cpp's tokenizer, when the fixture script could run it, agrees too.
        if let Some(llama_cpp) = case.get("llama_cpp_ids") {
            assert_eq!(ids(llama_cpp), expected, "llama.cpp on {text:?}");
        }
        // Byte-level BPE loses nothing.
        assert_eq!(tokenizer.decode(&got, false).unwrap(), text);
    }
    assert!(failures.is_empty(), "{} texts tokenized differently:\n{}", failures.len(), failures.join("\n"));

    let pre = serde_json::to_value(tokenizer.get_pre_tokenizer().unwrap()).unwrap();
    assert_eq!(pre, reference["expected_pre_tokenizer"]);
}

#[test]
fn dequantized_tensors_match_gguf_py() {
    let (_, out) = imported_smollm2();
    let reference = read_json(&fixtures().join("dequant_reference.json"));
    check_reference_source(&reference);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let weights = SafeTensors::deserialize(&bytes).unwrap();
    let gguf = GgufFile::open(smollm2_gguf()).unwrap();
    let heads = gguf.get_u64("llama.attention.head_count").unwrap().unwrap() as usize;
    let kv_heads = gguf.get_u64("llama.attention.head_count_kv").unwrap().unwrap() as usize;

    let mut types_seen = std::collections::BTreeSet::new();
    for entry in reference["tensors"].as_array().unwrap() {
        let name = entry["hf_name"].as_str().unwrap();
        let shape: Vec<usize> =
            entry["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();

        // Through the import: model.safetensors.
        let view = weights.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(view.shape(), &shape[..], "{name}");
        let imported: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();

        // Directly: GgufFile::dequantize and unpermute_rows.
        let gguf_name = entry["gguf_name"].as_str().unwrap();
        let info = gguf.tensor(gguf_name).unwrap();
        assert_eq!(info.ggml_type.name(), entry["ggml_type"].as_str().unwrap());
        types_seen.insert(info.ggml_type.name());
        let mut direct = gguf.dequantize(info).unwrap();
        if gguf_name.ends_with("attn_q.weight") || gguf_name.ends_with("attn_k.weight") {
            let n = if gguf_name.ends_with("attn_q.weight") { heads } else { kv_heads };
            direct = unpermute_rows(&direct, shape[0], shape[1], n);
        }
        assert!(direct == imported, "{name}: the import and GgufFile::dequantize disagree");

        let cols = *shape.last().unwrap();
        for row in entry["rows"].as_array().into_iter().flatten() {
            let r = row["row"].as_u64().unwrap() as usize;
            let expected = f32s(&row["values"]);
            assert_eq!(&imported[r * cols..r * cols + expected.len()], &expected[..], "{name} row {r}");
        }
        for sample in entry["samples"].as_array().unwrap() {
            let i = sample[0].as_u64().unwrap() as usize;
            let expected = sample[1].as_f64().unwrap() as f32;
            assert_eq!(imported[i], expected, "{name}[{i}]");
        }
        let close = |got: f64, key: &str| {
            let want = entry[key].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{name} {key}: {got} vs {want}");
        };
        close(imported.iter().map(|&v| v as f64).sum(), "sum");
        close(imported.iter().map(|&v| (v as f64).abs()).sum(), "sum_abs");
        close(imported.iter().map(|&v| (v as f64) * (v as f64)).sum(), "sum_sq");
    }
    let present: Vec<String> =
        reference["types_present"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    assert_eq!(types_seen.into_iter().collect::<Vec<_>>(), present, "every type in the file is checked");
}

#[test]
fn config_and_report() {
    let (report, out) = imported_smollm2();
    assert_eq!(report.architecture, "llama");
    assert_eq!(report.n_tensors, 272);
    assert_eq!(report.n_params, 134_515_008);
    assert_eq!(report.quant_types, ["F32", "Q4_1", "Q8_0"]);

    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["num_hidden_layers"], 30);
    assert_eq!(config["hidden_size"], 576);
    assert_eq!(config["intermediate_size"], 1536);
    assert_eq!(config["num_attention_heads"], 9);
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!(config["head_dim"], 64);
    assert_eq!(config["vocab_size"], 49152);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["max_position_embeddings"], 8192);
    assert_eq!(config["hidden_act"], "silu");
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(config["bos_token_id"], 1);
    assert_eq!(config["eos_token_id"], 2);
    assert_eq!(config["pad_token_id"], 2);
    assert_eq!(config["attention_bias"], false);
    assert_eq!(config["mlp_bias"], false);
    assert!(config.get("rope_scaling").is_none());

    let tok_config = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tok_config["bos_token"], "<|im_start|>");
    assert_eq!(tok_config["eos_token"], "<|im_end|>");
    assert_eq!(tok_config["pad_token"], "<|im_end|>");
    assert_eq!(tok_config["unk_token"], "<|endoftext|>");
    assert_eq!(tok_config["add_bos_token"], false);
    assert_eq!(tok_config["model_max_length"], 8192);
    assert!(tok_config["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(tok_config["added_tokens_decoder"].as_object().unwrap().len(), 17);

    let generation = read_json(&out.join("generation_config.json"));
    assert_eq!(generation["eos_token_id"], 2);

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let weights = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(weights.len(), 272);
    assert!(weights.names().iter().all(|n| *n != "lm_head.weight"), "tied: no lm_head");
}
