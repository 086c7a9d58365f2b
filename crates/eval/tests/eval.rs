//! The evaluation machinery on models whose outcome is forced: exact prompt lengths, the
//! passkey scorer, RULER's string_match_all, the length x depth grid, perplexity bookkeeping
//! (a model with zero weights predicts the uniform distribution: PPL = vocab size), and the
//! RoPE overrides.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::ProgressBar;
use longmix_eval::ppl::{perplexity, PplMode, PplOptions};
use longmix_eval::prompts::{niah_sample, passkey_sample, sample_rng, Haystack, NOISE};
use longmix_eval::{
    first_integer, string_match_all, GridOptions, LanguageModel, NeedleValue, RopeChoice, RopeOverride, StringChoice,
    TchLm, TextTokenizer,
};
use longmix_model::{
    batch_targets, load_model, CausalLm, FactorSet, FactorsFile, LongFactors, ModelConfig, RopeScaling, Window,
};
use tch::{nn, Device, Kind, Tensor};

/// One token per byte; with `special`, a BOS (id 256) first.
struct Bytes;

impl TextTokenizer for Bytes {
    fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let mut ids: Vec<i64> = if special { vec![256] } else { vec![] };
        ids.extend(text.bytes().map(|b| b as i64));
        Ok(ids)
    }
    fn decode(&self, ids: &[i64]) -> Result<String> {
        Ok(String::from_utf8_lossy(&ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect::<Vec<_>>())
            .into_owned())
    }
}

/// Reads the prompt and answers like a perfect model would, but only when the needle sits in
/// the first `reach` fraction of the prompt; otherwise answers `wrong`.
struct Oracle {
    reach: f64,
    wrong: &'static str,
    seen: Vec<usize>,
}

impl Oracle {
    fn answer(&self, prompt: &str) -> String {
        // Passkey: "The pass key is K."; NIAH: "... for KEY is: VALUE."
        let (marker, start) = if let Some(i) = prompt.find("The pass key is ") {
            ("The pass key is ", i)
        } else {
            let i = prompt.find(" is: ").expect("a needle");
            (" is: ", i)
        };
        let rest = &prompt[start + marker.len()..];
        let value = &rest[..rest.find(". ").or_else(|| rest.find(".\n")).or_else(|| rest.find('.')).unwrap()];
        if (start as f64) / (prompt.len() as f64) < self.reach {
            format!(" {value}. More text 123")
        } else {
            self.wrong.to_string()
        }
    }
}

impl LanguageModel for Oracle {
    fn generate(&mut self, prompts: &[Vec<i64>], max_new_tokens: usize) -> Result<Vec<Vec<i64>>> {
        prompts
            .iter()
            .map(|p| {
                self.seen.push(p.len());
                let text = Bytes.decode(p)?;
                let mut out = Bytes.encode(&self.answer(&text), false)?;
                out.truncate(max_new_tokens);
                Ok(out)
            })
            .collect()
    }
    fn nll(&mut self, _ids: &[i64], _first: usize) -> Result<(f64, usize)> {
        unimplemented!()
    }
}

fn grid(lengths: Vec<usize>, depths: Vec<f64>) -> GridOptions {
    GridOptions { lengths, depths, samples: 2, seed: 7, max_new_tokens: 64, batch_size: 2 }
}

#[test]
fn passkey_prompts_have_exact_lengths_and_depths() {
    let filler = Haystack::repeated(&Bytes, NOISE, " ", 3000, "noise").unwrap();
    for length in [300usize, 777, 2048] {
        let mut last = 0;
        for depth in [0.0, 0.3, 0.5, 1.0] {
            let s = passkey_sample(&Bytes, &filler, length, depth, 4242).unwrap();
            assert_eq!(s.prompt.len(), length);
            assert_eq!(s.prompt[0], 256, "BOS first");
            let text = Bytes.decode(&s.prompt).unwrap();
            assert!(text.starts_with("There is an important info hidden"));
            assert!(text.ends_with("\nWhat is the pass key? The pass key is"));
            assert_eq!(&text[s.needle_at - 1..s.needle_at - 1 + 22], "\nThe pass key is 4242.", "BOS is token 0");
            assert!(s.needle_at >= last, "needle moves back with depth");
            last = s.needle_at;
        }
    }
    // Depth 0: the key right after the instruction; depth 1: right before the question.
    let s0 = passkey_sample(&Bytes, &filler, 500, 0.0, 1).unwrap();
    assert!(Bytes.decode(&s0.prompt).unwrap().contains("there.\n\nThe pass key is 1."));
    let s1 = passkey_sample(&Bytes, &filler, 500, 1.0, 1).unwrap();
    assert!(Bytes.decode(&s1.prompt).unwrap().ends_with("1 is the pass key.\n\nWhat is the pass key? The pass key is"));
    assert!(passkey_sample(&Bytes, &filler, 100, 0.5, 1).is_err(), "too short for the fixed text");
}

#[test]
fn niah_prompts_follow_ruler_and_have_exact_lengths() {
    let text =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/sample.txt")).unwrap();
    for hay in [Haystack::noise(&Bytes).unwrap(), Haystack::text(&Bytes, &text, "sample", 10_000).unwrap()] {
        for value in [NeedleValue::Numbers, NeedleValue::Words, NeedleValue::Uuids] {
            for (length, depth) in [(1500usize, 0.0), (2500, 0.5), (3001, 1.0), (4000, 0.3)] {
                let mut rng = sample_rng(1, &[length as u64]);
                let s = niah_sample(&Bytes, &hay, value, length, depth, &mut rng).unwrap();
                assert_eq!(s.prompt.len(), length, "{} {value:?}", hay.name);
                let p = Bytes.decode(&s.prompt).unwrap();
                let v = &value.plural()[..value.plural().len() - 1];
                assert!(p.starts_with(&format!("A special magic {v} is hidden within the following text. Make sure to memorize it. I will quiz you about the {v} afterwards.\n")), "{p}");
                assert!(p.ends_with(&format!("\nWhat is the special magic {v} for {} mentioned in the provided text? The special magic {v} for {} mentioned in the provided text is", s.key, s.key)));
                let needle = format!("One of the special magic {} for {} is: {}.", value.plural(), s.key, s.value);
                assert_eq!(p.matches(&needle).count(), 1, "{p}");
                match value {
                    NeedleValue::Numbers => assert!(s.value.len() == 7 && s.value.parse::<u64>().is_ok()),
                    NeedleValue::Words => assert!(s.value.contains('-')),
                    NeedleValue::Uuids => assert_eq!(s.value.len(), 36),
                }
                // Depth is measured in the haystack, between the instruction and the question.
                let hay_start = p.find("afterwards.\n").unwrap() + "afterwards.\n".len();
                let hay_end = p.rfind("\nWhat is the special").unwrap();
                let at = (p.find(&needle).unwrap() - hay_start) as f64 / (hay_end - hay_start - needle.len()) as f64;
                assert!((at - depth).abs() < 0.1, "{}: needle at {at:.2} for depth {depth}", hay.name);
                assert_eq!(s.needle_at, 1 + p.find(&needle).unwrap() - hay.sep.len());
            }
        }
    }
}

#[test]
fn first_integer_and_string_match_all() {
    assert_eq!(first_integer(" 12345. Remember it."), Some(12345));
    assert_eq!(first_integer("the key is -42 or 7"), Some(42));
    assert_eq!(first_integer("no digits here"), None);
    assert_eq!(first_integer("a1b22"), Some(1));
    let refs = vec!["Alpha-Beta".to_string(), "1234567".to_string()];
    assert_eq!(string_match_all("... alpha-beta and 1234567", &refs), 1.0);
    assert_eq!(string_match_all("ALPHA-BETA only", &refs), 0.5);
    assert_eq!(string_match_all("nothing", &refs), 0.0);
}

#[test]
fn grid_scores_follow_the_forced_answers() {
    // The oracle finds needles in the first 60% of the prompt only.
    let opts = grid(vec![2000, 3000], vec![0.0, 0.25, 0.75, 1.0]);
    let mut lm = Oracle { reach: 0.6, wrong: " I do not know 99.", seen: vec![] };
    let r = longmix_eval::passkey(&mut lm, &Bytes, &opts, &ProgressBar::hidden()).unwrap();
    assert_eq!(r.scores, vec![vec![100.0, 100.0, 0.0, 0.0]; 2], "{}", r.table());
    assert_eq!(r.by_length, vec![50.0, 50.0]);
    assert_eq!(r.mean, 50.0);
    assert_eq!(r.samples.len(), 2 * 4 * 2);
    assert!(r.samples.iter().all(|s| s.prompt_tokens == s.length));
    assert_eq!(lm.seen.len(), 16);
    // Same seed, same prompts (keys); another seed, other keys.
    let again = longmix_eval::passkey(
        &mut Oracle { reach: 1.1, wrong: "", seen: vec![] },
        &Bytes,
        &opts,
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(again.mean, 100.0);
    let keys = |r: &longmix_eval::GridResult| r.samples.iter().map(|s| s.expected.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&r), keys(&again));
    let other = longmix_eval::passkey(
        &mut Oracle { reach: 1.1, wrong: "", seen: vec![] },
        &Bytes,
        &GridOptions { seed: 8, ..opts.clone() },
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_ne!(keys(&r), keys(&other));

    for value in [NeedleValue::Numbers, NeedleValue::Words, NeedleValue::Uuids] {
        let hay = Haystack::noise(&Bytes).unwrap();
        let mut lm = Oracle { reach: 0.6, wrong: " unknown.", seen: vec![] };
        let r = longmix_eval::niah(&mut lm, &Bytes, &hay, value, &opts, &ProgressBar::hidden()).unwrap();
        assert_eq!(r.scores, vec![vec![100.0, 100.0, 0.0, 0.0]; 2], "{value:?}\n{}", r.table());
        assert_eq!(r.metric, "string_match_all");
    }
}

/// A tiny LLaMA (vocab 300) with every weight zero: logits are all 0, every next-token
/// distribution is uniform, so the perplexity is exactly the vocabulary size.
fn zero_model() -> (nn::VarStore, CausalLm) {
    let cfg = ModelConfig::from_json_str(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":300,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":64,
            "tie_word_embeddings":true}"#,
    )
    .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = CausalLm::new(&vs.root(), cfg);
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let _ = v.zero_();
        }
    });
    (vs, model)
}

#[test]
fn perplexity_of_a_uniform_model_is_the_vocab_size() {
    let (_vs, model) = zero_model();
    let docs: Vec<Vec<i64>> = (0..3).map(|d| (0..150).map(|i| (i * 7 + d * 13) % 300).collect()).collect();
    for (mode, windows_per_doc) in [(PplMode::Truncate, 1usize), (PplMode::Sliding { stride: 40, max_windows: 10 }, 3)]
    {
        let mut lm = TchLm::new(&model, None);
        let opts = PplOptions { lengths: vec![32, 64], samples: 2, mode };
        let r = perplexity(&mut lm, &docs, &opts, &ProgressBar::hidden()).unwrap();
        for p in &r.points {
            assert!((p.ppl - 300.0).abs() < 1e-3, "{mode:?} L={}: {}", p.length, p.ppl);
            assert_eq!(p.documents, 2);
            if mode == PplMode::Truncate {
                assert_eq!(p.scored_tokens, 2 * (p.length - 1), "L-1 predictions per document");
            }
        }
        if let PplMode::Sliding { .. } = mode {
            // L = 64, stride 40 over 150 tokens: windows [0,64) [40,104) [80,144) [120,150) -> capped at... 4.
            let p = &r.points[1];
            assert_eq!(p.scored_tokens, 2 * 149, "each token after the first, once");
            assert!(p.windows >= 2 * windows_per_doc);
        }
    }
    // STRING on the same model: still uniform.
    let mut lm = TchLm::new(&model, Some(longmix_model::StringConfig::new(10, 2)));
    let r = perplexity(
        &mut lm,
        &docs,
        &PplOptions { lengths: vec![48], samples: 1, mode: PplMode::Truncate },
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert!((r.points[0].ppl - 300.0).abs() < 1e-3);
}

#[test]
fn chunked_scoring_equals_the_model_nll() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/phi3_longrope_partial");
    let lm = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    let ids: Vec<i64> = (0..40).map(|i| (i * 37 + 5) % 256).collect();
    let input = Tensor::from_slice(&ids).unsqueeze(0);
    let pos = Tensor::arange(40, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let targets = batch_targets(&input, &pos);
    let want = lm.model.nll(&input, &pos, &targets);
    let mut t = TchLm::new(&lm.model, None);
    let (got, m) = t.nll(&ids, 1).unwrap();
    assert_eq!(m as i64, want.tokens());
    assert!((got - want.sum()).abs() < 1e-3, "{got} vs {}", want.sum());
    // Scoring from a later token covers only the tail.
    let (_, tail) = t.nll(&ids, 30).unwrap();
    assert_eq!(tail, 10);
}

fn smollm_like() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":300,"hidden_size":576,"intermediate_size":64,
            "num_hidden_layers":1,"num_attention_heads":9,"num_key_value_heads":3,"max_position_embeddings":8192,
            "rope_theta":100000.0}"#,
    )
    .unwrap()
}

fn inv_freq(c: &ModelConfig, len: i64) -> Vec<f64> {
    Vec::<f64>::try_from(c.rope.inv_freq(len, Device::Cpu).to_kind(Kind::Double)).unwrap()
}

#[test]
fn overrides_change_the_rope_as_intended() {
    let base = smollm_like();
    let plain = inv_freq(&base, 1);
    let apply = |rope: RopeOverride, target: Option<i64>| {
        let mut c = base.clone();
        let a = RopeChoice { rope, target_length: target, string: None }.apply(&mut c).unwrap();
        (c, a)
    };
    // Own: untouched.
    let (c, a) = apply(RopeOverride::Own, None);
    assert_eq!(c.rope, base.rope);
    assert_eq!(a.label, "own");
    // PI: every frequency / 2.
    let (c, a) = apply(RopeOverride::Pi, Some(16384));
    assert_eq!(a.label, "pi x2");
    for (x, y) in inv_freq(&c, 16384).iter().zip(&plain) {
        assert!((x - y / 2.0).abs() < 1e-7 * y.max(1e-3));
    }
    // NTK: base * 2^(64/62): the first pair unchanged, the last one divided by 2.
    let (c, _) = apply(RopeOverride::Ntk, Some(16384));
    assert!((c.rope.theta - 1e5 * 2f64.powf(64.0 / 62.0)).abs() < 1e-6);
    let f = inv_freq(&c, 16384);
    assert!((f[0] - plain[0]).abs() < 1e-7);
    assert!((f[31] / plain[31] - 0.5).abs() < 1e-4, "{}", f[31] / plain[31]);
    // Dynamic: plain up to L0, NTK-grown beyond.
    let (c, _) = apply(RopeOverride::Dynamic, Some(16384));
    assert_eq!(inv_freq(&c, 8192), plain);
    assert!(inv_freq(&c, 16384)[31] < plain[31]);
    // YaRN: factor 2, attention factor 0.1 ln 2 + 1, high frequencies kept, low ones / 2.
    let (c, _) = apply(RopeOverride::Yarn, Some(16384));
    assert!(matches!(c.rope.scaling, RopeScaling::Yarn { factor, .. } if factor == 2.0));
    assert!((c.rope.attention_factor() - (0.1 * 2f64.ln() + 1.0)).abs() < 1e-12);
    let f = inv_freq(&c, 16384);
    assert!((f[0] - plain[0]).abs() < 1e-7 && (f[31] - plain[31] / 2.0).abs() < 1e-9);
    // LongRoPE (closed-form init): short window = plain RoPE, long window = init factors.
    let (c, _) = apply(RopeOverride::parse("longrope2").unwrap(), Some(16384));
    let long = FactorSet::Longrope2.factors(1e5, 64, 8192, 16384);
    assert_eq!(c.rope.window(8192), Window::Short);
    assert_eq!(inv_freq(&c, 8192), plain);
    for ((x, y), l) in inv_freq(&c, 8193).iter().zip(&plain).zip(&long) {
        assert!((x - y / l).abs() < 1e-6 * y, "{x} {y} {l}");
    }
    assert!((c.rope.attention_factor() - (1.0 + 2f64.ln() / 8192f64.ln()).sqrt()).abs() < 1e-12);
    assert_eq!(c.max_position_embeddings, 16384);
    // A factors file: the same numbers when it holds the same factors; checked against the model.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.json");
    FactorsFile {
        long_factor: long.clone(),
        short_factor: None,
        target_length: 16384,
        original_length: 8192,
        notes: serde_json::json!({}),
    }
    .write(&path)
    .unwrap();
    let (cf, a) = apply(RopeOverride::Extension(LongFactors::File(path.clone())), None);
    // (JSON keeps the numbers to the last bit or one ulp off.)
    for (x, y) in inv_freq(&cf, 16384).iter().zip(inv_freq(&c, 16384)) {
        assert!((x - y).abs() <= 1e-6 * y, "{x} {y}");
    }
    assert_eq!(cf.rope.attention_factor(), c.rope.attention_factor());
    assert_eq!(a.label, "factors(f.json)");
    FactorsFile {
        long_factor: long[..10].to_vec(),
        short_factor: None,
        target_length: 16384,
        original_length: 8192,
        notes: serde_json::json!({}),
    }
    .write(&path)
    .unwrap();
    let e = RopeChoice { rope: RopeOverride::Extension(LongFactors::File(path)), target_length: None, string: None }
        .apply(&mut base.clone())
        .unwrap_err();
    assert!(format!("{e:#}").contains("d_rot/2 = 32"), "{e:#}");
    // Missing or too short target lengths are errors that say what to do.
    let e = RopeChoice { rope: RopeOverride::Yarn, target_length: None, string: None }
        .apply(&mut base.clone())
        .unwrap_err();
    assert!(e.to_string().contains("--target-length"), "{e}");
    let e = RopeChoice { rope: RopeOverride::Pi, target_length: Some(4096), string: None }
        .apply(&mut base.clone())
        .unwrap_err();
    assert!(e.to_string().contains("must exceed"), "{e}");
    // STRING: defaults from max_position_embeddings, overrides honoured, combined with a RoPE override.
    let mut c = base.clone();
    let a = RopeChoice { rope: RopeOverride::Own, target_length: None, string: Some(StringChoice::default()) }
        .apply(&mut c)
        .unwrap();
    let s = a.string.unwrap();
    assert_eq!((s.shifted_offset, s.local_window), (2703, 128));
    assert_eq!(a.label, "own+string(S=2703,W=128)");
    let mut c = base.clone();
    let choice = StringChoice { shifted_offset: Some(100), local_window: Some(8), attention_factor: Some(1.0) };
    let a = RopeChoice { rope: RopeOverride::Yarn, target_length: Some(16384), string: Some(choice) }
        .apply(&mut c)
        .unwrap();
    let s = a.string.unwrap();
    assert_eq!((s.shifted_offset, s.local_window, s.attention_factor), (100, 8, 1.0));
    assert!(matches!(c.rope.scaling, RopeScaling::Yarn { .. }));
}
