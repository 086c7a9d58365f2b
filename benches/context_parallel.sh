#!/usr/bin/env bash
# Memory per rank and step time of context parallelism on one long row: cp 1, 2 and 4 ranks
# (Gloo, one thread each) split one row of SEQ_LEN tokens per step, every row one piece of a
# single document (the King James Old Testament read as one document), on a random LLaMA
# (hidden 256, 8 query / 4 KV heads, LAYERS layers, SmolLM2's tokenizer and vocabulary) with
# layer checkpointing and the LM head in chunks of LOSS_CHUNK tokens.
#
#   benches/context_parallel.sh [steps] [rounds]     (after launch/setup.sh and cargo build --release)
#   LONGMIX_BIN (default target/release/longmix), SEQ_LEN (8192), LAYERS (4), LOSS_CHUNK (256)
#
# One unmeasured step builds the tokenization cache first; then the settings alternate (cp1,
# cp2, cp4, cp1, ...) so drift on a shared machine hits all alike.
# A sampler reads every rank's resident memory (VmRSS) every 10 ms and notes when rank 0
# writes each metrics line (the held-out line of step 0 ends set-up). A rank's memory then
# (LibTorch, weights, float32 gradients and AdamW moments, all allocated at set-up, and the
# tokenizer) is the fixed part, and its peak (VmHWM, `rank_peak_rss_mb`) minus that is what
# the steps added: activations, the LM head's chunk, and what the C allocator keeps of freed
# working memory.
# Prints, per setting, medians over the steps after the first of every run, and writes
# benches/results/context_parallel.json.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-4}
rounds=${2:-2}
seq_len=${SEQ_LEN:-8192}
layers=${LAYERS:-4}
loss_chunk=${LOSS_CHUNK:-256}
export LONGMIX_BIN=${LONGMIX_BIN:-target/release/longmix}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp /proc/loadavg "$work/loadavg"  # the machine is shared: what else was running
.venv/bin/python benches/random_llama.py "$work/model" --hidden 256 --intermediate 768 --layers "$layers" --heads 8 --kv-heads 4
# Every rank's VmRSS every 10 ms, and when rank 0 wrote each line of the metrics (the held-out
# line of step 0 comes when set-up is done, right before the first step).
cat >"$work/sampler.py" <<'PY'
import json, os, sys, time
toml, cp, metrics, out, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
bin_name = os.path.basename(os.environ["LONGMIX_BIN"])
ranks, samples, lines, seen, last_scan = {}, {}, [], 0, 0.0
def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1]) / 1024
    raise OSError("no VmRSS: the process has exited")
def scan():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if os.path.basename(argv[0].decode()) != bin_name or toml.encode() not in argv:
                continue
            env = dict(e.split(b"=", 1) for e in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in e)
            ranks[int(pid)] = int(env.get(b"RANK", b"0"))
        except (OSError, ValueError):
            pass
while not os.path.exists(stop):
    now = time.monotonic()
    if len(ranks) < cp and now - last_scan > 0.2:
        scan(); last_scan = now
    for pid, r in list(ranks.items()):
        try:
            samples.setdefault(r, []).append((now, rss_mb(pid)))
        except (OSError, TypeError):
            pass
    try:
        if os.path.getsize(metrics) > seen:
            with open(metrics) as f:
                f.seek(seen); text = f.read()
            done = text[:text.rfind("\n") + 1]
            seen += len(done.encode())
            for l in done.splitlines():
                m = json.loads(l)
                lines.append((m["event"], m["step"], now))
    except OSError:
        pass
    time.sleep(0.01)
json.dump({"samples": {str(r): s for r, s in samples.items()}, "lines": lines}, open(out, "w"))
PY
run() {  # name cp steps
  cat >"$work/$1.toml" <<TOML
[model]
path = "$work/model"
[rope]
target_length = $seq_len
[data]
sources = [{ type = "jsonl", path = "$PWD/.cache/pkgs/kjv-ot.jsonl", group_by = [] }]
short_share = 0
eval_fraction = 0
cache_dir = "$work/cache"
[train]
steps = $3
seq_len = $seq_len
global_batch_rows = 1
checkpoint_layers = true
loss_chunk = $loss_chunk
[optim]
lr = 1e-4
[checkpoint]
dir = "$work/$1"
[eval]
short_rows = 0
long_rows = 0
[log]
no_progress = true
tensorboard = false
[distributed]
context_parallel = $2
TOML
  mkdir -p "$work/$1"
  rm -f "$work/stop"
  .venv/bin/python "$work/sampler.py" "$work/$1.toml" "$2" "$work/$1/metrics.jsonl" "$work/$1-rss.json" "$work/stop" &
  local sampler=$!
  OMP_NUM_THREADS=1 MASTER_PORT=$((29700 + RANDOM % 200)) LOGDIR="$work/$1-logs" RUST_LOG=warn \
    launch/multi.sh "$2" train --config "$work/$1.toml" >/dev/null \
    || { touch "$work/stop"; wait "$sampler"; tail -n 5 "$work/$1-logs"/rank-*.log >&2; exit 1; }
  touch "$work/stop"
  wait "$sampler"
}
# One unmeasured step first: it tokenizes the corpus into the shared cache, whose working
# memory the C allocator would otherwise keep in the first measured run.
echo "warm-up (tokenization cache)" >&2
run warmup 2 1
for cp in 1 2 4; do  # the plan's estimate of the same runs
  sed "s/^context_parallel = .*/context_parallel = $cp/" "$work/warmup.toml" >"$work/estimate-cp$cp.toml"
  "$LONGMIX_BIN" train --config "$work/estimate-cp$cp.toml" --dry-run --world-size "$cp" 2>&1 \
    | sed -n 's/^ *memory (est.) *//p' >"$work/estimate-cp$cp.txt"
done
for ((round = 1; round <= rounds; round++)); do
  for cp in 1 2 4; do
    echo "round $round: cp $cp" >&2
    run "cp$cp-$round" "$cp" "$steps"
  done
done
mkdir -p benches/results
.venv/bin/python - "$work" "$steps" "$rounds" "$seq_len" "$layers" "$loss_chunk" <<'PY'
import json, statistics as st, sys, os, glob
work, steps, rounds, seq_len, layers, loss_chunk = sys.argv[1], *map(int, sys.argv[2:])
res = {}
for cp in (1, 2, 4):
    rows, base, peak, added, low = [], [], [], [], []
    for d in sorted(glob.glob(f"{work}/cp{cp}-*/metrics.jsonl")):
        ms = [m for m in map(json.loads, open(d)) if m["event"] == "step"]
        rss = json.load(open(d.replace("/metrics.jsonl", "-rss.json")))
        t = {k: s for (e, k, s) in rss["lines"] if e == "step"}
        t[0] = next(s for (e, k, s) in rss["lines"] if e == "eval" and k == 0)
        before = [[v for (s, v) in rss["samples"][str(r)] if s <= t[0]][-1] for r in range(cp)]
        base.append(max(before))
        for m in ms[1:]:
            rows.append(m)
            peak.append(max(m["rank_peak_rss_mb"]))
            added.append(max(p - b for p, b in zip(m["rank_peak_rss_mb"], before)))
            # The lowest RSS of any rank during the step: the fixed part plus what the
            # allocator kept of the steps before.
            low.append(min(v for r in range(cp) for (s, v) in rss["samples"][str(r)] if t[m["step"] - 1] < s <= t[m["step"]]))
    res[f"cp{cp}"] = {
        "steps": len(rows),
        "step_s": st.median(m["step_s"] for m in rows),
        "step_s_each": [round(m["step_s"], 2) for m in rows],
        "compute_s": st.median(max(m["rank_compute_s"]) for m in rows),
        "all_to_all_s": st.median(m["all_to_all_s"] for m in rows),
        "peak_rss_mb": st.median(peak),
        "before_first_step_rss_mb": st.median(base),
        "added_by_steps_mb": st.median(added),
        "lowest_rss_during_steps_mb": st.median(low),
        "plan_estimate": open(f"{work}/estimate-cp{cp}.txt").read().strip(),
    }
ref = res["cp1"]
for k, v in res.items():
    v["added_vs_cp1"] = v["added_by_steps_mb"] / ref["added_by_steps_mb"]
    print(f"{k}: step {v['step_s']:.2f} s  compute {v['compute_s']:.2f} s  all-to-all {v['all_to_all_s']:.2f} s  "
          f"peak RSS {v['peak_rss_mb']:.0f} MB  before step 1 {v['before_first_step_rss_mb']:.0f} MB  "
          f"added {v['added_by_steps_mb']:.0f} MB (x{v['added_vs_cp1']:.2f} of cp 1)  lowest during steps {v['lowest_rss_during_steps_mb']:.0f} MB")
    print(f"     plan: {v['plan_estimate']}")
res["command"] = f"SEQ_LEN={seq_len} LAYERS={layers} LOSS_CHUNK={loss_chunk} benches/context_parallel.sh {steps} {rounds}"
res["machine"] = f"{os.cpu_count()} cores"
res["load_average_before"] = open(f"{work}/loadavg").read().split()[:3]
json.dump(res, open("benches/results/context_parallel.json", "w"), indent=1)
PY
