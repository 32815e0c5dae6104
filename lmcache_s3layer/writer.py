"""The write path: group the per-layer puts of one store into segments, upload each layer
object in the background, commit (manifest, then pointers) after the last layer landed.

``submit_layer`` runs on the forward path (LMCache's ``store_layer`` calls the plugin once per
layer while vLLM computes), so it only does bookkeeping and hands work to upload threads. The
caller's buffers are referenced until an upload thread has copied them into the request body;
then ``release`` is called, so LMCache memory is held for a copy's time, not an upload's.

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

from .checksum import crc32c
from .config import S3LayerConfig
from .errors import PreconditionFailed, S3LayerError
from .index import ChunkIndex
from .layout import Manifest, Namespace, normalize_hash, split_into_segments
from .segments import SegmentStore, new_segment_id

log = logging.getLogger(__name__)

Release = Callable[[], None]


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
    key: tuple
    segments: list[tuple[int, int, _Segment]]  # (first chunk, end chunk, segment)
    num_layers: int
    layers_seen: set[int] = field(default_factory=set)
    dropped: bool = False
    last_activity: float = field(default_factory=time.monotonic)


class SegmentWriter:
    def __init__(self, cfg: S3LayerConfig, store: SegmentStore, index: ChunkIndex, *,
                 on_event: Callable[[str, int], None] | None = None, stale_after_s: float = 300.0):
        self.cfg = cfg
        self.store = store
        self.index = index
        self.stats = WriterStats()
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
                if layer != 0 or any((ns, h) in self._pending_chunks for h in hashes):
                    accept = False  # a store we dropped earlier, or a duplicate of one in flight
                else:
                    st = self._start_store_locked(key, ns, hashes, tuple(chunk_tokens),
                                                  tuple(token_shape), num_layers)
                    accept = True
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
            views = [memoryview(b).cast("B") for b in buffers]
            bodies = []
            for first, end, seg in st.segments:
                sums = tuple(crc32c(v) for v in views[first:end])
                bodies.append((seg, sums, b"".join(views[first:end])))
        except Exception as exc:  # noqa: BLE001 - a bad buffer fails this store, not the caller
            log.error("could not read layer %d of a store: %s", layer, exc)
            bodies = None
        finally:
            release()
        try:
            if bodies is None:
                for _, _, seg in st.segments:
                    self._fail_segment(seg)
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
            for h in seg.hashes:
                k = (seg.ns, h)
                n = self._pending_chunks.get(k, 0) - 1
                if n <= 0:
                    self._pending_chunks.pop(k, None)
                else:
                    self._pending_chunks[k] = n

    # ---- bookkeeping -----------------------------------------------------------------------

    def _start_store_locked(self, key, ns, hashes, tokens, token_shape, num_layers) -> _Store:
        segs = []
        for first, end in split_into_segments(len(hashes), self.cfg.segment_max_chunks):
            seg = _Segment(ns, new_segment_id(), hashes[first:end], tokens[first:end], token_shape, num_layers)
            segs.append((first, end, seg))
        for h in hashes:
            self._pending_chunks[(ns, h)] = self._pending_chunks.get((ns, h), 0) + 1
        st = _Store(key, segs, num_layers)
        self._stores[key] = st
        self.stats.stores_started += 1
        return st

    def _drop_store_locked(self, st: _Store | None) -> None:
        if st is None:
            return
        st.dropped = True
        self._stores.pop(st.key, None)
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
