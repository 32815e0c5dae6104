"""The installed ``lmcache-s3layer`` console script, in its own process: ``plan`` against values
worked out by hand from the formulas (anchors §5, design.md "The physics"), and ``inspect`` /
``gc`` against the S3 server, with the secret only in the environment."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache_s3layer.admin import cli
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.format.objects import Namespace
from lmcache_s3layer.store.client import S3Client
from lmcache_s3layer.store.segments import SegmentStore

PREFIX = "cli-test"


def console_script() -> str:
    # The venv's bin dir sits next to the interpreter running the tests.
    path = Path(sys.executable).with_name("lmcache-s3layer")
    if path.exists():
        return str(path)
    found = shutil.which("lmcache-s3layer")
    if not found:
        pytest.skip("the lmcache-s3layer console script is not installed")
    return found


def run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(LMCACHE_TRACK_USAGE="false", HF_HUB_OFFLINE="1")
    return subprocess.run([console_script(), *argv], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=120)


# ---- plan --------------------------------------------------------------------------------------

EXAMPLE = ["plan", "--model", "llama-3.1-8b", "--context", "1048576", "--new-tokens", "256",
           "--latency-ms", "20", "--bandwidth-gbps", "100"]


def test_plan_json_for_llama_8b_at_one_mebitoken_matches_hand_arithmetic():
    proc = run(*EXAMPLE, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)

    # Llama-3.1-8B (anchors §5.1): 32 layers, 8 KV heads x 128, 32 query heads, hidden 4096,
    # MLP 14336, bf16. Defaults: H100 at 50% of 989 TFLOP/s, 3.35 TB/s HBM; 256-token chunks,
    # 64 chunks per segment, 8 MiB ranged GETs; S3 Standard prices.
    L, P, N = 32, 1_048_576, 256
    bpt = 2 * 8 * 128 * 2  # K and V x kv_heads x head_dim x 2 bytes = 4096 (4 KiB)
    assert out["bytes_per_token_per_layer"] == bpt == 4096
    assert out["kv_bytes"] == P * L * bpt == 2**20 * 2**5 * 2**12 == 128 * 2**30

    # Objects: 2^20 / 256 = 4096 chunks -> 4096 / 64 = 64 segments; each segment has 32 layer
    # objects, a manifest and a pointer at its first chunk: 64*32 + 64 + 64 = 2176 PUTs.
    chunks, segments = P // 256, P // 256 // 64
    assert (chunks, segments) == (4096, 64)
    assert out["put_requests"] == segments * L + segments + segments == 2176
    # A layer object is 64 chunks x 256 tokens x 4 KiB = 64 MiB = 8 ranged GETs of 8 MiB;
    # a cold index also reads one pointer per chunk and one manifest per segment.
    assert out["get_requests_data"] == segments * L * (64 * 256 * bpt // (8 * 2**20)) == 16384
    assert out["get_requests"] == 16384 + chunks + segments == 20544

    # Compute per layer (§5.3): FLOPs = 2*N*P_layer + 4*N*(P + N/2)*(q_heads*head_dim).
    p_layer = 4096 * 32 * 128 + 2 * 4096 * 8 * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert p_layer == 218_112_000 == out["model"]["params_per_layer"]
    flops = 2 * N * p_layer + 4 * N * (P + N / 2) * (32 * 128)
    f_eff = 989e12 * 0.5
    hbm = (p_layer * 2 + (P + N) * bpt) / 3.35e12  # weights + KV read per layer
    t_layer = max(flops / f_eff, hbm)
    assert t_layer == flops / f_eff  # compute-bound: ~9.12 ms
    assert out["t_layer_ms"] == pytest.approx(t_layer * 1e3, rel=1e-12)

    # Fetch per layer: 2^20 tokens x 4 KiB = 4 GiB at 100 Gbps = 12.5 GB/s -> 343.6 ms.
    t_fetch = P * bpt / 12.5e9
    assert out["fetch_per_layer_ms"] == pytest.approx(t_fetch * 1e3, rel=1e-12)
    assert out["hides"] is (t_fetch <= t_layer) is False

    # TTFT floor, fetch-bound: one first-byte latency, then all 32 layers at link rate, then
    # the last layer's compute: 20 ms + 32 x 343.6 ms + 9.12 ms = 11.02 s.
    ttft = 0.020 + L * t_fetch + t_layer
    assert ttft > 0.020 + t_fetch + L * t_layer  # the compute-bound branch is the smaller one
    assert out["ttft_floor_ms"] == pytest.approx(ttft * 1e3, rel=1e-12)

    # Recompute: a prefill of T = P + N tokens from nothing, layer by layer:
    # FLOPs = 2*T*P_layer + 4*T*(T/2)*4096 per layer, at F_eff.
    T = P + N
    recompute = L * (2 * T * p_layer + 4 * T * (T / 2) * (32 * 128)) / f_eff
    assert out["recompute_ms"] == pytest.approx(recompute * 1e3, rel=1e-12)  # ~613 s
    assert out["load_vs_recompute"] == pytest.approx(recompute / ttft, rel=1e-12)

    # Money at S3 Standard: $0.005 per 1,000 PUTs, $0.0004 per 1,000 GETs, $0.023/GB-month
    # with AWS's GB = 2^30 bytes.
    assert out["usd_per_store"] == pytest.approx(2176 * 0.005 / 1000, rel=1e-12)  # $0.011
    assert out["usd_per_load"] == pytest.approx(20544 * 0.0004 / 1000, rel=1e-12)
    assert out["usd_per_month"] == pytest.approx(128 * 0.023, rel=1e-12)

    # The comparison layouts: per-(chunk, layer) objects put 4096 x 32 objects; token-major
    # puts one object per chunk.
    assert out["layouts"]["chunk_layer"]["put_requests"] == chunks * L == 131_072
    assert out["layouts"]["token_major"]["put_requests"] == chunks == 4096


def test_plan_table_is_the_default_output():
    proc = run(*EXAMPLE)
    assert proc.returncode == 0, proc.stderr
    assert "KV, all layers           128.00 GiB" in proc.stdout
    assert "hides behind compute     no" in proc.stdout
    for layout in ("segments (ours)", "per (chunk, layer)", "token-major (stock)"):
        assert layout in proc.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)


def test_plan_bad_input_exits_2_with_a_message():
    proc = run("plan", "--model", "llama-3.1-8b", "--context", "-1")
    assert proc.returncode == 2 and "must be >= 0" in proc.stderr


# ---- every registered command answers --help ------------------------------------------------------


@pytest.mark.parametrize("command", sorted(cli.all_commands()))
def test_every_command_has_help(command, capsys):
    # ``bench`` is registered by another module when present; whatever is registered must work.
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {cli.PROG} {command}")


def test_top_level_help_lists_the_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for name in cli.all_commands():
        assert name in proc.stdout
    assert run("--version").stdout.startswith("lmcache-s3layer ")


# ---- inspect and gc in their own processes ----------------------------------------------------------


NS = Namespace("meta-llama/Llama-3.1-8B", 1, 0, "bfloat16")
HIDDEN = 64
BPT = 2 * HIDDEN * 2


def test_inspect_verify_and_gc_through_the_console_script(s3_endpoint, bucket, s3_boto_client):
    cfg = S3LayerConfig(bucket=bucket, endpoint_url=s3_endpoint.endpoint_url, region=s3_endpoint.region,
                        access_key_id=s3_endpoint.access_key, secret_access_key=s3_endpoint.secret_key,
                        prefix=PREFIX)
    client = S3Client(cfg)
    store = SegmentStore(client, PREFIX)
    rng = random.Random(5)
    try:
        tokens = [32, 32, 16]
        layers = [rng.randbytes(sum(tokens) * BPT) for _ in range(4)]
        m = store.write_segment(NS, [11, 12, 13], tokens, (2, HIDDEN), layers)
    finally:
        client.close()
    conn = ["--endpoint-url", s3_endpoint.endpoint_url, "--region", s3_endpoint.region, "--bucket", bucket,
            "--prefix", PREFIX, "--access-key-id", s3_endpoint.access_key]
    env = {"AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_key}

    def cmd(*argv):
        proc = run(argv[0], *conn, *argv[1:], env=env)
        assert s3_endpoint.secret_key not in proc.stdout + proc.stderr
        return proc

    proc = cmd("inspect", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    (seg,) = doc["segments"]
    assert (seg["segment_id"], seg["tokens"], seg["layers"], seg["chunks"]) == (m.segment_id, 80, 4, 3)
    assert seg["model"] == "meta-llama/Llama-3.1-8B"

    proc = cmd("inspect", "--verify", "--progress")
    assert proc.returncode == 0, proc.stderr
    assert "all checksums match" in proc.stdout and "verifying [" in proc.stderr

    # One flipped byte in chunk 2 of layer 3: named, and the exit status says so.
    key = store.names(NS).layer_object(m.segment_id, 3)
    bad = bytearray(layers[3])
    bad[64 * BPT + 5] ^= 1
    s3_boto_client.put_object(Bucket=bucket, Key=key, Body=bytes(bad))
    proc = cmd("inspect", "--verify")
    assert proc.returncode == 1
    assert f"CORRUPT segment {m.segment_id} layer 3 chunk 2: checksum mismatch" in proc.stdout

    proc = cmd("gc", "--older-than", "0s", "--dry-run")
    assert proc.returncode == 0 and f"would delete segment {m.segment_id}" in proc.stdout
    assert len(s3_boto_client.list_objects_v2(Bucket=bucket)["Contents"]) == 4 + 1 + 1  # untouched

    proc = cmd("gc", "--older-than", "0s", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["summary"]["segments"] == 1 and rep["actions"][0]["done"] is True
    assert "Contents" not in s3_boto_client.list_objects_v2(Bucket=bucket)

    proc = cmd("inspect")
    assert proc.returncode == 0 and "0 segment(s)" in proc.stdout


def test_connection_errors_exit_3_without_the_secret(s3_endpoint):
    proc = run("inspect", "--endpoint-url", s3_endpoint.endpoint_url, "--region", s3_endpoint.region,
               "--bucket", "no-such-bucket-s3layer-cli", "--access-key-id", s3_endpoint.access_key,
               env={"AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_key})
    assert proc.returncode == 3, proc.stderr
    assert "no-such-bucket-s3layer-cli" in proc.stderr
    assert s3_endpoint.secret_key not in proc.stdout + proc.stderr
