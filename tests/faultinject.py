"""A seeded fault injector for the object-store path: HTTP-level faults at botocore's event
hooks (cheap, any rate) and object-level faults by editing the bucket directly.

HTTP faults (``HttpFaults``), decided per request from ``random.Random(seed)`` in the order
requests reach the hook, so a seed replays the same fault sequence for the same request
sequence:

- ``slowdown`` / ``internal`` / ``unavailable``: a parsed 503 SlowDown / 500 InternalError /
  503 ServiceUnavailable error document instead of sending the request;
- ``reset``: the connection dies before a response (any operation), or, for GetObject, after
  part of the body (urllib3's "Connection broken");
- ``truncate``: GetObject only: a 206 whose body ends early (a clean FIN mid-body);
- ``timeout``: a read timeout without a response;
- ``delay``: the request is held for ``delay_s`` and then sent (past deadlines when
  ``delay_s`` exceeds them);
- ``flip``: GetObject only: the real response, with one bit flipped on the wire;
- ``lost_response``: PutObject only: the write lands, then its response is lost (a timeout),
  so the retry meets its own object;
- ``denied``: 403 SignatureDoesNotMatch, what wrong credentials produce;
- ``no_bucket``: 404 NoSuchBucket.

Object faults (``ObjectFaults``) damage what a segment consists of: flip bytes of a layer
object, delete a layer object / manifest / pointer, replace a manifest with one of another
model, dtype or shape under the right key, or overwrite a manifest/pointer with a malformed
document.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from typing import Callable, Iterable

import botocore.exceptions
import urllib3.exceptions
from botocore.awsrequest import AWSResponse
from botofaults import error_response

from lmcache_s3layer.format.objects import MAX_MANIFEST_BYTES, MAX_POINTER_BYTES, is_manifest_key, layer_of_key

HTTP_KINDS = ("slowdown", "internal", "unavailable", "reset", "truncate", "timeout", "delay", "flip",
              "lost_response", "denied", "no_bucket")

# A mix where most faults are transient (what S3 really produces), with a tail of hard ones.
DEFAULT_MIX = {"slowdown": 6, "internal": 3, "unavailable": 3, "reset": 4, "truncate": 3, "timeout": 2,
               "flip": 3, "lost_response": 2, "denied": 1, "no_bucket": 1}

_GET_ONLY = {"truncate", "flip"}
_PUT_ONLY = {"lost_response"}
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d+)")


class _ShortBody:
    """A response body that delivers ``data`` and then ends early (or breaks, like a reset)."""

    def __init__(self, data: bytes, reset: bool):
        self._data = data
        self._pos = 0
        self._reset = reset

    def read(self, amt=None):
        if self._pos >= len(self._data):
            if self._reset:
                raise urllib3.exceptions.ProtocolError(
                    "Connection broken: ConnectionResetError(104, 'Connection reset by peer')")
            return b""
        n = len(self._data) - self._pos if amt is None else min(amt, len(self._data) - self._pos)
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def stream(self, *args, **kwargs):
        yield self.read()

    def close(self):
        pass


class _FlippingBody:
    """Wraps a real StreamingBody and flips one bit at byte ``at`` of what it delivers."""

    def __init__(self, body, at: int, bit: int):
        self._body = body
        self._at = at
        self._mask = 1 << bit
        self._pos = 0

    def read(self, amt=None):
        chunk = self._body.read(amt)
        if chunk and self._pos <= self._at < self._pos + len(chunk):
            b = bytearray(chunk)
            b[self._at - self._pos] ^= self._mask
            chunk = bytes(b)
        self._pos += len(chunk)
        return chunk

    def close(self):
        self._body.close()


class HttpFaults:
    """Per-request faults on one or more boto3 clients. ``rate`` is the probability that a
    request gets a fault; ``mix`` weighs the kinds (a kind that does not apply to an
    operation is redrawn among those that do). Thread-safe."""

    def __init__(self, seed: int, rate: float = 0.0, mix: dict[str, float] | None = None,
                 delay_s: float = 0.2, ops: Iterable[str] | None = None, limit: int | None = None):
        self.rng = random.Random(seed)
        self.rate = rate
        # At most this many faults, then none: "fail the next n tries" for policy tests.
        self.limit = limit
        self.mix = dict(mix or DEFAULT_MIX)
        unknown = set(self.mix) - set(HTTP_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self.delay_s = delay_s
        self.ops = set(ops) if ops is not None else None  # None: every operation
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._clients: list = []

    # ---- wiring ----------------------------------------------------------------------------

    def attach(self, boto_client) -> "HttpFaults":
        events = boto_client.meta.events
        events.register_first("before-send.s3", self._before_send, unique_id=f"faults-send-{id(self)}")
        events.register_first("after-call.s3", self._after_call, unique_id=f"faults-after-{id(self)}")
        self._clients.append(boto_client)
        return self

    def detach(self) -> None:
        for c in self._clients:
            c.meta.events.unregister("before-send.s3", unique_id=f"faults-send-{id(self)}")
            c.meta.events.unregister("after-call.s3", unique_id=f"faults-after-{id(self)}")
        self._clients.clear()

    def set(self, rate: float | None = None, mix: dict[str, float] | None = None,
            delay_s: float | None = None, ops: Iterable[str] | None | bool = False,
            limit: int | None | bool = False) -> None:
        with self._lock:
            if limit is not False:
                self.limit = limit
            if rate is not None:
                self.rate = rate
            if mix is not None:
                self.mix = dict(mix)
            if delay_s is not None:
                self.delay_s = delay_s
            if ops is not False:
                self.ops = set(ops) if ops is not None else None

    @property
    def injected(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def by_kind(self) -> Counter:
        with self._lock:
            out: Counter = Counter()
            for (kind, _op), n in self.counts.items():
                out[kind] += n
            return out

    # ---- decisions -------------------------------------------------------------------------

    def _draw(self, op: str) -> str | None:
        with self._lock:
            if self.rate <= 0 or (self.ops is not None and op not in self.ops):
                return None
            if self.limit is not None and sum(self.counts.values()) >= self.limit:
                return None
            if self.rng.random() >= self.rate:
                return None
            kinds = [(k, w) for k, w in self.mix.items() if w > 0 and _applies(k, op)]
            if not kinds:
                return None
            total = sum(w for _, w in kinds)
            x = self.rng.random() * total
            for kind, w in kinds:  # noqa: B007 - the kind drawn is the one the loop stops at
                x -= w
                if x < 0:
                    break
            self.counts[(kind, op)] += 1
            return kind

    def _before_send(self, request, **kwargs):
        op = kwargs.get("event_name", "").rsplit(".", 1)[-1]
        kind = self._draw(op)
        # after-call of this request runs on this thread; reset so a request that died in
        # flight cannot pass its fault on to the next one.
        _tls.pending = kind if kind in ("flip", "lost_response") else None
        if kind is None:
            return None
        url = request.url
        if kind == "slowdown":
            return error_response(url, 503, "SlowDown", "Please reduce your request rate.")
        if kind == "internal":
            return error_response(url, 500, "InternalError", "We encountered an internal error.")
        if kind == "unavailable":
            return error_response(url, 503, "ServiceUnavailable", "Service is unable to handle request.")
        if kind == "denied":
            return error_response(url, 403, "SignatureDoesNotMatch", "The request signature we calculated "
                                  "does not match the signature you provided.")
        if kind == "no_bucket":
            return error_response(url, 404, "NoSuchBucket", "The specified bucket does not exist")
        if kind == "timeout":
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=url)
        if kind == "delay":
            with self._lock:
                d = self.delay_s
            time.sleep(d)
            return None
        if kind in ("reset", "truncate") and op == "GetObject":
            return self._short_get(request, reset=(kind == "reset"))
        if kind == "reset":
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=url)
        return None  # flip / lost_response act in after-call

    def _short_get(self, request, reset: bool) -> AWSResponse:
        m = _RANGE_RE.search(request.headers.get("Range", b"").decode()
                             if isinstance(request.headers.get("Range"), bytes)
                             else str(request.headers.get("Range", "")))
        start, n = (int(m.group(1)), int(m.group(2)) - int(m.group(1)) + 1) if m else (0, 4096)
        if start == 0 and n - 1 in (MAX_POINTER_BYTES, MAX_MANIFEST_BYTES):
            n = 300  # a whole small object (pointer, manifest): its real size is some hundreds of bytes
        n = min(n, 1 << 20)
        with self._lock:
            keep = self.rng.randrange(0, max(1, n))
            junk = self.rng.randbytes(keep)
        headers = {"Content-Length": str(n), "Content-Range": f"bytes {start}-{start + n - 1}/{start + n}",
                   "Content-Type": "binary/octet-stream", "ETag": '"fault"'}
        return AWSResponse(request.url, 206, headers, _ShortBody(junk, reset))

    def _after_call(self, http_response=None, parsed=None, model=None, **kwargs):
        kind = getattr(_tls, "pending", None)
        if kind is None:
            return
        _tls.pending = None
        if http_response is None or http_response.status_code >= 300:
            return
        if kind == "flip" and parsed is not None and "Body" in parsed:
            n = int(parsed.get("ContentLength") or 0)
            if n > 0:
                with self._lock:
                    at, bit = self.rng.randrange(n), self.rng.randrange(8)
                parsed["Body"] = _FlippingBody(parsed["Body"], at, bit)
        elif kind == "lost_response":
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=http_response.url)


_tls = threading.local()


def _applies(kind: str, op: str) -> bool:
    if kind in _GET_ONLY:
        return op == "GetObject"
    if kind in _PUT_ONLY:
        return op == "PutObject"
    return True


# ---------------------------------------------------------------------------------------------
# Object-level faults
# ---------------------------------------------------------------------------------------------

OBJECT_KINDS = ("flip_layer", "delete_layer", "delete_manifest", "delete_pointer", "foreign_model",
                "foreign_dtype", "foreign_shape", "malformed_manifest", "malformed_pointer", "stale_pointer")


class ObjectFaults:
    """Damage to stored segments, done with a separate (admin) boto3 client."""

    def __init__(self, admin_client, bucket: str, seed: int):
        self.s3 = admin_client
        self.bucket = bucket
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def injected(self) -> int:
        return sum(self.counts.values())

    # ---- finding objects -------------------------------------------------------------------

    def keys(self, prefix: str = "") -> list[str]:
        out, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            resp = self.s3.list_objects_v2(**kw)
            out += [o["Key"] for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return out
            token = resp["NextContinuationToken"]

    def segment_objects(self, segment_dir: str) -> dict[str, list[str]]:
        keys = self.keys(segment_dir.rstrip("/") + "/")
        return {"layers": sorted(k for k in keys if layer_of_key(k) is not None),
                "manifest": [k for k in keys if is_manifest_key(k)]}

    # ---- faults ----------------------------------------------------------------------------

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def flip_bytes(self, key: str, n: int = 1) -> list[int]:
        body = bytearray(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        with self._lock:
            where = [self.rng.randrange(len(body)) for _ in range(n)]
            bits = [self.rng.randrange(8) for _ in range(n)]
        for at, bit in zip(where, bits):
            body[at] ^= 1 << bit
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=bytes(body))
        self._count("flip_layer")
        return where

    def delete(self, key: str, kind: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=key)
        self._count(kind)

    def apply(self, kind: str, *, pointer: str, manifest: str | None = None, layer: str | None = None,
              flips: int = 1) -> None:
        """One object fault of ``kind`` on a chunk's pointer, its segment's manifest, or one of
        the segment's layer objects."""
        if kind == "delete_pointer":
            self.delete(pointer, kind)
        elif kind == "malformed_pointer":
            self.malformed(pointer, kind)
        elif kind == "stale_pointer":
            self.stale_pointer(pointer)
        elif kind == "delete_manifest":
            self.delete(manifest, kind)
        elif kind.startswith("foreign"):
            self.foreign_manifest(manifest, kind)
        elif kind == "malformed_manifest":
            self.malformed(manifest, kind)
        elif kind == "flip_layer":
            self.flip_bytes(layer, n=flips)
        elif kind == "delete_layer":
            self.delete(layer, kind)
        else:
            raise ValueError(f"unknown object fault {kind!r}")

    def foreign_manifest(self, manifest_key: str, kind: str) -> None:
        """Rewrite the manifest as one another model/dtype/shape would have written under this
        key: well-formed, self-consistent, and not ours."""
        doc = json.loads(self.s3.get_object(Bucket=self.bucket, Key=manifest_key)["Body"].read())
        if kind == "foreign_model":
            doc["namespace"]["model"] = "other-org/other-model"
        elif kind == "foreign_dtype":
            doc["namespace"]["dtype"] = "float32"
            doc["element_size"] = 4
            _rescale(doc, 2)
        elif kind == "foreign_shape":
            doc["token_shape"] = [doc["token_shape"][0], doc["token_shape"][-1] * 2]
            _rescale(doc, 2)
        else:
            raise ValueError(kind)
        self.s3.put_object(Bucket=self.bucket, Key=manifest_key, Body=json.dumps(doc).encode())
        self._count(kind)

    def malformed(self, key: str, kind: str) -> str:
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        with self._lock:
            how, data = malform(body, self.rng)
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        self._count(kind)
        return how

    def stale_pointer(self, pointer_key: str) -> None:
        """A pointer naming a segment that does not exist (a half-deleted segment)."""
        doc = json.loads(self.s3.get_object(Bucket=self.bucket, Key=pointer_key)["Body"].read())
        doc["segment_id"] = "%032x" % self.rng.getrandbits(128)
        self.s3.put_object(Bucket=self.bucket, Key=pointer_key, Body=json.dumps(doc).encode())
        self._count("stale_pointer")


def _rescale(doc: dict, factor: int) -> None:
    doc["chunk_offsets"] = [o * factor for o in doc["chunk_offsets"]]
    doc["layer_bytes"] = doc["layer_bytes"] * factor


MALFORMATIONS: tuple[tuple[str, Callable[[bytes, random.Random], bytes]], ...] = (
    ("empty", lambda b, r: b""),
    ("truncated", lambda b, r: b[: r.randrange(1, max(2, len(b)))]),
    ("garbage", lambda b, r: r.randbytes(r.randrange(1, 200))),
    ("not_json_object", lambda b, r: b"[1, 2, 3]"),
    ("wrong_version", lambda b, r: b.replace(b'"version":1', b'"version":2')),
    ("extra_field", lambda b, r: b[:-1] + b',"surprise":1}'),
    ("duplicate_key", lambda b, r: b[:-1] + b',"version":1}'),
    ("nan", lambda b, r: b.replace(b'"version":1', b'"version":NaN')),
    ("deep", lambda b, r: b"[" * 100000 + b"]" * 100000),
    ("bit_flip", lambda b, r: _flip(b, r)),
)


def _flip(b: bytes, r: random.Random) -> bytes:
    x = bytearray(b)
    x[r.randrange(len(x))] ^= 1 << r.randrange(8)
    return bytes(x)


def malform(body: bytes, rng: random.Random) -> tuple[str, bytes]:
    how, fn = MALFORMATIONS[rng.randrange(len(MALFORMATIONS))]
    return how, fn(body, rng)
