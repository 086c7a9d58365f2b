//! Logits parity with Hugging Face transformers on tiny random checkpoints.
//!
//! The fixtures (`tests/fixtures/parity/`, made by `tests/fixtures/make_parity_fixtures.py`)
//! hold each case's config, weights and transformers' logits. Every reference row was computed
//! by running each of its documents alone through transformers, so a packed row, a batch mixing
//! a short and a long row, and per-row window choice are all checked against that. The families:
//! LLaMA, Phi-3, Qwen2 (q/k/v biases, tied and untied), Qwen3 (q/k norms, head_dim apart from
//! hidden / heads) and Mistral (run as LLaMA, with and without its sliding window).

use std::path::PathBuf;

use longmix_model::load_model;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

#[derive(serde::Deserialize)]
struct Case {
    case: String,
    probes: Vec<Probe>,
}

#[derive(serde::Deserialize)]
struct Probe {
    name: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("tests/fixtures/parity/cases.json");
    serde_json::from_str(&text).expect("cases.json")
}

/// Max abs error of every probe of `case`.
fn errors(case: &Case) -> Vec<(String, f64)> {
    let dir = fixtures().join(&case.case);
    let lm = load_model(&dir, Kind::Float, Device::Cpu).unwrap_or_else(|e| panic!("{}: {e:#}", case.case));
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap().into_iter().collect();
    case.probes
        .iter()
        .map(|p| {
            let get = |k: &str| {
                expected.get(&format!("{}.{k}", p.name)).unwrap_or_else(|| panic!("{}: {}.{k}", case.case, p.name))
            };
            let logits = tch::no_grad(|| lm.model.forward(get("input_ids"), get("position_ids")));
            assert_eq!(logits.size(), get("logits").size(), "{}/{}", case.case, p.name);
            let err = (logits - get("logits")).abs().max().double_value(&[]);
            (p.name.clone(), err)
        })
        .collect()
}

fn check(name: &str) {
    let case = cases().into_iter().find(|c| c.case == name).unwrap_or_else(|| panic!("no fixture case {name}"));
    let errs = errors(&case);
    for (probe, err) in &errs {
        eprintln!("{name}/{probe}: max abs logit error {err:.2e}");
    }
    let bad: Vec<_> = errs.iter().filter(|(_, e)| e.is_nan() || *e > TOLERANCE).collect();
    assert!(bad.is_empty(), "{name}: probes over {TOLERANCE}: {bad:?}");
}

/// Every case in the manifest has a test below (so a new fixture cannot go unchecked).
#[test]
fn every_fixture_case_is_tested() {
    let tested = [
        "llama_gqa_tied",
        "llama_mha_untied_bias",
        "llama_linear",
        "llama_dynamic",
        "llama_yarn",
        "llama_yarn_mscale",
        "llama_yarn_attn",
        "llama3",
        "llama_longrope",
        "phi3_longrope_partial",
        "phi3_longrope_v5",
        "phi3_sliding_window",
        "llama_packed",
        "qwen2_untied",
        "qwen2_tied_yarn",
        "qwen2_longrope",
        "qwen2_sliding_window",
        "qwen3_default",
        "qwen3_yarn",
        "qwen3_longrope_bias",
        "mistral_sliding_window",
        "mistral_yarn",
        "mistral_longrope",
    ];
    for c in cases() {
        assert!(tested.contains(&c.case.as_str()), "fixture case {} has no test", c.case);
    }
    for t in tested {
        assert!(cases().iter().any(|c| c.case == t), "test names case {t} but the fixtures lack it");
    }
}

#[test]
fn llama_gqa_tied() {
    check("llama_gqa_tied");
}
#[test]
fn llama_mha_untied_bias() {
    check("llama_mha_untied_bias");
}
#[test]
fn llama_linear() {
    check("llama_linear");
}
#[test]
fn llama_dynamic() {
    check("llama_dynamic");
}
#[test]
fn llama_yarn() {
    check("llama_yarn");
}
#[test]
fn llama_yarn_mscale() {
    check("llama_yarn_mscale");
}
#[test]
fn llama_yarn_attn() {
    check("llama_yarn_attn");
}
#[test]
fn llama3() {
    check("llama3");
}
#[test]
fn llama_longrope() {
    check("llama_longrope");
}
#[test]
fn phi3_longrope_partial() {
    check("phi3_longrope_partial");
}
#[test]
fn phi3_longrope_v5() {
    check("phi3_longrope_v5");
}
#[test]
fn phi3_sliding_window() {
    check("phi3_sliding_window");
}
#[test]
fn llama_packed() {
    check("llama_packed");
}
#[test]
fn qwen2_untied() {
    check("qwen2_untied");
}
#[test]
fn qwen2_tied_yarn() {
    check("qwen2_tied_yarn");
}
#[test]
fn qwen2_longrope() {
    check("qwen2_longrope");
}
#[test]
fn qwen2_sliding_window() {
    check("qwen2_sliding_window");
}
#[test]
fn qwen3_default() {
    check("qwen3_default");
}
#[test]
fn qwen3_yarn() {
    check("qwen3_yarn");
}
#[test]
fn qwen3_longrope_bias() {
    check("qwen3_longrope_bias");
}
#[test]
fn mistral_sliding_window() {
    check("mistral_sliding_window");
}
#[test]
fn mistral_yarn() {
    check("mistral_yarn");
}
#[test]
fn mistral_longrope() {
    check("mistral_longrope");
}
