#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: unit, real-S3 (SeaweedFS, started by the
# tests on 127.0.0.1), LMCache engine, faults, load and vLLM end-to-end. Extra arguments go to
# pytest, e.g. `scripts/test.sh -m engine`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LMCACHE_TRACK_USAGE=false HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -p no:cacheprovider -q -rs "$@"
