"""Shared fixtures: one S3 endpoint per test session, fresh buckets per test.

By default the session starts a private SeaweedFS server (``lmcache_s3layer.testing.server``) on free
loopback ports with its data in pytest's tmp dir, so parallel runs do not collide. To run the
suite against another S3-compatible store instead, set::

    S3LAYER_TEST_ENDPOINT=http://host:port
    S3LAYER_TEST_ACCESS_KEY / S3LAYER_TEST_SECRET_KEY   (default: AWS_ACCESS_KEY_ID / ..._SECRET_...)
    S3LAYER_TEST_REGION                                  (default: AWS_DEFAULT_REGION, us-east-1)
    S3LAYER_TEST_VERIFY=false | /path/to/ca-bundle.pem   (TLS verification; default on)
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Union

import pytest

from lmcache_s3layer.config import parse_bool
from lmcache_s3layer.errors import ConfigError

# Every LMCache engine in the suite (engine, fault, load and vLLM end-to-end tests, including
# vLLM's worker processes, which inherit the environment) copies the way a GPU does: copies
# land only at sync points and freed buffers are poisoned (cpu_connector.DeferredCopies).
# Unit tests of the synchronous mode ask for it explicitly.
os.environ.setdefault("S3LAYER_CPU_COPY", "deferred")

_SLOW = ("engine", "e2e_vllm", "faults", "load")


def pytest_collection_modifyitems(config, items):
    """``-m "not slow"`` is the daily lane: every family that drives LMCache's engine, vLLM,
    the fault soak or the load test is also marked ``slow``."""
    for item in items:
        if any(item.get_closest_marker(m) for m in _SLOW):
            item.add_marker(pytest.mark.slow)


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)  # keep it out of assertion messages and logs
    region: str = "us-east-1"
    verify: Union[bool, str] = True  # boto3's ``verify``: a bool or a CA bundle path

    def client(self, **config_kwargs):
        """A boto3 S3 client with path-style addressing (what SeaweedFS/MinIO expect)."""
        import boto3
        from botocore.config import Config

        cfg = {
            "s3": {"addressing_style": "path"},
            "connect_timeout": 2,
            "read_timeout": 15,
            "retries": {"mode": "standard", "max_attempts": 3},
            **config_kwargs,
        }
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            verify=self.verify,
            config=Config(**cfg),
        )


def _verify_from_env(value: str | None) -> Union[bool, str]:
    """S3LAYER_TEST_VERIFY: unset or empty verifies, an on/off word says so, anything else
    is a CA bundle path."""
    if value is None or not value.strip():
        return True
    try:
        return parse_bool(value, "S3LAYER_TEST_VERIFY")
    except ConfigError:
        return value


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[S3Endpoint]:
    env = os.environ
    url = env.get("S3LAYER_TEST_ENDPOINT")
    if url:
        access = env.get("S3LAYER_TEST_ACCESS_KEY") or env.get("AWS_ACCESS_KEY_ID")
        secret = env.get("S3LAYER_TEST_SECRET_KEY") or env.get("AWS_SECRET_ACCESS_KEY")
        if not (access and secret):
            pytest.fail("S3LAYER_TEST_ENDPOINT is set but no access/secret key is")
        yield S3Endpoint(
            endpoint_url=url,
            access_key=access,
            secret_key=secret,
            region=env.get("S3LAYER_TEST_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            verify=_verify_from_env(env.get("S3LAYER_TEST_VERIFY")),
        )
        return

    from lmcache_s3layer.testing.server import LocalS3Server, LocalS3ServerError, find_weed_binary

    try:
        find_weed_binary()
    except LocalS3ServerError as e:
        pytest.skip(f"no S3 endpoint: {e}")
    server = LocalS3Server(data_dir=tmp_path_factory.mktemp("seaweedfs"))
    server.start(timeout=60)
    try:
        yield S3Endpoint(server.endpoint_url, server.access_key, server.secret_key, server.region)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_boto_client(s3_endpoint):
    """A boto3 client for the session endpoint (thread-safe; share it freely)."""
    return s3_endpoint.client()


def empty_and_delete_bucket(client, name: str) -> None:
    """Best effort: abort uploads, delete every object (and version), delete the bucket."""
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for up in page.get("Uploads", []):
                with contextlib.suppress(Exception):
                    client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
            vs = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                  for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
                  if v.get("VersionId") not in (None, "null")]
            if vs:
                client.delete_objects(Bucket=name, Delete={"Objects": vs, "Quiet": True})
    with contextlib.suppress(Exception):
        client.delete_bucket(Bucket=name)


@pytest.fixture
def bucket(s3_boto_client) -> Iterator[str]:
    """A new, empty, uniquely named bucket; emptied and deleted after the test."""
    name = f"s3layer-test-{uuid.uuid4().hex[:16]}"
    region = s3_boto_client.meta.region_name
    extra = {} if region in (None, "us-east-1") else {
        "CreateBucketConfiguration": {"LocationConstraint": region}}  # AWS wants it elsewhere
    s3_boto_client.create_bucket(Bucket=name, **extra)
    try:
        yield name
    finally:
        empty_and_delete_bucket(s3_boto_client, name)


# ---- end of session: no thread may keep the run alive -------------------------------------
#
# LMCache starts non-daemon threads (the StorageManager's event loop) that only its own close()
# stops. An engine a test forgot, or one LMCache itself half-built, would make the interpreter
# wait for them forever after the last test and stall CI with every test green. So the session
# closes what LMCache still holds, names any thread that survives, and exits with pytest's own
# status instead of hanging.

_EXIT_STATUS = 0


def pytest_sessionfinish(session, exitstatus):
    global _EXIT_STATUS
    _EXIT_STATUS = int(exitstatus)
    import sys
    if "lmcache.v1.cache_engine" in sys.modules:
        from lmcache.v1.cache_engine import LMCacheEngineBuilder
        for instance_id in list(getattr(LMCacheEngineBuilder, "_instances", {})):
            with contextlib.suppress(Exception):
                LMCacheEngineBuilder.destroy(instance_id)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import sys
    import threading
    import time

    deadline = time.monotonic() + 10
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not stuck:
        return
    # pytest still holds stdout/stderr (its cleanups run after this hook): hand them back and
    # flush the summary it has already written, or os._exit would drop both.
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.stop_global_capturing()
    config.get_terminal_writer().flush()
    sys.stderr.write(f"conftest: {len(stuck)} non-daemon thread(s) still running after the session "
                     f"({', '.join(sorted(set(stuck)))}); exiting with pytest's status "
                     f"{_EXIT_STATUS} instead of waiting for them\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS)


# Outcome lines that suites report (e.g. the fault soak's "faults injected: N, ..."): printed in
# pytest's terminal summary so they show even under -q, where test output is captured.
SUMMARY_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if SUMMARY_LINES:
        terminalreporter.section("s3layer outcome summary")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)
