#!/usr/bin/env bash
# The README's first command: on a fresh CPU machine, start the local SeaweedFS, write a tiny
# random-weight Llama, compute a long prompt in one vLLM engine (its KV goes to S3 layer by
# layer), then run it again in a new engine that loads the prefix from S3, and compare with a
# run without any KV cache. Extra arguments go to examples/offline_vllm.py (e.g. --prompt-tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
# Idempotent: a no-op when .venv is up to date, a few minutes on a fresh machine.
bash scripts/setup.sh
PY=.venv/bin/python
export LMCACHE_TRACK_USAGE=false HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LMCACHE_DISABLE_BANNER=1
exec "$PY" examples/offline_vllm.py demo --local-s3 --baseline "$@"
