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

`--tiny FAMILY` (llama, mistral, phi3, qwen2, qwen3) makes the export itself: transformers writes
a tiny random checkpoint of that family (SmolLM2's tokenizer, L0 = 64), `longmix train` runs a
few steps of mixed short and long rows extending it to 256 tokens and exports it in float32, and
the check above runs on that export with a long window of 200 tokens:

    .venv/bin/python tests/hf_check_export.py --tiny qwen3 --tol 1e-4
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

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


TINY_L0, TINY_TARGET, TINY_LONG = 64, 256, 200


def tiny_config(family, vocab):
    """A tiny random checkpoint's transformers config: 2 layers, hidden 64, 4 heads / 2 KV heads."""
    import transformers as tf
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_L0,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "phi3":
        return tf.Phi3Config(**common, original_max_position_embeddings=TINY_L0, pad_token_id=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        # head_dim 24, unlike hidden / heads = 16
        return tf.Qwen3Config(**common, head_dim=24, use_sliding_window=False)
    sys.exit(f"FAIL: --tiny {family}: use llama, mistral, phi3, qwen2 or qwen3")


def make_tiny_export(family, bin_path, tmp):
    """Write a tiny random `family` checkpoint, train it with longmix past its window, export it."""
    from transformers import AutoModelForCausalLM
    tok_dir = os.path.join(ROOT, ".cache/models/smollm2-135m")
    vocab = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).get_vocab_size(True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab))
    with torch.no_grad():  # weights far from flat, so that logits differ wherever the math does
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    src = os.path.join(tmp, "model")
    model.save_pretrained(src, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        if os.path.exists(os.path.join(tok_dir, f)):
            shutil.copy(os.path.join(tok_dir, f), src)
    nt = os.path.join(ROOT, ".cache/pkgs/kjv-nt.jsonl")
    run = os.path.join(tmp, "run.toml")
    with open(run, "w") as f:
        f.write(f"""[model]
path = "{src}"
threads = 2
[rope]
target_length = {TINY_TARGET}
[data]
# verses: short documents (original RoPE); chapters: long ones (rescaled RoPE)
sources = [{{ type = "jsonl", path = "{nt}" }},
           {{ type = "jsonl", path = "{nt}", group_by = ["book", "chapter"], join = " " }}]
short_share = 0.5
eval_fraction = 0.01
cache_dir = "{tmp}/cache"
[train]
steps = 4
seq_len = {TINY_TARGET}
micro_batch_rows = 2
[optim]
lr = 1e-3
[schedule]
warmup_steps = 1
[checkpoint]
dir = "{tmp}/ckpt"
every = 4
[export]
dir = "{tmp}/export"
dtype = "f32"
[log]
no_progress = true
""")
    subprocess.run([bin_path, "train", "--config", run], check=True, stdout=subprocess.DEVNULL)
    steps = [json.loads(l) for l in open(os.path.join(tmp, "ckpt/metrics.jsonl")) if '"step"' in l]
    steps = [s for s in steps if s.get("event") == "step"]
    short = sum(s["rows_short"] for s in steps)
    long_ = sum(s["rows_long"] for s in steps)
    print(f"longmix trained a tiny {family} ({model.config.architectures[0]}) {len(steps)} steps, "
          f"{short} short and {long_} long rows, loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")
    if not (short and long_) or any(s["window_mismatches"] for s in steps):
        sys.exit("FAIL: the run did not train both windows")
    out = os.path.join(tmp, "export")
    exported = json.load(open(os.path.join(out, "config.json")))["architectures"]
    if exported != model.config.architectures:
        sys.exit(f"FAIL: the export names {exported}, the checkpoint {model.config.architectures}")
    return out


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--export")
    src.add_argument("--tiny", help="make the export: a tiny random checkpoint of this family, trained by longmix")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/longmix"))
    ap.add_argument("--text", default=os.path.join(ROOT, ".cache/pkgs/kjv-ot.jsonl"))
    ap.add_argument("--tol", type=float, default=2e-3)
    ap.add_argument("--short-len", type=int, help="short window in tokens, <= L0 (default L0/2)")
    ap.add_argument("--long-len", type=int, help="long window in tokens, in (L0, max_position_embeddings] "
                    "(default L0 + L0/32, capped at max_position_embeddings)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny:
            a.export = make_tiny_export(a.tiny, a.bin, tmp)
            a.long_len = a.long_len or TINY_LONG
        check(a)


def check(a):
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
    print(f"transformers loaded {a.export} as {type(model).__name__}: rope {model.config.rope_parameters.get('rope_type')}, "
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
