//! KV-cached decoding equals full recomputation, step by step, on the tiny parity checkpoints
//! (GQA, partial rotary, sliding window, longrope across L0, dynamic NTK, STRING), for a
//! left-padded batch; and the generation loop (greedy, stop tokens, seeded sampling).

use std::path::PathBuf;

use longmix_model::generate::{choose, full_logits, SplitMix64};
use longmix_model::{
    generate, load_model, DecodeOptions, Decoder, GenerateOptions, LoadedModel, Sampling, StringConfig,
};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn load(case: &str) -> LoadedModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity").join(case);
    load_model(&dir, Kind::Float, Device::Cpu).unwrap_or_else(|e| panic!("{case}: {e:#}"))
}

/// Deterministic pseudo-random tokens below 256.
fn tokens(seed: u64, n: usize) -> Vec<i64> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| 3 + rng.below(250) as i64).collect()
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Teacher-force `cont[r]` after `prompts[r]`; return, per step (the prefill is step 0) and
/// row, the error of the cached logits against a full recomputation, and the decoder's
/// re-prefill counts.
fn errors(
    lm: &LoadedModel,
    prompts: &[Vec<i64>],
    cont: &[Vec<i64>],
    opts: DecodeOptions,
) -> (Vec<Vec<f64>>, Vec<usize>) {
    let string = opts.string;
    let (mut dec, mut logits) = Decoder::new(&lm.model, prompts, opts).unwrap();
    let mut seqs = prompts.to_vec();
    let mut errs = Vec::new();
    for step in 0..=cont[0].len() {
        let row_errs: Vec<f64> = (0..prompts.len())
            .map(|r| max_err(&logits.get(r as i64), &full_logits(&lm.model, &seqs[r], string.as_ref())))
            .collect();
        errs.push(row_errs);
        if step == cont[0].len() {
            break;
        }
        let next: Vec<i64> = cont.iter().map(|c| c[step]).collect();
        for (s, &t) in seqs.iter_mut().zip(&next) {
            s.push(t);
        }
        logits = dec.step(&next);
    }
    for (r, s) in seqs.iter().enumerate() {
        assert_eq!(dec.tokens(r), s.as_slice());
    }
    (errs, dec.reprefills())
}

fn worst(errs: &[Vec<f64>]) -> f64 {
    errs.iter().flatten().cloned().fold(0.0, f64::max)
}

#[test]
fn cached_decoding_equals_full_recomputation() {
    // (case, prompt lengths, steps): GQA + tied, MHA + biases, Phi-3 fused + partial rotary
    // (longrope, short window), Phi-3 sliding window 8 (the window bites in prefill and decode),
    // llama3 scaling, Qwen2 q/k/v biases, Qwen3 q/k norms with head_dim 24, Qwen2 and Mistral
    // windows.
    for (case, lens, steps) in [
        ("llama_gqa_tied", [7usize, 12], 14usize),
        ("llama_mha_untied_bias", [12, 5], 14),
        ("phi3_longrope_partial", [7, 12], 14),
        ("phi3_sliding_window", [3, 12], 16),
        ("llama3", [9, 4], 12),
        ("qwen2_untied", [7, 12], 14),
        ("qwen3_default", [12, 5], 14),
        ("qwen2_sliding_window", [3, 12], 16),
        ("mistral_sliding_window", [12, 3], 16),
    ] {
        let lm = load(case);
        let prompts: Vec<Vec<i64>> = lens.iter().enumerate().map(|(i, &n)| tokens(i as u64, n)).collect();
        let cont: Vec<Vec<i64>> = (0..2).map(|i| tokens(100 + i, steps)).collect();
        let (errs, reprefills) = errors(&lm, &prompts, &cont, DecodeOptions::default());
        eprintln!("{case}: max abs logit error over {} steps x 2 rows: {:.2e}", steps + 1, worst(&errs));
        assert!(worst(&errs) < TOLERANCE, "{case}: {errs:?}");
        assert_eq!(reprefills, vec![0, 0], "{case}: no table change below L0");
    }
}

#[test]
fn longrope_switch_reprefills_each_row_when_it_crosses_l0() {
    // L0 = 32 (max 128). Row 0: 28-token prompt, lengths 29..38 -> crosses L0 at length 33.
    // Row 1: 20-token prompt, lengths 21..30 -> never crosses, although it sits in a cache of
    // 38 slots (left padding): the window follows the row's positions, not the cache size.
    for case in ["phi3_longrope_partial", "llama_longrope", "phi3_longrope_v5", "qwen3_longrope_bias"] {
        let lm = load(case);
        assert_eq!(lm.model.config.original_max_position_embeddings(), 32);
        let prompts = vec![tokens(1, 28), tokens(2, 20)];
        let cont = vec![tokens(3, 10), tokens(4, 10)];
        let (errs, reprefills) = errors(&lm, &prompts, &cont, DecodeOptions::default());
        eprintln!("{case}: cached vs full, max abs logit error {:.2e}", worst(&errs));
        assert!(worst(&errs) < TOLERANCE, "{case}: {errs:?}");
        assert_eq!(reprefills, vec![1, 0], "{case}: row 0 re-prefilled once, at L0 + 1");

        // Without the re-prefill (pitfall #2) row 0 goes wrong from length 33 on; row 1 never.
        let stale = DecodeOptions { refresh_on_table_change: false, ..DecodeOptions::default() };
        let (errs, _) = errors(&lm, &prompts, &cont, stale);
        for (step, e) in errs.iter().enumerate() {
            let len0 = 28 + step;
            if len0 <= 32 {
                assert!(e[0] < TOLERANCE, "{case}: step {step} (length {len0}) should still match: {}", e[0]);
            } else {
                assert!(e[0] > 1e-3, "{case}: stale keys at length {len0} should differ: {}", e[0]);
            }
            assert!(e[1] < TOLERANCE, "{case}: row 1 (short) at step {step}: {}", e[1]);
        }
    }
}

#[test]
fn prompts_already_past_l0_start_long() {
    let lm = load("phi3_longrope_partial");
    let prompts = vec![tokens(5, 40), tokens(6, 33)];
    let cont = vec![tokens(7, 5), tokens(8, 5)];
    let (errs, reprefills) = errors(&lm, &prompts, &cont, DecodeOptions::default());
    assert!(worst(&errs) < TOLERANCE, "{errs:?}");
    assert_eq!(reprefills, vec![0, 0]);
}

#[test]
fn dynamic_ntk_stays_exact_by_re_prefilling() {
    // Dynamic NTK changes the table at every length beyond 32: exactness costs a re-prefill
    // per step there.
    let lm = load("llama_dynamic");
    let prompts = vec![tokens(9, 28), tokens(10, 30)];
    let cont = vec![tokens(11, 8), tokens(12, 8)];
    let (errs, reprefills) = errors(&lm, &prompts, &cont, DecodeOptions::default());
    eprintln!("llama_dynamic: max abs logit error {:.2e}, re-prefills {reprefills:?}", worst(&errs));
    assert!(worst(&errs) < TOLERANCE, "{errs:?}");
    assert_eq!(reprefills, vec![4, 6], "lengths 33..36 and 31..38 beyond 32");
}

#[test]
fn string_decoding_equals_full_string_recomputation() {
    for (case, s, w) in [("llama_gqa_tied", 10, 3), ("phi3_sliding_window", 5, 1), ("phi3_longrope_partial", 9, 2)] {
        let lm = load(case);
        let cfg = StringConfig { shifted_offset: s, local_window: w, attention_factor: 1.0693 };
        let opts = DecodeOptions { string: Some(cfg), ..DecodeOptions::default() };
        // Row 0's prompt is shorter than S, row 1's longer: both cross or pass S while decoding.
        let prompts = vec![tokens(13, 7), tokens(14, 12)];
        let cont = vec![tokens(15, 12), tokens(16, 12)];
        let (errs, _) = errors(&lm, &prompts, &cont, opts);
        eprintln!("{case}: STRING S={s} W={w}: cached vs full max abs logit error {:.2e}", worst(&errs));
        assert!(worst(&errs) < TOLERANCE, "{case}: {errs:?}");
    }
}

#[test]
fn greedy_generation_with_and_without_cache_agree() {
    let lm = load("llama_gqa_tied");
    let prompts = vec![tokens(20, 5), tokens(21, 9)];
    let mut opts = GenerateOptions { max_new_tokens: 12, ..GenerateOptions::default() };
    let cached = generate(&lm.model, &prompts, &opts).unwrap();
    opts.use_cache = false;
    let full = generate(&lm.model, &prompts, &opts).unwrap();
    assert_eq!(cached.tokens, full.tokens);
    assert!(cached.tokens.iter().all(|t| t.len() == 12));
    // Greedy = argmax of the full recomputation at each step.
    let mut seq = prompts[1].clone();
    for &t in &cached.tokens[1] {
        let want = full_logits(&lm.model, &seq, None).argmax(0, false).int64_value(&[]);
        assert_eq!(t, want);
        seq.push(t);
    }
    // A stop token ends its row (kept in the output); the other row goes on.
    opts.use_cache = true;
    opts.stop_tokens = vec![cached.tokens[0][2]];
    let stopped = generate(&lm.model, &prompts, &opts).unwrap();
    assert_eq!(stopped.tokens[0], cached.tokens[0][..3].to_vec());
    assert!(stopped.stopped[0]);
    let pos1 = cached.tokens[1].iter().position(|t| *t == cached.tokens[0][2]);
    let expect1 = pos1.map_or(cached.tokens[1].clone(), |p| cached.tokens[1][..=p].to_vec());
    assert_eq!(stopped.tokens[1], expect1);
}

#[test]
fn sampling_is_seeded() {
    let lm = load("llama_gqa_tied");
    let prompts = vec![tokens(30, 6)];
    let run = |sampling| {
        let opts = GenerateOptions { max_new_tokens: 16, sampling, ..GenerateOptions::default() };
        generate(&lm.model, &prompts, &opts).unwrap().tokens
    };
    let a = run(Sampling::Sample { temperature: 1.5, top_p: 0.95, seed: 1 });
    assert_eq!(a, run(Sampling::Sample { temperature: 1.5, top_p: 0.95, seed: 1 }), "same seed, same tokens");
    assert_ne!(a, run(Sampling::Sample { temperature: 1.5, top_p: 0.95, seed: 2 }), "another seed, other tokens");
    let greedy = run(Sampling::Greedy);
    assert_eq!(greedy, run(Sampling::Sample { temperature: 1.0, top_p: 1e-9, seed: 3 }), "top-p -> 0 is greedy");
    assert_eq!(greedy, run(Sampling::Sample { temperature: 0.0, top_p: 1.0, seed: 3 }), "temperature 0 is greedy");
}

#[test]
fn nucleus_keeps_the_smallest_set_reaching_top_p() {
    // Probabilities 0.25 / 0.75: top_p = 0.5 keeps only token 1; top_p = 1 samples both.
    let logits = [0.0f32, 3f32.ln()];
    let mut rng = SplitMix64::new(0);
    let s = Sampling::Sample { temperature: 1.0, top_p: 0.5, seed: 0 };
    assert!((0..200).all(|_| choose(&logits, s, &mut rng) == 1));
    let s = Sampling::Sample { temperature: 1.0, top_p: 1.0, seed: 0 };
    let zeros = (0..4000).filter(|_| choose(&logits, s, &mut rng) == 0).count();
    assert!((800..1200).contains(&zeros), "about a quarter: {zeros}");
    assert_eq!(choose(&[1.0, 5.0, 5.0, 2.0], Sampling::Greedy, &mut rng), 1, "first max on ties");
}
