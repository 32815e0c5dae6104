"""The write path: group the per-layer puts of one store into segments, upload each layer
object in the background, commit (manifest, then the segment's start pointer) after the last
layer landed.

``submit_layer`` runs on the forward path (LMCache's ``store_layer`` calls the plugin once per
layer while vLLM computes), so it only does bookkeeping and hands work to upload threads. The
caller's buffers are referenced until an upload thread has copied them into the request body;
then ``release`` is called, so LMCache memory is held for a copy's time, not an upload's.

Which chunks a store writes: LMCache hands us the chunks whose layer-0 ``contains()`` was
False, so a store may skip chunks (the set need not be contiguous), and it may also contain
chunks that are committed already but unknown to this process's memory index (a layerwise
lookup stops at its first miss, so chunks after a gap are never looked up). Before the first
byte of a store is read, its chunks are checked against the index and, for those memory does
not know, against the store (``ChunkIndex.committed``: one parallel round of pointer GETs,
then every manifest found says which of the handed chunks it holds); every chunk not committed
(and not in flight in another store) is written, each run of consecutive new chunks as its own
segment(s), each with a pointer at its first chunk. Committed chunks are not rewritten when
that can be known: a chunk in the middle of a committed segment whose first chunk is neither
in memory nor among the handed chunks has no pointer of its own and is written again (a rare
cross-process case; a duplicate of the same bytes, never wrong data). A committed chunk in the
middle of a store only splits it, so the chunks around it are still written.

Cross-instance races: two writers starting a segment at the same chunk race on its pointer and
the loser deletes its segment (``SegmentStore.commit``). Two writers whose new chunks overlap
without the same first chunk (W1 writes 0..9 while W2 writes 5..14) both commit. An index that
resolves 0..9 through W1's segment and never looked up chunk 5's pointer then finds no pointer
at chunk 10 (it is in the middle of W2's segment), so chunks 10..14 look missing to it until
rewritten; the next store of that prompt heals it: ``committed`` says chunk 10 is not, and it
is written as a segment starting at 10, which has a pointer. A cold index does find them (its
one round of GETs reads chunk 5's pointer too).

Fence: on a GPU, LMCache fills the buffers it hands us with an asynchronous device-to-host
copy. ``before_read`` (if given) is called on the upload thread, once per layer upload, right
before the buffers are first read, so the reader can wait for that copy without stalling the
forward pass; it failing fails that store like a failed upload.

Back-pressure: bytes accepted but not yet uploaded are capped by ``put_inflight_budget_bytes``.
A store that would exceed it is dropped whole (and counted): queueing without bound would
eventually stall the forward pass or exhaust memory, and a cache may always decline a write.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from lmcache_s3layer.cache.index import ChunkIndex
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import PreconditionFailed, S3LayerError
from lmcache_s3layer.format.checksum import crc32c
from lmcache_s3layer.format.objects import Manifest, Namespace, normalize_hash
from lmcache_s3layer.store.ranges import split_runs_into_segments
from lmcache_s3layer.store.segments import SegmentStore, new_segment_id

log = logging.getLogger(__name__)

Release = Callable[[], None]
Fence = Callable[[], None]


@dataclass
class WriterStats:
    stores_started: int = 0
    segments_committed: int = 0
    stores_dropped_budget: int = 0
    stores_failed: int = 0
    stores_lost_race: int = 0
    stores_abandoned: int = 0
    layers_uploaded: int = 0
    bytes_uploaded: int = 0
    chunks_already_committed: int = 0  # handed to us, found committed, not written again
    chunks_in_flight_elsewhere: int = 0  # being written by another store (or repeated in one)


@dataclass
class _Segment:
    ns: Namespace
    segment_id: str
    hashes: tuple[int, ...]
    tokens: tuple[int, ...]
    token_shape: tuple[int, ...]
    num_layers: int
    checksums: dict[int, tuple[int, ...]] = field(default_factory=dict)
    uploaded: set[int] = field(default_factory=set)
    failed: bool = False
    done: bool = False


@dataclass
class _Store:
    key: tuple  # (namespace, chunk hashes as handed to us)
    ns: Namespace
    tokens: tuple[int, ...]
    token_shape: tuple[int, ...]
    num_layers: int
    candidates: tuple[int, ...]  # positions this store registered as pending: what it may write
    # (first, end, segment) over store positions; None until planned (by the first upload
    # task, under plan_lock), [] when dropped before that or nothing was left to write.
    segments: list[tuple[int, int, _Segment]] | None = None
    plan_lock: threading.Lock = field(default_factory=threading.Lock)
    layers_seen: set[int] = field(default_factory=set)
    dropped: bool = False
    last_activity: float = field(default_factory=time.monotonic)

    @property
    def hashes(self) -> tuple[int, ...]:
        return self.key[1]


class SegmentWriter:
    def __init__(self, cfg: S3LayerConfig, store: SegmentStore, index: ChunkIndex, *,
                 on_event: Callable[[str, int], None] | None = None, stale_after_s: float = 300.0,
                 before_read: Fence | None = None):
        self.cfg = cfg
        self.store = store
        self.index = index
        self.stats = WriterStats()
        self._before_read = before_read
        self._on_event = on_event or (lambda name, n: None)
        self._pool = ThreadPoolExecutor(cfg.put_workers, thread_name_prefix="s3layer-put")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stores: dict[tuple, _Store] = {}
        self._pending_chunks: dict[tuple[Namespace, int], int] = {}
        self._inflight_bytes = 0
        self._tasks = 0
        self._stale_after = stale_after_s
        self._closed = False

    # ---- forward path ----------------------------------------------------------------------

    def submit_layer(self, ns: Namespace, layer: int, num_layers: int, chunk_hashes: Sequence[int],
                     chunk_tokens: Sequence[int], token_shape: Sequence[int], buffers: Sequence,
                     release: Release) -> bool:
        """Accept layer ``layer`` of the chunks ``chunk_hashes``; never blocks on I/O.

        ``buffers[j]`` holds chunk j's KV_T2D bytes for this layer. ``release`` is called
        exactly once, when the buffers are no longer needed. Returns False when the store is
        dropped (budget, duplicate, closed); the buffers are then released already.

        A store whose chunks are all being written by other stores is a duplicate; one whose
        chunks are partly so writes only the rest (the in-flight ones are not written twice).
        """
        hashes = tuple(normalize_hash(h) for h in chunk_hashes)
        nbytes = sum(memoryview(b).nbytes for b in buffers)
        key = (ns, hashes)
        with self._lock:
            self._sweep_stale_locked()
            st = self._stores.get(key)
            if self._closed:
                st = None
                accept = False
            elif st is None:
                # layer > 0 without a store: one we dropped earlier (or never started)
                st = self._start_store_locked(key, ns, tuple(chunk_tokens), tuple(token_shape),
                                              num_layers) if layer == 0 else None
                accept = st is not None  # None: every chunk is being written by another store
            else:
                accept = not st.dropped and layer not in st.layers_seen
            if accept and self._inflight_bytes + nbytes > self.cfg.put_inflight_budget_bytes:
                self.stats.stores_dropped_budget += 1
                self._on_event("store_dropped_budget", 1)
                log.warning("upload budget (%d bytes in flight) exceeded: dropping a store of %d chunks",
                            self._inflight_bytes, len(hashes))
                self._drop_store_locked(st)
                accept = False
            if not accept:
                release()
                return False
            assert st is not None  # accepted implies a live store
            st.layers_seen.add(layer)
            st.last_activity = time.monotonic()
            self._inflight_bytes += nbytes
            self._tasks += 1
            if len(st.layers_seen) == st.num_layers:
                # every layer accepted: nothing more will come for this store key
                del self._stores[key]
        self._pool.submit(self._upload_layer, st, layer, list(buffers), release, nbytes)
        return True

    def is_pending(self, ns: Namespace, chunk_hash: int) -> bool:
        with self._lock:
            return (ns, normalize_hash(chunk_hash)) in self._pending_chunks

    def inflight_bytes(self) -> int:
        with self._lock:
            return self._inflight_bytes

    # ---- upload threads --------------------------------------------------------------------

    def _upload_layer(self, st: _Store, layer: int, buffers: list, release: Release, nbytes: int) -> None:
        try:
            bodies = self._read_layer(st, layer, buffers, release)
            if bodies is None:
                self._fail_store(st)
                return
            for seg, sums, body in bodies:
                with self._lock:
                    skip = seg.failed
                if skip:
                    continue
                try:
                    self.store.put_layer(seg.ns, seg.segment_id, layer, body)
                except S3LayerError as exc:
                    log.warning("upload of segment %s layer %d failed: %s", seg.segment_id, layer, exc)
                    self._fail_segment(seg)
                    continue
                with self._lock:
                    orphan = seg.failed  # dropped while this layer was on the wire
                    seg.checksums[layer] = sums
                    seg.uploaded.add(layer)
                    self.stats.layers_uploaded += 1
                    self.stats.bytes_uploaded += len(body)
                    ready = len(seg.uploaded) == seg.num_layers and not seg.failed
                if orphan:
                    self._delete_layers(seg, [layer])
                elif ready:
                    self._commit(seg)
        finally:
            with self._lock:
                self._inflight_bytes -= nbytes
                self._tasks -= 1
                self._idle.notify_all()

    def _read_layer(self, st: _Store, layer: int, buffers: list,
                    release: Release) -> list[tuple[_Segment, tuple[int, ...], bytes]] | None:
        """(segment, chunk checksums, body) per live segment of the store; None when the
        buffers could not be read. ``release`` is called in every case, after the copy."""
        try:
            segments = self._plan(st)
            # The fence comes first even when nothing is left to read: the buffers go back to
            # LMCache below, and must not be reused while a device copy still writes them.
            if self._before_read is not None:
                self._before_read()
            with self._lock:
                live = [(first, end, seg) for first, end, seg in segments if not seg.failed]
            views = [memoryview(b).cast("B") for b in buffers]
            return [(seg, tuple(crc32c(v) for v in views[first:end]), b"".join(views[first:end]))
                    for first, end, seg in live]
        except Exception as exc:  # noqa: BLE001 - a bad buffer or fence fails this store, not the caller
            log.error("could not read layer %d of a store: %s", layer, exc)
            return None
        finally:
            release()

    # ---- planning: which chunks a store writes, in which segments --------------------------

    def _plan(self, st: _Store) -> list[tuple[int, int, _Segment]]:
        """The store's segments, decided once (by its first upload task; the others wait):
        every layer object of a segment must hold the same chunks."""
        with st.plan_lock:
            with self._lock:
                if st.segments is not None:
                    return st.segments
            committed = self._already_committed(st)  # I/O: outside the writer's lock
            with self._lock:
                if st.segments is None:  # else dropped meanwhile: nothing to write
                    st.segments = self._segments_locked(st, committed)
                return st.segments

    def _already_committed(self, st: _Store) -> set[int]:
        """Positions of the store's candidates that a committed segment already holds."""
        try:
            found = self.index.committed(st.ns, [st.hashes[i] for i in st.candidates])
        except Exception as exc:  # noqa: BLE001 - unknown means "write it": at worst a lost race
            log.warning("could not check which chunks of a store are stored already: %s", exc)
            return set()
        return {i for i, hit in zip(st.candidates, found) if hit}

    def _segments_locked(self, st: _Store, committed: set[int]) -> list[tuple[int, int, _Segment]]:
        self._unpend_locked(st.ns, [st.hashes[i] for i in committed])
        self.stats.chunks_already_committed += len(committed)
        new = [i for i in st.candidates if i not in committed]
        segs = []
        for first, end in split_runs_into_segments(new, self.cfg.segment_max_chunks):
            seg = _Segment(st.ns, new_segment_id(), st.hashes[first:end], st.tokens[first:end],
                           st.token_shape, st.num_layers)
            segs.append((first, end, seg))
        return segs

    def _commit(self, seg: _Segment) -> None:
        m = Manifest(seg.segment_id, seg.ns, seg.num_layers, seg.token_shape, seg.hashes, seg.tokens,
                     tuple(seg.checksums[l] for l in range(seg.num_layers)), time.time())
        try:
            self.store.commit(m, create_only=self.cfg.conditional_writes)
        except PreconditionFailed:
            with self._lock:
                self.stats.stores_lost_race += 1
            self._on_event("store_lost_race", 1)
            self._finish(seg)
            # The winner's segment serves these chunks; forget our negative answers for them.
            self.index.forget_missing(seg.ns, seg.hashes)
            return
        except S3LayerError as exc:
            log.warning("commit of segment %s failed: %s", seg.segment_id, exc)
            self._fail_segment(seg)
            return
        self.index.add_manifest(m)
        with self._lock:
            self.stats.segments_committed += 1
        self._on_event("segment_committed", 1)
        self._finish(seg)

    def _fail_store(self, st: _Store) -> None:
        with self._lock:
            planned = st.segments is not None
            if st.segments is None:  # the plan itself failed: no segment exists to clean up
                st.segments = []
                self._unpend_locked(st.ns, [st.hashes[i] for i in st.candidates])
                self.stats.stores_failed += 1
            segments = list(st.segments)
        if not planned:
            self._on_event("store_failed", 1)
        for _, _, seg in segments:
            self._fail_segment(seg)

    def _fail_segment(self, seg: _Segment) -> None:
        with self._lock:
            if seg.failed or seg.done:
                return
            seg.failed = True
            self.stats.stores_failed += 1
            uploaded = sorted(seg.uploaded)
        self._on_event("store_failed", 1)
        self._finish(seg)
        self._delete_layers(seg, uploaded)

    def _delete_layers(self, seg: _Segment, layers) -> None:
        for layer in layers:  # best effort: gc collects whatever is left
            try:
                self.store.client.delete(self.store.names(seg.ns).layer_object(seg.segment_id, layer))
            except S3LayerError:
                pass

    def _finish(self, seg: _Segment) -> None:
        with self._lock:
            seg.done = True
            self._unpend_locked(seg.ns, seg.hashes)

    def _unpend_locked(self, ns: Namespace, hashes) -> None:
        for h in hashes:
            k = (ns, h)
            n = self._pending_chunks.get(k, 0) - 1
            if n <= 0:
                self._pending_chunks.pop(k, None)
            else:
                self._pending_chunks[k] = n

    # ---- bookkeeping -----------------------------------------------------------------------

    def _start_store_locked(self, key, ns, tokens, token_shape, num_layers) -> _Store | None:
        """Register a new store's chunks as pending; None when there is nothing for it to write.

        Chunks another store is writing are left to it (and a hash repeated within the store
        to its first position): writing them twice would only lose a commit race.
        """
        hashes = key[1]
        seen: set[int] = set()
        candidates = []
        for i, h in enumerate(hashes):
            if h not in seen and (ns, h) not in self._pending_chunks:
                candidates.append(i)
            seen.add(h)
        self.stats.chunks_in_flight_elsewhere += len(hashes) - len(candidates)
        if not candidates:
            return None
        for i in candidates:
            k = (ns, hashes[i])
            self._pending_chunks[k] = self._pending_chunks.get(k, 0) + 1
        st = _Store(key, ns, tokens, token_shape, num_layers, tuple(candidates))
        self._stores[key] = st
        self.stats.stores_started += 1
        return st

    def _drop_store_locked(self, st: _Store | None) -> None:
        if st is None:
            return
        st.dropped = True
        self._stores.pop(st.key, None)
        if st.segments is None:
            # Not planned yet: no segment exists, so the planner (if running) finds this empty
            # plan and writes nothing; the chunks it had registered are free again.
            st.segments = []
            self._unpend_locked(st.ns, [st.hashes[i] for i in st.candidates])
            return
        for _, _, seg in st.segments:
            if not seg.failed and not seg.done:
                seg.failed = True
                threading.Thread(target=self._cleanup_dropped, args=(seg,), daemon=True).start()

    def _cleanup_dropped(self, seg: _Segment) -> None:
        self._finish(seg)
        # Layers still on the wire see seg.failed and delete themselves when they land.
        with self._lock:
            uploaded = sorted(seg.uploaded)
        self._delete_layers(seg, uploaded)

    def _sweep_stale_locked(self) -> None:
        now = time.monotonic()
        for st in [s for s in self._stores.values() if now - s.last_activity > self._stale_after]:
            # LMCache abandoned this store's generator part-way (request aborted).
            self.stats.stores_abandoned += 1
            self._on_event("store_abandoned", 1)
            self._drop_store_locked(st)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted layer is uploaded and committed (tests, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._tasks > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            for st in list(self._stores.values()):
                self._drop_store_locked(st)
        self.flush(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
