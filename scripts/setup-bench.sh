#!/usr/bin/env bash
# Optional: a virtual environment with PyTorch (CPU use) for the PyTorch column of
# `cargo run --release --example kernels_bench`. Not needed by the product or its tests.
# PyTorch comes from PyPI (the only index reachable here); the Linux wheel pulls CUDA runtime
# wheels too (about 3 GB in all), which it needs even to import on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench
TORCH_VERSION=${DATAFREE_TORCH_VERSION:-2.15.0}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "torch $TORCH_VERSION already in $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'in $VENV')"
