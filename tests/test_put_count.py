"""A real store's PUTs, counted where the server receives them, match ``plan`` (format v2: a
pointer per segment, not per chunk). Runs ``benchmarks/put_count.py``'s measurement against the
session's S3 endpoint at 200K tokens (the script's default is 1M)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def put_count():
    spec = importlib.util.spec_from_file_location("put_count_under_test", REPO / "benchmarks" / "put_count.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counted_puts_of_a_200k_token_store_match_plan(put_count, s3_endpoint, bucket):
    tokens = 200_000  # 782 chunks -> 12 segments of 64 chunks + one of 14
    counted = put_count.count_store_puts(s3_endpoint.endpoint_url, s3_endpoint.access_key, s3_endpoint.secret_key,
                                         s3_endpoint.region, bucket=bucket, tokens=tokens, layers=32,
                                         chunk_size=256, segment_max_chunks=64)
    planned = put_count.plan_puts(tokens, 256, 64)
    assert planned["layers"] == 32 and planned["detail"]["segments"] == 13
    assert planned["puts"] == 13 * 32 + 13 + 13
    assert counted["segments_committed"] == 13
    assert counted["counted_puts_by_kind"] == {"layer": 13 * 32, "manifest": 13, "pointer": 13}
    # +-2%: a retried PUT reaches the server twice
    assert abs(counted["counted_puts"] - planned["puts"]) <= 0.02 * planned["puts"]
    # the writer's planning looked every chunk up once (one round of pointer GETs), nothing more
    assert counted["requests_by_method"].get("GET", 0) == counted["chunks"] == 782


def test_the_request_parser_frames_content_length_and_chunked_bodies(put_count):
    seen = []
    p = put_count._RequestParser(lambda method, target: seen.append((method, target)))
    stream = (b"PUT /b/k1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
              b"GET /b/k2?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
              b"PUT /b/k3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
              b"DELETE /b/k4 HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
    for i in range(0, len(stream), 7):  # arbitrary TCP segmentation
        p.feed(stream[i:i + 7])
    assert seen == [("PUT", "/b/k1"), ("GET", "/b/k2?x=1"), ("PUT", "/b/k3"), ("DELETE", "/b/k4")]
