#!/usr/bin/env bash
# Idle time of data-parallel ranks on mixed short/long rows, with and without balancing, and
# the gradient reduction's wait with and without overlap: 2 ranks (Gloo, one thread each) on
# a random 8-layer LLaMA (hidden 64, SmolLM2's tokenizer) whose long rows (one 4096-token
# document) cost about 1.6x a row of packed short documents (<= 512 tokens).
#
#   benches/dp_balance.sh [steps]      (after launch/setup.sh and cargo build --release)
#
# Prints, per setting, the median over steps after the first of: the slowest rank's compute,
# the mean rank idle time (waiting for the slowest), the longest reduction wait, and the
# unhidden reduction (the wait of the rank that finished computing last); and writes
# benches/results/dp_balance.json.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-8}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python benches/random_llama.py "$work/model" --hidden 64 --intermediate 128 --layers 8 --heads 4 --kv-heads 2
run() {  # name balance overlap
  cat >"$work/$1.toml" <<TOML
[model]
path = "$work/model"
[rope]
target_length = 4096
[data]
sources = [
  { type = "jsonl", path = "$PWD/.cache/pkgs/kjv-ot.jsonl", group_by = ["book"] },
  { type = "jsonl", path = "$PWD/.cache/pkgs/kjv-nt.jsonl", group_by = ["book", "chapter"] },
]
short_share = 0.5
cache_dir = "$work/cache"
[train]
steps = $steps
seq_len = 4096
global_batch_rows = 4
checkpoint_layers = true
[optim]
lr = 1e-4
[checkpoint]
dir = "$work/$1"
[eval]
short_rows = 0
long_rows = 0
[log]
no_progress = true
[distributed]
balance = $2
overlap = $3
TOML
  OMP_NUM_THREADS=1 MASTER_PORT=$((29700 + RANDOM % 200)) LOGDIR="$work/$1-logs" RUST_LOG=warn \
    launch/multi.sh 2 train --config "$work/$1.toml" >/dev/null \
    || { tail -n 5 "$work/$1-logs"/rank-*.log >&2; exit 1; }
}
# Alternate the settings twice so drift on a shared machine hits both alike.
for round in 1 2; do
  for setting in "balanced true true" "round_robin false true" "no_overlap true false"; do
    set -- $setting
    echo "round $round: $1" >&2
    run "$1-$round" "$2" "$3"
  done
done
mkdir -p benches/results
.venv/bin/python - "$work" "$steps" <<'PY'
import json, statistics as st, sys, os, glob
work, steps = sys.argv[1], int(sys.argv[2])
res = {}
for name in ("balanced", "round_robin", "no_overlap"):
    rows = []
    for d in sorted(glob.glob(f"{work}/{name}-*/metrics.jsonl")):
        rows += [m for m in map(json.loads, open(d)) if m["event"] == "step" and m["step"] > 1]
    slow = st.median(max(m["rank_compute_s"]) for m in rows)
    idle = st.median(st.mean(m["rank_idle_s"]) for m in rows)
    wait = st.median(max(m["rank_wait_s"]) for m in rows)
    # The rank that finished its compute last waits only for communication still in flight:
    # the reduction the backward did not hide.
    unhidden = st.median(m["rank_wait_s"][max(range(len(m["rank_compute_s"])), key=lambda r: m["rank_compute_s"][r])] for m in rows)
    step = st.median(m["step_s"] for m in rows)
    res[name] = {"steps": len(rows), "step_s": step, "slowest_compute_s": slow, "mean_rank_idle_s": idle,
                 "reduction_wait_s": wait, "unhidden_reduction_s": unhidden, "idle_fraction": idle / slow}
for k, v in res.items():
    print(f"{k:12} step {v['step_s']:.2f} s  slowest rank compute {v['slowest_compute_s']:.2f} s  "
          f"mean rank idle {v['mean_rank_idle_s']:.2f} s ({100 * v['idle_fraction']:.1f}%)  reduction wait {v['reduction_wait_s']:.3f} s  "
          f"unhidden reduction {v['unhidden_reduction_s']:.3f} s")
b, r = res["balanced"], res["round_robin"]
print(f"balancing: step time x{r['step_s'] / b['step_s']:.2f} faster, idle {100*r['idle_fraction']:.1f}% -> {100*b['idle_fraction']:.1f}%")
res["command"] = f"benches/dp_balance.sh {steps}"
res["machine"] = f"{os.cpu_count()} cores"
json.dump(res, open("benches/results/dp_balance.json", "w"), indent=1)
PY
