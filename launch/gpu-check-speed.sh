#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one call: the training kernels' numerics, then the speed
# and memory benchmarks of the GPU shapes against PyTorch + transformers.
#
#  1. kernel-check: CUDA in use; varlen flash attention over packed rows equals per-document
#     attention within bf16 tolerance (outputs and gradients, GQA, sliding window); the
#     checkpointed + chunked-head path's gradients equal the plain path's (f32 and bf16); the
#     allocator statistics see a 1 GB tensor and reset.
#  2. benches/compare.py --set gpu: LLaMA-3.2-1B shape, bf16, 16k and 32k rows, vs the reference.
#  3. The longest trainable row (checkpointing + chunked loss) for the 1B and Phi-3-mini shapes,
#     and packed short rows mixed with long rows vs long rows alone.
#
# A binary built elsewhere works: copy target/release/{longmix,kernel-check} and point
# LD_LIBRARY_PATH at a torch 2.11 lib/ (LONGMIX_BIN_DIR names the folder holding them).
# QUICK=1 runs step 1 only. Results go to $OUT (default benches/results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${LONGMIX_BIN_DIR:-target/release}
out=${OUT:-benches/results/gpu}
mkdir -p "$out"
"$bin/longmix" env
"$bin/kernel-check" cuda | tee "$out/kernel-check.txt"
[ "${QUICK:-0}" = 1 ] && exit 0

bench() { "$bin/longmix" bench --device cuda --dtype bf16 --steps 3 --warmup 1 "$@"; }
summary() { python3 benches/bench_summary.py; }

# Packed short rows (4k documents) mixed with long rows vs long rows alone, 1B at 16k, 4 rows.
for share in 0 0.5; do
  bench --preset llama3.2-1b --seq-len 16384 --rows 4 --packed-share $share --doc-len 4096 --checkpoint-layers \
    --json "$out/mix-$share.json" >/dev/null
  summary <"$out/mix-$share.json"
done

# Longest single row that trains (doubling until out of memory).
for preset in llama3.2-1b phi3-mini-4k; do
  len=16384
  while [ $len -le 262144 ]; do
    if "$bin/longmix" bench --preset $preset --device cuda --dtype bf16 --steps 1 --warmup 1 --seq-len $len \
        --checkpoint-layers --json "$out/longest-$preset-$len.json" >/dev/null 2>"$out/longest-$preset-$len.err"; then
      summary <"$out/longest-$preset-$len.json"
      len=$((len * 2))
    else
      echo "$preset: $len tokens does not fit ($(grep -o 'out of memory' "$out/longest-$preset-$len.err" | head -1))"
      break
    fi
  done
done

# Against PyTorch + transformers: the machine's python if it has both, else the project's .venv
# (benches/setup-reference.sh installs it).
if python3 -c 'import torch, transformers' 2>/dev/null; then
  export REFERENCE_PYTHON=${REFERENCE_PYTHON:-python3}
else
  benches/setup-reference.sh >/dev/null
fi
python3 benches/compare.py --set gpu --rounds 2 --steps 3 --out "$out/compare.json"
