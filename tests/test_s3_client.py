"""S3 client unit tests with moto (in-process) and injected HTTP errors."""

from __future__ import annotations

import logging

import pytest
from botofaults import BotoFaults
from moto import mock_aws

from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import (
    AccessDenied,
    BucketNotFound,
    ConfigError,
    CorruptObject,
    ObjectNotFound,
    PreconditionFailed,
    Throttled,
    Unavailable,
)
from lmcache_s3layer.store.client import S3Client

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"


@pytest.fixture
def client():
    with mock_aws():
        cfg = S3LayerConfig(bucket="unit", region="us-east-1", access_key_id="AKIAUNITTEST",
                            secret_access_key=SECRET, max_attempts=4, retry_base_s=0.0)
        sleeps: list[float] = []
        c = S3Client(cfg, sleep=sleeps.append)
        c._client.create_bucket(Bucket="unit")
        c.sleeps = sleeps
        yield c


def test_ranged_get_into_buffer_and_scatter(client):
    data = bytes(range(256)) * 64
    client.put_bytes("k", data)
    out = bytearray(100)
    client.get_range_into("k", 1000, memoryview(out))
    assert bytes(out) == data[1000:1100]
    a, b = bytearray(10), bytearray(30)
    client.get_range_into("k", 5, [memoryview(a), memoryview(b)])
    assert bytes(a) + bytes(b) == data[5:45]


def test_short_object_is_corrupt_not_partial(client):
    client.put_bytes("short", b"x" * 10)
    out = bytearray(20)
    with pytest.raises((CorruptObject, Unavailable)):
        client.get_range_into("short", 0, memoryview(out))


def test_missing_key_and_bucket(client):
    with pytest.raises(ObjectNotFound):
        client.get_range_into("nope", 0, memoryview(bytearray(4)))
    other = S3Client(client.cfg.replace(bucket="does-not-exist"))
    with pytest.raises(BucketNotFound, match="does-not-exist"):
        other.check_bucket()


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")])
def test_throttling_and_5xx_are_retried_within_bound(client, status, code):
    client.put_bytes("k", b"hello world")
    faults = BotoFaults().attach(client._client)
    faults.add(status, code, count=3, operation="GetObject")  # max_attempts=4: the 4th succeeds
    out = bytearray(5)
    client.get_range_into("k", 0, memoryview(out))
    assert bytes(out) == b"hello"
    assert faults.injected == 3
    assert client.stats.retries == 3
    assert len(client.sleeps) == 3 and all(s >= 0 for s in client.sleeps)


def test_retries_are_bounded(client):
    client.put_bytes("k", b"hello world")
    faults = BotoFaults().attach(client._client)
    faults.add(503, "SlowDown", count=100, operation="GetObject")
    with pytest.raises(Throttled, match="after 4 attempts"):
        client.get_range_into("k", 0, memoryview(bytearray(5)))
    assert faults.injected == 4


def test_access_denied_is_clear_and_secret_free(client, caplog):
    caplog.set_level(logging.DEBUG)
    faults = BotoFaults().attach(client._client)
    faults.add(403, "AccessDenied", count=10)
    with pytest.raises(AccessDenied) as ei:
        client.get_bytes("k", 100)
    msg = str(ei.value)
    assert "access denied" in msg and "unit/k" in msg
    assert faults.injected == 1  # not retried: waiting will not fix credentials
    assert SECRET not in msg and SECRET not in repr(client.cfg) and SECRET not in caplog.text


def test_create_only_put(client):
    client.put_bytes("ptr", b"a", create_only=True)
    with pytest.raises(PreconditionFailed):
        client.put_bytes("ptr", b"b", create_only=True)


def test_get_bytes_bounds_allocation(client):
    client.put_bytes("big", b"x" * 5000)
    with pytest.raises(CorruptObject, match="limit"):
        client.get_bytes("big", 4096)
    assert client.get_bytes("big", 5000) == b"x" * 5000


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="bucket"):
        S3LayerConfig()
    with pytest.raises(ConfigError, match="unknown setting 's3layer.buckt'"):
        S3LayerConfig.from_extra_config({"s3layer.buckt": "x"})
    with pytest.raises(ConfigError, match="together"):
        S3LayerConfig(bucket="abc", access_key_id="x")
    for prefix in ("../escape", ".", "kv/./x", "/abs"):
        with pytest.raises(ConfigError, match="prefix"):
            S3LayerConfig(bucket="abc", prefix=prefix)
    assert S3LayerConfig(bucket="abc", prefix="kv.cache/v.1").prefix == "kv.cache/v.1"
    c = S3LayerConfig.from_extra_config({"s3layer.bucket": "abc", "s3layer.staging_budget_bytes": "64MiB",
                                         "s3layer.verify_tls": "false", "other.key": 1})
    assert c.staging_budget_bytes == 64 * 1024**2 and c.verify_tls is False
    assert S3LayerConfig(bucket="abc").verify_tls is True  # TLS verification on by default
