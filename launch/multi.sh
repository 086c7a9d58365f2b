#!/usr/bin/env bash
# Start N ranks of a longmix command on this machine without torchrun: every rank gets
# torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
# MASTER_PORT); rank 0 hosts the rendezvous store. Each rank's output goes to
# <logdir>/rank-R.log (rank 0 also to the terminal). When one rank fails, the others are
# stopped and the script exits with that rank's status.
#
#   launch/multi.sh 2 train --config configs/demo.toml --resume auto
#   NPROC via $1; MASTER_PORT (default 29500), LOGDIR (default runs/logs), LONGMIX_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: launch/multi.sh N <longmix arguments...>}
shift
bin=${LONGMIX_BIN:-target/release/longmix}
logdir=${LOGDIR:-runs/logs}
mkdir -p "$logdir"
export WORLD_SIZE=$n LOCAL_WORLD_SIZE=$n MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
# Share the cores instead of every rank spinning on all of them.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))}
pids=()
for ((r = 0; r < n; r++)); do
  if [ "$r" = 0 ]; then
    # A subshell, so that its status is the rank's, not tee's.
    ( RANK=$r LOCAL_RANK=$r "$bin" "$@" 2>&1 | tee "$logdir/rank-$r.log"; exit "${PIPESTATUS[0]}" ) &
  else
    RANK=$r LOCAL_RANK=$r "$bin" "$@" >"$logdir/rank-$r.log" 2>&1 &
  fi
  pids+=($!)
done
stop_all() {
  for p in "${pids[@]}"; do
    pkill -TERM -P "$p" 2>/dev/null || true
    kill -TERM "$p" 2>/dev/null || true
  done
}
trap 'stop_all' INT TERM
status=0
left=("${pids[@]}")
while [ "${#left[@]}" -gt 0 ]; do
  finished=
  set +e
  wait -n -p finished "${left[@]}"
  rc=$?
  set -e
  [ -n "$finished" ] || break
  rest=()
  for p in "${left[@]}"; do [ "$p" = "$finished" ] || rest+=("$p"); done
  left=("${rest[@]}")
  if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
    status=$rc
    echo "a rank exited with status $rc; stopping the others (logs in $logdir)" >&2
    stop_all
  fi
done
exit "$status"
