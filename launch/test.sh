#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU. Everything builds once in the release
# profile, which the main binary shares; the embedded default model is imported once up front.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
cargo build --release -p longmix
model=.cache/models/smollm2-135m
if [ ! -f "$model/config.json" ]; then
  target/release/longmix import-gguf .cache/pkgs/SmolLM2-135M-Instruct.Q4_1.gguf --out "$model"
fi
cargo test --release --workspace "$@"
