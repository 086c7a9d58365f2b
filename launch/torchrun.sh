#!/usr/bin/env bash
# Data-parallel training under torchrun (the project's .venv has it):
#
#   one node, all its GPUs:   launch/torchrun.sh configs/llama3-8b-128k.toml
#   N GPUs of this node:      NPROC=4 launch/torchrun.sh CONFIG
#   several nodes (run on each node with the same MASTER_ADDR, NODE_RANK 0..NNODES-1):
#     NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 launch/torchrun.sh CONFIG
#
# `--resume auto` starts fresh or resumes the newest good checkpoint, so torchrun's
# --max-restarts (MAX_RESTARTS, default 3) restarts a failed run where it stopped.
# Extra arguments after the config go to `longmix train`.
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=${1:?usage: launch/torchrun.sh CONFIG [longmix train arguments...]}
shift
bin=${LONGMIX_BIN:-target/release/longmix}
torchrun=${TORCHRUN:-.venv/bin/torchrun}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
args=(--nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-3}" --no-python)
if [ "${NNODES:-1}" -gt 1 ]; then
  args+=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" \
         --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
else
  args+=(--master-port "${MASTER_PORT:-29500}")
fi
exec "$torchrun" "${args[@]}" "$bin" train --config "$cfg" --resume auto "$@"
