//! Small GGUF files written by the tests: a full import round trip with hand-quantized F32,
//! F16, Q8_0, Q4_0 and Q4_1 tensors, the error cases, and the output-folder rules.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use common::{ggml, llama_cpp_permute, quantize, read_json, scratch, GgufWriter, Kv};
use longmix_gguf::{import_gguf, GgmlType, GgufError, GgufFile, MARKER_FILE};
use safetensors::SafeTensors;

const HIDDEN: usize = 64;
const FFN: usize = 96;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = HIDDEN / HEADS;
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte alphabet: the token for each byte.
fn byte_tokens() -> Vec<String> {
    longmix_gguf::tokenizer::byte_level_alphabet().iter().map(|c| c.to_string()).collect()
}

/// The vocabulary: 3 control tokens, the 256 byte tokens, then "ab" and "abc".
fn vocab() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_tokens());
    tokens.extend(["ab".to_string(), "abc".to_string()]);
    tokens
}

fn id(token: &str) -> u32 {
    vocab().iter().position(|t| t == token).unwrap() as u32
}

/// A tensor of the synthetic model: GGUF name, HF name, HF shape, ggml type, Q/K head count.
struct Spec {
    gguf: &'static str,
    hf: &'static str,
    shape: [usize; 2],
    ty: u32,
    permute_heads: Option<usize>,
}

fn specs() -> Vec<Spec> {
    let v = vocab().len();
    let kv = KV_HEADS * HEAD_DIM;
    let s = |gguf, hf, shape, ty, permute_heads| Spec { gguf, hf, shape, ty, permute_heads };
    vec![
        s("token_embd.weight", "model.embed_tokens.weight", [v, HIDDEN], ggml::Q8_0, None),
        s("output_norm.weight", "model.norm.weight", [1, HIDDEN], ggml::F32, None),
        s("output.weight", "lm_head.weight", [v, HIDDEN], ggml::Q4_1, None),
        s("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", [1, HIDDEN], ggml::F32, None),
        s("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", [HIDDEN, HIDDEN], ggml::Q4_0, Some(HEADS)),
        s("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", [kv, HIDDEN], ggml::Q4_1, Some(KV_HEADS)),
        s("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", [kv, HIDDEN], ggml::F16, None),
        s("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", [HIDDEN, HIDDEN], ggml::Q8_0, None),
        s("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight", [1, HIDDEN], ggml::F32, None),
        s("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", [FFN, HIDDEN], ggml::Q4_1, None),
        s("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", [FFN, HIDDEN], ggml::Q4_0, None),
        s("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", [HIDDEN, FFN], ggml::F16, None),
    ]
}

/// A one-layer LLaMA with untied embeddings and a BOS-adding SmolLM-style tokenizer, and the
/// HF-layout values every tensor must import as.
/// HF name -> (HF shape, values).
type Expected = HashMap<&'static str, (Vec<usize>, Vec<f32>)>;

fn tiny_llama() -> (GgufWriter, Expected) {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Kv::str("llama"))
        .kv("general.name", Kv::str("tiny"))
        .kv("llama.block_count", Kv::U32(1))
        .kv("llama.context_length", Kv::U32(256))
        .kv("llama.embedding_length", Kv::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", Kv::U32(FFN as u32))
        .kv("llama.attention.head_count", Kv::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Kv::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", Kv::F32(500000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-6))
        .kv("llama.rope.dimension_count", Kv::U32(HEAD_DIM as u32))
        .kv("tokenizer.ggml.model", Kv::str("gpt2"))
        .kv("tokenizer.ggml.pre", Kv::str("smollm"))
        .kv("tokenizer.ggml.tokens", Kv::Strs(vocab()))
        .kv(
            "tokenizer.ggml.token_type",
            Kv::I32s(vocab().iter().enumerate().map(|(i, _)| if i < 3 { 3 } else { 1 }).collect()),
        )
        .kv("tokenizer.ggml.merges", Kv::Strs(vec!["a b".into(), "ab c".into()]))
        .kv("tokenizer.ggml.bos_token_id", Kv::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Kv::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Kv::Bool(true))
        .kv("tokenizer.chat_template", Kv::str("{{ messages }}"));

    let mut expected = HashMap::new();
    for (seed, spec) in specs().into_iter().enumerate() {
        let [rows, cols] = spec.shape;
        let (bytes, gguf_values) = quantize(spec.ty, rows * cols, seed as u64);
        let dims: Vec<u64> = if rows == 1 { vec![cols as u64] } else { vec![cols as u64, rows as u64] };
        w.tensor(spec.gguf, &dims, spec.ty, bytes);
        // The GGUF rows of Q and K are llama.cpp's permutation of the HF rows: find which HF
        // row each GGUF row came from and put it back.
        let hf_values = match spec.permute_heads {
            None => gguf_values,
            Some(heads) => {
                let row_ids: Vec<f32> = (0..rows).map(|r| r as f32).collect();
                let source_row = llama_cpp_permute(&row_ids, rows, 1, heads);
                let mut hf = vec![0.0; rows * cols];
                for (g, &r) in source_row.iter().enumerate() {
                    let r = r as usize;
                    hf[r * cols..(r + 1) * cols].copy_from_slice(&gguf_values[g * cols..(g + 1) * cols]);
                }
                hf
            }
        };
        let shape = if rows == 1 { vec![cols] } else { vec![rows, cols] };
        expected.insert(spec.hf, (shape, hf_values));
    }
    (w, expected)
}

#[test]
fn round_trip_of_hand_quantized_model() {
    let dir = scratch("round_trip");
    let (writer, expected) = tiny_llama();
    let gguf = writer.write(&dir.join("tiny.gguf"));
    let out = dir.join("hf");

    let report = import_gguf(&gguf, &out).unwrap();
    assert_eq!(report.architecture, "llama");
    assert_eq!(report.n_tensors, 12);
    assert_eq!(report.n_params, expected.values().map(|(_, v)| v.len() as u64).sum::<u64>());
    assert_eq!(report.quant_types, ["F32", "F16", "Q4_0", "Q4_1", "Q8_0"]);
    assert_eq!(report.out_dir, out);

    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), expected.len());
    for (name, (shape, values)) in &expected {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(t.shape(), &shape[..], "{name}");
        let got: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert!(got == *values, "{name}: values differ");
    }

    let config = read_json(&out.join("config.json"));
    assert_eq!(config["num_hidden_layers"], 1);
    assert_eq!(config["hidden_size"], HIDDEN);
    assert_eq!(config["intermediate_size"], FFN);
    assert_eq!(config["num_attention_heads"], HEADS);
    assert_eq!(config["num_key_value_heads"], KV_HEADS);
    assert_eq!(config["head_dim"], HEAD_DIM);
    assert_eq!(config["vocab_size"], vocab().len());
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["rope_theta"], 500000.0);
    assert_eq!(config["rms_norm_eps"], 1e-6);
    assert_eq!(config["max_position_embeddings"], 256);
    assert_eq!(config["bos_token_id"], 1);
    assert_eq!(config["eos_token_id"], 2);
    assert!(config.get("rope_scaling").is_none());

    let tok_config = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tok_config["bos_token"], "<|im_start|>");
    assert_eq!(tok_config["eos_token"], "<|im_end|>");
    assert_eq!(tok_config["add_bos_token"], true);
    assert_eq!(tok_config["chat_template"], "{{ messages }}");
    let generation = read_json(&out.join("generation_config.json"));
    assert_eq!(generation["bos_token_id"], 1);
    assert_eq!(generation["eos_token_id"], 2);
    let manifest = read_json(&out.join(MARKER_FILE));
    assert_eq!(manifest["n_tensors"], 12);

    // BOS is added; "abc" and "ab" merge; digits split one by one; control tokens stay whole.
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let encoding = tokenizer.encode("abc ab12<|im_end|>", true).unwrap();
    let space = id("Ġ");
    assert_eq!(encoding.get_ids(), [1, id("abc"), space, id("ab"), id("1"), id("2"), 2]);
    assert_eq!(tokenizer.decode(encoding.get_ids(), false).unwrap(), "<|im_start|>abc ab12<|im_end|>");
}

#[test]
fn reads_version_2_and_metadata() {
    let (mut writer, _) = tiny_llama();
    writer.version = 2;
    let file = GgufFile::from_bytes(writer.to_bytes(), "tiny-v2.gguf").unwrap();
    assert_eq!(file.version(), 2);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u64("llama.block_count").unwrap(), Some(1));
    assert_eq!(file.get_strings("tokenizer.ggml.merges").unwrap().unwrap(), ["a b", "ab c"]);
    let q = file.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.dims, [HIDDEN as u64, HIDDEN as u64]);
    assert_eq!(q.ggml_type, GgmlType::Q4_0);
    assert_eq!(q.shape(), [HIDDEN, HIDDEN]);
    assert_eq!(file.dequantize(q).unwrap().len(), HIDDEN * HIDDEN);
}

/// The message of an import that must fail, after checking it left nothing behind.
fn import_error(dir: &Path, gguf: &Path) -> GgufError {
    let out = dir.join("out");
    let err = import_gguf(gguf, &out).expect_err("the import should fail");
    assert!(!out.exists(), "a failed import must not create the output folder");
    let leftovers: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "a failed import left {leftovers:?}");
    let message = err.to_string();
    assert!(!message.contains('\n'), "one line, got: {message}");
    err
}

#[test]
fn bad_magic_names_the_file() {
    let dir = scratch("bad_magic");
    let path = dir.join("model.bin");
    fs::write(&path, b"PK\x03\x04 this is a zip, not a model").unwrap();
    let err = import_error(&dir, &path);
    assert!(matches!(err, GgufError::NotGguf { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("not a GGUF file") && message.contains(r#""PK\x03\x04""#), "{message}");

    let empty = dir.join("empty.gguf");
    fs::write(&empty, b"").unwrap();
    assert!(import_error(&dir, &empty).to_string().contains("the file is empty"));
}

#[test]
fn truncated_files_say_so_wherever_they_end() {
    let dir = scratch("truncated");
    let (writer, _) = tiny_llama();
    let bytes = writer.to_bytes();
    let file = GgufFile::from_bytes(bytes.clone(), "whole").unwrap();
    let data_start = file.data_offset() as usize;
    let last = file.tensors().iter().max_by_key(|t| t.offset).unwrap();
    let data_end = data_start + (last.offset + last.n_bytes.unwrap()) as usize;
    // Inside: the version, the counts, the metadata, the tensor table, the tensor data.
    for cut in [6, 20, 200, data_start - 40, data_start + 100, data_end - 1] {
        let path = dir.join(format!("cut-{cut}.gguf"));
        fs::write(&path, &bytes[..cut]).unwrap();
        let err = import_error(&dir, &path);
        assert!(matches!(err, GgufError::Truncated { .. }), "cut at {cut}: {err:?}");
        let message = err.to_string();
        assert!(message.contains("is truncated") && message.contains(&path.display().to_string()), "{message}");
    }
}

#[test]
fn unsupported_versions_are_refused() {
    let dir = scratch("version");
    for version in [1, 4] {
        let (mut writer, _) = tiny_llama();
        writer.version = version;
        let err = import_error(&dir, &writer.write(&dir.join(format!("v{version}.gguf"))));
        let message = err.to_string();
        assert!(
            message.contains(&format!("GGUF version {version}")) && message.contains("supported: 2 and 3"),
            "{message}"
        );
    }
    // A big-endian file reads as a huge version.
    let (mut writer, _) = tiny_llama();
    writer.version = 3u32.swap_bytes();
    let err = import_error(&dir, &writer.write(&dir.join("be.gguf")));
    assert!(err.to_string().contains("big-endian"), "{err}");
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = scratch("architecture");
    let (mut writer, _) = tiny_llama();
    writer.kv("general.architecture", Kv::str("phi3"));
    let err = import_error(&dir, &writer.write(&dir.join("phi3.gguf")));
    let message = err.to_string();
    assert!(matches!(err, GgufError::UnsupportedArchitecture { .. }), "{err:?}");
    assert!(message.contains("\"phi3\"") && message.contains("only \"llama\""), "{message}");
}

#[test]
fn unsupported_quant_type_names_tensor_and_type() {
    let dir = scratch("quant_type");
    let (mut writer, _) = tiny_llama();
    // IQ4_NL: 32-value blocks of 18 bytes, which this crate does not dequantize.
    writer.tensor("blk.0.ffn_up.weight", &[HIDDEN as u64, FFN as u64], ggml::IQ4_NL, vec![0; FFN * HIDDEN / 32 * 18]);
    let err = import_error(&dir, &writer.write(&dir.join("iq4.gguf")));
    let message = err.to_string();
    assert!(matches!(err, GgufError::UnsupportedTensorType { ty: GgmlType::IQ4_NL, .. }), "{err:?}");
    assert!(message.contains("\"blk.0.ffn_up.weight\"") && message.contains("IQ4_NL"), "{message}");
    assert!(message.contains("Q8_0") && message.contains("Q6_K"), "lists the supported types: {message}");

    let (mut writer, _) = tiny_llama();
    writer.tensor("blk.0.ffn_up.weight", &[HIDDEN as u64, FFN as u64], 200, vec![]);
    let err = import_error(&dir, &writer.write(&dir.join("unknown.gguf")));
    assert!(err.to_string().contains("unknown type 200"), "{err}");
}

#[test]
fn other_model_problems_are_reported() {
    let dir = scratch("model_problems");
    type Edit = Box<dyn Fn(&mut GgufWriter)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing tensor",
            Box::new(|w| {
                w.tensors.retain(|(n, ..)| n != "blk.0.ffn_down.weight");
            }),
            "blk.0.ffn_down.weight is missing",
        ),
        (
            "extra tensor",
            Box::new(|w| {
                w.tensor("blk.0.attn_q.bias", &[HIDDEN as u64], ggml::F32, vec![0; HIDDEN * 4]);
            }),
            "\"blk.0.attn_q.bias\" has no counterpart",
        ),
        (
            "wrong shape",
            Box::new(|w| {
                w.kv("llama.feed_forward_length", Kv::U32(128));
            }),
            "expected [128, 64]",
        ),
        (
            "missing hparam",
            Box::new(|w| {
                w.remove_kv("llama.block_count");
            }),
            "\"llama.block_count\" is missing",
        ),
        (
            "sentencepiece",
            Box::new(|w| {
                w.kv("tokenizer.ggml.model", Kv::str("llama"));
            }),
            "tokenizer model \"llama\" is not supported",
        ),
        (
            "pre-tokenizer",
            Box::new(|w| {
                w.kv("tokenizer.ggml.pre", Kv::str("default"));
            }),
            "pre-tokenizer \"default\"",
        ),
        (
            "rope scaling",
            Box::new(|w| {
                w.kv("llama.rope.scaling.type", Kv::str("longrope"));
                w.kv("llama.rope.scaling.factor", Kv::F32(4.0));
            }),
            "RoPE scaling type \"longrope\"",
        ),
    ];
    for (what, edit, expected) in cases {
        let (mut writer, _) = tiny_llama();
        edit(&mut writer);
        let message = import_error(&dir, &writer.write(&dir.join("m.gguf"))).to_string();
        assert!(message.contains(expected), "{what}: {message}");
    }
}

#[test]
fn rope_scaling_is_written() {
    let dir = scratch("rope_scaling");
    let (mut writer, _) = tiny_llama();
    writer.kv("llama.rope.scaling.type", Kv::str("linear")).kv("llama.rope.scaling.factor", Kv::F32(2.0));
    let out = dir.join("out");
    import_gguf(&writer.write(&dir.join("m.gguf")), &out).unwrap();
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["rope_scaling"], serde_json::json!({"rope_type": "linear", "factor": 2.0}));
}

#[test]
fn output_folder_rules() {
    let dir = scratch("output_rules");
    let (writer, _) = tiny_llama();
    let gguf = writer.write(&dir.join("tiny.gguf"));
    let out = dir.join("out");

    // Someone else's folder is left alone.
    fs::create_dir(&out).unwrap();
    fs::write(out.join("notes.txt"), "mine").unwrap();
    let err = import_gguf(&gguf, &out).unwrap_err();
    assert!(matches!(err, GgufError::OutputExists { .. }), "{err:?}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");

    // An empty folder is used.
    fs::remove_file(out.join("notes.txt")).unwrap();
    import_gguf(&gguf, &out).unwrap();
    assert!(out.join(MARKER_FILE).is_file());

    // A previous import is replaced whole: a file only the old one had disappears.
    fs::write(out.join("stale.txt"), "old").unwrap();
    import_gguf(&gguf, &out).unwrap();
    assert!(!out.join("stale.txt").exists());
    assert!(out.join("model.safetensors").is_file());

    // A failing import leaves the previous one as it was.
    let bad = dir.join("bad.gguf");
    fs::write(&bad, b"GGUF").unwrap();
    assert!(import_gguf(&bad, &out).is_err());
    assert!(out.join("model.safetensors").is_file());

    // Nothing but the GGUF files and the output is left in the parent.
    let mut names: Vec<_> =
        fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["bad.gguf", "out", "tiny.gguf"]);
}
