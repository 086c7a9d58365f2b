#!/usr/bin/env bash
# The reference side of the benchmarks: PyTorch + transformers in the project's .venv, next to
# the very torch build longmix links (launch/setup.sh installs it), so both sides run the same
# LibTorch kernels. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
TRANSFORMERS_VERSION=5.23.0
launch/setup.sh
if ! .venv/bin/python -c "import transformers, sys; sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" 2>/dev/null; then
  echo "== installing transformers==$TRANSFORMERS_VERSION into .venv (the benchmark reference)"
  .venv/bin/python -m pip install -q --disable-pip-version-check "transformers==$TRANSFORMERS_VERSION" numpy
fi
.venv/bin/python -c "import torch, transformers; print('reference: torch', torch.__version__, 'transformers', transformers.__version__)"
