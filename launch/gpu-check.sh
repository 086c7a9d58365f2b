#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one call: everything CUDA in longmix that CPU tests cannot
# reach, each step failing the script when it fails.
#
#  1. `longmix env`: the binary really uses CUDA, and bf16 works.
#  2. kernel-check: varlen flash attention over packed rows equals per-document attention
#     (outputs, gradients, GQA, sliding window); the checkpointed + chunked-head path equals the
#     plain one (f32, bf16); context parallelism over a one-rank NCCL group (the all-to-alls and
#     their backward on the GPU) equals the plain step (f32, bf16); one cu_seqlens copy per
#     forward; the allocator statistics; SDPA picks flash (or cuDNN), not the math kernel, for
#     long bf16 rows.
#  3. c10d-selftest on NCCL: collectives, the context-parallel all-to-all and its backward, the
#     store, a bound device and an orderly shutdown (no "destroy_process_group() was not called"
#     warning).
#  4. Training on the GPU with the defaults (dtype auto = bf16, chunked LM head, float32
#     gradient accumulation over 4 micro-batches): one plain process and world size 1 on NCCL
#     give the same losses, both exit cleanly; float32 on long rows is refused with its fix.
#  5. One benchmark step of the LLaMA-3.2-1B shape at 16k tokens: tokens/s, MFU, peak memory next
#     to the plan's estimate.
#  6. The memory of an LLaMA-3-8B-shaped step at 16k tokens (one rank's share of a 128k row at
#     context parallel 8; 4 of its 32 layers, so that weights and AdamW fit one GPU) next to the
#     sizing model's estimate for it (docs/distributed.md).
#
# Usage: launch/gpu-check.sh [MODEL_DIR]   (default: the embedded SmolLM2 of launch/setup.sh)
# A binary built elsewhere works too: LONGMIX_BIN_DIR names the folder holding longmix,
# kernel-check and c10d-selftest; point LD_LIBRARY_PATH at a torch 2.11 lib/. Results: $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${LONGMIX_BIN_DIR:-target/release}
model=$(realpath "${1:-.cache/models/smollm2-135m}")
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RUST_LOG=${RUST_LOG:-warn}
step() { printf '\n== %s\n' "$*"; }

step "1. CUDA in use"
"$bin/longmix" env --json | python3 -c '
import json, sys
e = json.load(sys.stdin)
assert e["cuda_available"], "CUDA is not available to longmix: libtorch_cuda.so was not linked or no driver"
assert all(g["bf16"] for g in e["gpus"]), "a bf16 matmul failed on the GPU"
print("CUDA in use:", ", ".join(g["name"] for g in e["gpus"]))'

step "2. kernels"
"$bin/kernel-check" cuda | tee "$out/kernel-check.txt"

step "3. NCCL collectives and shutdown"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 \
  "$bin/c10d-selftest" nccl 2>"$work/selftest.err" | tee "$out/selftest.txt"
if grep -q "destroy_process_group" "$work/selftest.err"; then
  cat "$work/selftest.err"; echo "the NCCL group was not shut down in order"; exit 1
fi

step "4. training on the GPU"
python3 - "$work/corpus.jsonl" <<'PY'
import json, sys
words = open("docs/sample.txt").read().split()
with open(sys.argv[1], "w") as f:
    for i in range(400):
        n = 60 + (i * 379) % 5000
        f.write(json.dumps({"text": " ".join(words[(i * 13 + j * 7) % len(words)] for j in range(n))}) + "\n")
PY
config() {  # name seq_len [extra lines for [model]]
  cat >"$work/$1.toml" <<TOML
[model]
path = "$model"
device = "cuda"
${3:-}
[rope]
target_length = 16384
original_length = 2048
[data]
sources = [{ type = "jsonl", path = "$work/corpus.jsonl" }]
short_share = 0.5
cache_dir = "$work/cache"
[train]
steps = 3
seq_len = $2
global_batch_rows = 4
micro_batch_rows = 1
checkpoint_layers = true
[optim]
lr = 1e-4
[checkpoint]
dir = "$work/$1"
[eval]
short_rows = 1
long_rows = 0
[log]
no_progress = true
TOML
}
config plain 4096
config nccl1 4096
"$bin/longmix" train --config "$work/plain.toml" 2>&1 | tee "$out/train-plain.txt"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29613 \
  "$bin/longmix" train --config "$work/nccl1.toml" 2>&1 | tee "$out/train-nccl1.txt"
if grep -q "destroy_process_group" "$out/train-nccl1.txt"; then
  echo "the trainer's NCCL group was not shut down in order"; exit 1
fi
python3 - "$work/plain/metrics.jsonl" "$work/nccl1/metrics.jsonl" <<'PY'
import json, sys
a, b = ([m for m in map(json.loads, open(p)) if m["event"] == "step"] for p in sys.argv[1:3])
assert len(a) == len(b) == 3, (len(a), len(b))
for x, y in zip(a, b):
    assert x["rows_short"] > 0 and x["rows_long"] > 0, "every step should mix short and long rows"
    for k in ("loss", "grad_norm"):
        d = abs(x[k] - y[k]) / max(abs(x[k]), 1e-12)
        print(f"step {x['step']} {k}: plain {x[k]:.6f}  NCCL world 1 {y[k]:.6f}  rel diff {d:.1e}")
        assert d < 1e-2, f"world size 1 on NCCL differs from one process at step {x['step']} ({k})"
    print(f"step {x['step']}: peak GPU memory {x.get('cuda_peak_allocated_mb')} MB")
print("bf16 training on the GPU: one process and NCCL world size 1 agree")
PY
config f32long 8192 'dtype = "f32"'
if "$bin/longmix" train --config "$work/f32long.toml" --dry-run >"$work/f32.txt" 2>&1; then
  cat "$work/f32.txt"; echo "float32 on 8192-token CUDA rows should be refused"; exit 1
fi
grep -o "f32 on CUDA with train.seq_len = 8192[^;]*" "$work/f32.txt"

step "5. one benchmark: LLaMA-3.2-1B shape, 16k tokens, bf16, layer checkpointing"
"$bin/longmix" bench --preset llama3.2-1b --device cuda --dtype bf16 --seq-len 16384 --checkpoint-layers \
  --steps 2 --warmup 1 --json "$out/bench-1b-16k.json" >/dev/null
python3 benches/bench_summary.py "$out/bench-1b-16k.json"

step "6. memory: LLaMA-3-8B shape (4 layers), 16k tokens = one rank's share of 128k at cp 8"
"$bin/longmix" bench --preset llama3-8b --layers 4 --device cuda --dtype bf16 --seq-len 16384 --checkpoint-layers \
  --loss-chunk 2048 --steps 1 --warmup 1 --json "$out/bench-8b-shape-16k.json" >/dev/null
python3 benches/bench_summary.py "$out/bench-8b-shape-16k.json"

echo
echo "gpu-check: all CUDA checks passed"
