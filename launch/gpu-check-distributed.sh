#!/usr/bin/env bash
# On a machine with NVIDIA GPUs: the NCCL path of data parallelism.
#  1. c10d-selftest on NCCL, world size 1 (and across every GPU through torchrun when there are
#     several): all-reduce, broadcast, barrier and the store, checked value by value.
#  2. The same short training run on cuda:0 as one plain process and as world size 1 on NCCL
#     (bucketed all-reduce, team checkpoint): the step losses and gradient norms must agree
#     (within 1e-4 relative: CUDA's embedding backward sums with atomics).
# Needs launch/setup.sh's corpus and a model folder ($1, default the embedded SmolLM2). A binary
# built elsewhere works too: point LD_LIBRARY_PATH at a torch 2.11 lib/ folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${LONGMIX_BIN:-target/release/longmix}
selftest=${LONGMIX_SELFTEST:-target/release/c10d-selftest}
model=$(realpath "${1:-.cache/models/smollm2-135m}")
torchrun=${TORCHRUN:-$(command -v torchrun || echo .venv/bin/torchrun)}
export RUST_LOG=warn
# DEVICE=cpu STEPS=2 runs the same script on Gloo, as a dry check on a machine without a GPU.
device=${DEVICE:-cuda}
backend=$([ "$device" = cpu ] && echo gloo || echo nccl)

echo "== c10d selftest, $backend, world size 1"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 "$selftest" "$backend"
gpus=$([ "$device" = cpu ] && echo 0 || nvidia-smi -L | wc -l)
if [ "$gpus" -gt 1 ]; then
  echo "== c10d selftest, NCCL, world size $gpus"
  "$torchrun" --nproc-per-node "$gpus" --master-port 29612 --no-python "$selftest" nccl
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for name in plain nccl1; do
  cat >"$work/$name.toml" <<TOML
[model]
path = "$model"
device = "$device"
[rope]
target_length = 16384
original_length = 512
[data]
sources = [
  { type = "jsonl", path = "$PWD/.cache/pkgs/kjv-ot.jsonl", group_by = ["book"] },
  { type = "jsonl", path = "$PWD/.cache/pkgs/kjv-nt.jsonl", group_by = ["book", "chapter"] },
]
short_share = 0.5
cache_dir = "$work/cache"
[train]
steps = ${STEPS:-4}
seq_len = ${SEQ:-1024}
global_batch_rows = 2
checkpoint_layers = true
[optim]
lr = 1e-4
[checkpoint]
dir = "$work/$name"
[eval]
short_rows = 0
long_rows = 0
[log]
no_progress = true
TOML
done
echo "== training: one plain process on $device"
"$bin" train --config "$work/plain.toml"
echo "== training: world size 1 on $backend"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29613 "$bin" train --config "$work/nccl1.toml"
python3 - "$work/plain/metrics.jsonl" "$work/nccl1/metrics.jsonl" <<'PY'
import json, sys
a, b = ([m for m in map(json.loads, open(p)) if m["event"] == "step"] for p in sys.argv[1:3])
assert len(a) == len(b) > 0, (len(a), len(b))
for x, y in zip(a, b):
    for k in ("loss", "grad_norm"):
        d = abs(x[k] - y[k]) / max(abs(x[k]), 1e-12)
        print(f"step {x['step']} {k}: plain {x[k]:.6f}  process group {y[k]:.6f}  rel diff {d:.1e}")
        assert d < 1e-4, f"world size 1 on NCCL differs from one process at step {x['step']} ({k})"
print("world size 1 on the process group trains what one process trains")
PY
