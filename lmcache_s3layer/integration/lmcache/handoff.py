"""Buffers handed to LMCache stay ours until the device copy that reads them has finished.

LMCache's ``retrieve_layer`` queues each layer's host->device copy and, right after queueing
the last one, drops its reference to every buffer of the retrieval. On a GPU that copy runs
later, on a stream of its own; a buffer whose count reaches zero is back in LMCache's pool at
once, and our prefetcher may allocate it and write another request's bytes into it while the
copy still reads it. So every buffer we hand over carries one reference of ours, returned
only when LMCache has dropped its own *and* a device fence (every copy queued so far has
finished) has passed.

When a retrieval fails, LMCache's generator dies inside ``task.result()`` and never drops the
references of the layers it already took: those are dropped here, for exactly the failed
retrieval. Two concurrent retrievals of the same chunks are told apart by call order: LMCache
creates each layer's request on the forward thread, in the same order of retrievals at every
layer (vLLM steps them in lockstep), so the k-th request for layer ``i`` of a chunk list
belongs to the k-th retrieval still at layer ``i``.

Objects only need ``ref_count_up``/``ref_count_down``/``get_ref_count`` (LMCache's MemoryObj).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Retrieval:
    """One LMCache retrieval of one chunk list: the buffers it took so far."""

    key: Hashable
    next_layer: int = 0
    objs: list[Any] = field(default_factory=list)
    last_activity: float = field(default_factory=time.monotonic)


@dataclass
class HandOffStats:
    retrievals: int = 0
    retrievals_failed: int = 0
    retrievals_abandoned: int = 0
    fences: int = 0
    buffers_released: int = 0


class HandOff:
    """Tracks handed buffers per retrieval and releases them after LMCache and the device.

    ``fence`` blocks until every device copy queued before the call has finished
    (``torch.cuda.synchronize`` on a GPU); it runs on this object's own thread, never on
    the forward thread. ``abandon_after_s``: a retrieval that neither takes a layer nor
    fails for that long was dropped by its caller; its buffers are released so the pool
    does not leak (far beyond any retrieval deadline).
    """

    def __init__(self, fence: Callable[[], None], *, poll_s: float = 0.002,
                 abandon_after_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self._fence = fence
        self._poll_s = poll_s
        self._abandon_after_s = abandon_after_s
        self._clock = clock
        self.stats = HandOffStats()
        self._cv = threading.Condition()
        self._live: dict[Hashable, list[Retrieval]] = {}
        # Buffers whose retrieval ended: released once LMCache's reference is gone too.
        self._ending: list[list[Any]] = []
        self._releasing = 0  # buffers past the fence, being released
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="s3layer-handoff-release", daemon=True)
        self._thread.start()

    # ---- called per layer request ----------------------------------------------------------

    def begin(self, key: Hashable, layer: int) -> Retrieval:
        """The retrieval a request for ``layer`` of chunk list ``key`` belongs to. Must be
        called on the thread that steps the retrievals, in their stepping order."""
        with self._cv:
            group = self._live.setdefault(key, [])
            r = next((r for r in group if r.next_layer == layer), None)
            if r is None:
                r = Retrieval(key, next_layer=layer)
                group.append(r)
                if layer == 0:
                    self.stats.retrievals += 1
            r.next_layer = layer + 1
            r.last_activity = self._clock()
            return r

    def handed(self, r: Retrieval, objs: list[Any], last: bool) -> None:
        """``objs`` go to LMCache now; we keep one reference of our own to each."""
        for o in objs:
            o.ref_count_up()
        with self._cv:
            r.objs.extend(objs)
            r.last_activity = self._clock()
            if last:
                self._end_locked(r)

    def failed(self, r: Retrieval) -> None:
        """LMCache will never drop the references of the layers this retrieval took."""
        with self._cv:
            self.stats.retrievals_failed += 1
            for o in r.objs:
                o.ref_count_down()
            self._end_locked(r)

    # ---- lifecycle -------------------------------------------------------------------------

    def live_retrievals(self) -> int:
        with self._cv:
            return sum(len(g) for g in self._live.values())

    def held_buffers(self) -> int:
        with self._cv:
            return sum(len(r.objs) for g in self._live.values() for r in g) + sum(map(len, self._ending))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self._cv:
            while self._ending or self._releasing:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        """Stop the release thread. Buffers still held stay with the pool's owner (LMCache
        frees the whole pool at shutdown); releasing them now could race a device copy."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    # ---- internals -------------------------------------------------------------------------

    def _end_locked(self, r: Retrieval) -> None:
        group = self._live.get(r.key, [])
        if r in group:
            group.remove(r)
        if not group:
            self._live.pop(r.key, None)
        if r.objs:
            self._ending.append(r.objs)
            r.objs = []
            self._cv.notify_all()

    def _abandon_stale_locked(self) -> None:
        now = self._clock()
        for group in list(self._live.values()):
            for r in list(group):
                if now - r.last_activity > self._abandon_after_s:
                    log.warning("s3layer: a retrieval took no layer for %.0f s; releasing its %d buffers",
                                now - r.last_activity, len(r.objs))
                    self.stats.retrievals_abandoned += 1
                    for o in r.objs:
                        o.ref_count_down()  # LMCache's, as for a failed retrieval
                    self._end_locked(r)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._ending and not self._closed:
                    self._cv.wait(min(self._abandon_after_s, 1.0))
                    self._abandon_stale_locked()
                if self._closed:
                    return
                # LMCache drops a retrieval's references in one loop, in layer order, after
                # queueing its last copy: a batch is ready once each buffer is referenced by
                # us alone (its last buffer first, so a pending batch costs one check a poll).
                ready = [objs for objs in self._ending
                         if objs[-1].get_ref_count() <= 1 and all(o.get_ref_count() <= 1 for o in objs)]
                if not ready:
                    self._cv.wait(self._poll_s)
                    continue
                for objs in ready:
                    self._ending.remove(objs)
                self._releasing += sum(map(len, ready))
            try:
                self._fence()  # every copy queued before LMCache let go has now finished
                self.stats.fences += 1
            except Exception as exc:  # noqa: BLE001 - never free memory a copy may still read
                log.error("s3layer: device fence failed (%s); %d hand-off buffers stay allocated",
                          exc, sum(map(len, ready)))
                ready = []
            with self._cv:
                # Under the lock, so that close() never returns while a release is running.
                if not self._closed:
                    for objs in ready:
                        for o in objs:
                            o.ref_count_down()
                        self.stats.buffers_released += len(objs)
                self._releasing = 0
                self._cv.notify_all()
