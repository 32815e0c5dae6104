"""HandOff: buffers handed to LMCache come back to the pool only after LMCache and the device."""

from __future__ import annotations

import threading
import time

from lmcache_s3layer.integration.lmcache.handoff import HandOff


class Buf:
    """A MemoryObj's reference count; ``freed`` when it reaches zero."""

    def __init__(self, name):
        self.name, self.count, self.freed = name, 1, False
        self.lock = threading.Lock()

    def ref_count_up(self):
        with self.lock:
            self.count += 1

    def ref_count_down(self):
        with self.lock:
            self.count -= 1
            assert self.count >= 0, f"{self.name}: double free"
            self.freed = self.count == 0

    def get_ref_count(self):
        with self.lock:
            return self.count


class Fence:
    def __init__(self):
        self.calls = 0
        self.open = threading.Event()
        self.open.set()

    def __call__(self):
        self.open.wait(5)
        self.calls += 1


def until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def lmcache_drops(bufs):
    for b in bufs:
        b.ref_count_down()


def test_buffers_are_released_only_after_lmcache_drops_them_and_the_fence_passed():
    fence = Fence()
    h = HandOff(fence)
    try:
        r = h.begin("chunks", 0)
        layer0 = [Buf("l0")]
        h.handed(r, layer0, last=False)
        r = h.begin("chunks", 1)
        layer1 = [Buf("l1")]
        h.handed(r, layer1, last=True)
        time.sleep(0.05)
        assert not any(b.freed for b in layer0 + layer1)  # LMCache still holds them
        fence.open.clear()
        lmcache_drops(layer0 + layer1)  # LMCache queued its last copy and let go
        time.sleep(0.05)
        assert not any(b.freed for b in layer0 + layer1), "released before the device fence passed"
        fence.open.set()
        assert until(lambda: all(b.freed for b in layer0 + layer1))
        assert h.wait_idle(5) and h.held_buffers() == 0 and fence.calls >= 1
    finally:
        h.close()


def test_identical_concurrent_retrievals_are_told_apart_by_stepping_order():
    """Two retrievals of the same chunks, stepped in lockstep; the second fails at layer 1.
    Exactly its own layer-0 buffer is released (LMCache will never drop it), never the
    first retrieval's, which is still in use."""
    h = HandOff(Fence())
    try:
        a0, b0 = Buf("a0"), Buf("b0")
        ra = h.begin("same", 0)
        h.handed(ra, [a0], last=False)
        rb = h.begin("same", 0)
        h.handed(rb, [b0], last=False)
        assert ra is not rb
        ra1 = h.begin("same", 1)
        assert ra1 is ra
        h.handed(ra, [Buf("a1")], last=False)
        rb1 = h.begin("same", 1)
        assert rb1 is rb
        h.failed(rb)
        assert until(lambda: b0.freed)
        assert not a0.freed and a0.get_ref_count() == 2
        assert h.live_retrievals() == 1 and h.stats.retrievals_failed == 1
    finally:
        h.close()


def test_a_failed_fence_never_frees():
    def broken():
        raise RuntimeError("device lost")

    h = HandOff(broken)
    try:
        r = h.begin("k", 0)
        buf = Buf("x")
        h.handed(r, [buf], last=True)
        lmcache_drops([buf])
        assert h.wait_idle(5)
        assert not buf.freed and buf.get_ref_count() == 1
    finally:
        h.close()


def test_an_abandoned_retrieval_is_released_after_its_timeout():
    now = [0.0]
    h = HandOff(Fence(), abandon_after_s=100.0, clock=lambda: now[0])
    try:
        r = h.begin("k", 0)
        buf = Buf("x")
        h.handed(r, [buf], last=False)
        now[0] = 50.0
        time.sleep(0.05)
        assert not buf.freed
        now[0] = 200.0
        assert until(lambda: buf.freed, timeout=5)
        assert h.stats.retrievals_abandoned == 1
    finally:
        h.close()


def test_close_stops_releasing():
    fence = Fence()
    h = HandOff(fence)
    r = h.begin("k", 0)
    buf = Buf("x")
    h.handed(r, [buf], last=True)
    h.close()
    lmcache_drops([buf])
    time.sleep(0.05)
    assert not buf.freed  # the pool's owner frees everything at shutdown
