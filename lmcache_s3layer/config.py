"""Typed settings, built once from LMCache's ``extra_config`` and validated at start-up.

Every key lives under the ``s3layer.`` prefix, flat, because LMCache does not flatten nested
dicts in ``extra_config`` (and ``LMCACHE_EXTRA_CONFIG`` is one JSON object). A misspelt key is
an error, not a silently ignored default: a cache that quietly runs with the wrong bucket or no
prefetch is worse than one that refuses to start.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from lmcache_s3layer.errors import ConfigError

PREFIX = "s3layer."

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "KI": 1024,
          "M": 1000**2, "MB": 1000**2, "MIB": 1024**2, "MI": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "GI": 1024**3,
          "T": 1000**4, "TB": 1000**4, "TIB": 1024**4, "TI": 1024**4}


def parse_size(value: Any, name: str) -> int:
    """Bytes from an int or a string such as ``512MiB`` / ``8 MB``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size in bytes, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").upper()
            return int(float(m.group(1)) * _UNITS[unit])
    raise ConfigError(f"{name}: expected a size such as 8388608, '8MiB' or '1GiB', got {value!r}")


_BYTE_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def fmt_bytes(n: float, digits: int = 1) -> str:
    """A byte count for people, in binary units: ``fmt_bytes(3 << 29)`` is ``1.5 GiB``,
    ``digits=2`` gives ``1.50 GiB``; below 1 KiB, whole bytes (``512 B``)."""
    for unit, size in _BYTE_UNITS:
        if n >= size:
            return f"{n / size:,.{digits}f} {unit}"
    return f"{n:,.0f} B"


def parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class S3LayerConfig:
    # --- where the objects live -------------------------------------------------------------
    bucket: str = ""
    prefix: str = "kvcache"
    endpoint_url: str | None = None  # None: AWS's regional endpoint
    region: str = "us-east-1"
    addressing_style: str = "auto"  # auto | path | virtual (MinIO/Ceph/SeaweedFS want path)
    verify_tls: bool = True
    ca_bundle: str | None = None
    # Credentials: explicit values win, else the standard AWS chain (env, profile, IMDS).
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None

    # --- the client ---------------------------------------------------------------------------
    max_connections: int = 64
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0
    max_attempts: int = 4  # first try included
    retry_base_s: float = 0.05
    retry_max_backoff_s: float = 1.0
    part_size_bytes: int = 8 * 1024**2  # AWS advises 8-16 MiB ranged GETs
    conditional_writes: bool = True  # create-only pointers: the first committed segment wins

    # --- the format ---------------------------------------------------------------------------
    segment_max_chunks: int = 64  # 64 x 256 tokens x 4 KiB = 16 MiB layer objects for Llama-8B

    # --- the read path ------------------------------------------------------------------------
    staging_budget_bytes: int = 512 * 1024**2
    prefetch_max_depth: int = 0  # 0: as deep as the staging budget allows
    prefetch_on_lookup: bool = True
    prefetch_idle_timeout_s: float = 30.0  # a prefetch whose retrieval never comes is dropped
    retrieval_deadline_s: float = 30.0
    lookup_timeout_s: float = 2.0
    negative_cache_ttl_s: float = 2.0
    index_max_entries: int = 1_000_000
    # What pinned look-ups may promise LMCache's CPU pool, in bytes; 0: unlimited (a core with
    # no LMCache pool behind it: tests, the CLI). LMCache keeps every layer it was handed until
    # the retrieval's last layer, so a hit of B bytes per layer holds L x B of the pool until
    # it ends; a look-up answers only the prefix that fits what other pinned look-ups have not
    # promised (a shorter hit, never a stall). The backend sets it to the pool's real capacity;
    # a user may set a smaller value (e.g. to leave room for stores), never a larger one.
    handoff_budget_bytes: int = 0
    # The pool's allocation granularity (LMCache's allocator rounds every buffer up to 4 KiB):
    # set by the backend, so a promise counts what a buffer really takes.
    handoff_align_bytes: int = 1

    # --- the write path -----------------------------------------------------------------------
    put_inflight_budget_bytes: int = 1024**3
    put_workers: int = 8

    # --- guard rails and operations -----------------------------------------------------------
    require_hash_seed: bool = True
    metrics_port: int | None = None  # None: metrics are kept in-process only, not served
    # Prometheus scrapes from another host, so all interfaces by default; 127.0.0.1 keeps
    # /metrics private to the machine.
    metrics_addr: str = "0.0.0.0"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def secret_values(self) -> tuple[str, ...]:
        return tuple(v for v in (self.secret_access_key, self.session_token) if v)

    def replace(self, **changes: Any) -> "S3LayerConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "S3LayerConfig":
        """Read ``s3layer.*`` keys; unknown ``s3layer.*`` keys are an error (typos)."""
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in extra.items():
            if not isinstance(raw_key, str) or not raw_key.startswith(PREFIX):
                continue
            name = raw_key[len(PREFIX):]
            if name not in known:
                raise ConfigError(
                    f"unknown setting {raw_key!r}; known settings: "
                    + ", ".join(PREFIX + k for k in sorted(known))
                )
            if name in _SECRET_FIELDS:
                value = _resolve_secret(value, raw_key)
            kwargs[name] = _coerce(known[name], value, raw_key)
        return cls(**kwargs)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "S3LayerConfig":
        """Same as ``from_extra_config`` for un-prefixed keys (CLI, tests)."""
        return cls.from_extra_config({PREFIX + k: v for k, v in values.items()})


_SECRET_FIELDS = {"access_key_id", "secret_access_key", "session_token"}


def _resolve_secret(value: Any, name: str) -> Any:
    """``env:NAME`` reads the credential from the environment. LMCache logs its whole
    configuration (extra_config included) at start-up, so a literal secret in the YAML ends
    up in the log; an ``env:`` reference or the AWS credential chain does not."""
    if isinstance(value, str) and value.startswith("env:"):
        var = value[4:]
        import os
        got = os.environ.get(var)
        if not got:
            raise ConfigError(f"{name}: environment variable {var!r} is not set")
        return got
    return value


_SIZE_FIELDS = {"part_size_bytes", "staging_budget_bytes", "put_inflight_budget_bytes",
                "handoff_budget_bytes", "handoff_align_bytes"}


def _coerce(f: dataclasses.Field, value: Any, name: str) -> Any:
    if value is None:
        return None
    if f.name in _SIZE_FIELDS:
        return parse_size(value, name)
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    try:
        if kind.startswith("bool"):
            return parse_bool(value, name)
        if kind.startswith("int"):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.split(' ')[0]}, got {value!r}") from None
    return value


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](--x-s3)?$|^[a-z0-9][a-z0-9.\-]{1,61}--[a-z0-9\-]+--x-s3$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9!_.*'()\-/]*$")


def _validate(c: S3LayerConfig) -> None:
    if not c.bucket:
        raise ConfigError(
            "s3layer.bucket is not set: name the bucket that holds the KV cache "
            "(extra_config: {'s3layer.bucket': 'my-kv-bucket'})"
        )
    if not _BUCKET_RE.match(c.bucket):
        raise ConfigError(f"s3layer.bucket: {c.bucket!r} is not a valid S3 bucket name")
    # '.' and '..' components are literal keys on S3 but collapsed by some S3 look-alikes and
    # by every file-backed tool that mirrors a bucket, so they could alias another prefix.
    if (not _PREFIX_RE.match(c.prefix) or c.prefix.startswith("/")
            or any(part in (".", "..") for part in c.prefix.split("/"))):
        raise ConfigError(
            f"s3layer.prefix: {c.prefix!r} must be a relative key prefix of letters, digits "
            "and !_.*'()-/ with no '.' or '..' component"
        )
    if c.addressing_style not in ("auto", "path", "virtual"):
        raise ConfigError("s3layer.addressing_style must be one of auto, path, virtual")
    if c.endpoint_url is not None and not re.match(r"^https?://[^\s/]+", c.endpoint_url):
        raise ConfigError(f"s3layer.endpoint_url: {c.endpoint_url!r} is not an http(s) URL")
    if (c.access_key_id is None) != (c.secret_access_key is None):
        raise ConfigError(
            "s3layer.access_key_id and s3layer.secret_access_key must be given together "
            "(or neither, to use the standard AWS credential chain)"
        )
    positive = {
        "max_connections": c.max_connections, "max_attempts": c.max_attempts,
        "part_size_bytes": c.part_size_bytes, "segment_max_chunks": c.segment_max_chunks,
        "staging_budget_bytes": c.staging_budget_bytes, "put_workers": c.put_workers,
        "put_inflight_budget_bytes": c.put_inflight_budget_bytes,
        "connect_timeout_s": c.connect_timeout_s, "read_timeout_s": c.read_timeout_s,
        "retrieval_deadline_s": c.retrieval_deadline_s, "lookup_timeout_s": c.lookup_timeout_s,
        "prefetch_idle_timeout_s": c.prefetch_idle_timeout_s,
        "index_max_entries": c.index_max_entries,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"s3layer.{name} must be > 0, got {value}")
    if c.part_size_bytes < 64 * 1024:
        raise ConfigError("s3layer.part_size_bytes must be at least 64KiB")
    if c.segment_max_chunks > 4096:
        raise ConfigError("s3layer.segment_max_chunks must be at most 4096")
    if c.prefetch_max_depth < 0:
        raise ConfigError("s3layer.prefetch_max_depth must be >= 0 (0 = as deep as the budget allows)")
    if c.handoff_budget_bytes < 0:
        raise ConfigError("s3layer.handoff_budget_bytes must be >= 0 (0 = as large as LMCache's pool)")
    if c.handoff_align_bytes < 1:
        raise ConfigError("s3layer.handoff_align_bytes must be >= 1")
    for name in ("retry_base_s", "retry_max_backoff_s", "negative_cache_ttl_s"):
        if getattr(c, name) < 0:
            raise ConfigError(f"s3layer.{name} must be >= 0")
    if c.metrics_port is not None and not (0 <= c.metrics_port <= 65535):
        raise ConfigError("s3layer.metrics_port must be a TCP port")
    if not c.metrics_addr or any(ch.isspace() for ch in c.metrics_addr):
        raise ConfigError("s3layer.metrics_addr must be an interface address such as 0.0.0.0 or 127.0.0.1")
