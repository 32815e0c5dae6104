"""The two quick benchmarks run end to end as a user runs them (subprocesses, own SeaweedFS)
and print one well-formed JSON object. Only schema and sanity are asserted: the timing goals
are reported by the benchmarks themselves, never asserted on a shared CI machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def _weed_or_skip() -> None:
    from lmcache_s3layer.testing.server import LocalS3ServerError, find_weed_binary

    try:
        find_weed_binary()
    except (LocalS3ServerError, FileNotFoundError) as exc:
        pytest.skip(f"no SeaweedFS binary: {exc}")


def _run_json(script: str, *args: str) -> dict:
    _weed_or_skip()
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, f"stdout must be exactly one JSON line, got: {proc.stdout[-2000:]}"
    return json.loads(lines[0])


@pytest.mark.slow  # a timed throughput run (~8 s)
def test_s3_throughput_quick_json():
    out = _run_json("s3_throughput.py", "--quick", "--json")
    assert out["raw_mib_s"] > 0 and out["ours_mib_s"] > 0
    assert out["ratio"] == pytest.approx(out["ours_mib_s"] / out["raw_mib_s"], abs=0.002)
    assert out["verified"] is True
    assert out["bytes"] == out["layers"] * out["layer_bytes"] > 0
    assert len(out["raw_mib_s_rounds"]) == len(out["ours_mib_s_rounds"]) == out["rounds"]
    # awscrt is optional, but then the output says why
    assert out.get("crt_mib_s", 0) > 0 or out.get("crt_unavailable")


@pytest.mark.slow  # drives LMCache's engine through the whole benchmark (~30 s)
def test_pipeline_quick_json(tmp_path):
    out = _run_json("pipeline.py", "--quick", "--json", "--out-dir", str(tmp_path))
    assert out["latency_ms"] == 50
    assert out["bound_ms"] > 0 and out["staging_budget_bytes"] > 0
    layers = out["model_kv_shape"]["layers"]
    assert layers == 32 and out["layer_bytes"] == 2 * 8 * 128 * 2 * out["tokens"]
    expected = layers * out["layer_bytes"]
    assert out["kv_bytes"] == expected and out["kv_verified"] is True
    # the bound is max(L * t_c, latency + bytes / BW)
    assert out["bound_ms"] >= layers * out["compute_ms"] - 0.01
    assert out["bound_ms"] >= out["latency_ms"] + expected / (out["bw_mib_s"] * MIB) * 1000 - 1.0
    for v in ("ours", "depth1"):
        r = out[v]
        assert r["ttft_ms"] > 0 and r["gets"] > 0
        assert r["exposed_ms"] == pytest.approx(r["ttft_ms"] - out["bound_ms"], abs=0.05)
        assert r["bytes"] == expected  # every layer of every chunk, fetched exactly once
        assert r["retrieved_tokens"] == out["tokens"]
        assert 0 < r["peak_staging_bytes"] <= out["staging_budget_bytes"]
        fetch, compute = r["timeline"]["fetch"], r["timeline"]["compute"]
        assert [f[0] for f in fetch] == [c[0] for c in compute] == list(range(layers))
        # no layer computes before its fetch finished
        assert all(f[2] <= c[1] + 0.01 for f, c in zip(fetch, compute))
    assert out["depth1"]["peak_staging_bytes"] <= 2 * out["layer_bytes"]
    stock = out["lmcache_s3"]
    if stock.get("unavailable"):
        assert stock["reason"]
    else:
        assert stock["ttft_ms"] > 0 and stock["bytes"] == expected and stock["retrieved_tokens"] == out["tokens"]
    local = out["local_cpu"]  # LMCache's own DRAM tier: the same hand-off, no S3
    assert local["ttft_ms"] > 0 and local["gets"] == 0 and local["retrieved_tokens"] == out["tokens"]
    assert set(out["goals"]) >= {"ours_exposed_within_latency_plus_5pct_bound", "ours_peak_staging_within_budget",
                                 "depth1_over_ours_exposed", "ours_over_local_cpu_ms"}
    assert out["goals"]["ours_over_local_cpu_ms"] == pytest.approx(out["ours"]["ttft_ms"] - local["ttft_ms"], abs=0.05)
    png = Path(out["png"])
    assert png.exists() and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
