"""A random LLaMA checkpoint with SmolLM2's tokenizer and vocabulary, for the multi-rank benches.

    .venv/bin/python benches/random_llama.py OUT --hidden H --intermediate I --layers L --heads N --kv-heads K

Writes OUT/config.json, OUT/model.safetensors (float32, norms 1, the rest N(0, 0.05^2) from a
seeded generator, so a rerun writes the same weights) and OUT/tokenizer.json (copied from the
embedded SmolLM2 that launch/setup.sh imports).
"""
import argparse
import json
import os
import shutil
import struct
import sys

import torch

p = argparse.ArgumentParser()
p.add_argument("out")
for name in ("hidden", "intermediate", "layers", "heads", "kv-heads"):
    p.add_argument(f"--{name}", type=int, required=True)
a = p.parse_args()
h, i, L = a.hidden, a.intermediate, a.layers
kv = h // a.heads * a.kv_heads
os.makedirs(a.out)
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
       "hidden_size": h, "intermediate_size": i, "num_hidden_layers": L, "num_attention_heads": a.heads,
       "num_key_value_heads": a.kv_heads, "max_position_embeddings": 512, "rope_theta": 10000.0,
       "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
       "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
json.dump(cfg, open(f"{a.out}/config.json", "w"))
g = torch.Generator().manual_seed(0)
shapes = {"model.embed_tokens.weight": (49152, h), "model.norm.weight": (h,)}
for l in range(L):
    q = f"model.layers.{l}."
    shapes.update({q + "self_attn.q_proj.weight": (h, h), q + "self_attn.k_proj.weight": (kv, h),
                   q + "self_attn.v_proj.weight": (kv, h), q + "self_attn.o_proj.weight": (h, h),
                   q + "mlp.gate_proj.weight": (i, h), q + "mlp.up_proj.weight": (i, h),
                   q + "mlp.down_proj.weight": (h, i), q + "input_layernorm.weight": (h,),
                   q + "post_attention_layernorm.weight": (h,)})
tensors = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.05) for k, s in shapes.items()}
header, blobs, off = {}, [], 0
for k, t in tensors.items():
    b = t.contiguous().numpy().astype("<f4").tobytes()
    header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
hb = json.dumps(header).encode()
hb += b" " * (-len(hb) % 8)
with open(f"{a.out}/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(hb)))
    f.write(hb)
    for b in blobs:
        f.write(b)
shutil.copy(".cache/models/smollm2-135m/tokenizer.json", a.out)
print(f"model: {sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters", file=sys.stderr)
