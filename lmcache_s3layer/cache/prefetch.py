"""The layer pipeline: fetch layers ahead of the forward pass, verified, within a memory budget.

LMCache's layerwise retrieval asks for layer i+1 only after layer i arrived (one fetch in
flight), which puts one S3 first-byte latency into every layer. Here a retrieval plans the
ranged GETs of all its layers at once (coalesced per segment run, split into parts), keeps up
to *k* layers in flight, and hands layer i over as soon as every chunk of it is complete and
its CRC32C matches the manifest. It can start at lookup time, before the forward pass exists.

Scheduling, in one place (``_admit``):
- priority is (retrieval start order, layer): earlier requests and earlier layers first, over
  one shared pool of part workers;
- a layer is *admitted* (its staging buffers allocated, its parts queued) only while the
  staged bytes stay within ``budget_bytes``; one consumer's layer larger than the whole budget
  is admitted alone. When a layer a consumer is blocked on cannot fit, staged layers nobody
  waits on are evicted (re-fetched later);
- a consumer's chunks often span several retrievals (overlapping prompts share lookup-time
  fetches), so a consumer may hold staged parts of its layer while it waits for the rest: with
  many consumers that is hold-and-wait, and a full budget would stall them all until the
  deadline. Waits are ordered by arrival, and the oldest wait with a part still to admit may
  also evict parts that *younger* waits hold: the oldest always completes, so every wait does;
- depth *k*: before consumption starts, as deep as the budget allows (the forward pass is not
  running yet, so there is nothing to overlap with but time); afterwards, just enough layers to
  cover one layer's fetch time at the measured consumption rate (``adaptive_depth``), so
  memory is left for other retrievals.

Requests sharing a prefix share retrievals; a chunk of a layer that another request will take
too is copied for it at hand-off (``_keep_copy_locked``), so one batch reads each object once.

A layer is handed out whole and verified, or the call raises ``RetrievalFailed``: never partial.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Protocol, Sequence

from lmcache_s3layer.cache.index import Location
from lmcache_s3layer.errors import CorruptObject, RetrievalFailed, S3LayerError, StorageError
from lmcache_s3layer.format.objects import Namespace
from lmcache_s3layer.store.ranges import plan_runs
from lmcache_s3layer.store.segments import SegmentStore

log = logging.getLogger(__name__)


class StagingAllocator(Protocol):
    """Where fetched bytes land; the backend passes one that allocates LMCache MemoryObjs so
    hand-off needs no copy."""

    def allocate(self, tokens: int, nbytes: int) -> tuple[Any, memoryview] | None: ...

    def release(self, handle: Any) -> None: ...


class BytearrayAllocator:
    def allocate(self, tokens: int, nbytes: int) -> tuple[Any, memoryview]:
        buf = bytearray(nbytes)
        return buf, memoryview(buf)

    def release(self, handle: Any) -> None:
        pass


def adaptive_depth(layer_bytes: int, ttfb_s: float, bandwidth_bps: float, consume_interval_s: float | None,
                   num_layers: int, max_depth: int = 0) -> int:
    """Layers to keep in flight so the fetch of layer i+k ends before layer i+k is needed.

    fetch(one layer) = ttfb + bytes/bw; while it runs the consumer eats one layer every
    ``consume_interval_s``: k = ceil(fetch / interval) + 1 covers it. Unknown consumption
    rate (lookup time, no forward pass yet) means "as deep as allowed".
    """
    cap = num_layers if max_depth <= 0 else min(max_depth, num_layers)
    if consume_interval_s is None or consume_interval_s <= 0:
        return cap
    fetch_s = ttfb_s + (layer_bytes / bandwidth_bps if bandwidth_bps > 0 else 0.0)
    return max(1, min(cap, math.ceil(fetch_s / consume_interval_s) + 1))


class LatencyWindow:
    """The ``quantile`` of the last ``size`` first-byte latencies, recomputed every few samples
    (it is read under the prefetcher's lock at every admission)."""

    def __init__(self, seed_s: float, size: int = 128, quantile: float = 0.95, every: int = 8):
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self._quantile = quantile
        self._every = every
        self._since = 0
        self.tail = seed_s

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._since += 1
        if self._since >= self._every or len(self._samples) <= self._every:
            self._since = 0
            ordered = sorted(self._samples)
            self.tail = ordered[min(len(ordered) - 1, int(self._quantile * len(ordered)))]


def staging_budget_needed(*, layer_bytes: int, num_layers: int, link_bps: float, latency_s: float,
                          jitter_s: float = 0.0, compute_s: float = 0.0) -> int:
    """Staging bytes that let one retrieval run at its pipeline's rate through the latency tail.

    Little's law: layers in flight = rate x time each spends in flight. The rate is one layer
    per max(compute, layer transfer) (whichever is slower paces the pipeline); a layer is in
    flight from admission until consumed, at worst the tail latency plus its transfer. Sized
    on the tail (latency + jitter), not the mean: sized on the mean, every slow response
    stalls the link until it lands, and the latency is paid again at each stall. One more
    layer covers the one being handed over. Never more than the whole prompt.
    """
    if layer_bytes <= 0 or num_layers <= 0:
        return 0
    transfer = layer_bytes / link_bps if link_bps > 0 else 0.0
    step = max(compute_s, transfer, 1e-6)
    in_flight = (latency_s + jitter_s + transfer) / step
    return min(num_layers, math.ceil(in_flight) + 1) * layer_bytes


class JobState(Enum):
    """One layer of one retrieval: waiting -> queued -> staged | failed, then taken. Eviction
    sends a staged layer back to waiting; cancelling a queued one makes it cancelled until its
    in-flight parts are abandoned (then taken)."""

    WAITING = "waiting"  # not admitted: no staging buffers yet
    QUEUED = "queued"  # admitted: buffers allocated, parts queued or in flight
    STAGED = "staged"  # every part in and verified
    FAILED = "failed"
    TAKEN = "taken"  # handed out (or dropped): buffers no longer ours
    CANCELLED = "cancelled"


@dataclass
class _LayerJob:
    retrieval: "Retrieval"
    layer: int
    nbytes: int
    state: JobState = JobState.WAITING
    handles: list[Any] = field(default_factory=list)
    views: list[memoryview] = field(default_factory=list)
    parts_left: int = 0
    attempts: int = 0
    error: Exception | None = None
    generation: int = 0  # bumps on eviction so late parts of an old attempt are ignored
    waiters: int = 0  # consumers blocked on this job now
    takes: list[int] = field(default_factory=list)  # per chunk: consumers it was handed to
    t_admit: float = 0.0
    t_done: float = 0.0


@dataclass(eq=False)
class _Wait:
    """One consumer blocked in ``get_layer``: the jobs (one per involved retrieval) it needs."""

    seq: int  # arrival order: the deadlock-breaking priority
    layer: int
    jobs: list[_LayerJob] = field(default_factory=list)
    picks: list[tuple["Retrieval", int] | None] = field(default_factory=list)  # (holder, slot) per chunk


@dataclass
class TraceEvent:
    retrieval: int
    layer: int
    kind: str  # admit | staged | taken | failed | evicted
    t: float


class Retrieval:
    _ids = itertools.count(1)

    def __init__(self, ns: Namespace, locations: Sequence[Location], num_layers: int, first_layer: int,
                 source: str, now: float, deadline_s: float):
        self.id = next(Retrieval._ids)
        self.ns = ns
        self.locations = list(locations)
        self.hashes = [loc.manifest.chunk_hashes[loc.index] for loc in self.locations]
        self.num_layers = num_layers
        self.source = source
        self.created = now
        self.last_take = now
        # Counted from the first consumer's first ask, not from the look-up: a request may
        # wait in the engine's queue longer than the deadline without anything being slow. A
        # look-up-time fetch nobody consumes is bounded by the idle expiry instead.
        self.deadline: float | None = None
        self.deadline_s = deadline_s
        # The consumer's own time per layer: from handing layer i out to its ask for layer
        # i+1. Not ask-to-ask: that includes the waits, so a fetch-bound consumer would look
        # slow, the depth rule would answer "shallow", and the pipeline would stay fetch-bound
        # at a depth of two, paying the latency on every other layer.
        self.consume_intervals: list[float] = []
        self.last_handout: float | None = None
        self.runs = plan_runs(self.locations)
        tokens = [loc.tokens for loc in self.locations]
        self.chunk_tokens = tokens
        self.chunk_bytes = [t * loc.manifest.bytes_per_token for t, loc in zip(tokens, self.locations)]
        self.layer_bytes = sum(self.chunk_bytes)
        self.jobs = {l: _LayerJob(self, l, self.layer_bytes) for l in range(first_layer, num_layers)}
        self.cancelled = False
        self.waiting_layer: int | None = None  # the layer last waited on (consumption rate)
        self.waiters = 0  # consumers blocked on one of its layers now
        self.taken_upto = first_layer - 1  # highest layer handed out
        self.takers = [0] * len(self.locations)  # per chunk: most consumers it went to in one layer
        self.done_event = threading.Event()

    @property
    def consume_interval(self) -> float | None:
        if not self.consume_intervals:
            return None
        recent = self.consume_intervals[-4:]
        return sum(recent) / len(recent)


@dataclass
class PrefetchStats:
    retrievals: int = 0
    layers_staged: int = 0
    layers_taken: int = 0
    layers_evicted: int = 0
    layers_failed: int = 0
    chunks_copied: int = 0  # (chunk, layer) buffers copied for another request sharing a prefix
    gets: int = 0
    bytes_fetched: int = 0
    cancelled: int = 0
    idle_expired: int = 0
    peak_staging_bytes: int = 0


class Prefetcher:
    def __init__(self, store: SegmentStore, *, budget_bytes: int, workers: int = 16, max_depth: int = 0,
                 deadline_s: float = 30.0, idle_timeout_s: float = 30.0, layer_attempts: int = 2,
                 allocator: StagingAllocator | None = None, clock: Callable[[], float] = time.monotonic,
                 trace: bool = False, on_layer_fetched: Callable[[int, int, float], None] | None = None,
                 on_fault: Callable[[str], None] | None = None, head_part_bytes: int = 512 * 1024,
                 interest: Callable[[Namespace, int], int] | None = None):
        self.store = store
        self.head_part_bytes = head_part_bytes
        self.budget = budget_bytes
        self.max_depth = max_depth
        self.deadline_s = deadline_s
        self.idle_timeout_s = idle_timeout_s
        self.layer_attempts = layer_attempts
        self.allocator: StagingAllocator = allocator or BytearrayAllocator()
        self.clock = clock
        self.stats = PrefetchStats()
        self.trace: list[TraceEvent] | None = [] if trace else None
        self._on_layer_fetched = on_layer_fetched
        # Checksum failures are found here, after the S3 client saw a successful response,
        # so the client's own error hook never hears of them.
        self._on_fault = on_fault
        # How many requests will load a chunk (the look-ups that pinned it): a batch stepped in
        # lockstep takes a layer one request after the other, so the first taker cannot see
        # the second waiting yet.
        self._interest = interest
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        # Workers wait apart from consumers and are woken a few at a time: one notify_all
        # per arriving part would make every one of dozens of workers runnable at once, and
        # the forward pass's thread would then queue behind them for the GIL (5 ms a turn).
        self._work_cv = threading.Condition(self._lock)
        self._retrievals: dict[int, Retrieval] = {}
        self._holders: dict[tuple[Namespace, int], list[tuple[Retrieval, int]]] = {}
        self._waits: dict[int, _Wait] = {}  # by arrival, oldest first
        self._wait_seq = itertools.count()
        self._staged_bytes = 0
        self._queue: list[tuple[tuple, int, Any]] = []
        self._seq = itertools.count()
        # For the depth rule: the tail of recent first-byte latencies (a mean would size the
        # pipeline for the typical response and stall on every slow one) and an EWMA of the
        # per-request body rate; seeded pessimistically so the first estimate is deep.
        self._ttfb = LatencyWindow(seed_s=0.05)
        self._bw = 200e6
        self._closed = False
        self._workers = [threading.Thread(target=self._worker, name=f"s3layer-get-{i}", daemon=True)
                         for i in range(workers)]
        for w in self._workers:
            w.start()
        self._janitor = threading.Thread(target=self._janitor_loop, name="s3layer-prefetch-janitor", daemon=True)
        self._janitor.start()

    # ---- public API ------------------------------------------------------------------------

    @property
    def staging_bytes(self) -> int:
        with self._lock:
            return self._staged_bytes

    def current_depth(self) -> int:
        """The depth rule's answer for the newest live retrieval (0 when idle)."""
        with self._lock:
            rs = list(self._retrievals.values())
            if not rs:
                return 0
            r = rs[-1]
            return adaptive_depth(r.layer_bytes, self._ttfb.tail, self._bw, r.consume_interval, r.num_layers,
                                  self.max_depth)

    def active(self) -> int:
        with self._lock:
            return len(self._retrievals)

    def prefetch(self, ns: Namespace, locations: Sequence[Location], num_layers: int, *,
                 first_layer: int = 0, source: str = "lookup") -> Retrieval | None:
        """Start fetching every layer of these chunks (lookup time). Chunks already held by a
        live retrieval are skipped, so repeated look-ups of one prompt fetch once."""
        with self._lock:
            if self._closed:
                return None
            fresh, seen = [], set()
            for loc in locations:
                key = (loc.manifest.segment_id, loc.index)
                if key not in seen and not self._held_locked(ns, loc, first_layer):
                    seen.add(key)
                    fresh.append(loc)
            if not fresh:
                return None
            r = self._start_locked(ns, fresh, num_layers, first_layer, source)
            self._admit_locked()
            return r

    def get_layer(self, ns: Namespace, layer: int, locations: Sequence[Location], num_layers: int,
                  timeout: float | None = None) -> list[Any]:
        """Layer ``layer`` of these chunks, in order, verified: one allocator handle per chunk,
        owned by the caller from now on. Blocks until staged, or raises RetrievalFailed."""
        now = self.clock()
        with self._lock:
            if self._closed:
                raise RetrievalFailed("prefetcher is closed")
            wait = _Wait(next(self._wait_seq), layer)
            self._waits[wait.seq] = wait
            try:
                return self._await_layer_locked(wait, ns, locations, num_layers, now, timeout)
            finally:
                wait.picks = []
                self._set_wait_jobs_locked(wait, [])
                del self._waits[wait.seq]

    def _await_layer_locked(self, wait: _Wait, ns: Namespace, locations: Sequence[Location], num_layers: int,
                            now: float, timeout: float | None) -> list[Any]:
        layer = wait.layer
        picks: list[tuple[Retrieval, int] | None] = [None] * len(locations)
        wait.picks = picks
        involved: list[Retrieval] = []
        deadline: float | None = None
        while True:
            # (Re)pick a holder for every chunk whose holder can no longer serve it. Requests
            # that share chunks share retrievals, so while we wait another consumer may take
            # the layer (releasing our slot), or fail and cancel it: then we fetch our own
            # copy instead of waiting for a buffer that will never come.
            stale = [i for i, p in enumerate(picks) if p is None or not self._serves_locked(p, layer)]
            if stale:
                missing = []
                for i in stale:
                    picks[i] = self._holder_locked(ns, locations[i], layer)
                    if picks[i] is None:
                        missing.append(i)
                if missing:
                    r = self._start_locked(ns, [locations[i] for i in missing], num_layers, layer, "retrieve")
                    for k, i in enumerate(missing):
                        picks[i] = (r, k)
                involved = list({id(p[0]): p[0] for p in picks if p is not None}.values())
                for r in involved:
                    if r.deadline is None:
                        r.deadline = now + r.deadline_s
                    if (r.waiting_layer != layer and r.last_handout is not None and r.taken_upto >= 0
                            and layer > r.taken_upto):
                        r.consume_intervals.append(max(0.0, now - r.last_handout))
                    r.waiting_layer = layer
                    r.last_take = now
                self._set_wait_jobs_locked(wait, [r.jobs[layer] for r in involved])
                if deadline is None:
                    deadline = min(r.deadline for r in involved if r.deadline is not None)
                    if timeout is not None:
                        deadline = min(deadline, now + timeout)
            jobs = wait.jobs
            failed = next((j for j in jobs if j.state == JobState.FAILED), None)
            if failed is not None:
                err = failed.error
                for r in involved:
                    self._cancel_locked(r)
                self._admit_locked()
                raise RetrievalFailed(f"layer {layer}: {err}") from err
            if all(j.state == JobState.STAGED for j in jobs):
                break
            if any(j.state == JobState.WAITING for j in jobs):
                # Memory freed by a release or a cancellation elsewhere is noticed here too,
                # not only when some fetch completes.
                self._admit_locked()
            assert deadline is not None  # set on the first pass: every pick starts out stale
            left = deadline - self.clock()
            if left <= 0 or self._closed:
                for r in involved:
                    self._cancel_locked(r)
                self._admit_locked()
                raise RetrievalFailed(f"layer {layer} not fetched and verified in time: waited "
                                      f"{self.clock() - now:.1f} s, up to the retrieval deadline")
            self._cv.wait(min(left, 0.5))
        # Requests sharing a prefix share buffers: a chunk another consumer will take too is
        # copied for it before the staged buffer is handed out, so each layer object is read
        # once per burst of such requests, not once per request.
        wait.picks = []  # from here on this consumer is not one of the others
        wanted = self._wanted_locked(layer)
        out = []
        for p in picks:
            assert p is not None  # every stale pick was refilled above
            r, slot = p
            job = r.jobs[layer]
            out.append(job.handles[slot])
            job.handles[slot] = None
            if not job.takes:
                job.takes = [0] * len(job.handles)
            job.takes[slot] += 1
            r.takers[slot] = max(r.takers[slot], job.takes[slot])
            if self._awaited_locked(job, slot, wanted):
                self._keep_copy_locked(job, slot)
        handout = self.clock()
        for r in involved:
            r.waiting_layer = None
            r.taken_upto = max(r.taken_upto, layer)
            r.last_handout = handout
        self._set_wait_jobs_locked(wait, [])  # retires what no one else will take
        self._admit_locked()
        return out

    def _wanted_locked(self, layer: int) -> set[tuple[int, int]]:
        """(retrieval id, slot) of every chunk a consumer waits on at ``layer`` or earlier:
        consumers go layer by layer, so each will want it at ``layer`` too."""
        return {(p[0].id, p[1]) for w in self._waits.values() if w.layer <= layer for p in w.picks if p}

    def _awaited_locked(self, job: _LayerJob, slot: int, wanted: set[tuple[int, int]]) -> bool:
        """Will another consumer take this chunk of this layer? One in ``wanted``, or, when
        fewer took it than took it in some layer or than requests pinned it, one in a batch
        that has not asked yet."""
        r = job.retrieval
        taken = job.takes[slot] if job.takes else 0
        if r.takers[slot] > taken:
            return True
        if self._interest is not None and self._interest(r.ns, r.hashes[slot]) > taken:
            return True
        return (r.id, slot) in wanted

    def _keep_copy_locked(self, job: _LayerJob, slot: int) -> None:
        """Before ``slot``'s staged buffer (still valid: not yet returned) goes to its consumer,
        copy it into a fresh one kept in the job for the next consumer."""
        r = job.retrieval
        try:
            got = self.allocator.allocate(r.chunk_tokens[slot], r.chunk_bytes[slot])
        except S3LayerError:
            got = None
        if got is None:  # no memory for a copy: the next consumer fetches its own
            return
        view = memoryview(got[1]).cast("B")
        view[:] = job.views[slot]
        job.handles[slot], job.views[slot] = got[0], view
        self.stats.chunks_copied += 1

    def _maybe_retire_locked(self, job: _LayerJob) -> None:
        """Retire a layer handed out in part once nobody waits on it nor will take the rest."""
        if job.state != JobState.STAGED or not job.takes or job.waiters > 0:
            return
        wanted = self._wanted_locked(job.layer)
        if any(h is not None and self._awaited_locked(job, s, wanted) for s, h in enumerate(job.handles)):
            return  # if that consumer never comes, eviction or idle expiry frees it
        self._retire_layer_locked(job.retrieval, job.layer)

    def cancel_chunks(self, ns: Namespace, hashes: Sequence[int]) -> int:
        """Unpin/abort: drop every retrieval holding any of these chunks that no one waits on."""
        n = 0
        with self._lock:
            # One retrieval holds many of a request's chunks: visit each once.
            holders = {r.id: r for h in hashes for r, _ in self._holders.get((ns, h), [])}
            for r in holders.values():
                # Only retrievals nobody has started consuming: one whose layers are being
                # handed out belongs to a forward pass in progress.
                if r.waiters == 0 and r.taken_upto < min(r.jobs, default=0) and not r.cancelled:
                    self._cancel_locked(r)
                    n += 1
                else:  # a copy kept for this request is not needed any more
                    for job in list(r.jobs.values()):
                        self._maybe_retire_locked(job)
            if n:
                self._admit_locked()
        return n

    def cancel(self, r: Retrieval) -> None:
        with self._lock:
            self._cancel_locked(r)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        end = self.clock() + timeout
        with self._lock:
            while self._retrievals or self._staged_bytes:
                left = end - self.clock()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for r in list(self._retrievals.values()):
                self._cancel_locked(r)
            self._cv.notify_all()
            self._work_cv.notify_all()
        for w in self._workers:
            w.join(timeout=5)
        self._janitor.join(timeout=5)

    # ---- bookkeeping (all under self._lock) ------------------------------------------------

    def _set_wait_jobs_locked(self, wait: _Wait, jobs: list[_LayerJob]) -> None:
        old, wait.jobs = wait.jobs, jobs
        for j in jobs:  # first, so a job in both lists is never seen unwaited
            j.waiters += 1
            j.retrieval.waiters += 1
        for j in old:
            j.waiters -= 1
            j.retrieval.waiters -= 1
            self._maybe_retire_locked(j)

    def _start_locked(self, ns, locations, num_layers, first_layer, source) -> Retrieval:
        r = Retrieval(ns, locations, num_layers, first_layer, source, self.clock(), self.deadline_s)
        self._retrievals[r.id] = r
        for slot, h in enumerate(r.hashes):
            self._holders.setdefault((ns, h), []).append((r, slot))
        self.stats.retrievals += 1
        return r

    def _serves_locked(self, pick: tuple[Retrieval, int], layer: int) -> bool:
        r, slot = pick
        job = r.jobs.get(layer)
        return (not r.cancelled and job is not None and job.state != JobState.TAKEN
                and (job.state != JobState.STAGED or job.handles[slot] is not None))

    def _held_locked(self, ns, loc: Location, layer: int) -> bool:
        return self._holder_locked(ns, loc, layer) is not None

    def _holder_locked(self, ns, loc: Location, layer: int) -> tuple[Retrieval, int] | None:
        h = loc.manifest.chunk_hashes[loc.index]
        for r, slot in self._holders.get((ns, h), []):
            # Same segment only: a chunk's layers must all come from one committed segment.
            # A failed layer is returned too, so the caller sees the failure instead of
            # quietly starting another fetch of what was just found broken.
            if (r.locations[slot].manifest.segment_id == loc.manifest.segment_id
                    and self._serves_locked((r, slot), layer)):
                return r, slot
        return None

    def _admit_locked(self) -> None:
        order = sorted((r for r in self._retrievals.values() if not r.cancelled), key=lambda r: r.id)
        # 1) Layers a consumer is blocked on, whatever their retrieval's priority: with
        #    retrievals advanced in lockstep, an earlier request may be waiting on a later one's
        #    progress. Oldest wait first; only the oldest with a part left to admit may evict
        #    what younger waits hold (see the module docstring: no hold-and-wait stall).
        preempt = True
        for wait in list(self._waits.values()):
            pending = [j for j in wait.jobs if j.state == JobState.WAITING and not j.retrieval.cancelled]
            if not pending:
                continue
            for job in pending:
                if not self._fits_locked(job.nbytes, wait=wait, preempt=preempt) or not self._allocate_locked(job):
                    if preempt:
                        # What it freed is its own: younger waits taking it would starve it.
                        return
                    break
                self._enqueue_locked(job)
            preempt = False
        # 2) Read-ahead in strict priority: nothing later jumps ahead of a layer that does not fit.
        for r in order:
            base = r.taken_upto + 1
            k = adaptive_depth(r.layer_bytes, self._ttfb.tail, self._bw, r.consume_interval, r.num_layers,
                               self.max_depth)
            for layer in range(base, min(r.num_layers, base + k)):
                ahead = r.jobs.get(layer)
                if ahead is None or ahead.state != JobState.WAITING:
                    continue
                if self._staged_bytes + ahead.nbytes > self.budget and self._staged_bytes > 0:
                    return
                if not self._allocate_locked(ahead):
                    return
                self._enqueue_locked(ahead)

    def _fits_locked(self, nbytes: int, wait: _Wait, preempt: bool) -> bool:
        """Room for one more part of ``wait``'s layer, evicting for it if need be."""
        if self._staged_bytes + nbytes <= self.budget:
            return True
        self._evict_for_locked(nbytes, wait, preempt)
        own = sum(j.nbytes for j in wait.jobs if j.handles)
        # Nothing else staged: this consumer's layer runs alone, however large (as a single
        # layer larger than the whole budget does), or it could never be served.
        return self._staged_bytes + nbytes <= self.budget or self._staged_bytes == own

    def _evict_for_locked(self, nbytes: int, wait: _Wait, preempt: bool) -> None:
        """Free staged layers to make room for ``wait``: read-ahead nobody waits on first
        (beyond each retrieval's next layer first, later retrievals and furthest layers
        first); then, for the oldest wait only, parts younger waits hold (youngest first).
        Evicted layers are fetched again when their turn comes."""
        def head(r: Retrieval) -> int:
            return r.taken_upto + 1

        idle = [j for r in self._retrievals.values() if not r.cancelled
                for j in r.jobs.values() if j.state == JobState.STAGED and j.waiters == 0]
        idle.sort(key=lambda j: (j.layer == head(j.retrieval), -j.retrieval.id, -j.layer))
        held: list[_LayerJob] = []
        if preempt:
            # Not the parts of older waits, nor of complete ones: their consumers are about to
            # take them, which frees the memory without a refetch.
            kept = {id(j) for w in self._waits.values()
                    if w.seq <= wait.seq or all(j.state == JobState.STAGED for j in w.jobs) for j in w.jobs}
            for w in reversed(list(self._waits.values())):
                if w.seq <= wait.seq:
                    break
                held += [j for j in w.jobs if j.state == JobState.STAGED and id(j) not in kept]
        for job in idle + held:
            if self._staged_bytes + nbytes <= self.budget:
                return
            if job.state != JobState.STAGED:  # already evicted: shared by two younger waits
                continue
            self._release_job_locked(job)
            job.state = JobState.WAITING
            job.generation += 1
            self.stats.layers_evicted += 1
            self._trace(job, "evicted")

    def _allocate_locked(self, job: _LayerJob) -> bool:
        r = job.retrieval
        handles: list[Any] = []
        views: list[memoryview] = []
        for tokens, nbytes in zip(r.chunk_tokens, r.chunk_bytes):
            try:
                got = self.allocator.allocate(tokens, nbytes)
            except S3LayerError as exc:
                # The stored shape does not fit this engine's buffers: the layer can never be
                # served. Fail it (its consumer raises RetrievalFailed) rather than let the
                # error escape into a worker thread or the admission loop.
                for h in handles:
                    self.allocator.release(h)
                job.state, job.error = JobState.FAILED, exc
                self.stats.layers_failed += 1
                self._cv.notify_all()
                return False
            if got is None:  # the LMCache pool is full: try again when something is released
                for h in handles:
                    self.allocator.release(h)
                return False
            handles.append(got[0])
            views.append(memoryview(got[1]).cast("B"))
        job.handles, job.views = handles, views
        self._staged_bytes += job.nbytes
        self.stats.peak_staging_bytes = max(self.stats.peak_staging_bytes, self._staged_bytes)
        return True

    def _enqueue_locked(self, job: _LayerJob) -> None:
        r = job.retrieval
        job.state = JobState.QUEUED
        job.attempts += 1
        job.t_admit = self.clock()
        self._trace(job, "admit")
        parts = []
        # The layer the forward pass needs next is the one latency lands on: split it finer, so
        # it holds more of the link's connections than the read-ahead admitted beside it (at
        # lookup, every layer's first byte arrives together and they share the bandwidth).
        head = job.waiters > 0 or (r.taken_upto < job.layer == min(r.jobs))
        part_size = None
        if head:
            part_size = min(self.store.part_size, max(self.head_part_bytes, -(-job.nbytes // _HEAD_SPLIT)))
        for run in r.runs:
            read = self.store.plan_layer_read(run.manifest, job.layer, run.first, run.last, part_size)
            slot_views = [job.views[s] for s in run.slots]
            for part in read.parts:
                parts.append((part, _scatter(slot_views, part.dest, part.length)))
        job.parts_left = len(parts)
        for part, dests in parts:
            prio = (r.id, job.layer)
            heapq.heappush(self._queue, (prio, next(self._seq), (job, job.generation, part, dests)))
        self._work_cv.notify(len(parts))

    def _release_job_locked(self, job: _LayerJob) -> None:
        for h in job.handles:
            if h is not None:
                self.allocator.release(h)
        if job.handles:
            self._staged_bytes -= job.nbytes
        job.handles, job.views = [], []

    def _retire_layer_locked(self, r: Retrieval, layer: int) -> None:
        job = r.jobs[layer]
        # Handles handed out now belong to the caller (their slots are None); chunks of this
        # retrieval the caller did not ask for are released.
        self._release_job_locked(job)
        job.state = JobState.TAKEN
        self.stats.layers_taken += 1
        self._trace(job, "taken")
        if all(j.state == JobState.TAKEN for j in r.jobs.values()):
            self._finish_locked(r)
        self._cv.notify_all()

    def _cancel_locked(self, r: Retrieval) -> None:
        if r.cancelled:
            return
        r.cancelled = True
        self.stats.cancelled += 1
        for job in r.jobs.values():
            if job.state in (JobState.STAGED, JobState.WAITING):
                self._release_job_locked(job)
            elif job.state == JobState.QUEUED:
                job.generation += 1  # in-flight parts finish into buffers released on arrival
                job.state = JobState.CANCELLED
        self._finish_locked(r)
        self._cv.notify_all()

    def _finish_locked(self, r: Retrieval) -> None:
        self._retrievals.pop(r.id, None)
        for h in r.hashes:
            lst = self._holders.get((r.ns, h))
            if lst:
                lst[:] = [(x, s) for x, s in lst if x is not r]
                if not lst:
                    del self._holders[(r.ns, h)]
        r.done_event.set()

    def _trace(self, job: _LayerJob, kind: str) -> None:
        if self.trace is not None:
            self.trace.append(TraceEvent(job.retrieval.id, job.layer, kind, self.clock()))

    # ---- workers ---------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._work_cv.wait()
                if self._closed and not self._queue:
                    return
                _, _, (job, gen, part, dests) = heapq.heappop(self._queue)
                if gen != job.generation:
                    self._part_abandoned_locked(job)
                    continue
            err: Exception | None = None
            t0 = time.perf_counter()
            ttfb = 0.0
            try:
                ttfb = self.store.client.get_range_into(part.key, part.offset, dests)
            except Exception as exc:  # noqa: BLE001 - recorded on the job, raised to the consumer
                err = exc
            elapsed = time.perf_counter() - t0
            with self._lock:
                self.stats.gets += 1
                if err is None:
                    self.stats.bytes_fetched += part.length
                    self._observe(ttfb, part.length, elapsed)
                if gen != job.generation:
                    self._part_abandoned_locked(job)
                    continue
                if err is not None and job.error is None:
                    job.error = err
                job.parts_left -= 1
                if job.parts_left > 0:
                    continue
                error = job.error
            if error is None:
                error = self._verify(job)
            with self._lock:
                if gen != job.generation:
                    self._part_abandoned_locked(job)
                    continue
                self._layer_done_locked(job, error)

    def _part_abandoned_locked(self, job: _LayerJob) -> None:
        """A part of an evicted/cancelled attempt landed: free its buffers once all have."""
        if job.state == JobState.CANCELLED:
            job.parts_left -= 1
            if job.parts_left <= 0:
                self._release_job_locked(job)
                job.state = JobState.TAKEN
                self._cv.notify_all()

    def _verify(self, job: _LayerJob) -> Exception | None:
        r = job.retrieval
        try:
            for run in r.runs:
                read = self.store.plan_layer_read(run.manifest, job.layer, run.first, run.last)
                self.store.verify_slices(read, [job.views[s] for s in run.slots])
        except (CorruptObject, S3LayerError) as exc:
            if self._on_fault is not None:
                self._on_fault("ChecksumMismatch" if isinstance(exc, CorruptObject) else type(exc).__name__)
            return exc
        return None

    def _layer_done_locked(self, job: _LayerJob, error: Exception | None) -> None:
        r = job.retrieval
        job.t_done = self.clock()
        if error is None:
            job.state = JobState.STAGED
            self.stats.layers_staged += 1
            self._trace(job, "staged")
            if self._on_layer_fetched:
                self._on_layer_fetched(job.layer, job.nbytes, job.t_done - job.t_admit)
        elif job.attempts < self.layer_attempts and _worth_retrying(error) and not r.cancelled:
            # The S3 client already retried transport errors; this is one more whole-layer
            # attempt, mostly for a torn read that failed its checksum.
            log.info("refetching layer %d (%s)", job.layer, error)
            job.error = None
            job.generation += 1
            self._enqueue_locked(job)
            return
        else:
            job.state = JobState.FAILED
            job.error = error
            self.stats.layers_failed += 1
            self._trace(job, "failed")
            self._release_job_locked(job)
        self._cv.notify_all()
        self._admit_locked()

    def _observe(self, ttfb: float, nbytes: int, elapsed: float) -> None:
        a = 0.2
        self._ttfb.add(ttfb)
        body = elapsed - ttfb
        if body > 1e-4 and nbytes > 256 * 1024:
            self._bw = (1 - a) * self._bw + a * (nbytes / body)

    def _janitor_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = self.clock()
                expired = [r for r in self._retrievals.values()
                           if r.waiters == 0 and now - r.last_take > self.idle_timeout_s]
                for r in expired:
                    log.info("prefetch of %d chunks idle for %.0f s: releasing its memory",
                             len(r.hashes), now - r.last_take)
                    self.stats.idle_expired += 1
                    self._cancel_locked(r)
                if expired:
                    self._admit_locked()
                self._cv.wait(0.25)


# How many GETs the head layer is split into at most (parts never below head_part_bytes).
_HEAD_SPLIT = 8
def _worth_retrying(error: Exception) -> bool:
    if isinstance(error, CorruptObject):
        return True
    return isinstance(error, StorageError) and error.retryable


def _scatter(views: list[memoryview], offset: int, length: int) -> list[memoryview]:
    """The slices of consecutive buffers ``views`` covering bytes [offset, offset+length)."""
    out, pos = [], 0
    for v in views:
        lo, hi = pos, pos + len(v)
        a, b = max(lo, offset), min(hi, offset + length)
        if a < b:
            out.append(v[a - lo:b - lo])
        pos = hi
        if pos >= offset + length:
            break
    return out
