//! Needle-driven perplexity and `longmix search` end to end: the samples with the real SmolLM2
//! tokenizer, the scoring against `CausalLm::nll`, and the search on a tiny random LLaMA
//! (L0 = 64 → L = 128) whose factors file the trainer accepts.

mod common;

use std::path::{Path, PathBuf};

use common::{run_ok, smollm2, tiny_model, workspace};
use longmix_model::{
    load_model, load_tokenizer, AttentionFactor, Extension, ExtensionSpec, FactorSet, FactorsFile, LongFactors,
    IGNORE_INDEX,
};
use longmix_search::needle::{build_samples, needle_ppl, Document, NeedleOptions, T1};
use tch::{Device, Kind, Tensor};

/// Sentences of docs/sample.txt, one per line, rotated by `i` and repeated to `lines` lines.
fn document_text(i: usize, lines: usize) -> String {
    let text = std::fs::read_to_string(workspace().join("docs/sample.txt")).unwrap();
    let sentences: Vec<String> =
        text.split_inclusive(['.', '?']).map(|s| s.trim().to_string()).filter(|s| s.len() > 3).collect();
    (0..lines).map(|k| sentences[(i * 3 + k) % sentences.len()].clone()).collect::<Vec<_>>().join("\n")
}

/// `tiny_model` with its query and key projections scaled up, so attention is sharp enough for
/// the RoPE frequencies to matter (random 0.02-std weights give nearly uniform attention).
fn sharp_tiny_model(dir: &Path) {
    tiny_model(dir);
    let lm = load_model(dir, Kind::Float, Device::Cpu).unwrap();
    let mut named: Vec<(String, Tensor)> = lm
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let t = if n.contains("q_proj") || n.contains("k_proj") { t * 8.0 } else { t };
            (n, t)
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let files = longmix_model::load::weight_files(dir).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    Tensor::write_safetensors(&named, &files[0]).unwrap();
}

/// A JSONL corpus of `n` long documents (one line per sentence).
fn long_corpus(path: &Path, n: usize, lines: usize) {
    let mut out = String::new();
    for i in 0..n {
        out += &serde_json::json!({ "text": document_text(i, lines) }).to_string();
        out += "\n";
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn needle_samples_are_exact() {
    let tok = load_tokenizer(&smollm2()).unwrap();
    let docs: Vec<Document> = (0..3)
        .map(|i| Document {
            id: format!("doc{i}"),
            tokens: tok.encode(document_text(i, 60), false).unwrap().get_ids().to_vec(),
        })
        .collect();
    let (l, n) = (512usize, 12usize);
    let opts = NeedleOptions { length: l, samples: n, documents: 3, seed: 7, bos: None };
    let samples = build_samples(&tok, &docs, &opts).unwrap();
    assert_eq!(samples.len(), n);
    let prefix = tok.encode(T1, false).unwrap().get_ids().len();
    let mut needles = std::collections::HashSet::new();
    for (k, s) in samples.iter().enumerate() {
        assert_eq!(s.input_ids.len(), l, "exactly L tokens");
        assert_eq!(s.targets.len(), l);
        let needle: u32 = s.needle.parse().unwrap();
        assert!((1_000_000..=9_999_999).contains(&needle), "a 7-digit needle");
        needles.insert(needle);
        let a = s.answer_len;
        let ids: Vec<u32> = s.input_ids.iter().map(|&t| t as u32).collect();
        // The answer tokens are the needle, at the very end, after t3's question.
        assert_eq!(tok.decode(&ids[l - a..], false).unwrap().trim(), s.needle);
        assert!(tok
            .decode(&ids[l - a - 20..], false)
            .unwrap()
            .ends_with(&format!("mentioned in the provided text is: {}", s.needle)));
        // Targets: -100 everywhere but the positions predicting the answer tokens.
        for t in 0..l {
            if t >= l - 1 - a && t < l - 1 {
                assert_eq!(s.targets[t], s.input_ids[t + 1], "position {t} predicts answer token {}", t + 1 - (l - a));
            } else {
                assert_eq!(s.targets[t], IGNORE_INDEX, "position {t} must not be scored");
            }
        }
        assert_eq!(s.targets.iter().filter(|&&t| t != IGNORE_INDEX).count(), a);
        // t1 first, then the document; the needle sentence where the sample says.
        assert!(tok.decode(&ids[..prefix], false).unwrap() == T1);
        let needle_text = tok.decode(&ids[s.needle_at..s.needle_at + 25], false).unwrap();
        assert!(
            needle_text.starts_with(&format!("One of the special magic numbers for wandering-age is: {}.\n", s.needle)),
            "{needle_text:?}"
        );
        // Depth k/(N-1), split snapped back to a line end (or the document start).
        assert!((s.depth - k as f64 / (n - 1) as f64).abs() < 1e-12);
        assert_eq!(s.document, k % 3);
        if s.needle_at > prefix {
            assert!(
                tok.decode(&ids[s.needle_at - 1..s.needle_at], false).unwrap().ends_with('\n'),
                "split at a line end"
            );
        }
    }
    assert_eq!(needles.len(), n, "needles differ");
    // Depths are spread: the needle moves from the start to the end of the context.
    assert_eq!(samples[0].needle_at, prefix);
    assert!(samples[n - 1].needle_at > l * 3 / 4 - 40, "deepest needle at {}", samples[n - 1].needle_at);
    let at: Vec<usize> = samples.iter().map(|s| s.needle_at).collect();
    assert!(at.windows(2).all(|w| w[1] >= w[0]), "needle positions rise with depth: {at:?}");
    // Deterministic for a seed; another seed gives other needles.
    assert_eq!(build_samples(&tok, &docs, &opts).unwrap(), samples);
    let other = build_samples(&tok, &docs, &NeedleOptions { seed: 8, ..opts.clone() }).unwrap();
    assert_ne!(other[0].needle, samples[0].needle);
    // With a BOS: still exactly L tokens, BOS first.
    let with_bos = build_samples(&tok, &docs, &NeedleOptions { bos: Some(1), ..opts.clone() }).unwrap();
    assert!(with_bos.iter().all(|s| s.input_ids.len() == l && s.input_ids[0] == 1));
    // Too short an L is refused.
    let e = build_samples(&tok, &docs, &NeedleOptions { length: 40, ..opts }).unwrap_err().to_string();
    assert!(e.contains("too short"), "{e}");
}

#[test]
fn needle_ppl_is_the_answer_tokens_nll_under_the_configured_factors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    sharp_tiny_model(&dir);
    let mut lm = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    let tok = load_tokenizer(&dir).unwrap();
    let docs: Vec<Document> = (0..2)
        .map(|i| Document {
            id: format!("{i}"),
            tokens: tok.encode(document_text(i, 20), false).unwrap().get_ids().to_vec(),
        })
        .collect();
    let samples =
        build_samples(&tok, &docs, &NeedleOptions { length: 128, samples: 5, documents: 2, seed: 0, bos: None })
            .unwrap();
    let spec = ExtensionSpec {
        target_length: Some(128),
        original_length: Some(64),
        long: LongFactors::Set(FactorSet::Pi),
        short: None,
        attention: AttentionFactor::None,
    };
    let pi = Extension::resolve(&spec, &lm.model.config.rope).unwrap();
    assert!(pi.short_factor.iter().all(|&x| x == 1.0), "plain RoPE's own short factors are 1");
    pi.apply(&mut lm.model.config);
    let score = needle_ppl(&lm.model, &samples, 2).unwrap();
    // The same number from full logits of the model's forward.
    let flat: Vec<i64> = samples.iter().flat_map(|s| s.input_ids.clone()).collect();
    let tgt: Vec<i64> = samples.iter().flat_map(|s| s.targets.clone()).collect();
    let ids = Tensor::from_slice(&flat).view([5, 128]);
    let targets = Tensor::from_slice(&tgt).view([5, 128]);
    let pos = Tensor::arange(128, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([5, 1]);
    let logp = tch::no_grad(|| lm.model.forward(&ids, &pos)).view([5 * 128, -1]).log_softmax(-1, Kind::Double);
    let flat_t = targets.view([-1]);
    let keep = flat_t.ne(IGNORE_INDEX);
    let count = keep.sum(Kind::Int64).int64_value(&[]);
    let sum =
        -logp.gather(1, &flat_t.clamp_min(0).unsqueeze(1), false).squeeze_dim(1).masked_select(&keep).sum(Kind::Double);
    let mean = sum.double_value(&[]) / count as f64;
    assert_eq!(count as usize, score.tokens);
    assert!((mean - score.mean_nll).abs() < 1e-4, "needle_ppl {} vs nll {mean}", score.mean_nll);
    assert!((score.ppl - score.mean_nll.exp()).abs() < 1e-9);
    // Batch size does not change it; the factors do (rows of 128 > L0 = 64 are long rows).
    let one = needle_ppl(&lm.model, &samples, 1).unwrap();
    assert!((one.mean_nll - score.mean_nll).abs() < 1e-5);
    pi.with_long(&vec![1.0; pi.long_factor.len()]).apply(&mut lm.model.config);
    let original = needle_ppl(&lm.model, &samples, 2).unwrap();
    assert!(
        (original.mean_nll - score.mean_nll).abs() > 1e-4,
        "PI and original RoPE must score differently: {} vs {}",
        original.mean_nll,
        score.mean_nll
    );
}

struct SearchRun {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl SearchRun {
    fn new() -> SearchRun {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        sharp_tiny_model(&root.join("model"));
        long_corpus(&root.join("docs.jsonl"), 3, 30);
        let cfg = format!(
            r#"
[model]
path = "{root}/model"
device = "cpu"
threads = 1
[rope]
target_length = 128
[needle]
sources = [{{ type = "jsonl", path = "{root}/docs.jsonl" }}]
cache_dir = "{root}/cache"
samples = 4
documents = 2
batch_size = 2
[search]
population = 8
parents = 4
mutations = 3
crossovers = 3
iterations = 6
seed = 1
[output]
factors = "{root}/factors.json"
state_dir = "{root}/state"
"#,
            root = root.display()
        );
        std::fs::write(root.join("search.toml"), cfg).unwrap();
        SearchRun { _tmp: tmp, root }
    }

    fn config(&self) -> String {
        self.root.join("search.toml").display().to_string()
    }

    fn search(&self, extra: &[&str]) -> String {
        let cfg = self.config();
        let mut args = vec!["search", "--config", &cfg, "--no-progress"];
        args.extend_from_slice(extra);
        String::from_utf8(run_ok(&args).stdout).unwrap()
    }

    fn jsonl(&self, name: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.root.join("state").join(name))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

#[test]
fn search_improves_resumes_exactly_and_feeds_the_trainer() {
    let run = SearchRun::new();
    let out = run.search(&[]);
    assert!(out.contains("longrope2 search, critical dim 2") && out.contains("wrote"), "{out}");
    let factors = FactorsFile::read(&run.root.join("factors.json")).unwrap();
    assert_eq!((factors.target_length, factors.original_length, factors.long_factor.len()), (128, 64, 8));
    let f = &factors.long_factor;
    // LongRoPE2 shape: NTK from λ_cd below cd = 2, searched values in [2, 4] from it on.
    assert!((f[1] - f[2].powf(0.5)).abs() < 1e-12 && f[0] == 1.0);
    assert!(f.windows(2).all(|w| w[1] > w[0]) && f[2] >= 2.0 && f[7] <= 4.0);
    let notes = &factors.notes;
    assert_eq!(notes["method"], "longrope2");
    assert_eq!(notes["iteration"], 6);
    assert_eq!(notes["critical_dim"], 2);

    // The factors reach the model: the first population's fitness values differ ...
    let cache = run.jsonl("cache.jsonl");
    let first: Vec<f64> = cache[1..9].iter().map(|v| v["fitness"].as_str().unwrap().parse().unwrap()).collect();
    let distinct: std::collections::BTreeSet<u64> = first.iter().map(|x| x.to_bits()).collect();
    assert!(distinct.len() >= 6, "fitness does not depend on the factors: {first:?}");
    // ... and the search lowers them: the final parents' mean is below the first population's
    // mean, and the best never gets worse.
    let log = run.jsonl("search.jsonl");
    assert_eq!(log.len(), 7);
    let (m0, m6) = (log[0]["mean_fitness"].as_f64().unwrap(), log[6]["mean_fitness"].as_f64().unwrap());
    assert!(m6 < m0, "parents' mean {m6} is not below the first population's mean {m0}");
    let best = notes["fitness"].as_f64().unwrap();
    let trace: Vec<f64> = log.iter().map(|v| v["best_fitness"].as_f64().unwrap()).collect();
    assert!(trace.windows(2).all(|w| w[1] <= w[0]), "the best never gets worse: {trace:?}");
    assert!(
        best < notes["initial_best_fitness"].as_f64().unwrap(),
        "no improvement on the first population's best: {trace:?}"
    );
    assert!(best.is_finite() && best > 1.0);

    // Stopped after one iteration and started again: the same file, byte for byte.
    let split = SearchRun::new();
    let out = split.search(&["--stop-after", "1"]);
    assert!(out.contains("stopped after iteration 1"), "{out}");
    assert!(!split.root.join("factors.json").exists());
    let out = split.search(&[]);
    assert!(out.contains("resumed after iteration 1"), "{out}");
    let a = std::fs::read_to_string(run.root.join("factors.json")).unwrap();
    let b = std::fs::read_to_string(split.root.join("factors.json"))
        .unwrap()
        .replace(&split.root.display().to_string(), &run.root.display().to_string());
    assert_eq!(a, b);

    // The trainer takes the file as `[rope] factors_file`.
    let train = format!(
        r#"
[model]
path = "{root}/model"
[rope]
target_length = 128
factors_file = "{root}/factors.json"
[data]
sources = [{{ type = "jsonl", path = "{root}/docs.jsonl" }}]
cache_dir = "{root}/cache"
short_share = 0.0
[train]
steps = 1
seq_len = 128
[checkpoint]
dir = "{root}/ckpt"
"#,
        root = run.root.display()
    );
    std::fs::write(run.root.join("train.toml"), train).unwrap();
    let cfg = run.root.join("train.toml").display().to_string();
    let out = String::from_utf8(run_ok(&["train", "--config", &cfg, "--dry-run"]).stdout).unwrap();
    assert!(out.contains("configuration is valid") && out.contains(&format!("{:.3}", f[7])), "{out}");
}

#[test]
fn search_config_errors_name_the_key() {
    let run = SearchRun::new();
    let cfg = run.config();
    let good = std::fs::read_to_string(&cfg).unwrap();
    let cases = [
        (
            good.replace("seed = 1", "seed = 1\ncritical_dim = 8"),
            &["search.critical_dim", "between 1 and d_rot/2 - 1 = 7"][..],
        ),
        (
            good.replace("target_length = 128", "target_length = 64"),
            &["rope.target_length", "must exceed the original window L0 = 64"],
        ),
        (good.replace("seed = 1", "seed = 1\nlength_scale = 1.5"), &["search.length_scale", "must exceed s"]),
        (good.replace("seed = 1", "seed = 1\nstart_tokens = 4"), &["search.start_tokens", "not supported"]),
        (good.replace("docs.jsonl", "missing.jsonl"), &["missing.jsonl", "does not exist"]),
        (
            good.replace("target_length = 128", "target_length = 4096"),
            &["no document has the", "smaller target length"],
        ),
        (good.replace("device = \"cpu\"", "device = \"tpu\""), &["model.device", "tpu"]),
        (good.replace("parents = 4", "parents = 40"), &["search.parents", "between 2 and search.population = 8"]),
    ];
    for (text, needles) in cases {
        std::fs::write(&cfg, &text).unwrap();
        let o = common::bin().args(["search", "--config", &cfg, "--no-progress"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "expected a failure for\n{text}");
        for n in needles {
            assert!(err.contains(n), "error lacks {n:?}:\n{err}");
        }
    }
}

#[test]
fn needle_ppl_command_compares_factor_sets() {
    let run = SearchRun::new();
    let model = run.root.join("model").display().to_string();
    let docs = run.root.join("docs.jsonl").display().to_string();
    let cache = run.root.join("cache").display().to_string();
    let out = run_ok(&[
        "needle-ppl",
        "--model",
        &model,
        "--target-length",
        "128",
        "--jsonl",
        &docs,
        "--cache-dir",
        &cache,
        "--samples",
        "3",
        "--device",
        "cpu",
        "--factors",
        "original,pi,ntk,yarn,longrope2",
        "--json",
    ]);
    let rows: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 5);
    let ppl: Vec<f64> = rows.iter().map(|r| r["needle_ppl"].as_f64().unwrap()).collect();
    assert!(ppl.iter().all(|p| p.is_finite() && *p > 1.0));
    assert!(ppl.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-6), "factor sets must differ: {ppl:?}");
    assert!(
        (rows[3]["attention_factor"].as_f64().unwrap() - (0.1 * 2f64.ln() + 1.0)).abs() < 1e-12,
        "yarn's own factor"
    );
    assert!((rows[4]["attention_factor"].as_f64().unwrap() - (1.0 + 2f64.ln() / 64f64.ln()).sqrt()).abs() < 1e-12);
    assert_eq!(rows[1]["answer_tokens"], 21, "3 samples x 7 digits");
}

#[test]
fn longrope_v1_search_runs_from_its_init() {
    let run = SearchRun::new();
    let cfg = run.config();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("iterations = 6", "iterations = 2\nmode = \"longrope\"\ninit = \"ntk\"");
    std::fs::write(&cfg, text).unwrap();
    let out = run.search(&[]);
    assert!(out.contains("longrope search:"), "{out}");
    let f = FactorsFile::read(&run.root.join("factors.json")).unwrap();
    assert_eq!(f.notes["method"], "longrope");
    assert!(f.notes["critical_dim"].is_null());
    let l = &f.long_factor;
    assert!(l.windows(2).all(|w| w[1] >= w[0]) && l[0] >= 1.0 && l[7] <= 3.0, "{l:?}");
    // The first individual is NTK on the grid: λ_i = 2^(2i/14), rounded to 0.01.
    let log = run.jsonl("cache.jsonl");
    let first: Vec<i64> = serde_json::from_value(log[1]["genes"].clone()).unwrap();
    let ntk: Vec<i64> = (0..8).map(|i| (2f64.powf(2.0 * i as f64 / 14.0) * 100.0).round() as i64).collect();
    assert_eq!(first, ntk);
}
