//! `longmix train --dry-run` plans a run from the TOML and the model's config.json alone: the
//! 128k recipes of LLaMA-3-8B (8 GPUs without and with context parallelism, 64 GPUs) and
//! Phi-3-mini (8 GPUs), from folders holding only the models' `config.json`, on this CPU machine
//! (whose configs name `cuda`), in seconds and under 1 GB, printing the memory figures
//! docs/distributed.md shows; and the refusal of a context-parallel size the heads cannot take.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// `configs/<recipe>.toml` pointed at a folder holding only `preset`'s config.json, a one-line
/// corpus and paths under `root`, with `context_parallel` set to `cp` when given.
fn recipe(root: &Path, recipe: &str, preset: &str, model_path: &str, cp: Option<usize>) -> PathBuf {
    let ws = common::workspace();
    let model = root.join(preset);
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(ws.join(format!("crates/model/presets/{preset}.json")), model.join("config.json")).unwrap();
    std::fs::write(root.join("corpus.jsonl"), "{\"text\": \"in the beginning\"}\n").unwrap();
    let text = std::fs::read_to_string(ws.join(format!("configs/{recipe}.toml"))).unwrap();
    let sources_at = text.find("sources = [").unwrap();
    let sources_end = sources_at + text[sources_at..].find("]\n").unwrap() + 2;
    let r = root.display();
    let mut text = format!(
        "{}sources = [{{ type = \"jsonl\", path = \"{r}/corpus.jsonl\" }}]\n{}",
        &text[..sources_at],
        &text[sources_end..]
    )
    .replace(model_path, &model.display().to_string())
    .replace("/scratch/longmix-tokens", &format!("{r}/cache"))
    .replace("\"runs/", &format!("\"{r}/runs/"));
    if let Some(factors) = text.lines().find(|l| l.starts_with("factors_file")).map(str::to_string) {
        text = text.replace(&factors, "init = \"longrope2\"");
    }
    if let Some(cp) = cp {
        let line = text.lines().find(|l| l.starts_with("context_parallel")).unwrap().to_string();
        text = text.replace(&line, &format!("context_parallel = {cp}"));
    }
    let cfg = root.join(format!("{recipe}-{}.toml", cp.map_or("recipe".into(), |c| c.to_string())));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn dry_run(cfg: &Path, world: usize) -> Output {
    common::bin()
        .args(["train", "--config", cfg.to_str().unwrap(), "--dry-run", "--world-size", &world.to_string()])
        .output()
        .unwrap()
}

#[test]
fn the_128k_recipes_plan_from_config_json_alone_and_print_the_documented_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let llama = |cp| recipe(root, "llama3-8b-128k", "llama3-8b", "/models/Meta-Llama-3-8B", cp);
    let phi3 = recipe(root, "phi3-mini-128k", "phi3-mini-4k", "/models/Phi-3-mini-4k-instruct", None);
    // The order of docs/distributed.md: the 8B on 8 GPUs without context parallelism, then the
    // recipe on 8 and 64 GPUs, then Phi-3-mini's on 8.
    let plans = [(llama(Some(1)), 8), (llama(None), 8), (llama(None), 64), (phi3, 8)];

    let doc = std::fs::read_to_string(common::workspace().join("docs/distributed.md")).unwrap();
    let documented: Vec<&str> = doc.lines().filter(|l| l.starts_with("  memory (est.)")).collect();
    assert_eq!(documented.len(), plans.len(), "docs/distributed.md should show {} plans", plans.len());
    for ((cfg, world), line) in plans.iter().zip(documented) {
        let t0 = Instant::now();
        let out = dry_run(cfg, *world);
        let took = t0.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(took < Duration::from_secs(30), "the plan took {took:?}");
        assert!(stdout.contains(line), "{world} GPU(s): the plan\n{stdout}\ndoes not print the documented\n{line}");
        assert!(stdout.contains("not tokenized yet"), "{stdout}");
    }
    let recipe_8 = String::from_utf8_lossy(&dry_run(&plans[1].0, 8).stdout).into_owned();
    assert!(recipe_8.contains("8 = 1 data parallel x 8 context parallel"), "{recipe_8}");
    assert!(recipe_8.contains("16384 tokens of a 131072-token row and 4 query heads with 1 KV head(s)"), "{recipe_8}");
    // The plans, all in this process's children: the largest resident set of any.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let peak_mb = usage.ru_maxrss as f64 / 1024.0;
    eprintln!("dry runs of the 128k recipes: peak resident memory {peak_mb:.0} MB");
    assert!(peak_mb < 1000.0, "the plan held {peak_mb:.0} MB");
    assert!(!root.join("runs").exists() && !root.join("cache").exists(), "a dry run writes nothing");
}

/// Qwen2.5-7B's 28 query and 4 KV heads cannot be split 8 ways: the plan refuses with both
/// numbers and the sizes that work; a world the context-parallel size does not divide too.
#[test]
fn a_context_parallel_size_the_heads_or_the_world_cannot_take_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let qwen = recipe(tmp.path(), "qwen2.5-7b-128k", "qwen2.5-7b", "/models/Qwen2.5-7B", Some(8));
    let out = dry_run(&qwen, 8);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("context_parallel`: 8 does not split the model's 28 query heads and 4 KV heads")
            && err.contains("use one of [1, 2, 4, 28]"),
        "{err}"
    );
    let llama = recipe(tmp.path(), "llama3-8b-128k", "llama3-8b", "/models/Meta-Llama-3-8B", None);
    let err = String::from_utf8_lossy(&dry_run(&llama, 12).stderr).into_owned();
    assert!(err.contains("8 does not divide the 12 ranks") && err.contains("use one of [1, 2, 3, 4, 6, 12]"), "{err}");
}
