"""Typed errors, so callers decide on kinds (retry, miss, fail loudly) instead of strings.

Messages are built from object names, HTTP codes and our own words only: never from
credentials, signed URLs or request headers (see ``s3.redact``).
"""

from __future__ import annotations


class S3LayerError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(S3LayerError, ValueError):
    """A setting is missing, malformed or unsafe; raised once, at start-up."""


class FormatError(S3LayerError):
    """A manifest or pointer is truncated, oversized, malformed or inconsistent."""


class NamespaceMismatch(FormatError):
    """A well-formed manifest/pointer that belongs to another model, rank, dtype or chunk."""


class StorageError(S3LayerError):
    """An object-store request failed; ``retryable`` says whether trying again may help."""

    retryable = False

    def __init__(self, message: str, *, key: str | None = None, code: str | None = None):
        super().__init__(message)
        self.key = key
        self.code = code


class ObjectNotFound(StorageError):
    pass


class BucketNotFound(StorageError):
    pass


class AccessDenied(StorageError):
    pass


class PreconditionFailed(StorageError):
    """A create-only write lost the race: the object already exists."""


class Throttled(StorageError):
    retryable = True


class Unavailable(StorageError):
    """5xx, connection refused/reset, truncated body: the store may recover."""

    retryable = True


class StorageTimeout(StorageError):
    retryable = True


class CorruptObject(StorageError):
    """Bytes arrived but do not match the manifest's checksum or size."""

    retryable = True  # a torn read may succeed again; persistent corruption exhausts retries


class RetrievalFailed(S3LayerError):
    """A layer could not be fetched and verified before its deadline; nothing partial is served."""
