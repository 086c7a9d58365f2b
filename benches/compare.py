#!/usr/bin/env python3
"""longmix vs PyTorch + transformers, shape by shape, in one invocation.

For every shape of the chosen set, runs `longmix bench` and `benches/reference.py` alternately
(--rounds times each, so machine noise hits both sides alike), takes each run's median step
time, then the median over rounds, and prints tokens/s of both, the ratio (longmix /
reference), MFU where the device's peak is known, and peak memory next to longmix's estimate.
Writes every run's JSON and the summary to --out. Needs benches/setup-reference.sh once.

    benches/compare.py --set cpu --out benches/results/cpu.json
    benches/compare.py --set gpu --out benches/results/h200.json
"""
import argparse, json, os, platform, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONGMIX = os.path.join(ROOT, "target/release/longmix")
# The reference's interpreter: $REFERENCE_PYTHON, else the project's .venv (benches/setup-reference.sh).
PYTHON = os.environ.get("REFERENCE_PYTHON") or os.path.join(ROOT, ".venv/bin/python")

# name, preset, seq_len, checkpoint_layers, dtype, device, extra longmix-only flags
SETS = {
    "cpu": [
        ("smollm2-135m 2048 f32", "smollm2-135m", 2048, False, "f32", "cpu", []),
        ("smollm2-135m 2048 f32 ckpt", "smollm2-135m", 2048, True, "f32", "cpu", []),
    ],
    "gpu": [
        ("llama3.2-1b 16k bf16 ckpt", "llama3.2-1b", 16384, True, "bf16", "cuda", []),
        ("llama3.2-1b 32k bf16 ckpt", "llama3.2-1b", 32768, True, "bf16", "cuda", []),
        ("llama3.2-1b 16k bf16", "llama3.2-1b", 16384, False, "bf16", "cuda", []),
    ],
}


def run(cmd):
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-4000:]}")
    out = p.stdout
    report = json.loads(out[out.index("{"):])
    report["wall_s"] = time.time() - t
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="cpu", choices=sorted(SETS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--only", help="run only shapes whose name contains this")
    ap.add_argument("--out")
    a = ap.parse_args()

    rows, runs = [], []
    for name, preset, seq, ckpt, dtype, device, extra in SETS[a.set]:
        if a.only and a.only not in name:
            continue
        common = ["--preset", preset, "--seq-len", str(seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
                  "--device", device, "--dtype", dtype] + (["--checkpoint-layers"] if ckpt else [])
        if a.threads:
            common += ["--threads", str(a.threads)]
        ours, ref = [], []
        for r in range(a.rounds):
            # Alternate which side goes first, so a drift in machine load does not favour one.
            order = [("longmix", [LONGMIX, "bench"] + common + extra), ("reference", [PYTHON, "benches/reference.py"] + common)]
            for side, cmd in (order if r % 2 == 0 else order[::-1]):
                print(f"[{name}] round {r + 1}/{a.rounds}: {side}", file=sys.stderr, flush=True)
                rep = run(cmd)
                rep["shape"] = name
                runs.append(rep)
                (ours if side == "longmix" else ref).append(rep)
        med = lambda reps, k: statistics.median(x[k] for x in reps)
        ours_s, ref_s = med(ours, "step_s"), med(ref, "step_s")
        tokens = ours[0]["tokens_per_step"]
        row = {
            "shape": name,
            "longmix_tokens_per_s": tokens / ours_s,
            "reference_tokens_per_s": tokens / ref_s,
            "ratio": ref_s / ours_s,
            "longmix_step_s": [x["step_s"] for x in ours],
            "reference_step_s": [x["step_s"] for x in ref],
            "longmix_mfu": None,
            "longmix_tflops": ours[0]["flops_per_step"] / ours_s / 1e12,
            "peak_tflops": ours[0]["peak_tflops"],
            "longmix_peak_mb": med(ours, "cuda_peak_allocated_mb" if device == "cuda" else "peak_rss_mb"),
            "reference_peak_mb": med(ref, "cuda_peak_allocated_mb" if device == "cuda" else "peak_rss_mb"),
            "longmix_estimate_mb": ours[0]["memory_estimate_mb"],
            "longmix_split_s": ours[-1]["split_s"],
            "reference_split_s": ref[-1]["split_s"],
        }
        if row["peak_tflops"]:
            row["longmix_mfu"] = row["longmix_tflops"] / row["peak_tflops"]
            row["reference_mfu"] = ours[0]["flops_per_step"] / ref_s / 1e12 / row["peak_tflops"]
        rows.append(row)

    print(f"\n{'shape':32} {'longmix tok/s':>14} {'reference':>10} {'ratio':>6} {'MFU':>6} "
          f"{'peak MB':>8} {'est. MB':>8} {'ref MB':>8}")
    for r in rows:
        mfu = f"{r['longmix_mfu'] * 100:5.1f}%" if r.get("longmix_mfu") else "     -"
        print(f"{r['shape']:32} {r['longmix_tokens_per_s']:14.1f} {r['reference_tokens_per_s']:10.1f} "
              f"{r['ratio']:5.2f}x {mfu} {r['longmix_peak_mb']:8.0f} {r['longmix_estimate_mb']:8.0f} "
              f"{r['reference_peak_mb']:8.0f}")
    if a.out:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()}
        summary = {"command": " ".join(["benches/compare.py"] + sys.argv[1:]), "machine": machine,
                   "date": time.strftime("%Y-%m-%d"), "shapes": rows, "runs": runs}
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
