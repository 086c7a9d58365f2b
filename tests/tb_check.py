#!/usr/bin/env python3
"""Open a run's TensorBoard event files with TensorBoard's own reader and compare them with
its metrics.jsonl: every number of every line, under the tag longmix gives it, once per step.

    .venv/bin/python tests/tb_check.py RUN_DIR      # the run's [checkpoint] dir
    .venv/bin/python tests/tb_check.py --tiny [--keep DIR]

`--tiny` makes the run itself: transformers writes a tiny random LLaMA (SmolLM2's tokenizer,
L0 = 64), `longmix train` runs it, is killed with SIGKILL past a checkpoint, and is resumed
twice (`--resume`, then `--resume` of an older checkpoint), so the event files have been cut
back and restarted. Needs `tensorboard` (`pip install tensorboard`) and, for --tiny,
`transformers`. Exits non-zero on any difference.
"""
import argparse, glob, json, os, shutil, signal, subprocess, sys, tempfile, time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected(metrics_path):
    """{tag: [(step, float32 value)]} of every number in metrics.jsonl, as longmix tags it."""
    out = {}
    for line in open(metrics_path):
        v = json.loads(line)
        step = v["step"]
        for key, x in v.items():
            if key in ("event", "step") or x is None or isinstance(x, (str, bool)):
                continue
            if v["event"] == "eval":
                tag = "eval/" + key.removeprefix("heldout_")
            elif isinstance(x, list):
                for rank, y in enumerate(x):
                    out.setdefault(f"rank/{key.removeprefix('rank_')}/{rank}", []).append((step, np.float32(y)))
                continue
            elif key.endswith("_mb"):
                tag = "memory/" + key
            else:
                tag = "train/" + key
            out.setdefault(tag, []).append((step, np.float32(x)))
    return out


def read_tensorboard(tb_dir):
    """{tag: [(step, float32 value)]} as TensorBoard's EventAccumulator reads the folder. Data is
    not purged when a step goes backwards, so a duplicate step would show here."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(tb_dir, size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False)
    acc.Reload()
    return {t: [(s.step, np.float32(s.value)) for s in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def check(run_dir):
    metrics = os.path.join(run_dir, "metrics.jsonl")
    tb_dir = os.path.join(run_dir, "tensorboard")
    files = sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")))
    want, got = expected(metrics), read_tensorboard(tb_dir)
    bad = [t for t in sorted(set(want) | set(got)) if want.get(t) != got.get(t)]
    for t in bad[:10]:
        print(f"  {t}: metrics.jsonl {want.get(t)}\n  {' ' * len(t)}  tensorboard   {got.get(t)}")
    # A step twice where metrics.jsonl has it once (metrics.jsonl itself holds two evaluations
    # of the last step when the eval interval divides the step count: one periodic, one final).
    count = lambda pts: {s: [q for q, _ in pts].count(s) for s, _ in pts}
    dups = [t for t, pts in got.items() if any(n > count(want.get(t, [])).get(s, 0) for s, n in count(pts).items())]
    steps = sorted({s for s, _ in got.get("train/loss", [])})
    n = sum(len(p) for p in got.values())
    print(f"{len(files)} event file(s), {len(got)} tags, {n} scalars; train/loss at steps "
          f"{steps[0]}..{steps[-1]} ({len(steps)} steps); eval/long at {[s for s, _ in got.get('eval/long', [])]}")
    for t in ["train/loss", "train/loss_short", "train/loss_long", "train/lr", "train/grad_norm",
              "train/tokens_per_s", "memory/peak_rss_mb", "eval/short", "eval/long"]:
        if t not in got:
            bad.append(t)
            print(f"  missing tag {t}")
    if dups:
        print(f"  a step appears twice in {dups[:5]}")
    if bad or dups:
        sys.exit(f"FAIL: {len(bad)} tag(s) differ from metrics.jsonl, {len(dups)} hold a step twice")
    print("OK: TensorBoard's reader sees exactly the numbers of metrics.jsonl, no step more often than there")


def tiny_model(dst):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tokenizers import Tokenizer
    tok_dir = os.path.join(ROOT, ".cache/models/smollm2-135m")
    vocab = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).get_vocab_size(True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(dst, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        if os.path.exists(os.path.join(tok_dir, f)):
            shutil.copy(os.path.join(tok_dir, f), dst)


def tiny_run(bin_path, tmp):
    """Train a tiny model 30 steps: killed past step 10's checkpoint, resumed, then redone from 20."""
    tiny_model(os.path.join(tmp, "model"))
    nt = os.path.join(ROOT, ".cache/pkgs/kjv-nt.jsonl")
    run = os.path.join(tmp, "run.toml")
    with open(run, "w") as f:
        f.write(f"""[model]
path = "{tmp}/model"
threads = 2
[rope]
target_length = 256
[data]
sources = [{{ type = "jsonl", path = "{nt}" }},
           {{ type = "jsonl", path = "{nt}", group_by = ["book", "chapter"], join = " " }}]
short_share = 0.5
eval_fraction = 0.01
cache_dir = "{tmp}/cache"
[train]
steps = 30
seq_len = 256
micro_batch_rows = 2
[optim]
lr = 1e-3
[schedule]
warmup_steps = 3
[checkpoint]
dir = "{tmp}/ckpt"
every = 10
keep = 3
[eval]
every = 5
[log]
no_progress = true
""")
    cmd = [bin_path, "train", "--config", run]
    metrics = os.path.join(tmp, "ckpt/metrics.jsonl")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    while p.poll() is None and not (os.path.exists(metrics) and '"step":13,' in open(metrics).read()):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    print("killed after step 13 was logged (last checkpoint: step 10)")
    subprocess.run(cmd + ["--resume"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(cmd + ["--resume", os.path.join(tmp, "ckpt/step-00000020")], check=True, stdout=subprocess.DEVNULL)
    print("resumed to the end, then again from step 20")
    return os.path.join(tmp, "ckpt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--tiny", action="store_true", help="make the run: a tiny random LLaMA, killed and resumed")
    ap.add_argument("--keep", help="with --tiny: make the run in this folder and keep it")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/longmix"))
    a = ap.parse_args()
    if a.tiny:
        tmp = a.keep or tempfile.mkdtemp()
        os.makedirs(tmp, exist_ok=True)
        try:
            check(tiny_run(a.bin, tmp))
        finally:
            if not a.keep:
                shutil.rmtree(tmp)
    elif a.run_dir:
        check(a.run_dir)
    else:
        ap.error("pass a run's folder (its [checkpoint] dir) or --tiny")


if __name__ == "__main__":
    main()
