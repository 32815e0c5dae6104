"""The object-store client: one pooled boto3 client, ranged GETs into caller buffers,
retries with backoff in exactly one place, and typed errors that never carry secrets.

Why boto3 and not awscrt on the data path: see README "S3 client choice" (measured). botocore's
own retries are switched off (``total_max_attempts=1``) so the retry budget, backoff and the
error kinds are ours and can be tested; its request/response checksum calculation is limited
to "when_required" because every byte we read is verified against our manifest's CRC32C.
"""

from __future__ import annotations

import builtins
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions

from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import (
    AccessDenied,
    BucketNotFound,
    CorruptObject,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    StorageTimeout,
    Throttled,
    Unavailable,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequests", "TooManyRequestsException", "503"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken", "AllAccessDisabled"}


@dataclass
class ObjectInfo:
    key: str
    size: int
    last_modified: float  # unix seconds


@dataclass
class ClientStats:
    gets: int = 0
    puts: int = 0
    deletes: int = 0
    lists: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    retries: int = 0


class Redactor:
    """Removes configured secrets from text that might reach a log line or an exception."""

    def __init__(self, secrets: tuple[str, ...]):
        self._secrets = tuple(s for s in secrets if s and len(s) >= 4)

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text


class S3Client:
    """Thread-safe; share one per process (it owns the connection pool)."""

    def __init__(self, cfg: S3LayerConfig, *, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.stats = ClientStats()
        self._stats_lock = threading.Lock()
        self._sleep = sleep
        self._rng = random.Random()
        self._redact = Redactor(cfg.secret_values)
        self._client = _make_boto_client(cfg)
        # Hook for fault injection and metrics: called with (operation, key) before each try.
        self.before_request: Callable[[str, str], None] | None = None
        # Metrics hooks: operation name per try, error kind per failed try.
        self.on_request: Callable[[str], None] | None = None
        # (error kind, operation, key): the key lets the listener tell an expected miss (a
        # pointer that does not exist) from a fault; it must never reach a metric label.
        self.on_error: Callable[[str, str, str], None] | None = None
        # Seconds one successful try took (operation, seconds): request-latency histograms.
        self.on_latency: Callable[[str, float], None] | None = None

    # ---- reads ---------------------------------------------------------------------------

    def get_range_into(self, key: str, start: int, out) -> float:
        """Fill ``out`` (one buffer, or a list filled in order: a scatter read) with bytes
        [start, start + total length) of ``key``; exactly, or raise. Returns the seconds until
        the response headers arrived (first-byte latency) of the successful try."""
        views = [memoryview(v).cast("B") for v in (out if isinstance(out, (list, tuple)) else [out])]
        n = sum(len(v) for v in views)
        if n == 0:
            return 0.0
        end = start + n - 1
        ttfb = 0.0

        def once() -> None:
            nonlocal ttfb
            t0 = time.perf_counter()
            resp = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")
            ttfb = time.perf_counter() - t0
            body = resp["Body"]
            try:
                length = int(resp.get("ContentLength", -1))
                if length != n:
                    raise CorruptObject(
                        f"object {key!r}: asked for {n} bytes at {start}, server sent {length}"
                        " (object shorter than its manifest says?)", key=key)
                _read_exact_into(body, views, key)
            finally:
                body.close()

        self._retrying("get", key, once)
        self._count(gets=1, bytes_read=n)
        return ttfb

    def get_bytes(self, key: str, max_bytes: int) -> bytes:
        """A whole small object (manifest, pointer); larger than ``max_bytes`` is corrupt.

        The Range header bounds what we download, so a hostile object cannot make us
        allocate more than ``max_bytes`` (+1 to detect excess).
        """

        def once() -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{max_bytes}")
            body = resp["Body"]
            try:
                total = _total_size(resp)
                if total is not None and total > max_bytes:
                    raise CorruptObject(f"object {key!r} is {total} bytes, over the {max_bytes}-byte limit", key=key)
                data = body.read(max_bytes + 1)
                length = resp.get("ContentLength")
            finally:
                body.close()
            if len(data) > max_bytes:
                raise CorruptObject(f"object {key!r} is over the {max_bytes}-byte limit", key=key)
            if length is not None and len(data) != int(length):
                # A body cut short on the wire must be retried, not parsed as a malformed object.
                raise Unavailable(f"get {key!r}: body ended after {len(data)} of {length} bytes",
                                  key=key, code="Truncated")
            return data

        try:
            data = self._retrying("get", key, once)
        except StorageError as exc:
            if exc.code == "InvalidRange":
                data = b""  # an empty object has no byte 0; callers treat it as malformed
            else:
                raise
        self._count(gets=1, bytes_read=len(data))
        return data

    def head(self, key: str) -> ObjectInfo:
        resp = self._retrying("head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        self._count(gets=1)
        return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token

            def list_page(kw: dict[str, Any] = kwargs) -> Any:
                return self._client.list_objects_v2(**kw)

            resp = self._retrying("list", prefix, list_page)
            self._count(lists=1)
            for o in resp.get("Contents", []):
                yield ObjectInfo(o["Key"], int(o["Size"]), o["LastModified"].timestamp())
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    # ---- writes --------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview, *, create_only: bool = False) -> None:
        """Single-request PUT (segments are sized below multipart territory on purpose:
        managed multipart PUTs get 501 from several S3 look-alikes, LMCache PR #4739).

        ``create_only`` sends ``If-None-Match: *``; losing the race raises PreconditionFailed.
        """
        # One copy into bytes: http.client streams file-like bodies in 8 KiB writes, which
        # costs more CPU than the copy on the two cores this has to share with the engine.
        body = data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes()
        kwargs = {"Bucket": self.bucket, "Key": key, "Body": body}
        if create_only:
            kwargs["IfNoneMatch"] = "*"
        self._retrying("put", key, lambda: self._client.put_object(**kwargs))
        self._count(puts=1, bytes_written=len(body))

    def delete(self, key: str) -> None:
        self._retrying("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))
        self._count(deletes=1)

    def delete_many(self, keys: builtins.list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]

            def delete_batch(b: builtins.list[dict[str, str]] = batch) -> Any:
                return self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": b, "Quiet": True})

            resp = self._retrying("delete", keys[i], delete_batch)
            self._count(deletes=len(batch))
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(f"delete of {len(errors)} object(s) failed, first {first.get('Key')!r}: "
                                   f"{first.get('Code')}", key=first.get("Key"), code=first.get("Code"))

    def check_bucket(self) -> None:
        """One cheap request that proves endpoint, credentials and bucket at start-up."""
        self._retrying("head_bucket", self.bucket, lambda: self._client.head_bucket(Bucket=self.bucket))

    def create_bucket_if_missing(self) -> None:
        try:
            self.check_bucket()
        except BucketNotFound:
            self._retrying("create_bucket", self.bucket,
                           lambda: self._client.create_bucket(Bucket=self.bucket))

    def close(self) -> None:
        self._client.close()

    # ---- the one retry loop --------------------------------------------------------------

    def _retrying(self, op: str, key: str, fn: Callable[[], T]) -> T:
        attempts = self.cfg.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                if self.on_request is not None:
                    self.on_request(op)
                if self.before_request is not None:
                    self.before_request(op, key)
                t0 = time.perf_counter()
                result = fn()
                if self.on_latency is not None:
                    self.on_latency(op, time.perf_counter() - t0)
                return result
            except StorageError as err:
                typed = err
            except Exception as exc:  # noqa: BLE001 - classified below, never leaked raw
                typed = self._classify(op, key, exc)
            if self.on_error is not None:
                self.on_error(type(typed).__name__, op, key)
            if not typed.retryable or attempt == attempts:
                if attempt > 1:
                    typed.args = (f"{typed.args[0]} (after {attempt} attempts)",)
                raise typed
            with self._stats_lock:
                self.stats.retries += 1
            # Full jitter: concurrent retriers after a SlowDown must not retry in lockstep.
            backoff = min(self.cfg.retry_max_backoff_s, self.cfg.retry_base_s * (2 ** (attempt - 1)))
            log.debug("retrying %s %s after %s (attempt %d/%d)", op, key, type(typed).__name__, attempt, attempts)
            self._sleep(self._rng.uniform(0, backoff) if backoff > 0 else 0)
        raise AssertionError("unreachable")

    def _classify(self, op: str, key: str, exc: Exception) -> StorageError:
        where = f"{op} {self.bucket}/{key}"
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket" or (op == "head_bucket" and status == 404):
                return BucketNotFound(f"bucket {self.bucket!r} does not exist (endpoint "
                                      f"{self.cfg.endpoint_url or 'AWS'})", key=key, code="NoSuchBucket")
            if code in _NOT_FOUND_CODES or status == 404:
                return ObjectNotFound(f"{where}: not found", key=key, code="NoSuchKey")
            if code in _DENIED_CODES or status == 403:
                return AccessDenied(
                    f"{where}: access denied ({code or status}); check the access key, secret and "
                    "bucket policy", key=key, code=code or "AccessDenied")
            if code in ("PreconditionFailed", "412") or status == 412:
                return PreconditionFailed(f"{where}: already exists", key=key, code="PreconditionFailed")
            if code in ("ConditionalRequestConflict",) or status == 409:
                return Throttled(f"{where}: conflicting concurrent write ({code})", key=key, code=code)
            if code in _THROTTLE_CODES or status in (429, 503):
                return Throttled(f"{where}: throttled ({code or status})", key=key, code=code)
            if code == "InvalidRange" or status == 416:
                return StorageError(f"{where}: invalid range", key=key, code="InvalidRange")
            if status >= 500 or code in ("InternalError", "ServiceUnavailable"):
                return Unavailable(f"{where}: server error ({code or status})", key=key, code=code)
            return StorageError(f"{where}: {code or status}: {self._redact(str(err.get('Message', '')))[:200]}",
                                key=key, code=code)
        if isinstance(exc, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError,
                            urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return StorageTimeout(f"{where}: timed out", key=key, code="Timeout")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return AccessDenied("no S3 credentials found: set s3layer.access_key_id/secret_access_key, "
                                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an AWS profile",
                                key=key, code="NoCredentials")
        if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
                            botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError,
                            urllib3.exceptions.HTTPError, ConnectionError, OSError)):
            return Unavailable(f"{where}: connection failed ({type(exc).__name__})", key=key, code="Connection")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return Unavailable(f"{where}: {type(exc).__name__}: {self._redact(str(exc))[:200]}", key=key)
        return StorageError(f"{where}: unexpected {type(exc).__name__}: {self._redact(str(exc))[:200]}", key=key)

    def _count(self, **kw: int) -> None:
        with self._stats_lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)


def _make_boto_client(cfg: S3LayerConfig):
    style = cfg.addressing_style
    if style == "auto":
        # Non-AWS endpoints (SeaweedFS, MinIO, Ceph) rarely have wildcard DNS for buckets.
        style = "path" if cfg.endpoint_url else "virtual"
    bcfg = botocore.config.Config(
        region_name=cfg.region,
        signature_version="s3v4",
        max_pool_connections=cfg.max_connections,
        connect_timeout=cfg.connect_timeout_s,
        read_timeout=cfg.read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": style},
        tcp_keepalive=True,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(profile_name=cfg.profile) if cfg.profile else boto3.session.Session()
    verify: bool | str = cfg.ca_bundle if cfg.ca_bundle else cfg.verify_tls
    return session.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        aws_session_token=cfg.session_token,
        verify=verify,
        config=bcfg,
    )


def _total_size(resp: dict) -> int | None:
    cr = resp.get("ContentRange")  # "bytes 0-99/1234"
    if cr and "/" in cr:
        tail = cr.rsplit("/", 1)[1]
        if tail.isdigit():
            return int(tail)
    return None


def _read_exact_into(body, views: list[memoryview], key: str) -> None:
    """Read exactly the views' total length from a botocore StreamingBody, filling them in order.

    http.client's ``readinto`` receives straight into our buffers (no intermediate bytes
    object); urllib3 is bypassed only for the payload, then asked to return the connection.
    """
    raw: Any = getattr(body, "_raw_stream", None)
    fp: Any = getattr(raw, "_fp", None)
    direct = fp is not None and hasattr(fp, "readinto")
    total = sum(len(v) for v in views)
    got = 0
    for out in views:
        n, filled = len(out), 0
        while filled < n:
            if direct:
                k = fp.readinto(out[filled:])
            else:
                chunk = body.read(min(n - filled, 1 << 20))
                k = len(chunk)
                out[filled:filled + k] = chunk
            if not k:
                break
            filled += k
        got += filled
        if filled != n:
            break
    if got != total:
        raise Unavailable(f"get {key!r}: body ended after {got} of {total} bytes", key=key, code="Truncated")
    if direct:
        try:
            raw.release_conn()
        except Exception:  # noqa: BLE001 - a connection we cannot reuse is merely closed
            pass
