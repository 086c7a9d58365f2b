#!/usr/bin/env python3
"""The PyTorch + transformers side of `longmix bench`: the same shape, trained the way a
transformers user trains it, printed as the same JSON.

Random weights from the preset's (or model folder's) config.json, attn_implementation="sdpa",
f32 on CPU / bf16 on GPU (as --dtype says), gradient checkpointing on or off, loss from
`model(input_ids, labels=...)`, torch.optim.AdamW with its defaults for the device (the
single-tensor loop on CPU, foreach on CUDA; --fused for the fused kernel), the same threads.
Long rows only: packed rows need a per-document mask that sdpa in transformers does not build
from position ids. Installed by benches/setup-reference.sh.

    .venv/bin/python benches/reference.py --preset smollm2-135m --seq-len 2048 --device cpu
"""
import argparse, json, os, resource, statistics, sys, time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_rss_mb():
    """Peak resident memory since the last reset (Linux VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def train_flops(c, tokens, doc_len_sq):
    """longmix's ModelConfig::train_flops: 6 N per token for the matmul weights (LM head in,
    embedding lookup out) plus causal attention 6 * layers * heads * head_dim * sum(d^2)."""
    h, v = c.hidden_size, c.vocab_size
    hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * c.intermediate_size + 2 * h
    n = v * h + c.num_hidden_layers * layer + h + (0 if c.tie_word_embeddings else v * h)
    matmul = n - (0 if c.tie_word_embeddings else v * h)
    return n, 6 * matmul * tokens + 6 * c.num_hidden_layers * q * doc_len_sq


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset")
    src.add_argument("--model")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--checkpoint-layers", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--fused", action="store_true", help="torch.optim.AdamW(fused=True)")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--profile", help="Chrome trace of the last step (torch.profiler)")
    ap.add_argument("--json")
    a = ap.parse_args()

    threads = a.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if a.device.startswith("cuda") else "cpu")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    path = a.model or os.path.join(ROOT, "crates/model/presets", a.preset + ".json")
    config = AutoConfig.from_pretrained(path)
    # f32 master weights with bf16 compute, as longmix does: autocast over f32 parameters.
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    model.config.use_cache = False
    if a.checkpoint_layers:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            fused=True if a.fused else None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    records = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        prof = None
        if a.profile and i + 1 == a.warmup + a.steps:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            prof = torch.profiler.profile(activities=acts, record_shapes=True)
            prof.__enter__()
        t0 = time.perf_counter()
        ids = torch.randint(config.vocab_size, (a.rows, a.seq_len)).to(device)
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        t4 = time.perf_counter()
        records.append((t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        if prof is not None:
            prof.__exit__(None, None, None)
            prof.export_chrome_trace(a.profile)
        print(f"reference step {i + 1}/{a.warmup + a.steps}: {t4 - t0:.2f} s, loss {loss.item():.3f}",
              file=sys.stderr, flush=True)

    measured = records[a.warmup:]
    med = lambda k: statistics.median(r[k] for r in measured)
    step_s = med(0)
    tokens = a.rows * a.seq_len
    n, flops = train_flops(config, tokens, a.rows * a.seq_len ** 2)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = a.peak_tflops or next((p for k, p in KNOWN_PEAK_TFLOPS.items() if gpu and k in gpu), None)
    tflops = flops / step_s / 1e12
    report = {
        "tool": "reference",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": a.preset or a.model,
        "params": n,
        "seq_len": a.seq_len,
        "rows": a.rows,
        "dtype": a.dtype,
        "device": str(device),
        "gpu": gpu,
        "threads": threads,
        "checkpoint_layers": a.checkpoint_layers,
        "optimizer": "fused" if a.fused else "default",
        "steps": len(measured),
        "tokens_per_step": tokens,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "flops_per_step": flops,
        "tflops": tflops,
        "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
        # The forward includes the LM head and loss (transformers computes them in forward).
        "split_s": {"data": med(1), "forward": med(2), "backward": med(3), "optimizer": med(4)},
        "step_times_s": [r[0] for r in measured],
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None,
        "cuda_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 1e6 if device.type == "cuda" else None,
    }
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
