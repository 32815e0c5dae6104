"""Segments on the object store: write (layers, then manifest, then the start pointer),
verified ranged reads of one layer's chunk range, pointer look-ups, and ordered deletion.

Commit protocol (why each step is where it is):
1. every layer object is PUT; nothing points at them yet, so a crash leaves only garbage
   that ``gc`` collects;
2. the manifest is PUT create-only: the segment's content is fixed from here on, but nothing
   finds it yet;
3. ONE pointer, named by the segment's first chunk, create-only: from here on other instances
   find the segment. Two writers starting a segment at the same chunk conflict on it; the
   loser deletes what it wrote (manifest, layers), so a start hash resolves to exactly one
   segment. Segments that overlap without sharing a start (a store of chunks 0..9 and one of
   5..14) both commit; they hold the same bytes for the shared chunks (hashes are chained),
   so a reader may use either.
A pointer whose manifest does not exist is garbage (the manifest is written before the pointer
and deleted after it): a writer meeting one replaces it (``commit``), and ``gc`` removes the
ones nobody replaces. Deletion runs in the reverse order of the commit, so a concurrent
reader sees a clean miss, never a segment whose manifest promises layers that are gone
without noticing (a missing layer is a typed error that the read path turns into a miss or a
loud failure, never partial data).
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from lmcache_s3layer.errors import CorruptObject, FormatError, ObjectNotFound, PreconditionFailed, StorageError
from lmcache_s3layer.format.checksum import crc32c
from lmcache_s3layer.format.objects import (
    DTYPE_SIZES,
    MAX_MANIFEST_BYTES,
    MAX_POINTER_BYTES,
    Manifest,
    Names,
    Namespace,
    Pointer,
    is_manifest_key,
    normalize_hash,
    parse_key,
    version_root,
)
from lmcache_s3layer.store.client import S3Client
from lmcache_s3layer.store.ranges import split_range

log = logging.getLogger(__name__)


def new_segment_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Part:
    """One ranged GET: ``length`` bytes at ``offset`` of ``key`` into ``dest`` of the buffer."""

    key: str
    offset: int
    length: int
    dest: int


@dataclass(frozen=True)
class LayerRead:
    """What it takes to fetch and verify chunks first..last (inclusive) of one layer."""

    manifest: Manifest
    layer: int
    first: int
    last: int
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.parts)


class SegmentStore:
    def __init__(self, client: S3Client, prefix: str, *, part_size: int | None = None):
        self.client = client
        self.prefix = prefix
        self.part_size = part_size or client.cfg.part_size_bytes
        self._names: dict[Namespace, Names] = {}

    def names(self, ns: Namespace) -> Names:
        n = self._names.get(ns)
        if n is None:
            n = self._names[ns] = Names(self.prefix, ns)
        return n

    # ---- write ---------------------------------------------------------------------------

    def put_layer(self, ns: Namespace, segment_id: str, layer: int, data) -> None:
        self.client.put_bytes(self.names(ns).layer_object(segment_id, layer), data)

    def commit(self, manifest: Manifest, *, create_only: bool = True) -> int:
        """Manifest, then the start pointer; returns how many pointers were written (0 or 1).

        Raises PreconditionFailed (after cleaning up) when another segment already starts at
        this chunk, and StorageError when the manifest could not be written (then nothing is
        committed). Once the manifest is down the segment is committed: a pointer that cannot
        be written only hides it from other instances (this one knows it from memory; ``gc``
        collects it as unreferenced once past the grace period), so it ends the commit
        instead of undoing it.
        """
        names = self.names(manifest.namespace)
        sid = manifest.segment_id
        mkey = names.manifest_object(sid)
        body = manifest.encode()
        try:
            self.client.put_bytes(mkey, body, create_only=create_only)
        except PreconditionFailed:
            # Segment ids are random, so an existing manifest under ours is our own earlier
            # try whose response was lost: the write landed, the retry met it.
            if not self._holds(mkey, body):
                raise
        pointer = Pointer.of(manifest)
        key = names.pointer_object(pointer.chunk_hash)
        try:
            self._put_pointer(manifest.namespace, key, pointer, create_only)
        except PreconditionFailed:
            log.info("segment %s lost a commit race on its first chunk; removing it", sid)
            self._delete_quietly([mkey] + [names.layer_object(sid, l) for l in range(manifest.num_layers)])
            raise
        except StorageError as exc:
            log.warning("segment %s is committed but its pointer was not written (%s); other "
                        "instances will not find it", sid, exc)
            return 0
        return 1

    def _put_pointer(self, ns: Namespace, key: str, pointer: Pointer, create_only: bool) -> None:
        """Create-only PUT of a start pointer; PreconditionFailed when a live segment holds it.

        An existing pointer is ours (a retry whose first response was lost), a live segment's
        (we lost the race), or garbage: its manifest is gone (deleted by hand or by a lifecycle
        rule; our own deletion removes pointers first). Garbage is replaced, once: left in
        place it would make every store of this prefix lose its commit until ``gc`` ran.
        S3 has no conditional delete, so two writers replacing the same garbage pointer at
        once can each delete it and the later delete may remove the pointer the other just
        created: that segment is then unreferenced (a duplicate ``gc`` collects), never a
        pointer to wrong data, because a reader checks the manifest's first chunk.
        """
        body = pointer.encode()
        for attempt in range(2):
            try:
                self.client.put_bytes(key, body, create_only=create_only)
                return
            except PreconditionFailed:
                state = self._pointer_state(ns, pointer)
                if state == "ours":
                    return  # from a try whose response was lost
                if state == "live" or attempt:
                    raise
            if state == "garbage":
                log.info("replacing the pointer of chunk %016x: the segment it names has no manifest",
                         pointer.chunk_hash & ((1 << 64) - 1))
                self.client.delete(key)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _pointer_state(self, ns: Namespace, pointer: Pointer) -> str:
        """What holds ``pointer``'s key: "ours", "gone" (deleted since), "garbage" (its
        segment's manifest is provably absent) or "live" (anything else, errors included:
        a pointer is only replaced on proof)."""
        try:
            existing = self.read_pointer(ns, pointer.chunk_hash)
        except (FormatError, StorageError):
            return "live"
        if existing is None:
            return "gone"
        if existing.segment_id == pointer.segment_id:
            return "ours"
        return "live" if self._manifest_exists(ns, existing.segment_id) else "garbage"

    def _manifest_exists(self, ns: Namespace, segment_id: str) -> bool:
        """False only when the manifest is provably absent: an error is no proof."""
        try:
            self.client.head(self.names(ns).manifest_object(segment_id))
        except ObjectNotFound:
            return False
        except StorageError:
            return True
        return True

    def _holds(self, key: str, body: bytes) -> bool:
        try:
            return self.client.get_bytes(key, MAX_MANIFEST_BYTES) == body
        except StorageError:
            return False

    def write_segment(self, ns: Namespace, chunk_hashes: Sequence[int], chunk_tokens: Sequence[int],
                      token_shape: Sequence[int], layers: Sequence, *, segment_id: str | None = None,
                      create_only: bool = True) -> Manifest:
        """Write a whole segment from per-layer buffers (each the concatenated chunk slices)."""
        sid = segment_id or new_segment_id()
        hashes = tuple(normalize_hash(h) for h in chunk_hashes)
        checksums = []
        manifest = None
        for buf in layers:
            view = memoryview(buf).cast("B")
            checksums.append(tuple(_chunk_checksums(view, token_shape, chunk_tokens, ns)))
        manifest = Manifest(sid, ns, len(layers), tuple(token_shape), hashes, tuple(chunk_tokens),
                            tuple(checksums), time.time())
        for layer, buf in enumerate(layers):
            if len(memoryview(buf).cast("B")) != manifest.layer_bytes:
                raise FormatError(f"layer {layer}: {len(memoryview(buf).cast('B'))} bytes, "
                                  f"expected {manifest.layer_bytes}")
            self.put_layer(ns, sid, layer, buf)
        self.commit(manifest, create_only=create_only)
        return manifest

    # ---- read ----------------------------------------------------------------------------

    def read_manifest(self, ns: Namespace, segment_id: str) -> Manifest:
        data = self.client.get_bytes(self.names(ns).manifest_object(segment_id), MAX_MANIFEST_BYTES)
        return Manifest.decode(data, expect=ns, expect_segment=segment_id)

    def read_pointer(self, ns: Namespace, chunk_hash: int) -> Pointer | None:
        """The pointer of the segment starting at this chunk; None when no segment does (which
        includes every chunk in the middle of a segment)."""
        try:
            data = self.client.get_bytes(self.names(ns).pointer_object(chunk_hash), MAX_POINTER_BYTES)
        except ObjectNotFound:
            return None
        return Pointer.decode(data, expect_hash=chunk_hash)

    def plan_layer_read(self, manifest: Manifest, layer: int, first: int, last: int,
                        part_size: int | None = None) -> LayerRead:
        """Coalesced: chunks first..last are contiguous in the layer object, so one range,
        split into parts of ``part_size`` (default: the store's) for parallel GETs."""
        part_size = part_size or self.part_size
        if not 0 <= layer < manifest.num_layers:
            raise FormatError(f"layer {layer} outside segment {manifest.segment_id} "
                              f"({manifest.num_layers} layers)")
        start, end = manifest.chunk_byte_range(first, last)
        key = self.names(manifest.namespace).layer_object(manifest.segment_id, layer)
        parts = tuple(Part(key, pos, n, pos - start) for pos, n in split_range(start, end - start, part_size))
        return LayerRead(manifest, layer, first, last, parts)

    def fetch_part(self, part: Part, out: memoryview) -> None:
        self.client.get_range_into(part.key, part.offset, out[part.dest:part.dest + part.length])

    @staticmethod
    def verify(read: LayerRead, buf) -> None:
        """Raise CorruptObject unless every chunk slice in ``buf`` matches the manifest."""
        view = memoryview(buf).cast("B")
        m = read.manifest
        base = m.chunk_offsets[read.first]
        expected = m.checksums[read.layer]
        for j in range(read.first, read.last + 1):
            lo = m.chunk_offsets[j] - base
            hi = lo + m.chunk_tokens[j] * m.bytes_per_token
            if crc32c(view[lo:hi]) != expected[j]:
                raise CorruptObject(
                    f"segment {m.segment_id} layer {read.layer} chunk {j}: checksum mismatch",
                    key=read.parts[0].key if read.parts else None, code="Checksum")

    @staticmethod
    def verify_slices(read: LayerRead, chunk_views: list) -> None:
        """Like ``verify`` for a scatter read: one buffer per chunk of the read, in order."""
        m = read.manifest
        expected = m.checksums[read.layer]
        if len(chunk_views) != read.last - read.first + 1:
            raise CorruptObject("internal: buffer count does not match the chunk range")
        for j, view in zip(range(read.first, read.last + 1), chunk_views):
            if len(view) != m.chunk_tokens[j] * m.bytes_per_token or crc32c(view) != expected[j]:
                raise CorruptObject(
                    f"segment {m.segment_id} layer {read.layer} chunk {j}: checksum mismatch",
                    key=read.parts[0].key if read.parts else None, code="Checksum")

    def read_layer(self, manifest: Manifest, layer: int, first: int, last: int,
                   out=None, pool: ThreadPoolExecutor | None = None) -> memoryview:
        """Fetch and verify; returns the filled buffer (allocated when ``out`` is None)."""
        read = self.plan_layer_read(manifest, layer, first, last)
        buf = memoryview(out if out is not None else bytearray(read.nbytes)).cast("B")
        if len(buf) < read.nbytes:
            raise ValueError(f"buffer of {len(buf)} bytes is smaller than the {read.nbytes} to read")
        buf = buf[:read.nbytes]
        if pool is not None and len(read.parts) > 1:
            for f in [pool.submit(self.fetch_part, p, buf) for p in read.parts]:
                f.result()
        else:
            for p in read.parts:
                self.fetch_part(p, buf)
        self.verify(read, buf)
        return buf

    # ---- listing and deletion -------------------------------------------------------------

    def iter_manifest_keys(self, root: str | None = None) -> Iterator[tuple[str, float, int]]:
        """(manifest key, last-modified, size) of every committed segment under ``root``."""
        for info in self.client.list(root if root is not None else version_root(self.prefix)):
            if is_manifest_key(info.key):
                yield info.key, info.last_modified, info.size

    def read_manifest_key(self, key: str) -> Manifest:
        parsed = parse_key(key)
        if parsed is None or not parsed.is_manifest:
            raise FormatError(f"{key!r} is not a segment manifest name")
        return Manifest.decode(self.client.get_bytes(key, MAX_MANIFEST_BYTES), expect_segment=parsed.ident)

    def delete_segment(self, manifest: Manifest) -> int:
        """Start pointer (only if it still names this segment), manifest, then layer objects."""
        names = self.names(manifest.namespace)
        sid = manifest.segment_id
        deleted = 0
        start = manifest.chunk_hashes[0]
        try:
            p = self.read_pointer(manifest.namespace, start)
        except (FormatError, StorageError):
            p = None
        if p is not None and p.segment_id == sid:
            self.client.delete(names.pointer_object(start))
            deleted += 1
        self.client.delete(names.manifest_object(sid))
        layer_keys = [names.layer_object(sid, l) for l in range(manifest.num_layers)]
        self.client.delete_many(layer_keys)
        return deleted + 1 + len(layer_keys)

    def _delete_quietly(self, keys: Iterable[str]) -> None:
        for k in keys:
            try:
                self.client.delete(k)
            except StorageError as exc:
                log.warning("could not remove %s while aborting a segment: %s", k, exc)


def _chunk_checksums(view: memoryview, token_shape: Sequence[int], chunk_tokens: Sequence[int],
                     ns: Namespace) -> list[int]:
    bpt = DTYPE_SIZES[ns.dtype]
    for d in token_shape:
        bpt *= d
    out, pos = [], 0
    for t in chunk_tokens:
        out.append(crc32c(view[pos:pos + t * bpt]))
        pos += t * bpt
    return out
