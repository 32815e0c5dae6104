"""CRC32C of KV slices: the checksum the manifest records per (layer, chunk).

CRC32C because it is hardware-accelerated (SSE4.2 / ARMv8 CRC) in awscrt, which LMCache
already depends on, so verifying every byte costs far less than moving it; it is also the
checksum S3 itself offers, so a future version can ask S3 to verify uploads with it.
"""

from __future__ import annotations

from awscrt import checksums as _crt


def crc32c(data, previous: int = 0) -> int:
    """CRC32C of a bytes-like object (bytes, bytearray, memoryview of contiguous bytes)."""
    if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
        data = data.cast("B")
    return _crt.crc32c(data, previous)


def slice_checksums(buf, offsets: list[int], sizes: list[int]) -> list[int]:
    view = memoryview(buf).cast("B")
    return [crc32c(view[o:o + s]) for o, s in zip(offsets, sizes)]
