#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU: builds once in the release profile,
# which the main binary shares.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
cargo test --release --workspace "$@"
