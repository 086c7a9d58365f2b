//! Activation checkpointing and the chunked LM head give the plain path's loss and gradients.

use std::collections::BTreeMap;
use std::path::PathBuf;

use longmix_model::{batch_targets, load_model, LoadedModel, MemoryOptions};
use tch::{Device, Kind, Tensor};

fn load(case: &str) -> LoadedModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity").join(case);
    load_model(&dir, Kind::Float, Device::Cpu).unwrap()
}

/// A batch of one packed short row (docs 30, 30, 20) and one 80-token long row.
fn mixed_batch(vocab: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(7);
    let ids = Tensor::randint(vocab, [2, 80], (Kind::Int64, Device::Cpu));
    let packed: Vec<i64> = [30, 30, 20].iter().flat_map(|&n| 0..n).collect();
    let pos = Tensor::stack(&[Tensor::from_slice(&packed), Tensor::arange(80, (Kind::Int64, Device::Cpu))], 0);
    let targets = batch_targets(&ids, &pos);
    (ids, pos, targets)
}

fn grads(
    m: &LoadedModel,
    opts: MemoryOptions,
    batch: &(Tensor, Tensor, Tensor),
) -> (f64, i64, BTreeMap<String, Tensor>) {
    for v in m.vs.trainable_variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let out = m.model.forward_backward(&batch.0, &batch.1, &batch.2, 0.01, opts).loss;
    // Each row's count is its tokens minus one per document.
    assert_eq!(out.row_tokens, vec![80 - 3, 80 - 1]);
    let grads = m.vs.variables().into_iter().map(|(k, v)| (k, v.grad().copy())).collect();
    (out.sum(), out.tokens(), grads)
}

fn check(case: &str) {
    let m = load(case);
    let batch = mixed_batch(m.model.config.vocab_size);
    let plain = grads(&m, MemoryOptions::default(), &batch);
    // The plain path agrees with the model's own loss.
    let eval = m.model.nll(&batch.0, &batch.1, &batch.2);
    let n = eval.tokens();
    assert_eq!(plain.1, n);
    assert!((plain.0 - eval.sum()).abs() < 1e-3, "{} vs {}", plain.0, eval.sum());
    // Tokens: 2 x 80 minus one per document (4 documents).
    assert_eq!(n, 160 - 4);
    for opts in [
        MemoryOptions { checkpoint_layers: true, loss_chunk: None, sync_phases: false },
        MemoryOptions { checkpoint_layers: false, loss_chunk: Some(37), sync_phases: false },
        MemoryOptions { checkpoint_layers: true, loss_chunk: Some(16), sync_phases: false },
    ] {
        let got = grads(&m, opts, &batch);
        assert_eq!(got.1, plain.1);
        assert!((got.0 - plain.0).abs() < 1e-3 * plain.0.abs().max(1.0), "{opts:?}: loss {} vs {}", got.0, plain.0);
        for (name, g) in &plain.2 {
            let err = (&got.2[name] - g).abs().max().double_value(&[]);
            let scale = g.abs().max().double_value(&[]).max(1e-6);
            assert!(err <= 1e-4 * scale, "{case} {opts:?}: grad of {name} off by {err:.3e} (max |g| {scale:.3e})");
            assert!(scale > 1e-8, "{case}: grad of {name} is zero; the check would be vacuous");
        }
    }
}

#[test]
fn llama_tied_embeddings_same_gradients() {
    check("llama_gqa_tied");
}

#[test]
fn phi3_partial_rotary_longrope_same_gradients() {
    check("phi3_longrope_partial");
}

#[test]
fn nll_over_several_head_chunks_equals_full_logits() {
    // 2 rows x 2600 positions: more than two HEAD_CHUNKs of scored positions, with document
    // boundaries (ignored targets) in the middle of a chunk.
    let m = load("llama_gqa_tied");
    let t = 2600;
    assert!(2 * t > 2 * longmix_model::HEAD_CHUNK);
    tch::manual_seed(3);
    let ids = Tensor::randint(m.model.config.vocab_size, [2, t], (Kind::Int64, Device::Cpu));
    let packed: Vec<i64> = [1000, 1600].iter().flat_map(|&n| 0..n).collect();
    let pos = Tensor::stack(&[Tensor::from_slice(&packed), Tensor::arange(t, (Kind::Int64, Device::Cpu))], 0);
    let targets = batch_targets(&ids, &pos);
    let nll = m.model.nll(&ids, &pos, &targets);
    assert_eq!(nll.row_tokens, vec![t - 2, t - 1]);
    let full = tch::no_grad(|| {
        let logits = m.model.forward(&ids, &pos);
        logits.view([-1, m.model.config.vocab_size]).log_softmax(-1, Kind::Double)
    });
    let flat = targets.view([-1]);
    let keep = flat.ne(-100);
    let want =
        -full.gather(1, &flat.clamp_min(0).unsqueeze(1), false).squeeze_dim(1).masked_select(&keep).sum(Kind::Double);
    let (got, want) = (nll.sum(), want.double_value(&[]));
    assert!((got - want).abs() < 1e-5 * want.abs(), "chunked {got} vs full {want}");
}
