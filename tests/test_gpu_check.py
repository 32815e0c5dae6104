"""The device-independent parts of ``scripts/gpu_check.sh``, run on CPU.

``--device cpu --dry-run`` runs the same driver (model, paged cache, LMCache engines, S3
through the latency proxy, LocalCPU, bit-identity check) at tiny size with our
``CPULayerwiseConnector`` in the place of LMCache's CUDA connector. The numbers are
meaningless here; what is checked is that every scenario runs to the end and loads the
whole prefix bit-identically, and that the wrapper's wheel unpacking works.
"""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
PREFIX_TOKENS = 4 * 64  # TINY: 4 chunks of 64


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("GPU_CHECK_WHEELS", None)
    env.update({"LMCACHE_TRACK_USAGE": "false", "HF_HUB_OFFLINE": "1", "GPU_CHECK_TIMEOUT": "300"})
    env.update(extra)
    return env


def test_cpu_dry_run_loads_bit_identical_kv_in_every_scenario(s3_endpoint, bucket, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--dry-run", "--endpoint", s3_endpoint.endpoint_url,
         "--bucket", bucket, "--latency-ms", "0", "20", "--json", str(out)],
        cwd=REPO, env=_env(AWS_ACCESS_KEY_ID=s3_endpoint.access_key,
                           AWS_SECRET_ACCESS_KEY=s3_endpoint.secret_key,
                           GPU_CHECK_WHEELS=str(tmp_path / "no-wheels")),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert s3_endpoint.secret_key not in proc.stdout + proc.stderr
    rows = {r["scenario"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"recompute", "s3 +0 ms", "s3 +0 ms again", "s3 +20 ms", "s3 +20 ms again", "localcpu"}
    assert rows["recompute"]["loaded_tokens"] == 0
    for name, r in rows.items():
        if name == "recompute":
            continue
        assert r["loaded_tokens"] == PREFIX_TOKENS, name
        assert r["kv_identical"] is True, name
        assert r["ttft_ms"] > 0
    assert "KV identical" in proc.stdout  # the table was printed


def test_wrapper_unpacks_wheels_and_names_missing_modules(tmp_path):
    """A wheel dir is unpacked onto PYTHONPATH (scripts to bin/), and the preflight names a
    module it cannot import instead of failing somewhere later."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fakepkg-1.0-py3-none-any.whl", "w") as z:
        # Shadows a required module with one that fails to import: the preflight must say so.
        z.writestr("prometheus_client/__init__.py", "raise ImportError('fake wheel shadows it')\n")
        z.writestr("fakepkg-1.0.data/scripts/fake-tool", "#!/bin/sh\necho fake\n")
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--dry-run"], cwd=REPO,
                          env=_env(GPU_CHECK_WHEELS=str(wheels)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "unpacked 1 wheels" in proc.stdout
    assert "prometheus_client: ImportError: fake wheel shadows it" in proc.stderr
