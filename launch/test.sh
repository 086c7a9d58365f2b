#!/usr/bin/env bash
# Set up (idempotent), check formatting and lints, and run the whole test suite on CPU.
# Everything builds once in the release profile, which the main binary shares; the embedded
# default model is imported once up front.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
# House style first: it fails in seconds where the build takes minutes.
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release -p longmix
model=.cache/models/smollm2-135m
if [ ! -f "$model/config.json" ]; then
  target/release/longmix import-gguf .cache/pkgs/SmolLM2-135M-Instruct.Q4_1.gguf --out "$model"
fi
cargo test --release --workspace "$@"
