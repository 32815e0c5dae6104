"""A pinned look-up promises only what LMCache's CPU pool can carry to the end of the retrieval.

LMCache keeps every layer it was handed until the retrieval's last layer, so a hit of B bytes
per layer holds L x B of the pool by the end. A deep model with a small pool used to answer
the whole prefix and then stall at the layer where the pool ran out, until the retrieval
deadline; now the look-up answers the prefix that fits (a partial hit, never a stall), and
look-ups running at once never promise more than the pool together.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_prefetch import BPT, NS, FakeClient, make_segment

from lmcache_s3layer.cache.core import S3LayerCore
from lmcache_s3layer.cache.metrics import Metrics
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.store.client import ClientStats

LAYERS = 64
TOKENS = 16
PROMISE = LAYERS * TOKENS * BPT  # pool bytes one chunk's retrieval holds by its last layer


class CoreClient(FakeClient):
    """The prefetch tests' in-memory store, with what the core and its metrics also read."""

    def __init__(self):
        super().__init__()
        self.stats = ClientStats()

    def close(self):
        pass


class PoolAllocator:
    """LMCache's pool in miniature: a fixed capacity, and None when full (busy_loop=False)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.lock = threading.Lock()

    def allocate(self, tokens, nbytes):
        with self.lock:
            if self.used + nbytes > self.capacity:
                return None
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        buf = bytearray(nbytes)
        return (buf, nbytes), memoryview(buf)

    def release(self, handle):
        with self.lock:
            self.used -= handle[1]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_core(capacity: int, clock=time.monotonic, **cfg) -> tuple[S3LayerCore, PoolAllocator]:
    pool = PoolAllocator(capacity)
    values = dict(bucket="fake", handoff_budget_bytes=capacity, staging_budget_bytes=capacity * 3 // 4,
                  max_connections=4, retrieval_deadline_s=20)
    values.update(cfg)
    core = S3LayerCore(S3LayerConfig(**values), allocator=pool, client=CoreClient(), clock=clock,
                       metrics=Metrics())
    return core, pool


def cached_prompt(core: S3LayerCore, chunks: int, seed: int):
    m, layers = make_segment(core.store, LAYERS, [TOKENS] * chunks, seed=seed)
    core.index.add_manifest(m)
    return m, layers


def lookup(core: S3LayerCore, m) -> int:
    """As LMCache's layerwise lookup: one pinned call per chunk, up to the first miss."""
    hits = 0
    for h in m.chunk_hashes:
        if core.lookup(NS, [h], pin=True, num_layers=LAYERS) != 1:
            break
        hits += 1
    return hits


def unpin(core: S3LayerCore, m, hits: int) -> None:
    for h in m.chunk_hashes[:hits]:
        core.unpin(NS, h)


def retrieve_in_lockstep(core: S3LayerCore, pool: PoolAllocator, requests) -> None:
    """Step the retrievals of one batch layer by layer, keeping every handed buffer until the
    last layer as LMCache does, and check each layer's bytes."""
    held = []
    for layer in range(LAYERS):
        for m, layers, hits in requests:
            got = core.get_layer(NS, layer, list(m.chunk_hashes[:hits]), LAYERS)
            assert b"".join(bytes(h[0]) for h in got) == layers[layer][:hits * TOKENS * BPT]
            held += got
    for h in held:
        pool.release(h)


def test_lookup_answers_only_what_the_pool_can_carry_and_the_retrieval_finishes():
    core, pool = make_core(3 * PROMISE + PROMISE // 2)
    try:
        m, layers = cached_prompt(core, 8, seed=1)
        hits = lookup(core, m)
        assert hits == 3  # not 8: 8 chunks x 64 layers would stall at layer ~28
        assert core.pool.promised == 3 * PROMISE and core.index.pinned_count() == 3
        retrieve_in_lockstep(core, pool, [(m, layers, hits)])
        assert pool.peak <= pool.capacity
        unpin(core, m, hits)
        assert core.pool.promised == 0 and core.index.pinned_count() == 0
        assert core.prefetcher.wait_idle(5) and pool.used == 0
        assert lookup(core, m) == 3  # the room came back
        unpin(core, m, 3)
    finally:
        core.close()


def test_lookups_at_once_never_promise_more_than_the_pool_together():
    """Two requests of one batch are stepped in lockstep: promising both their whole prompts
    would stall both. Their look-ups run on two threads, chunk by chunk, interleaved."""
    core, pool = make_core(5 * PROMISE)
    try:
        prompts = [cached_prompt(core, 4, seed=s) for s in (2, 3)]
        hits = [0, 0]
        step = threading.Barrier(2)

        def look(i):
            m = prompts[i][0]
            for h in m.chunk_hashes:
                step.wait(5)
                if core.lookup(NS, [h], pin=True, num_layers=LAYERS) != 1:
                    break
                hits[i] += 1
            try:
                step.wait(5)  # let the other thread finish its chunks
            except threading.BrokenBarrierError:
                pass

        threads = [threading.Thread(target=look, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sum(hits) == 5 and min(hits) >= 1
        assert core.pool.promised == 5 * PROMISE
        retrieve_in_lockstep(core, pool, [(m, layers, n) for (m, layers), n in zip(prompts, hits)])
        for (m, _), n in zip(prompts, hits):
            unpin(core, m, n)
        assert core.pool.promised == 0
    finally:
        core.close()


def test_a_promise_never_unpinned_is_reclaimed_when_idle_and_revived_by_its_retrieval():
    clock = Clock()
    core, pool = make_core(3 * PROMISE, clock=clock, prefetch_on_lookup=False,
                           prefetch_idle_timeout_s=30, retrieval_deadline_s=10)
    try:
        (a, _), (b, _) = cached_prompt(core, 3, seed=4), cached_prompt(core, 3, seed=5)
        assert lookup(core, a) == 3  # a request looked up, then (say) aborted while queued
        assert lookup(core, b) == 0
        clock.t += 30 + 10 - 1
        assert lookup(core, b) == 0  # not idle long enough: still a live promise
        clock.t += 2
        assert lookup(core, b) == 3  # a's promises were idle: reclaimed for b
        assert core.pool.stats.reclaimed == 3 and core.pool.promised == 3 * PROMISE
        # a's retrieval comes after all: its promises count again (over the budget: the
        # forward pass was promised those tokens), so nothing more is promised meanwhile
        core.get_layer(NS, 0, list(a.chunk_hashes), LAYERS)
        assert core.pool.stats.revived == 3 and core.pool.promised == 6 * PROMISE
        c, _ = cached_prompt(core, 1, seed=6)
        assert lookup(core, c) == 0
        unpin(core, a, 3)
        unpin(core, b, 3)
        assert core.pool.promised == 0
    finally:
        core.close()


def test_unlimited_budget_promises_nothing():
    core, _ = make_core(1 << 30, handoff_budget_bytes=0)
    try:
        m, _ = cached_prompt(core, 8, seed=7)
        assert lookup(core, m) == 8 and core.pool.promised == 0
        unpin(core, m, 8)
    finally:
        core.close()


def test_pinned_lookup_of_chunks_the_engine_holds_promises_nothing():
    """Chunks the engine already holds (looked up with prefetch=False by the backend) are not
    retrieved, so they take no pool memory and must not crowd out the ones that are."""
    core, _ = make_core(PROMISE)
    try:
        m, _ = cached_prompt(core, 3, seed=8)
        for h in m.chunk_hashes[:2]:
            assert core.lookup(NS, [h], pin=True, num_layers=LAYERS, prefetch=False) == 1
        assert core.lookup(NS, [m.chunk_hashes[2]], pin=True, num_layers=LAYERS) == 1
        assert core.pool.promised == PROMISE
        unpin(core, m, 3)
        assert core.pool.promised == 0
    finally:
        core.close()


# ---- through LMCache's real engine -----------------------------------------------------------


SPEC_KW = dict(num_layers=64, num_kv_heads=2, head_size=32, chunk_size=16, dtype=torch.bfloat16)
CHUNK_POOL_BYTES = 64 * 16 * 2 * 64 * 2  # one chunk, all 64 layers: 256 KiB
SENTINEL = 7.0


@pytest.fixture
def engine_kit():
    from lmcache_s3layer.testing.engine import KVSpec, make_paged_kv_cache, make_slot_mapping
    spec = KVSpec(**SPEC_KW)
    caches = make_paged_kv_cache(spec, 16, 16, seed=11)
    slots = make_slot_mapping(128, 16, 16, seed=12)
    return spec, caches, slots


def _engine_config(ep, bucket, pool_chunks=None):
    from lmcache_s3layer.testing.engine import plugin_engine_config
    gb = None if pool_chunks is None else pool_chunks * CHUNK_POOL_BYTES / 1024**3
    return plugin_engine_config(ep, bucket, max_local_cpu_gb=gb, prefix="handoff-test", retry_base_s=0.01,
                                retrieval_deadline_s=20)


def _store(ep, bucket, spec, tokens, caches, slots):
    from lmcache_s3layer.testing.engine import build_engine, destroy_engine, plugin_backend, run_store_layer
    engine = build_engine(_engine_config(ep, bucket), spec)  # LMCache's default pool: room to store
    try:
        run_store_layer(engine, tokens, caches, slots)
        assert plugin_backend(engine).flush(60)
    finally:
        destroy_engine(engine)


@pytest.mark.engine
def test_engine_deep_model_small_pool_gets_a_partial_hit_instead_of_a_stall(s3_endpoint, bucket, engine_kit):
    from lmcache_s3layer.testing.engine import (
        build_engine,
        destroy_engine,
        fill_paged_kv_cache,
        make_tokens,
        plugin_backend,
        run_retrieve_layer,
        snapshot_tokens,
    )
    spec, caches, slots = engine_kit
    tokens = make_tokens(128, seed=13)  # 8 chunks; the pool below carries 6 to the last layer
    want = snapshot_tokens(caches, slots)
    _store(s3_endpoint, bucket, spec, tokens, caches, slots)

    engine = build_engine(_engine_config(s3_endpoint, bucket, pool_chunks=6), spec)
    try:
        backend = plugin_backend(engine)
        hit = engine.lookup(tokens=tokens, lookup_id="req-1", pin=True)
        assert hit == 6 * 16  # was 128: then a stall at layer 48 until the deadline, and a failure
        assert backend.core.cfg.handoff_budget_bytes == 6 * CHUNK_POOL_BYTES  # the real pool's size
        fill_paged_kv_cache(caches, SENTINEL)
        t0 = time.monotonic()
        # as vLLM's adapter: retrieve the hit prefix only
        res = run_retrieve_layer(engine, tokens[:hit], caches, slots[:hit])
        elapsed = time.monotonic() - t0
        engine.lookup_unpin("req-1")
        assert int(res.ret_mask.sum()) == hit
        got = snapshot_tokens(caches, slots)
        assert torch.equal(got[:, :hit], want[:, :hit])
        assert bool((got[:, hit:] == SENTINEL).all())
        assert elapsed < 10, f"retrieval took {elapsed:.1f} s: it waited for memory"  # deadline: 20 s
        assert backend.core.pool.promised == 0
        assert backend.core.prefetcher.wait_idle(5) and backend.core.prefetcher.staging_bytes == 0
    finally:
        destroy_engine(engine)


@pytest.mark.engine
def test_engine_two_requests_of_one_batch_share_the_pool_without_stalling(s3_endpoint, bucket, engine_kit):
    from lmcache_s3layer.testing.engine import (
        build_engine,
        destroy_engine,
        fill_paged_kv_cache,
        make_tokens,
        plugin_backend,
        snapshot_tokens,
    )
    spec, caches, slots = engine_kit
    lanes = {"req-a": (make_tokens(64, seed=14), slots[:64]), "req-b": (make_tokens(64, seed=15), slots[64:])}
    want = {req: snapshot_tokens(caches, s) for req, (_, s) in lanes.items()}
    for tokens, s in lanes.values():
        _store(s3_endpoint, bucket, spec, tokens, caches, s)

    engine = build_engine(_engine_config(s3_endpoint, bucket, pool_chunks=6), spec)
    try:
        hits = {req: engine.lookup(tokens=t, lookup_id=req, pin=True) for req, (t, _) in lanes.items()}
        assert hits == {"req-a": 64, "req-b": 32}  # 4 + 2 chunks: what the pool carries together
        fill_paged_kv_cache(caches, SENTINEL)
        t0 = time.monotonic()
        gens = [engine.retrieve_layer(t[:hits[req]], kvcaches=list(caches), slot_mapping=s[:hits[req]],
                                      sync=True, req_id=req) for req, (t, s) in lanes.items()]
        for _ in range(spec.num_layers + 2):  # in lockstep, as vLLM steps one batch
            for g in gens:
                next(g)
        elapsed = time.monotonic() - t0
        for req, (_, s) in lanes.items():
            engine.lookup_unpin(req)
            n = hits[req]
            assert torch.equal(snapshot_tokens(caches, s[:n]), want[req][:, :n]), req
        assert elapsed < 10, f"retrieval took {elapsed:.1f} s: it waited for memory"  # deadline: 20 s
        core = plugin_backend(engine).core
        assert core.pool.promised == 0
    finally:
        destroy_engine(engine)
