//! `longmix eval` and `longmix generate` end to end: passkey on the real SmolLM2-135M inside
//! its window, every output file, RoPE overrides and STRING reaching the model, the longrope
//! switch during generation, and clear errors.

mod common;

use std::path::Path;

use serde_json::Value;

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 100).unwrap_or(false)
}

#[test]
fn passkey_on_smollm2_scores_high_within_its_window() {
    let model = common::smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("passkey.json");
    let t0 = std::time::Instant::now();
    let out = common::run_ok(&[
        "eval",
        "passkey",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--lengths",
        "512,1k",
        "--depths",
        "0,50",
        "--samples",
        "1",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    eprintln!("eval passkey 512/1024 x 2 depths: {:.1}s", t0.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("passkey (accuracy, %)") && stdout.contains("1024"), "{stdout}");
    let v = json(&out_path);
    assert_eq!(v["task"], "passkey");
    assert_eq!(v["rope"]["rope"], "own");
    let r = &v["result"];
    let samples = r["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 4);
    for s in samples {
        assert_eq!(s["prompt_tokens"], s["length"], "exact prompt lengths");
        eprintln!("L={} depth={} key={} -> {:?}", s["length"], s["depth"], s["expected"], s["prediction"]);
    }
    let mean = r["mean"].as_f64().unwrap();
    assert!(mean >= 75.0, "SmolLM2 should find the key within its 8k window: {mean}\n{stdout}");
    assert!(is_png(&tmp.path().join("passkey.png")), "heatmap next to the JSON");
    let again = tmp.path().join("again.png");
    common::run_ok(&["eval", "plot", out_path.to_str().unwrap(), "--out", again.to_str().unwrap()]);
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(tmp.path().join("passkey.png")).unwrap());
}

#[test]
fn generate_continues_and_batches_prompts() {
    let model = common::smollm2();
    let prompt = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is";
    let out = common::run_ok(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        prompt,
        "--prompt",
        "1, 2, 3, 4, 5,",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let outs = v["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 2);
    assert!(outs[0]["completion"].as_str().unwrap().starts_with(" Rome"), "{v}");
    assert!(outs[1]["completion"].as_str().unwrap().starts_with(" 6"), "{v}");
    // The KV cache gives what recomputation from scratch gives.
    let full = common::run_ok(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        prompt,
        "--prompt",
        "1, 2, 3, 4, 5,",
        "--max-new-tokens",
        "6",
        "--json",
        "--no-cache",
    ]);
    let w: Value = serde_json::from_slice(&full.stdout).unwrap();
    for r in 0..2 {
        assert_eq!(outs[r]["tokens"], w["outputs"][r]["tokens"]);
    }
}

/// Text of the sample file cut to about `tokens` tokens under the SmolLM2 tokenizer.
fn prompt_of(model: &Path, tokens: usize) -> String {
    let tok = longmix_model::load_tokenizer(model).unwrap();
    let words: Vec<&str> = std::fs::read_to_string(common::workspace().join("docs/sample.txt"))
        .unwrap()
        .leak()
        .split_whitespace()
        .collect();
    let mut n = 1;
    while tok.encode(words[..n].join(" "), true).unwrap().get_ids().len() < tokens {
        n += 1;
    }
    words[..n].join(" ")
}

#[test]
fn generation_re_prefills_when_a_longrope_row_crosses_l0() {
    // The tiny model's window is L0 = 64; under `--rope longrope --target-length 256` a
    // 60-token prompt crosses it after 5 new tokens.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_model(&model);
    let prompt = prompt_of(&model, 60);
    let run = |extra: &[&str]| -> Value {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--prompt",
            &prompt,
            "--prompt",
            "short",
            "--max-new-tokens",
            "10",
            "--ignore-eos",
            "--json",
            "--rope",
            "longrope",
            "--target-length",
            "256",
        ];
        args.extend_from_slice(extra);
        serde_json::from_slice(&common::run_ok(&args).stdout).unwrap()
    };
    let cached = run(&[]);
    let n = cached["outputs"][0]["prompt_tokens"].as_u64().unwrap();
    assert!((55..=64).contains(&n), "{n}");
    assert_eq!(cached["outputs"][0]["reprefills"], 1, "{cached}");
    assert_eq!(cached["outputs"][1]["reprefills"], 0, "the short row stays in the short window");
    let full = run(&["--no-cache"]);
    for r in 0..2 {
        assert_eq!(cached["outputs"][r]["tokens"], full["outputs"][r]["tokens"], "row {r}");
    }
}

#[test]
fn overrides_and_string_reach_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_model(&model);
    let text = common::workspace().join("docs/sample.txt");
    let ppl = |name: &str, extra: &[&str]| -> Value {
        let out = tmp.path().join(format!("{name}.json"));
        let mut args = vec![
            "eval",
            "ppl",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--text",
            text.to_str().unwrap(),
            "--lengths",
            "32,64,128",
            "--samples",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        common::run_ok(&args);
        assert!(is_png(&out.with_extension("png")), "{name}: line chart");
        json(&out)
    };
    let points = |v: &Value| -> Vec<f64> {
        v["result"]["points"].as_array().unwrap().iter().map(|p| p["ppl"].as_f64().unwrap()).collect()
    };
    let own = ppl("own", &[]);
    for p in own["result"]["points"].as_array().unwrap() {
        assert_eq!(p["scored_tokens"].as_u64().unwrap() + 1, p["length"].as_u64().unwrap(), "L-1 predictions");
    }
    let own_json = tmp.path().join("own.json");
    let yarn = ppl("yarn", &["--rope", "yarn", "--target-length", "256", "--compare", own_json.to_str().unwrap()]);
    assert!(yarn["rope"]["scaling"].as_str().unwrap().starts_with("Yarn { factor: 4.0"), "{}", yarn["rope"]);
    assert_eq!(yarn["label"], "yarn x4");
    assert_ne!(points(&own), points(&yarn));
    // STRING with S beyond every length and no extra temperature is plain RoPE ...
    let same = ppl(
        "string_noop",
        &["--string", "--string-offset", "500", "--string-window", "4", "--string-temperature", "1"],
    );
    for (a, b) in points(&own).iter().zip(points(&same)) {
        assert!((a - b).abs() <= 1e-4 * a, "{a} vs {b}");
    }
    // ... and with S = 20, shorter than every length, it changes them all.
    let string =
        ppl("string", &["--string", "--string-offset", "20", "--string-window", "4", "--string-temperature", "1"]);
    assert_eq!(string["rope"]["string"]["shifted_offset"], 20);
    assert!(points(&own).iter().zip(points(&string)).all(|(a, b)| (a - b).abs() > 1e-6));
    // A factors file (LongRoPE): the long window only bites beyond L0 = 64.
    let factors = tmp.path().join("factors.json");
    let long: Vec<f64> = (0..8).map(|i| 1.0 + i as f64 * 0.4).collect();
    std::fs::write(
        &factors,
        serde_json::json!({"long_factor": long, "target_length": 256, "original_length": 64}).to_string(),
    )
    .unwrap();
    let lr = ppl("factors", &["--factors", factors.to_str().unwrap()]);
    assert!(lr["rope"]["scaling"].as_str().unwrap().starts_with("LongRope"), "{}", lr["rope"]);
    assert!(lr["command"].as_str().unwrap().contains("--factors"));
    // Several runs redrawn in one chart.
    let files: Vec<String> = ["own", "yarn", "string", "factors"]
        .iter()
        .map(|n| tmp.path().join(format!("{n}.json")).display().to_string())
        .collect();
    let png = tmp.path().join("all.png");
    let mut args = vec!["eval", "plot", "--out", png.to_str().unwrap()];
    args.extend(files.iter().map(String::as_str));
    let out = common::run_ok(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("yarn x4") && stdout.contains("factors(factors.json)"), "{stdout}");
    assert!(is_png(&png));
}

#[test]
fn niah_prompts_have_exact_lengths() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_model(&model);
    for (values, haystack) in
        [("numbers", "noise".to_string()), ("uuids", common::workspace().join("docs/sample.txt").display().to_string())]
    {
        let out = tmp.path().join(format!("niah_{values}.json"));
        common::run_ok(&[
            "eval",
            "niah",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--values",
            values,
            "--haystack",
            &haystack,
            "--lengths",
            "150,200",
            "--depths",
            "0,100",
            "--samples",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            out.to_str().unwrap(),
        ]);
        let v = json(&out);
        let samples = v["result"]["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 8);
        for s in samples {
            assert_eq!(s["prompt_tokens"], s["length"]);
            let score = s["score"].as_f64().unwrap();
            assert!(score == 0.0 || score == 100.0);
        }
        assert_eq!(v["result"]["metric"], "string_match_all");
        assert!(is_png(&out.with_extension("png")));
    }
}

#[test]
fn eval_errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_model(&model);
    let run_err = |args: &[&str]| {
        let out = common::bin().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let m = model.to_str().unwrap();
    let e = run_err(&["eval", "passkey", "--model", m, "--device", "cpu", "--rope", "pi", "--lengths", "256"]);
    assert!(e.contains("--target-length"), "{e}");
    let e = run_err(&[
        "eval",
        "passkey",
        "--model",
        m,
        "--device",
        "cpu",
        "--rope",
        "ntk-by-parts",
        "--target-length",
        "256",
    ]);
    assert!(e.contains("use own, pi, ntk, dynamic, yarn, longrope2 or original"), "{e}");
    let e = run_err(&["eval", "passkey", "--model", m, "--device", "cpu", "--lengths", "16"]);
    assert!(e.contains("too short"), "{e}");
    let e = run_err(&[
        "eval",
        "ppl",
        "--model",
        m,
        "--device",
        "cpu",
        "--text",
        common::workspace().join("docs/sample.txt").to_str().unwrap(),
        "--lengths",
        "100k",
    ]);
    assert!(e.contains("no document of the corpus has 102400 tokens"), "{e}");
    let e = run_err(&[
        "eval",
        "niah",
        "--model",
        m,
        "--device",
        "cpu",
        "--string",
        "--string-offset",
        "10",
        "--string-window",
        "10",
        "--lengths",
        "200",
    ]);
    assert!(e.contains("local window W = 10 must be in [0, S)"), "{e}");
}
