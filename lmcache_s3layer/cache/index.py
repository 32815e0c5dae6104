"""Chunk hash -> (committed segment, position), in memory, with pointer look-ups for misses.

LMCache asks "is this chunk here?" on the scheduling path (lookup) and again on the forward
path (store_layer / retrieve_layer). The memory answer must be microseconds; a remote answer
costs a pointer GET and a manifest GET (cached per segment). Misses are remembered for a short
TTL so a burst of look-ups for a cold prefix costs one request per chunk, not one per call.

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
        """Memory first; pointer (+ manifest) GETs in parallel for the rest, bounded in time.

        A look-up that errors or times out is a miss (never an exception on the scheduling
        path); corrupt or foreign pointers/manifests are counted and treated as misses.
        """
        out, remote = self._resolve(ns, chunk_hashes)
        self._count_results(out, remote)
        return out

    def committed(self, ns: Namespace, chunk_hashes: Sequence[int]) -> list[bool]:
        """Write path: which of these chunks a committed segment already holds.

        The same memory-then-pointer answer as ``resolve``, but not counted as look-ups (the
        resolution metrics describe what the scheduler saw). A look-up that fails or times
        out says "not committed": writing a chunk again costs at worst a lost commit race,
        while skipping one that is not stored would leave a gap no later lookup gets past.
        """
        out, _ = self._resolve(ns, chunk_hashes)
        return [loc is not None for loc in out]

    def _resolve(self, ns: Namespace, chunk_hashes: Sequence[int]) -> tuple[list[Location | None], set[int]]:
        hashes = [normalize_hash(h) for h in chunk_hashes]
        out: list[Location | None] = [self.get(ns, h) for h in hashes]
        todo = [i for i, loc in enumerate(out) if loc is None and not self.is_known_missing(ns, hashes[i])]
        if not todo:
            return out, set()
        futures = {self._pool.submit(self._resolve_one, ns, hashes[i]): i for i in todo}
        done, not_done = wait(futures, timeout=self._lookup_timeout)
        for f in not_done:
            f.cancel()
        for f in done:
            try:
                out[futures[f]] = f.result()
            except Exception:  # noqa: BLE001 - _resolve_one already classified and logged
                out[futures[f]] = None
        return out, {futures[f] for f in done}

    def _resolve_one(self, ns: Namespace, h: int) -> Location | None:
        try:
            self.stats.pointer_gets += 1
            ptr = self.store.read_pointer(ns, h)
            if ptr is None:
                self._remember_missing(ns, h)
                return None
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
            if not (0 <= ptr.index < m.num_chunks) or m.chunk_hashes[ptr.index] != h:
                raise FormatError("pointer and manifest disagree about the chunk's position")
        except FormatError as exc:
            self.stats.bad_objects += 1
            log.warning("ignoring chunk %016x: %s", h & ((1 << 64) - 1), exc)
            self._remember_missing(ns, h)
            return None
        except StorageError as exc:
            if getattr(exc, "code", None) == "NoSuchKey":
                # pointer without manifest: an aborted or half-deleted segment, a clean miss
                self._remember_missing(ns, h)
            else:
                log.warning("chunk look-up failed (treated as a miss): %s", exc)
            return None
        self.add_manifest(m)
        return Location(m, ptr.index)

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
