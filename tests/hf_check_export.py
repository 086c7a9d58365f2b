#!/usr/bin/env python3
"""Load a longmix export with Hugging Face transformers and compare its logits with longmix's.

Runs a short input (inside the original window L0, short factors) and a long one (past L0,
long factors) through `longmix score --save-logits` and through transformers, and fails if any
logit differs by more than --tol. Needs torch + transformers (not part of the test suite):

    .venv/bin/python -m pip install transformers==5.23.0 safetensors numpy
    .venv/bin/python tests/hf_check_export.py --export runs/demo/export
"""
import argparse, json, os, subprocess, sys, tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/longmix"))
    ap.add_argument("--text", default=os.path.join(ROOT, ".cache/pkgs/kjv-ot.jsonl"))
    ap.add_argument("--tol", type=float, default=2e-3)
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.export, "config.json")))
    l0 = cfg["original_max_position_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(a.export, dtype=torch.float32, attn_implementation="sdpa").eval()
    print(f"transformers loaded {a.export}: rope {model.config.rope_parameters.get('rope_type')}, "
          f"window {l0} -> {cfg['max_position_embeddings']}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, length in [("short", l0 // 2), ("long", l0 + l0 // 16)]:
            out = os.path.join(tmp, f"{name}.safetensors")
            subprocess.run([a.bin, "score", "--model", a.export, "--text", a.text, "--max-len", str(length),
                            "--device", "cpu", "--save-logits", out], check=True, stdout=subprocess.DEVNULL)
            ref = load_file(out)
            ids = ref["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, ref["positions"]]
            err = (logits - ref["logits"]).abs().max().item()
            worst = max(worst, err)
            print(f"{name:5s} input of {ids.shape[1]} tokens: max |logit difference| {err:.2e} "
                  f"(max |logit| {logits.abs().max().item():.1f})")
    if worst > a.tol:
        sys.exit(f"FAIL: transformers and longmix disagree by {worst:.2e} > {a.tol}")
    print("OK: transformers reproduces longmix's logits on the short and the long path")


if __name__ == "__main__":
    main()
