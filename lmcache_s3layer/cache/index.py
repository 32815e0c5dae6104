"""Chunk hash -> (committed segment, position), in memory, with pointer look-ups for misses.

LMCache asks "is this chunk here?" on the scheduling path (lookup) and again on the forward
path (store_layer / retrieve_layer). The memory answer must be microseconds. Remotely, only a
segment's FIRST chunk has a pointer (format v2); its manifest names every chunk of the
segment, and resolving one segment puts all of its chunks in memory.

A look-up of chunks memory does not know costs ONE round trip of pointer GETs, all in
parallel (each found pointer followed by its manifest GET, one per segment), then a walk
with no I/O: a chunk resolves when memory knows it, when its own pointer was found (it starts
a segment), or when a manifest resolved by the same look-up lists it (it continues that
segment). Walking segment by segment would be cheaper in GETs and slower by one round trip
per segment; the look-up is on the scheduling path, so the GETs are spent instead (a 404
costs as little as a hit). Because hashes are chained from the first token, a prefix hit
always begins at a segment start or continues a segment already resolved, so this finds
every prefix a pointer per chunk found.

Chunks a look-up concluded are missing (no pointer, and listed by no manifest it resolved) are
remembered for a short TTL, so a burst of look-ups for a cold prefix costs one request per
chunk, not one per call. A chunk whose 404 is explained by a manifest (the middle of a
segment) is never remembered as missing.

Pins: a pinned chunk's entry cannot be evicted or dropped until unpinned, so a chunk that was
a hit at lookup is still a hit at retrieve (LMCache #899 crashes the worker otherwise).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Sequence

from lmcache_s3layer.errors import FormatError, StorageError
from lmcache_s3layer.format.objects import Manifest, Namespace, normalize_hash
from lmcache_s3layer.store.segments import SegmentStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Location:
    manifest: Manifest
    index: int

    @property
    def tokens(self) -> int:
        return self.manifest.chunk_tokens[self.index]


@dataclass
class IndexStats:
    memory_hits: int = 0
    remote_hits: int = 0
    misses: int = 0
    pointer_gets: int = 0
    manifest_gets: int = 0
    bad_objects: int = 0
    covered: int = 0  # resolved without a pointer of their own: listed by a resolved manifest
    remote_rounds: int = 0  # look-ups that needed the store: one parallel round of GETs each


class ChunkIndex:
    def __init__(self, store: SegmentStore, *, pool: ThreadPoolExecutor, max_entries: int = 1_000_000,
                 negative_ttl_s: float = 2.0, lookup_timeout_s: float = 2.0, clock=time.monotonic):
        self.store = store
        self._pool = pool
        self._max_entries = max_entries
        self._negative_ttl = negative_ttl_s
        self._lookup_timeout = lookup_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Namespace, int], Location] = OrderedDict()
        self._pins: dict[tuple[Namespace, int], int] = {}
        self._negative: dict[tuple[Namespace, int], float] = {}
        self._manifests: dict[str, Manifest] = {}
        self.stats = IndexStats()

    # ---- memory ----------------------------------------------------------------------------

    def get(self, ns: Namespace, chunk_hash: int) -> Location | None:
        key = (ns, normalize_hash(chunk_hash))
        with self._lock:
            loc = self._entries.get(key)
            if loc is not None:
                self._entries.move_to_end(key)
            return loc

    def is_known_missing(self, ns: Namespace, chunk_hash: int) -> bool:
        key = (ns, normalize_hash(chunk_hash))
        with self._lock:
            exp = self._negative.get(key)
            if exp is None:
                return False
            if exp < self._clock():
                del self._negative[key]
                return False
            return True

    def add_manifest(self, m: Manifest) -> None:
        with self._lock:
            self._manifests[m.segment_id] = m
            for i, h in enumerate(m.chunk_hashes):
                key = (m.namespace, h)
                self._entries[key] = Location(m, i)
                self._entries.move_to_end(key)
                self._negative.pop(key, None)
            self._evict_locked()

    def drop_segment(self, segment_id: str, *, force: bool = False) -> int:
        """Forget a segment found broken or deleted; pinned chunks stay unless ``force``."""
        with self._lock:
            m = self._manifests.get(segment_id)
            if m is None:
                return 0
            dropped = 0
            for h in m.chunk_hashes:
                key = (m.namespace, h)
                loc = self._entries.get(key)
                if loc is not None and loc.manifest.segment_id == segment_id and (force or key not in self._pins):
                    del self._entries[key]
                    dropped += 1
            if not any(l.manifest.segment_id == segment_id for l in self._entries.values()):
                self._manifests.pop(segment_id, None)
            return dropped

    def pin(self, ns: Namespace, chunk_hash: int) -> bool:
        key = (ns, normalize_hash(chunk_hash))
        with self._lock:
            if key not in self._entries:
                return False
            self._pins[key] = self._pins.get(key, 0) + 1
            return True

    def unpin(self, ns: Namespace, chunk_hash: int) -> bool:
        key = (ns, normalize_hash(chunk_hash))
        with self._lock:
            n = self._pins.get(key, 0)
            if n <= 0:
                return False
            if n == 1:
                del self._pins[key]
            else:
                self._pins[key] = n - 1
            return True

    def pins(self, ns: Namespace, chunk_hash: int) -> int:
        """Look-ups that pinned this chunk and have not unpinned it: requests that will load it."""
        with self._lock:
            return self._pins.get((ns, normalize_hash(chunk_hash)), 0)

    def pinned_count(self) -> int:
        with self._lock:
            return sum(self._pins.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _evict_locked(self) -> None:
        while len(self._entries) > self._max_entries:
            for key in self._entries:
                if key not in self._pins:
                    del self._entries[key]
                    break
            else:
                return  # everything pinned: over the soft limit until unpinned

    # ---- remote ----------------------------------------------------------------------------

    def resolve(self, ns: Namespace, chunk_hashes: Sequence[int]) -> list[Location | None]:
        """Prefix answer: memory first; one parallel round of pointer (+ manifest) GETs for the
        rest, bounded in time; then the walk. Everything after the first miss is None (a
        prefix look-up cannot use it), even where a later segment was found.

        A look-up that errors or times out is a miss (never an exception on the scheduling
        path); corrupt or foreign pointers/manifests are counted and treated as misses.

        A single chunk in the middle of a segment, asked alone of a cold index, is a miss: it
        has no pointer and nothing in the request names its segment. LMCache asks in chunk
        order (layerwise: one call per chunk), so the segment's first chunk was asked and
        resolved first, and that put the whole segment in memory.
        """
        out, remote = self._resolve(ns, chunk_hashes)
        first_miss = next((i for i, loc in enumerate(out) if loc is None), len(out))
        for i in range(first_miss + 1, len(out)):
            out[i] = None
        self._count_results(out, remote)
        return out

    def committed(self, ns: Namespace, chunk_hashes: Sequence[int]) -> list[bool]:
        """Write path: for EVERY one of these chunks, whether a committed segment holds it
        (not a prefix answer: a store may hand chunks on both sides of a gap).

        The same memory-then-pointer walk as ``resolve``, but not counted as look-ups (the
        resolution metrics describe what the scheduler saw). A look-up that fails or times
        out says "not committed": writing a chunk again costs at worst a duplicate or a lost
        commit race, while skipping one that is not stored would leave a gap no later lookup
        gets past. A chunk in the middle of a committed segment whose first chunk is neither
        in memory nor among these hashes says "not committed" too (it has no pointer): the
        same duplicate, never wrong data.
        """
        out, _ = self._resolve(ns, chunk_hashes)
        return [loc is not None for loc in out]

    def _resolve(self, ns: Namespace, chunk_hashes: Sequence[int]) -> tuple[list[Location | None], set[int]]:
        """Every position's location (None: missing or unknown) and the positions resolved
        remotely. No I/O after the one parallel round."""
        hashes = [normalize_hash(h) for h in chunk_hashes]
        out: list[Location | None] = [self.get(ns, h) for h in hashes]
        if all(loc is not None for loc in out):
            return out, set()
        todo = [i for i, loc in enumerate(out) if loc is None and not self.is_known_missing(ns, hashes[i])]
        remote: set[int] = set()
        absent: set[int] = set()  # no usable pointer, for sure (not an error or a timeout)
        if todo:
            self.stats.remote_rounds += 1
            futures = {self._pool.submit(self._resolve_start, ns, hashes[i]): i for i in todo}
            done, not_done = wait(futures, timeout=self._lookup_timeout)
            for f in not_done:
                f.cancel()
            for f in done:
                i = futures[f]
                try:
                    loc, missing = f.result()
                except Exception:  # noqa: BLE001 - _resolve_start already classified and logged
                    loc, missing = None, False
                if loc is not None:
                    out[i] = loc
                    remote.add(i)
                elif missing:
                    absent.add(i)
        self._cover(ns, hashes, out, remote)
        for i in absent:
            if out[i] is None:  # no pointer, and no segment this look-up found lists it
                self._remember_missing(ns, hashes[i])
        return out, remote

    def _cover(self, ns: Namespace, hashes: list[int], out: list[Location | None], remote: set[int]) -> None:
        """Fill the positions a resolved segment lists: found by a pointer of this look-up
        (``add_manifest`` put them in memory) or known before (a sibling evicted alone)."""
        manifests: dict[str, Manifest] = {}
        for i, loc in enumerate(out):
            if loc is None:
                loc = self.get(ns, hashes[i])
                if loc is not None:
                    out[i] = loc
                    remote.add(i)
                    self.stats.covered += 1
                    continue
            else:
                manifests.setdefault(loc.manifest.segment_id, loc.manifest)
        if all(loc is not None for loc in out) or not manifests:
            return
        listed: dict[int, Location] = {}
        for m in manifests.values():
            for j, h in enumerate(m.chunk_hashes):
                listed.setdefault(h, Location(m, j))
        for i, loc in enumerate(out):
            if loc is None and hashes[i] in listed:
                out[i] = listed[hashes[i]]
                remote.add(i)
                self.stats.covered += 1

    def _resolve_start(self, ns: Namespace, h: int) -> tuple[Location | None, bool]:
        """(location, missing) of a chunk by its own pointer, i.e. as a segment's first chunk.
        ``missing``: it has no usable pointer for sure (404, or a pointer that is malformed,
        foreign or names a manifest that is gone); False with no location means unknown."""
        try:
            self.stats.pointer_gets += 1
            ptr = self.store.read_pointer(ns, h)
            if ptr is None:
                return None, True  # no segment starts here; maybe one continues here
            with self._lock:
                m = self._manifests.get(ptr.segment_id)
            if m is not None and m.namespace != ns:
                # The cache is by segment id alone. A pointer of this namespace naming another
                # namespace's segment (objects copied between dtypes or ranks, or a hostile
                # pointer) must not borrow that manifest: fp8_e4m3fn and fp8_e5m2 chunks have
                # the same hashes and sizes, so nothing later would notice the wrong bytes.
                # Read this namespace's own manifest object, which says whose it is.
                m = None
            if m is None:
                self.stats.manifest_gets += 1
                m = self.store.read_manifest(ns, ptr.segment_id)
            if m.chunk_hashes[0] != h:
                raise FormatError("pointer names a segment that does not start at its chunk")
        except FormatError as exc:
            self.stats.bad_objects += 1
            log.warning("ignoring chunk %016x: %s", h & ((1 << 64) - 1), exc)
            return None, True
        except StorageError as exc:
            if getattr(exc, "code", None) == "NoSuchKey":
                # pointer without manifest: an aborted or half-deleted segment, a clean miss
                return None, True
            log.warning("chunk look-up failed (treated as a miss): %s", exc)
            return None, False
        self.add_manifest(m)
        return Location(m, 0), False

    def _remember_missing(self, ns: Namespace, h: int) -> None:
        if self._negative_ttl <= 0:
            return
        with self._lock:
            if len(self._negative) > 100_000:
                now = self._clock()
                self._negative = {k: v for k, v in self._negative.items() if v >= now}
            self._negative[(ns, h)] = self._clock() + self._negative_ttl

    def forget_missing(self, ns: Namespace, hashes: Sequence[int]) -> None:
        with self._lock:
            for h in hashes:
                self._negative.pop((ns, normalize_hash(h)), None)

    def _count_results(self, out: list[Location | None], remote: set[int]) -> None:
        for i, loc in enumerate(out):
            if loc is None:
                self.stats.misses += 1
            elif i in remote:
                self.stats.remote_hits += 1
            else:
                self.stats.memory_hits += 1
