//! The embedded default model (SmolLM2-135M-Instruct, imported from its GGUF) against
//! transformers' own GGUF loader: mean NLL 1.4450 on the reference sentence, next token " Rome".

mod common;

use longmix_model::{load_model, load_tokenizer};
use tch::{Device, Kind, Tensor};

const SENTENCE: &str = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is";

#[test]
fn smollm2_matches_transformers_on_the_reference_sentence() {
    let dir = common::smollm2();
    let text = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(text.path(), SENTENCE).unwrap();
    let out = common::run_ok(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        text.path().to_str().unwrap(),
        "--json",
        "--device",
        "cpu",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!((nll - 1.445).abs() <= 0.002, "mean NLL {nll}, transformers gives 1.4450");

    let lm = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    let tok = load_tokenizer(&dir).unwrap();
    let ids: Vec<i64> = tok.encode(SENTENCE, true).unwrap().get_ids().iter().map(|&i| i as i64).collect();
    let input = Tensor::from_slice(&ids).unsqueeze(0);
    let pos = Tensor::arange(ids.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let logits = tch::no_grad(|| lm.model.forward(&input, &pos));
    let next = logits.get(0).get(ids.len() as i64 - 1).argmax(0, false).int64_value(&[]);
    assert_eq!(tok.decode(&[next as u32], false).unwrap(), " Rome");
}
