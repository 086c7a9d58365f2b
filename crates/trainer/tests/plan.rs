//! `longmix train --dry-run` plans a run from the TOML and the model's config.json alone: the
//! LLaMA-3-8B 128k recipe for 1, 8 and 64 GPUs, from a folder holding only the 8B `config.json`,
//! on this CPU machine (whose config names `cuda`), in seconds and under 1 GB, printing the memory
//! figures docs/distributed.md shows.

mod common;

use std::time::{Duration, Instant};

#[test]
fn the_8b_recipe_plans_from_config_json_alone_and_prints_the_documented_memory() {
    let ws = common::workspace();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("model")).unwrap();
    std::fs::copy(ws.join("crates/model/presets/llama3-8b.json"), root.join("model/config.json")).unwrap();
    std::fs::write(root.join("corpus.jsonl"), "{\"text\": \"in the beginning\"}\n").unwrap();
    let text = std::fs::read_to_string(ws.join("configs/llama3-8b-128k.toml")).unwrap();
    let sources_at = text.find("sources = [").unwrap();
    let sources_end = sources_at + text[sources_at..].find("]\n").unwrap() + 2;
    let r = root.display();
    let text = format!(
        "{}sources = [{{ type = \"jsonl\", path = \"{r}/corpus.jsonl\" }}]\n{}",
        &text[..sources_at],
        &text[sources_end..]
    )
    .replace("/models/Meta-Llama-3-8B", &format!("{r}/model"))
    .replace("factors_file = \"runs/llama3-8b-128k-search/factors.json\"", "init = \"longrope2\"")
    .replace("/scratch/longmix-tokens", &format!("{r}/cache"))
    .replace("\"runs/llama3-8b-128k", &format!("\"{r}/runs"));
    let cfg = root.join("run.toml");
    std::fs::write(&cfg, text).unwrap();

    let doc = std::fs::read_to_string(ws.join("docs/distributed.md")).unwrap();
    let documented: Vec<&str> = doc.lines().filter(|l| l.starts_with("  memory (est.)")).collect();
    assert_eq!(documented.len(), 3, "docs/distributed.md should show the plan for 1, 8 and 64 GPUs");
    for (world, line) in ["1", "8", "64"].into_iter().zip(documented) {
        let t0 = Instant::now();
        let out = common::bin()
            .args(["train", "--config", cfg.to_str().unwrap(), "--dry-run", "--world-size", world])
            .output()
            .unwrap();
        let took = t0.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(took < Duration::from_secs(30), "the plan took {took:?}");
        assert!(stdout.contains(line), "{world} GPU(s): the plan\n{stdout}\ndoes not print the documented\n{line}");
        assert!(stdout.contains("not tokenized yet"), "{stdout}");
    }
    // The three plans, all in this process's children: the largest resident set of any.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let peak_mb = usage.ru_maxrss as f64 / 1024.0;
    eprintln!("dry run of the 8B recipe: peak resident memory {peak_mb:.0} MB");
    assert!(peak_mb < 1000.0, "the plan held {peak_mb:.0} MB");
    assert!(!root.join("runs").exists() && !root.join("cache").exists(), "a dry run writes nothing");
}
