"""The storage core behind the LMCache adapter: bytes, hashes and namespaces, no LMCache types.

One instance per worker process. It owns the S3 client (and its connection pool), the chunk
index, the segment writer and the prefetch pipeline, and adds the one piece that ties the
read path together: a lookup that hits starts the prefetch (``LookupBatcher``), so layer 0..k
are on the wire before the forward pass asks for them (CachedAttention's read buffer); and
a pinned hit is only answered when LMCache's CPU pool can carry its retrieval to the end
(``PoolPromises``): a shorter hit, never a retrieval stalled for memory.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from lmcache_s3layer.cache.index import ChunkIndex, Location
from lmcache_s3layer.cache.metrics import Metrics
from lmcache_s3layer.cache.prefetch import Prefetcher, StagingAllocator
from lmcache_s3layer.cache.writer import SegmentWriter
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import CorruptObject, RetrievalFailed
from lmcache_s3layer.format.objects import Namespace, normalize_hash
from lmcache_s3layer.store.client import S3Client
from lmcache_s3layer.store.ranges import plan_runs
from lmcache_s3layer.store.segments import SegmentStore

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    ns: Namespace
    num_layers: int
    locs: list[Location] = field(default_factory=list)
    keys: set[tuple[str, int]] = field(default_factory=set)
    last: float = 0.0


class LookupBatcher:
    """Collects the chunks one lookup hits and starts their prefetch as one retrieval.

    LMCache's layerwise lookup asks about one chunk per call and never says when it is done, so
    a batch ends at the first miss, at a retrieval, or after ``quiet_s`` without a new hit.
    Batches are kept per calling thread: look-ups running at once on several threads would
    otherwise interleave into one retrieval of many prompts, larger than the staging budget.
    """

    def __init__(self, start: Callable[[Namespace, list[Location], int], Any], quiet_s: float = 0.002):
        self._start = start
        self._quiet = quiet_s
        self._lock = threading.Condition()
        self._batches: dict[int, _Batch] = {}  # by thread id
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="s3layer-lookup-batcher", daemon=True)
        self._thread.start()

    def add(self, ns: Namespace, loc: Location, num_layers: int) -> None:
        with self._lock:
            me = threading.get_ident()
            batch = self._batches.get(me)
            key = (loc.manifest.segment_id, loc.index)
            # A chunk already in the batch means another lookup began (requests of one batch
            # share a prefix): fetch it once, not once per request in one retrieval.
            if batch is not None and (ns != batch.ns or num_layers != batch.num_layers or key in batch.keys):
                self._flush_locked(me)
                batch = None
            if batch is None:
                batch = self._batches[me] = _Batch(ns, num_layers)
            batch.locs.append(loc)
            batch.keys.add(key)
            batch.last = time.monotonic()
            self._lock.notify()

    def flush(self) -> None:
        """Start every pending batch (a lookup ended at a miss, or a retrieval is starting)."""
        with self._lock:
            for tid in list(self._batches):
                self._flush_locked(tid)

    def _flush_locked(self, tid: int) -> None:
        batch = self._batches.pop(tid, None)
        if batch is not None:
            try:
                self._start(batch.ns, batch.locs, batch.num_layers)
            except Exception as exc:  # noqa: BLE001 - a failed prefetch is only a slower retrieval
                log.warning("could not start prefetch: %s", exc)

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                if not self._batches:
                    self._lock.wait()
                    continue
                now = time.monotonic()
                for tid, batch in list(self._batches.items()):
                    if now - batch.last >= self._quiet:
                        self._flush_locked(tid)
                if self._batches:
                    self._lock.wait(max(0.0, min(b.last for b in self._batches.values()) + self._quiet - now))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._batches.clear()
            self._lock.notify()
        self._thread.join(timeout=2)


@dataclass
class _Promise:
    nbytes: int
    last: float  # its look-up, or the last time a retrieval asked for its chunk
    live: bool = True  # False: reclaimed while idle; its bytes no longer count


@dataclass
class PoolStats:
    refused: int = 0  # chunks a pinned look-up could not promise (answered as misses)
    reclaimed: int = 0  # promises reclaimed after idling (a pin LMCache never released?)
    revived: int = 0  # reclaimed promises whose retrieval came after all


class PoolPromises:
    """What pinned look-ups promised LMCache's CPU pool, so a hit is only answered when the
    pool can carry its retrieval to the end.

    LMCache keeps every layer it was handed until the retrieval's last layer, so a retrieval
    of chunks of B bytes per layer peaks at L x B: L-1 layers handed plus the one being staged
    (the prefetcher's read-ahead is of the same retrieval's later layers, inside those L x B;
    a copy kept for a second request sharing the chunks is inside that request's own promise).
    A look-up answering more than the pool holds would stall its retrieval at the layer where
    the pool runs out, until the deadline; two requests of one batch are stepped in lockstep,
    so two look-ups promising more than the pool together would stall both. Each chunk is
    promised here, atomically, before it is answered as a hit.

    A promise ends with its pin (unpin). LMCache may never unpin (a request aborted while
    queued), so a promise idle longer than ``idle_s`` (no retrieval asked for its chunk) is
    reclaimable: its bytes stop counting, but only once another look-up needs the room; a
    retrieval that asks for the chunk after all revives it (over the budget if it must: the
    forward pass has already been promised those tokens; later look-ups then get less).
    """

    def __init__(self, budget_bytes: int, idle_s: float, clock: Callable[[], float] = time.monotonic):
        self.budget = budget_bytes
        self.idle_s = idle_s
        self.clock = clock
        self.promised = 0  # bytes of live promises
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._by_key: dict[tuple[Namespace, int], list[_Promise]] = {}

    @property
    def limited(self) -> bool:
        return self.budget > 0

    def promise(self, key: tuple[Namespace, int], nbytes: int) -> bool:
        if not self.limited:
            return True
        with self._lock:
            now = self.clock()
            if self.promised + nbytes > self.budget:
                self._reclaim_idle_locked(now)
                if self.promised + nbytes > self.budget:
                    self.stats.refused += 1
                    return False
            self._by_key.setdefault(key, []).append(_Promise(nbytes, now))
            self.promised += nbytes
            return True

    def release(self, key: tuple[Namespace, int], keep: int) -> None:
        """After an unpin: keep at most ``keep`` promises of this chunk (its pins left)."""
        if not self.limited:
            return
        with self._lock:
            promises = self._by_key.get(key)
            if not promises:
                return
            # Promises of one chunk are interchangeable; free the bytes of a live one first.
            promises.sort(key=lambda p: not p.live)
            while len(promises) > max(0, keep):
                p = promises.pop(0)
                if p.live:
                    self.promised -= p.nbytes
            if not promises:
                del self._by_key[key]

    def touch(self, keys: Sequence[tuple[Namespace, int]]) -> None:
        """A retrieval is asking for these chunks: their promises are in use."""
        if not self.limited:
            return
        with self._lock:
            now = self.clock()
            for key in keys:
                for p in self._by_key.get(key, ()):
                    p.last = now
                    if not p.live:
                        p.live = True
                        self.promised += p.nbytes
                        self.stats.revived += 1

    def _reclaim_idle_locked(self, now: float) -> None:
        n = 0
        for promises in self._by_key.values():
            for p in promises:
                if p.live and now - p.last > self.idle_s:
                    p.live = False
                    self.promised -= p.nbytes
                    n += 1
        if n:
            self.stats.reclaimed += n
            log.warning("s3layer: reclaimed %d chunk promises idle for over %.0f s (looked up and "
                        "pinned, never retrieved nor unpinned)", n, self.idle_s)


class S3LayerCore:
    def __init__(self, cfg: S3LayerConfig, *, allocator: StagingAllocator | None = None,
                 metrics: Metrics | None = None, trace: bool = False, client: S3Client | None = None,
                 clock: Callable[[], float] = time.monotonic, before_read: Callable[[], None] | None = None):
        """``before_read``: called on an upload thread before it reads a store's buffers; the
        backend passes a device fence, since LMCache fills them with asynchronous copies."""
        self.cfg = cfg
        self.metrics = metrics or Metrics.get()
        self.client = client or S3Client(cfg)
        self.store = SegmentStore(self.client, cfg.prefix)
        self._lookup_pool = ThreadPoolExecutor(min(32, cfg.max_connections), thread_name_prefix="s3layer-lookup")
        self.index = ChunkIndex(self.store, pool=self._lookup_pool, max_entries=cfg.index_max_entries,
                                negative_ttl_s=cfg.negative_cache_ttl_s, lookup_timeout_s=cfg.lookup_timeout_s)
        self.writer = SegmentWriter(cfg, self.store, self.index, on_event=self.metrics.event,
                                    before_read=before_read)
        self.prefetcher = Prefetcher(
            self.store, budget_bytes=cfg.staging_budget_bytes, workers=cfg.max_connections,
            max_depth=cfg.prefetch_max_depth, deadline_s=cfg.retrieval_deadline_s,
            idle_timeout_s=cfg.prefetch_idle_timeout_s, allocator=allocator, trace=trace,
            on_layer_fetched=self.metrics.layer_fetched, on_fault=self.metrics.fault,
            interest=self.index.pins)
        self.batcher = LookupBatcher(self._start_prefetch)
        # A promise a retrieval is consuming is touched at every layer it asks for, and one ask
        # waits at most the deadline: idle longer than the prefetch idle expiry plus that, it
        # belongs to a look-up whose retrieval never came (its prefetch has expired too).
        self.pool = PoolPromises(cfg.handoff_budget_bytes, cfg.prefetch_idle_timeout_s + cfg.retrieval_deadline_s,
                                 clock)
        self._pin_lock = threading.Lock()  # a pin and its promise are made and ended together
        self._bad_segments: dict[str, float] = {}
        self._lock = threading.Lock()
        self.metrics.bind_core(self)

    # ---- lookup ----------------------------------------------------------------------------

    def lookup(self, ns: Namespace, chunk_hashes: Sequence[int], *, pin: bool, num_layers: int,
               prefetch: bool | None = None, token_shape: Sequence[int] | None = None,
               reserve: bool | None = None) -> int:
        """Prefix hit count: memory index, then one parallel round of pointer look-ups (a
        segment found by its first chunk covers the chunks its manifest lists); pins and
        prefetches hits.

        ``token_shape`` is the engine's per-token KV shape: a segment of another shape (another
        model config under the same name) is a miss here, before anything is promised to the
        scheduler, instead of a failed retrieval later.

        A pinned hit is also a promise of LMCache pool memory (``PoolPromises``): the answer
        stops at the first chunk the pool could not carry to the end of the retrieval.
        ``reserve`` (default: pinned and ``prefetch`` not explicitly False, which the backend
        passes for chunks the engine already holds and will not retrieve) says whether to."""
        locs = self.index.resolve(ns, chunk_hashes)
        shape = tuple(token_shape) if token_shape is not None else None
        hits = 0
        hit_locs: list[Location] = []  # locs[:hits], known not None
        for loc in locs:
            if loc is None or self._is_bad(loc.manifest.segment_id) or loc.manifest.num_layers != num_layers:
                break
            if shape is not None and tuple(loc.manifest.token_shape) != shape:
                break
            hits += 1
            hit_locs.append(loc)
        do_prefetch = self.cfg.prefetch_on_lookup if prefetch is None else prefetch
        if reserve is None:
            reserve = prefetch is not False
        found = hits
        if pin:
            for i, (hit, h) in enumerate(zip(hit_locs, chunk_hashes[:found])):
                if not self._pin_hit(ns, hit, h, num_layers, reserve):
                    hits = i
                    break
                if do_prefetch:
                    self.batcher.add(ns, hit, num_layers)
        if hits < found:
            log.info("s3layer: %d cached chunk(s) answered as a miss: LMCache's CPU pool could not carry "
                     "their retrieval to the end (%d of %d bytes promised)", found - hits, self.pool.promised,
                     self.pool.budget)
        if hits < len(chunk_hashes) and pin:
            self.batcher.flush()  # the lookup ended at this miss
        self.metrics.lookup(hits, len(chunk_hashes) - hits)
        return hits

    def _pin_hit(self, ns: Namespace, loc: Location, chunk_hash: int, num_layers: int, reserve: bool) -> bool:
        """Pin a hit, after promising the pool its retrieval's memory; False: no room."""
        with self._pin_lock:
            key = (ns, normalize_hash(chunk_hash))
            if reserve and not self.pool.promise(key, self._handoff_bytes(loc, num_layers)):
                return False
            self.index.pin(ns, chunk_hash)
            return True

    def _handoff_bytes(self, loc: Location, num_layers: int) -> int:
        """Pool bytes a retrieval of this chunk holds by its last layer: every layer's buffer,
        each rounded up to the pool's allocation granularity."""
        align = self.cfg.handoff_align_bytes
        per_layer = loc.tokens * loc.manifest.bytes_per_token
        return num_layers * (-(-per_layer // align) * align)

    def contains(self, ns: Namespace, chunk_hash: int) -> bool:
        """Forward-path check: memory only (microseconds). Chunks reach memory through a
        lookup, our own commits, or an earlier retrieval. A look-up that resolves a segment
        puts ALL of its chunks in memory, so a chunk in the middle of a segment (which has no
        pointer of its own, format v2) is known here once its segment's first chunk was
        looked up: LMCache looks chunks up in order before it stores or retrieves them."""
        loc = self.index.get(ns, chunk_hash)
        return loc is not None and not self._is_bad(loc.manifest.segment_id)

    def unpin(self, ns: Namespace, chunk_hash: int) -> bool:
        h = normalize_hash(chunk_hash)
        with self._pin_lock:
            ok = self.index.unpin(ns, h)
            # Whether or not the index still had the pin: a promise never outlives the pins.
            self.pool.release((ns, h), keep=self.index.pins(ns, h))
        self.prefetcher.cancel_chunks(ns, [h])
        return ok

    def pin(self, ns: Namespace, chunk_hash: int) -> bool:
        return self.index.pin(ns, chunk_hash)

    # ---- write -----------------------------------------------------------------------------

    def put_layer(self, ns: Namespace, layer: int, num_layers: int, chunk_hashes: Sequence[int],
                  chunk_tokens: Sequence[int], token_shape: Sequence[int], buffers: Sequence,
                  release: Callable[[], None]) -> bool:
        return self.writer.submit_layer(ns, layer, num_layers, chunk_hashes, chunk_tokens, token_shape,
                                        buffers, release)

    def is_pending(self, ns: Namespace, chunk_hash: int) -> bool:
        return self.writer.is_pending(ns, chunk_hash)

    # ---- read ------------------------------------------------------------------------------

    def locations(self, ns: Namespace, chunk_hashes: Sequence[int]) -> list[Location]:
        out = []
        for h in chunk_hashes:
            loc = self.index.get(ns, h)
            if loc is None:
                raise RetrievalFailed(f"chunk {normalize_hash(h) & ((1 << 64) - 1):016x} was not looked up "
                                      "(not in the index): nothing to retrieve")
            out.append(loc)
        return out

    def get_layer(self, ns: Namespace, layer: int, chunk_hashes: Sequence[int], num_layers: int) -> list[Any]:
        """Verified handles of layer ``layer`` for these chunks, in order; raises RetrievalFailed."""
        self.batcher.flush()
        locs = self.locations(ns, chunk_hashes)
        if self.pool.limited:
            self.pool.touch([(ns, normalize_hash(h)) for h in chunk_hashes])
        t0 = time.perf_counter()
        try:
            handles = self.prefetcher.get_layer(ns, layer, locs, num_layers)
        except RetrievalFailed as exc:
            self._mark_bad_from(exc, locs)
            self.metrics.event("retrieval_failed", 1)
            raise
        self.metrics.layer_stall(layer, time.perf_counter() - t0)
        return handles

    def read_chunks_all_layers(self, ns: Namespace, chunk_hashes: Sequence[int]) -> list[list[memoryview] | None]:
        """Non-layerwise path: every layer of each chunk (coalesced per segment run), verified.
        Returns per chunk its L layer buffers, or None from the first chunk that failed."""
        locs = [self.index.get(ns, h) for h in chunk_hashes]
        if self.pool.limited:
            self.pool.touch([(ns, normalize_hash(h)) for h in chunk_hashes])
        out: list[list[memoryview] | None] = [None] * len(locs)
        n_ok = next((i for i, l in enumerate(locs) if l is None), len(locs))
        ok = [loc for loc in locs[:n_ok] if loc is not None]  # the usable prefix, narrowed
        runs = plan_runs(ok)
        futures = []
        for run in runs:
            for layer in range(run.manifest.num_layers):
                futures.append((run, layer, self._lookup_pool.submit(
                    self.store.read_layer, run.manifest, layer, run.first, run.last)))
        results: dict[int, dict[int, memoryview]] = {}
        failed_at = n_ok
        for run, layer, fut in futures:
            try:
                buf = fut.result(timeout=self.cfg.retrieval_deadline_s)
            except Exception as exc:  # noqa: BLE001 - a failed chunk ends the usable prefix
                log.warning("non-layerwise read failed: %s", exc)
                if isinstance(exc, CorruptObject) and exc.code == "Checksum":
                    self.metrics.fault("ChecksumMismatch")  # transport faults: counted by the client
                failed_at = min(failed_at, run.slots[0])
                self._mark_bad(run.manifest.segment_id)
                continue
            pos = 0
            for slot in run.slots:
                n = ok[slot].tokens * run.manifest.bytes_per_token
                results.setdefault(slot, {})[layer] = buf[pos:pos + n]
                pos += n
        for slot in range(failed_at):
            per_layer = results.get(slot, {})
            if len(per_layer) != ok[slot].manifest.num_layers:
                break
            out[slot] = [per_layer[l] for l in range(len(per_layer))]
        return out

    # ---- failure memory --------------------------------------------------------------------

    def _mark_bad_from(self, exc: Exception, locs: Sequence[Location]) -> None:
        cause = exc.__cause__
        key = getattr(cause, "key", None)
        for loc in locs:
            if key is None or loc.manifest.segment_id in key:
                self._mark_bad(loc.manifest.segment_id)

    def _mark_bad(self, segment_id: str) -> None:
        # Missing or corrupt objects: future look-ups of these chunks miss (and recompute)
        # until the TTL passes and the pointers are consulted again.
        with self._lock:
            self._bad_segments[segment_id] = time.monotonic() + 60.0
        self.index.drop_segment(segment_id)

    def _is_bad(self, segment_id: str) -> bool:
        with self._lock:
            exp = self._bad_segments.get(segment_id)
            if exp is None:
                return False
            if exp < time.monotonic():
                del self._bad_segments[segment_id]
                return False
            return True

    def _start_prefetch(self, ns: Namespace, locs: list[Location], num_layers: int) -> None:
        self.prefetcher.prefetch(ns, locs, num_layers, source="lookup")

    # ---- lifecycle -------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        return self.writer.flush(timeout)

    def close(self) -> None:
        self.batcher.close()
        self.writer.close()
        self.prefetcher.close()
        self._lookup_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

