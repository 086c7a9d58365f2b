#!/usr/bin/env python3
"""Load a longmix export with Hugging Face transformers and compare its logits with longmix's.

Scores one short window (inside the original window L0: short factors) and one long window
(past L0, at most max_position_embeddings: long factors) with `longmix score --save-logits` and
with transformers, and fails if any saved logit (32 spread positions per window, the last one
included) differs by more than --tol. Only the first window's worth of `--text` is handed to
longmix, so each length costs one forward pass per implementation, not a pass over the corpus.
Needs torch + transformers (not part of the test suite):

    .venv/bin/python -m pip install transformers==5.23.0 safetensors numpy
    .venv/bin/python tests/hf_check_export.py --export runs/demo/export
"""
import argparse, json, os, subprocess, sys, tempfile, time

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tokens kept past the window when cutting the text, so the cut cannot change the window's tokens.
MARGIN = 16


def text_prefix(tok, text, n_tokens):
    """The start of `text` up to the end of its token n_tokens + MARGIN, as longmix tokenizes it
    (tokenizer.json, special tokens on); the whole text if it is shorter than that."""
    want = n_tokens + MARGIN
    chars = 8 * want
    while True:
        piece = text[:chars]
        enc = tok.encode(piece, add_special_tokens=True)
        if len(enc.ids) > want:
            return piece[: enc.offsets[want - 1][1]]
        if chars >= len(text):
            return text
        chars *= 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/longmix"))
    ap.add_argument("--text", default=os.path.join(ROOT, ".cache/pkgs/kjv-ot.jsonl"))
    ap.add_argument("--tol", type=float, default=2e-3)
    ap.add_argument("--short-len", type=int, help="short window in tokens, <= L0 (default L0/2)")
    ap.add_argument("--long-len", type=int, help="long window in tokens, in (L0, max_position_embeddings] "
                    "(default L0 + L0/32, capped at max_position_embeddings)")
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.export, "config.json")))
    max_pos = cfg["max_position_embeddings"]
    l0 = cfg.get("original_max_position_embeddings", max_pos)
    if max_pos <= l0:
        sys.exit(f"FAIL: {a.export} has no extended window (max_position_embeddings {max_pos}, L0 {l0})")
    short = a.short_len or l0 // 2
    long_ = a.long_len or min(max_pos, l0 + max(1, l0 // 32))
    if not 2 <= short <= l0:
        sys.exit(f"FAIL: --short-len {short} must be in [2, L0 = {l0}]")
    if not l0 < long_ <= max_pos:
        sys.exit(f"FAIL: --long-len {long_} must be in (L0 = {l0}, max_position_embeddings = {max_pos}]")

    t0 = time.time()
    tok = Tokenizer.from_file(os.path.join(a.export, "tokenizer.json"))
    with open(a.text, encoding="utf-8", newline="") as f:
        text = f.read()
    model = AutoModelForCausalLM.from_pretrained(a.export, dtype=torch.float32, attn_implementation="sdpa").eval()
    print(f"transformers loaded {a.export}: rope {model.config.rope_parameters.get('rope_type')}, "
          f"window {l0} -> {max_pos}; checking windows of {short} and {long_} tokens")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, length, lo, hi in [("short", short, 2, l0), ("long", long_, l0 + 1, max_pos)]:
            t = time.time()
            piece = os.path.join(tmp, f"{name}.txt")
            with open(piece, "w", encoding="utf-8", newline="") as f:
                f.write(text_prefix(tok, text, length))
            out = os.path.join(tmp, f"{name}.safetensors")
            subprocess.run([a.bin, "score", "--model", a.export, "--text", piece, "--max-len", str(length),
                            "--device", "cpu", "--save-logits", out], check=True, stdout=subprocess.DEVNULL)
            ref = load_file(out)
            ids, positions = ref["input_ids"], ref["positions"]
            n = ids.shape[1]
            if not lo <= n <= hi:
                sys.exit(f"FAIL: the {name} window holds {n} tokens, outside [{lo}, {hi}] "
                         f"({a.text} is too short for a {length}-token window?)")
            with torch.no_grad():
                logits = model(input_ids=ids, logits_to_keep=positions).logits[0]
            err = (logits - ref["logits"]).abs().max().item()
            worst = max(worst, err)
            print(f"{name:5s} input of {n} tokens: max |logit difference| {err:.2e} "
                  f"(max |logit| {logits.abs().max().item():.1f}, {len(positions)} positions, {time.time() - t:.0f}s)")
    if worst > a.tol:
        sys.exit(f"FAIL: transformers and longmix disagree by {worst:.2e} > {a.tol}")
    print(f"OK: transformers reproduces longmix's logits on the short and the long path ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
