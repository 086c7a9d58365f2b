#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: prove the binary really uses CUDA, and that the GPU gives
# the CPU's numbers on the embedded default model. Run after launch/demo.sh (or with a model
# folder as $1). A binary built elsewhere works too: point LD_LIBRARY_PATH at a torch 2.11 lib/.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${LONGMIX_BIN:-target/release/longmix}
model=${1:-.cache/models/smollm2-135m}
"$bin" env
"$bin" env --json | python3 -c '
import json, sys
e = json.load(sys.stdin)
assert e["cuda_available"], "CUDA is not available to longmix: libtorch_cuda.so was not linked or no driver"
assert all(g["bf16"] for g in e["gpus"]), "a bf16 matmul failed on the GPU"
print("CUDA in use:", ", ".join(g["name"] for g in e["gpus"]))'
cpu=$("$bin" score --model "$model" --text docs/sample.txt --device cpu --json)
gpu=$("$bin" score --model "$model" --text docs/sample.txt --device cuda --json)
python3 - "$cpu" "$gpu" <<'PY'
import json, sys
cpu, gpu = (json.loads(x) for x in sys.argv[1:3])
d = abs(cpu["mean_nll"] - gpu["mean_nll"])
print(f"mean NLL cpu {cpu['mean_nll']:.5f}  cuda {gpu['mean_nll']:.5f}  |diff| {d:.2e}")
assert d < 2e-3, "GPU and CPU disagree"
PY
