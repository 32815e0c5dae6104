"""Prefetch pipeline behaviour (ordering, memory cap, cancellation, deadline, verification)
against an in-memory object store whose requests the test can hold and release."""

from __future__ import annotations

import random
import threading
import time

import pytest

from lmcache_s3layer.cache.index import Location
from lmcache_s3layer.cache.prefetch import (
    LatencyWindow,
    Prefetcher,
    _scatter,
    adaptive_depth,
    staging_budget_needed,
)
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import ObjectNotFound, RetrievalFailed
from lmcache_s3layer.format.checksum import crc32c
from lmcache_s3layer.format.objects import Manifest, Namespace, layer_of_key
from lmcache_s3layer.store.segments import SegmentStore, new_segment_id

NS = Namespace("m", 1, 0, "bfloat16")
HIDDEN = 8
BPT = 2 * HIDDEN * 2


class FakeClient:
    """Objects in a dict; ``hold`` blocks GETs of chosen layers until released."""

    def __init__(self):
        self.cfg = S3LayerConfig(bucket="fake", part_size_bytes=64 * 1024)
        self.objects: dict[str, bytes] = {}
        self.gets: list[str] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.in_flight = 0
        self.max_in_flight = 0

    def get_range_into(self, key, start, out):
        with self.lock:
            self.gets.append(key)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.gate.wait(10)
            data = self.objects.get(key)
            if data is None:
                raise ObjectNotFound(f"{key}: not found", key=key, code="NoSuchKey")
            pos = start
            for v in out:
                v[:] = data[pos:pos + len(v)]
                pos += len(v)
            return 0.001
        finally:
            with self.lock:
                self.in_flight -= 1

    def put_bytes(self, key, data, create_only=False):
        self.objects[key] = bytes(data)


def make_segment(store: SegmentStore, n_layers: int, tokens: list[int], seed: int = 0):
    rng = random.Random(seed)
    sid = new_segment_id()
    hashes = [rng.getrandbits(63) for _ in tokens]
    layers = [rng.randbytes(sum(tokens) * BPT) for _ in range(n_layers)]
    sums = []
    for l, data in enumerate(layers):
        store.client.put_bytes(store.names(NS).layer_object(sid, l), data)
        pos, row = 0, []
        for t in tokens:
            row.append(crc32c(data[pos:pos + t * BPT]))
            pos += t * BPT
        sums.append(tuple(row))
    m = Manifest(sid, NS, n_layers, (2, HIDDEN), tuple(hashes), tuple(tokens), tuple(sums), 0.0)
    return m, layers


@pytest.fixture
def store():
    return SegmentStore(FakeClient(), "p")


def locs(m: Manifest) -> list[Location]:
    return [Location(m, i) for i in range(m.num_chunks)]


def test_layers_come_back_in_order_complete_and_verified(store):
    m, layers = make_segment(store, 6, [16, 16, 5])
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=4)
    try:
        for layer in range(6):
            bufs = pf.get_layer(NS, layer, locs(m), 6)
            assert b"".join(bytes(b) for b in bufs) == layers[layer]
    finally:
        pf.close()
    # one coalesced GET per layer (the segment's chunks are contiguous)
    assert len(store.client.gets) == 6


def test_priority_earlier_layers_first(store):
    m, _ = make_segment(store, 8, [16])
    store.client.gate.clear()
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=1)
    try:
        pf.prefetch(NS, locs(m), 8)
        time.sleep(0.05)
        store.client.gate.set()
        pf.get_layer(NS, 7, locs(m), 8)
        order = [layer_of_key(k) for k in store.client.gets]
        assert order == sorted(order) == list(range(8))
    finally:
        pf.close()


def test_memory_cap_holds_and_everything_is_released(store):
    tokens = [16, 16]
    m, layers = make_segment(store, 10, tokens)
    layer_bytes = sum(tokens) * BPT
    budget = 3 * layer_bytes
    pf = Prefetcher(store, budget_bytes=budget, workers=4)
    try:
        pf.prefetch(NS, locs(m), 10)
        time.sleep(0.1)  # lookup-time prefetch runs ahead as far as the budget allows
        assert pf.staging_bytes <= budget
        for layer in range(10):
            bufs = pf.get_layer(NS, layer, locs(m), 10)
            assert b"".join(bytes(b) for b in bufs) == layers[layer]
            assert pf.staging_bytes <= budget
        assert pf.stats.peak_staging_bytes <= budget
        assert pf.wait_idle(5)
        assert pf.staging_bytes == 0
    finally:
        pf.close()


class CountingAllocator:
    def __init__(self):
        self.live = 0
        self.lock = threading.Lock()

    def allocate(self, tokens, nbytes):
        with self.lock:
            self.live += 1
        buf = bytearray(nbytes)
        return buf, memoryview(buf)

    def release(self, handle):
        with self.lock:
            self.live -= 1


def test_cancel_on_unpin_releases_memory(store):
    m, _ = make_segment(store, 6, [16, 16])
    alloc = CountingAllocator()
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2, allocator=alloc)
    try:
        pf.prefetch(NS, locs(m), 6)
        time.sleep(0.05)
        assert pf.cancel_chunks(NS, [m.chunk_hashes[0]]) == 1
        assert pf.wait_idle(5)
        assert alloc.live == 0
    finally:
        pf.close()


def test_prefetch_that_is_never_retrieved_expires(store):
    m, _ = make_segment(store, 4, [16])
    alloc = CountingAllocator()
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2, allocator=alloc, idle_timeout_s=0.2)
    try:
        pf.prefetch(NS, locs(m), 4)
        assert pf.wait_idle(5)
        assert alloc.live == 0 and pf.stats.idle_expired == 1
    finally:
        pf.close()


def test_deadline_fails_loudly_and_frees(store):
    m, _ = make_segment(store, 4, [16])
    store.client.gate.clear()  # the store never answers in time
    alloc = CountingAllocator()
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2, allocator=alloc, deadline_s=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(RetrievalFailed, match="deadline"):
            pf.get_layer(NS, 0, locs(m), 4)
        assert time.monotonic() - t0 < 5
        store.client.gate.set()
        assert pf.wait_idle(5)
        assert alloc.live == 0
    finally:
        store.client.gate.set()
        pf.close()


def test_corrupt_layer_is_never_handed_out(store):
    m, layers = make_segment(store, 3, [16, 16])
    key = store.names(NS).layer_object(m.segment_id, 1)
    bad = bytearray(layers[1])
    bad[40] ^= 0xFF
    store.client.objects[key] = bytes(bad)
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2)
    try:
        assert b"".join(bytes(b) for b in pf.get_layer(NS, 0, locs(m), 3)) == layers[0]
        with pytest.raises(RetrievalFailed, match="checksum"):
            pf.get_layer(NS, 1, locs(m), 3)
        # re-read once (a torn read may succeed), then give up: 1 + 1 attempts
        assert store.client.gets.count(key) == 2
    finally:
        pf.close()


def test_missing_layer_object_fails_retrieval(store):
    m, _ = make_segment(store, 3, [16])
    del store.client.objects[store.names(NS).layer_object(m.segment_id, 2)]
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2)
    try:
        pf.get_layer(NS, 0, locs(m), 3)
        pf.get_layer(NS, 1, locs(m), 3)
        with pytest.raises(RetrievalFailed, match="not found"):
            pf.get_layer(NS, 2, locs(m), 3)
    finally:
        pf.close()


def test_consumers_sharing_a_prefetch_each_get_their_layer(store):
    # Two requests share a prompt's prefix, so both pick the one lookup-time retrieval. The
    # first to take layer 0 retires it there; the second must get its chunks anyway (a fetch
    # of its own), not wait on the released buffers until the deadline.
    m, layers = make_segment(store, 3, [16, 16])
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2, deadline_s=5)
    store.client.gate.clear()
    results, errors = {}, []

    def consume(name, chunk_locs):
        try:
            results[name] = b"".join(bytes(b) for b in pf.get_layer(NS, 0, chunk_locs, 3))
        except RetrievalFailed as exc:
            errors.append(exc)

    try:
        pf.prefetch(NS, locs(m), 3)
        a = threading.Thread(target=consume, args=("first", locs(m)[:1]))
        b = threading.Thread(target=consume, args=("both", locs(m)))
        a.start()
        b.start()
        time.sleep(0.2)  # both are waiting on the shared retrieval's layer 0
        store.client.gate.set()
        a.join(10)
        b.join(10)
        assert not errors, errors
        assert results["first"] == layers[0][:16 * BPT]
        assert results["both"] == layers[0]
    finally:
        pf.close()


def test_first_layer_is_split_finer_than_the_read_ahead(store):
    # At lookup every admitted layer's first byte arrives together; the layer the forward pass
    # needs first is split into more GETs so it takes more of the link than the read-ahead.
    m, layers = make_segment(store, 4, [16, 16])  # 1 KiB per layer
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=4, head_part_bytes=256)
    try:
        pf.prefetch(NS, locs(m), 4)
        for layer in range(4):
            assert b"".join(bytes(b) for b in pf.get_layer(NS, layer, locs(m), 4)) == layers[layer]
    finally:
        pf.close()
    per_layer = [sum(layer_of_key(k) == l for k in store.client.gets) for l in range(4)]
    assert per_layer[0] == 4  # 1 KiB in parts of 256 bytes
    assert per_layer[1:] == [1, 1, 1]  # read-ahead: one coalesced GET each


def test_chunks_from_two_segments_are_served_in_request_order(store):
    m1, l1 = make_segment(store, 2, [16, 16], seed=1)
    m2, l2 = make_segment(store, 2, [16, 7], seed=2)
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2)
    try:
        ls = locs(m1) + locs(m2)
        for layer in range(2):
            got = b"".join(bytes(b) for b in pf.get_layer(NS, layer, ls, 2))
            assert got == l1[layer] + l2[layer]
    finally:
        pf.close()


def test_lockstep_retrievals_under_tight_budget_do_not_deadlock(store):
    """Two retrievals advanced in lockstep (as vLLM does for a batch) with a budget of one
    layer each: eviction keeps both moving."""
    a, la = make_segment(store, 6, [16], seed=3)
    b, lb = make_segment(store, 6, [16], seed=4)
    layer_bytes = 16 * BPT
    pf = Prefetcher(store, budget_bytes=2 * layer_bytes, workers=2)
    try:
        pf.prefetch(NS, locs(b), 6)  # the later request grabs memory first
        pf.prefetch(NS, locs(a), 6)
        for layer in range(6):
            assert bytes(pf.get_layer(NS, layer, locs(a), 6, timeout=5)[0]) == la[layer]
            assert bytes(pf.get_layer(NS, layer, locs(b), 6, timeout=5)[0]) == lb[layer]
        assert pf.stats.peak_staging_bytes <= 2 * layer_bytes
    finally:
        pf.close()


def test_adaptive_depth_rule():
    # unknown consumption rate: as deep as allowed
    assert adaptive_depth(1 << 20, 0.05, 1e9, None, 32) == 32
    assert adaptive_depth(1 << 20, 0.05, 1e9, None, 32, max_depth=4) == 4
    # 50 ms latency, 1 ms per layer consumption: the whole model must be in flight
    assert adaptive_depth(1 << 20, 0.05, 1e9, 0.001, 32) == 32
    # compute-bound: fetch 2 ms vs 10 ms per layer -> one layer ahead suffices
    assert adaptive_depth(1 << 20, 0.001, 1e9, 0.010, 32) == 2


class SlowClient(FakeClient):
    """Every GET takes ``delay`` seconds: a fetch-bound pipeline."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def get_range_into(self, key, start, out):
        time.sleep(self.delay)
        return super().get_range_into(key, start, out)


def test_a_fetch_bound_consumer_is_timed_by_its_own_work_not_its_waits():
    # 80 ms per GET, 1 ms of work per layer, depth 1: the consumer waits ~80 ms per layer.
    # Its consumption interval must read ~1 ms (so the depth rule goes deep), not the ~80 ms
    # from one ask to the next, which would keep a fetch-bound pipeline shallow for good.
    store = SegmentStore(SlowClient(0.08), "p")
    m, _ = make_segment(store, 6, [16])
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=4, max_depth=1)
    try:
        r = pf.prefetch(NS, locs(m), 6)
        assert r is not None
        for layer in range(6):
            pf.get_layer(NS, layer, locs(m), 6)
            time.sleep(0.001)
        assert len(r.consume_intervals) >= 4
        assert r.consume_interval is not None and r.consume_interval < 0.04, r.consume_intervals
        # and with that, the rule asks for more than two layers in flight
        assert adaptive_depth(r.layer_bytes, 0.08, 1e9, r.consume_interval, 32) >= 3
    finally:
        pf.close()


def test_latency_window_tracks_the_tail_not_the_mean():
    w = LatencyWindow(seed_s=0.05, size=100, quantile=0.95, every=1)
    assert w.tail == 0.05
    for i in range(100):
        w.add(0.030 + 0.040 * (i % 10 == 9))  # 90% at 30 ms, 10% at 70 ms: mean 34 ms
    assert w.tail == pytest.approx(0.070)
    for _ in range(100):  # the window forgets: only recent samples count
        w.add(0.010)
    assert w.tail == pytest.approx(0.010)


def test_staging_budget_covers_the_latency_tail_at_the_pipeline_rate():
    mib = 1 << 20
    # bandwidth-bound: 4 MiB layers at 400 MiB/s (10 ms each), 50 +- 20 ms: a layer is in
    # flight up to 80 ms, one leaves every 10 ms -> 8 in flight, +1 being handed over
    need = staging_budget_needed(layer_bytes=4 * mib, num_layers=32, link_bps=400 * mib, latency_s=0.05,
                                 jitter_s=0.02, compute_s=0.002)
    assert need == 9 * 4 * mib
    # compute-bound: one layer per 20 ms paces it, so fewer layers need be in flight
    slow = staging_budget_needed(layer_bytes=4 * mib, num_layers=32, link_bps=400 * mib, latency_s=0.05,
                                 jitter_s=0.02, compute_s=0.02)
    assert slow == 5 * 4 * mib
    # jitter is paid for: the same mean latency with a wider spread needs more
    assert staging_budget_needed(layer_bytes=4 * mib, num_layers=32, link_bps=400 * mib, latency_s=0.05,
                                 jitter_s=0.04, compute_s=0.002) > need
    # never more than the whole prompt
    assert staging_budget_needed(layer_bytes=4 * mib, num_layers=4, link_bps=400 * mib, latency_s=1.0) == 16 * mib


def test_scatter_splits_across_chunk_buffers():
    a, b, c = (memoryview(bytearray(n)) for n in (10, 5, 10))
    parts = _scatter([a, b, c], 8, 10)
    assert [len(p) for p in parts] == [2, 5, 3]


def _wait_until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_cancel_with_gets_in_flight_frees_buffers_when_they_land(store):
    m, _ = make_segment(store, 6, [16, 16])
    store.client.gate.clear()  # every GET hangs until released
    alloc = CountingAllocator()
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=4, allocator=alloc)
    try:
        pf.prefetch(NS, locs(m), 6)
        assert _wait_until(lambda: store.client.in_flight > 0)
        assert pf.cancel_chunks(NS, [m.chunk_hashes[1]]) == 1
        assert pf.active() == 0
        store.client.gate.set()  # late parts land in buffers that must then be freed
        assert pf.wait_idle(5)
        assert alloc.live == 0 and pf.staging_bytes == 0
        assert pf.stats.layers_taken == 0
    finally:
        store.client.gate.set()
        pf.close()


def test_unpin_does_not_cancel_a_retrieval_being_consumed(store):
    m, layers = make_segment(store, 4, [16])
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2)
    try:
        pf.prefetch(NS, locs(m), 4)
        assert bytes(pf.get_layer(NS, 0, locs(m), 4)[0]) == layers[0]
        # vLLM may unpin while the forward pass still reads this prefix: it must keep going
        assert pf.cancel_chunks(NS, [m.chunk_hashes[0]]) == 0
        for layer in range(1, 4):
            assert bytes(pf.get_layer(NS, layer, locs(m), 4)[0]) == layers[layer]
        assert pf.stats.retrievals == 1  # served by the lookup's prefetch, not refetched
    finally:
        pf.close()


def test_depth_one_stages_at_most_the_next_layer(store):
    """``prefetch_max_depth: 1`` (LMCache's own one-layer lookahead, the benchmark's
    ``depth1``): never more than the layer asked for plus the next one."""
    tokens = [16, 16]
    m, layers = make_segment(store, 8, tokens)
    layer_bytes = sum(tokens) * BPT
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=4, max_depth=1)
    try:
        for layer in range(8):
            bufs = pf.get_layer(NS, layer, locs(m), 8)
            assert b"".join(bytes(b) for b in bufs) == layers[layer]
            assert pf.staging_bytes <= layer_bytes
        assert 0 < pf.stats.peak_staging_bytes <= 2 * layer_bytes
        assert len(store.client.gets) == 8
    finally:
        pf.close()


def test_a_consumer_holding_part_of_its_layer_gets_the_rest(store):
    """A consumer's chunks span two retrievals: the small one is staged, the big one does not
    fit beside it. Holding one part while waiting for the other must not stall until the
    deadline: one layer of one consumer is served even when it is larger than the budget,
    as a single layer larger than the budget is."""
    small, ls = make_segment(store, 2, [16], seed=5)
    big, lb = make_segment(store, 2, [16, 16, 16], seed=6)
    unit = 16 * BPT
    pf = Prefetcher(store, budget_bytes=3 * unit, workers=2, max_depth=1)
    try:
        pf.prefetch(NS, locs(small), 2)
        assert _wait_until(lambda: pf.stats.layers_staged >= 1)
        pf.prefetch(NS, locs(big), 2)  # 3 units beside the staged 1: does not fit
        for layer in range(2):
            got = pf.get_layer(NS, layer, locs(small) + locs(big), 2, timeout=3)
            assert b"".join(bytes(b) for b in got) == ls[layer] + lb[layer]
        assert pf.stats.peak_staging_bytes <= 4 * unit  # the budget, or one consumer's layer
    finally:
        pf.close()


class JitterClient(FakeClient):
    def __init__(self, seed: int):
        super().__init__()
        self.rng = random.Random(seed)

    def get_range_into(self, key, start, out):
        with self.lock:
            delay = self.rng.random() * 0.004
        time.sleep(delay)
        return super().get_range_into(key, start, out)


@pytest.mark.parametrize("seed", range(4))
def test_consumers_spanning_shared_retrievals_never_stall_under_a_tight_budget(seed):
    """Requests overlap: each consumer's chunks are held by several lookup-time retrievals,
    some shared with other consumers that advance at their own pace. With far less staging
    memory than they want, every consumer still gets every layer, correct, well before the
    deadline (no hold-and-wait between consumers)."""
    store = SegmentStore(JitterClient(seed), "p")
    n_layers = 6
    segs = [make_segment(store, n_layers, [16, 16], seed=100 * seed + i) for i in range(8)]
    chunks = [(m, i, [lay[l][i * 16 * BPT:(i + 1) * 16 * BPT] for l in range(n_layers)])
              for m, lay in segs for i in range(m.num_chunks)]
    unit = 16 * BPT
    pf = Prefetcher(store, budget_bytes=5 * unit, workers=6, deadline_s=20)
    errors, rounds = [], [0]

    def consumer(k):
        rng = random.Random(1000 * seed + k)
        end = time.monotonic() + 1.5
        while time.monotonic() < end and not errors:
            picked = rng.sample(chunks, rng.randint(2, 4))
            ls = [Location(m, i) for m, i, _ in picked]
            pf.prefetch(NS, ls, n_layers)
            for layer in range(n_layers):
                try:
                    got = pf.get_layer(NS, layer, ls, n_layers, timeout=5)
                except RetrievalFailed as exc:
                    errors.append(f"consumer {k} layer {layer}: {exc}")
                    return
                if [bytes(b) for b in got] != [want[layer] for _, _, want in picked]:
                    errors.append(f"consumer {k} layer {layer}: wrong bytes")
                    return
                time.sleep(rng.random() * 0.002)
            rounds[0] += 1

    threads = [threading.Thread(target=consumer, args=(k,), daemon=True) for k in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[:3]
        assert rounds[0] >= 6
        # Over the budget only for one consumer's layer alone: up to 4 chunks, each held by a
        # retrieval of up to 4 chunks.
        assert pf.stats.peak_staging_bytes <= 16 * unit
        assert pf.stats.layers_evicted > 0  # the budget was tight enough to matter
    finally:
        pf.close()


def test_requests_with_the_same_prefix_fetch_each_layer_once(store):
    """A burst of requests sharing a system prompt: both look up (the second finds the chunks
    already being fetched), both load every layer. The one who takes a layer first gets the
    staged buffers, the other a copy: each layer object is read once, not once per request."""
    m, layers = make_segment(store, 4, [16, 16])
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2, deadline_s=5)
    store.client.gate.clear()
    results, errors = {"a": [], "b": []}, []

    def consume(name):
        try:
            for layer in range(4):
                got = pf.get_layer(NS, layer, locs(m), 4)
                results[name].append(b"".join(bytes(b) for b in got))
        except RetrievalFailed as exc:
            errors.append(exc)

    try:
        pf.prefetch(NS, locs(m), 4)
        assert pf.prefetch(NS, locs(m), 4) is None  # the second lookup joins the first
        threads = [threading.Thread(target=consume, args=(n,)) for n in results]
        for t in threads:
            t.start()
        time.sleep(0.2)  # both wait on layer 0
        store.client.gate.set()
        for t in threads:
            t.join(10)
        assert not errors, errors
        assert results["a"] == results["b"] == layers
        assert pf.stats.retrievals == 1
        per_layer = [sum(layer_of_key(k) == l for k in store.client.gets) for l in range(4)]
        assert per_layer == [1, 1, 1, 1]
        assert pf.wait_idle(5) and pf.staging_bytes == 0
    finally:
        store.client.gate.set()
        pf.close()


def test_lookups_on_two_threads_at_once_start_one_retrieval_each(store):
    """The batcher groups one lookup's hits into one retrieval. Look-ups running at once on two
    threads must not interleave into one retrieval of both prompts (which could be larger than
    the staging budget and then be staged alone, over it)."""
    from lmcache_s3layer.cache.core import LookupBatcher

    a, _ = make_segment(store, 2, [16, 16, 16], seed=7)
    b, _ = make_segment(store, 2, [16, 16, 16], seed=8)
    started, step = [], threading.Barrier(2)
    batcher = LookupBatcher(lambda ns, batch, layers: started.append([(l.manifest.segment_id, l.index) for l in batch]),
                            quiet_s=0.2)

    def lookup(m):
        for loc in locs(m):
            step.wait(5)  # the two look-ups alternate chunk by chunk
            batcher.add(NS, loc, 2)

    try:
        threads = [threading.Thread(target=lookup, args=(m,)) for m in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        batcher.flush()
        assert sorted(started) == sorted([[(m.segment_id, i) for i in range(3)] for m in (a, b)])
    finally:
        batcher.close()


class FakeClock:
    """The prefetcher's clock, moved by the test: deadlines and idle expiry without sleeping."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_deadline_counts_from_the_first_ask_not_from_the_lookup(store):
    """A request may wait in the engine's queue longer than the deadline after its look-up
    started the prefetch: its retrieval still gets the whole deadline, from its first ask."""
    m, layers = make_segment(store, 3, [16])
    clock = FakeClock()
    store.client.gate.clear()  # nothing arrives before the consumer asks
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2, deadline_s=10, idle_timeout_s=1000, clock=clock)
    try:
        pf.prefetch(NS, locs(m), 3)  # at look-up
        clock.advance(60)  # queued for six deadlines
        opener = threading.Timer(0.2, store.client.gate.set)
        opener.start()
        for layer in range(3):
            assert b"".join(bytes(b) for b in pf.get_layer(NS, layer, locs(m), 3)) == layers[layer]
        opener.join()
    finally:
        store.client.gate.set()
        pf.close()


def test_deadline_still_bounds_a_retrieval_once_it_is_consumed(store):
    m, _ = make_segment(store, 3, [16])
    clock = FakeClock()
    store.client.gate.clear()
    alloc = CountingAllocator()
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2, deadline_s=10, idle_timeout_s=1000, clock=clock,
                    allocator=alloc)
    errors = []

    def consume():
        try:
            pf.get_layer(NS, 0, locs(m), 3)
        except RetrievalFailed as exc:
            errors.append(exc)

    try:
        pf.prefetch(NS, locs(m), 3)
        clock.advance(60)
        t = threading.Thread(target=consume)
        t.start()
        assert _wait_until(lambda: pf._waits or errors, 10)  # the consumer is waiting: its deadline is set
        clock.advance(11)
        t.join(10)
        assert not t.is_alive() and len(errors) == 1 and "deadline" in str(errors[0])
        store.client.gate.set()
        assert _wait_until(lambda: pf.active() == 0 and alloc.live == 0, 10)
    finally:
        store.client.gate.set()
        pf.close()


def test_lookup_prefetch_nobody_consumes_is_bounded_by_idle_expiry(store):
    """With no deadline before the first ask, a look-up-time fetch whose retrieval never
    comes is released by the idle expiry alone."""
    m, _ = make_segment(store, 3, [16])
    clock = FakeClock()
    alloc = CountingAllocator()
    pf = Prefetcher(store, budget_bytes=1 << 30, workers=2, deadline_s=10, idle_timeout_s=30, clock=clock,
                    allocator=alloc)
    try:
        pf.prefetch(NS, locs(m), 3)
        assert _wait_until(lambda: pf.stats.layers_staged == 3, 10)
        clock.advance(29)
        time.sleep(0.3)  # a janitor round: not idle long enough yet
        assert pf.active() == 1 and pf.stats.idle_expired == 0
        clock.advance(2)
        assert _wait_until(lambda: pf.active() == 0 and alloc.live == 0, 10)  # real time: the clock is fake
        assert pf.stats.idle_expired == 1
    finally:
        pf.close()
