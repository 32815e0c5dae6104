"""Bounded load: 10 retrievals and 3 stores at a time through LMCache's real engine on CPU.

vLLM advances the layerwise generators of every request in a batch in lockstep (one ``next()``
each per layer) while its lookup server answers the scheduler on another thread; this test does
the same, against the session SeaweedFS, with a staging budget far smaller than what 10
retrievals would like to hold, and checks:
- staging memory never exceeds its budget (sampled while running, and the prefetcher's peak);
- every retrieved token is the stored KV and every lookup hit is loaded;
- afterwards every MemoryObj went back to LMCache's pool (no live allocation, nothing pinned,
  nothing staged), so references returned to zero.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmcache_s3layer.testing.engine import (
    LAYOUT_FLASH_ATTN,
    KVSpec,
    build_engine,
    destroy_engine,
    make_cpu_connector,
    make_token_kv,
    make_tokens,
    plugin_backend,
    plugin_engine_config,
    write_token_kv,
)

pytestmark = pytest.mark.load

SPEC = KVSpec(num_layers=8, num_kv_heads=2, head_size=16, chunk_size=16, dtype=torch.bfloat16,
              model_name="org/load-model")
TOKENS = 64
LAYER_BYTES = TOKENS * 2 * SPEC.hidden * 2  # one layer of one retrieval
# 10 retrievals read ahead want 80 layers staged; this budget holds a quarter of that.
BUDGET = 20 * LAYER_BYTES
TIGHT_BUDGET = 6 * LAYER_BYTES  # less than one layer for each of the 10 lockstep retrievals
RETRIEVALS, STORES = 10, 3
LANES = RETRIEVALS + STORES
BLOCK = 16
BLOCKS = LANES * TOKENS // BLOCK + 1
RUN_S = 12.0  # the loop's bound (not an assertion)
MAX_ROUNDS = 40
SENTINEL = 7.0


def plugin_config(ep, bucket, budget) -> dict:
    return plugin_engine_config(ep, bucket, max_local_cpu_gb=0.05, prefix="load", retry_base_s=0.005,
                                retrieval_deadline_s=20, staging_budget_bytes=budget, prefetch_idle_timeout_s=2.0,
                                segment_max_chunks=2, max_connections=8)


def _load_engine(ep, bucket, budget):
    """The engine under load, our backend and its core, and LMCache's LocalCPU backend (whose
    pool every MemoryObj must return to)."""
    engine = build_engine(plugin_config(ep, bucket, budget), SPEC,
                          connector=make_cpu_connector(SPEC, kv_layout=LAYOUT_FLASH_ATTN))
    backend = plugin_backend(engine)
    return engine, backend, backend.core, engine.storage_manager.storage_backends["LocalCPUBackend"]


class Lanes:
    """One shared paged cache (as in vLLM); each in-flight request owns a lane of slots."""

    def __init__(self):
        self.caches = [torch.full((2, BLOCKS, BLOCK, SPEC.num_kv_heads, SPEC.head_size), SENTINEL,
                                  dtype=SPEC.dtype) for _ in range(SPEC.num_layers)]

    @staticmethod
    def slots(lane: int) -> torch.Tensor:
        return torch.arange(lane * TOKENS, (lane + 1) * TOKENS, dtype=torch.long)

    def write(self, lane: int, kv: torch.Tensor) -> None:
        write_token_kv(self.caches, kv, self.slots(lane), LAYOUT_FLASH_ATTN)

    def clear(self, lane: int) -> None:
        s = self.slots(lane)
        for c in self.caches:
            c[:, s // BLOCK, s % BLOCK] = SENTINEL

    def read(self, lane: int) -> torch.Tensor:
        s = self.slots(lane)
        return torch.stack([c[:, s // BLOCK, s % BLOCK].permute(1, 0, 2, 3) for c in self.caches])


def _step_all(gens: list) -> list:
    """One lockstep step over every live generator; returns the last value of finished ones."""
    out = [None] * len(gens)
    for i, g in enumerate(gens):
        if g is None:
            continue
        try:
            out[i] = next(g)
        except StopIteration:
            gens[i] = None
    return out


@pytest.mark.timeout(180)
def test_ten_lockstep_engine_retrievals_and_stores(s3_endpoint, bucket):
    from lmcache_s3layer.errors import RetrievalFailed
    try:
        _run_load(s3_endpoint, bucket, storm=True, budget=BUDGET)
    except RetrievalFailed as exc:
        raise AssertionError(f"stalled: {exc}") from exc


@pytest.mark.timeout(180)
def test_ten_concurrent_retrievals_and_stores_stay_in_budget_and_release_everything(s3_endpoint, bucket):
    """10 threads retrieve through the plugin (its LMCache MemoryObjs, its prefetcher), 3 store
    through the engine, the scheduler's lookups run alongside; bounded in time."""
    engine, backend, core, lcb = _load_engine(s3_endpoint, bucket, TIGHT_BUDGET)
    lanes = Lanes()
    truth, keys = {}, {}
    for pid in range(RETRIEVALS + 4):
        truth[pid] = (make_tokens(TOKENS, seed=70_000 + pid), make_token_kv(SPEC, TOKENS, seed=900 + pid))
        lanes.write(0, truth[pid][1])
        gen = engine.store_layer(truth[pid][0], kvcaches=lanes.caches, slot_mapping=Lanes.slots(0), offset=0,
                                 sync=True, req_id=f"w{pid}")
        for _ in gen:
            pass
        keys[pid] = [k.split_layers(SPEC.num_layers)
                     for _, _, k in engine.token_database.process_tokens(tokens=truth[pid][0])]
    assert backend.flush(60)
    stop = threading.Event()
    peak, served, errors = [0], [0], []
    t_end = time.monotonic() + RUN_S

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], core.prefetcher.staging_bytes)
            time.sleep(0.002)

    def retriever(i):
        n = 0
        while time.monotonic() < t_end and not stop.is_set():
            pid = (i + n) % len(truth)
            n += 1
            lid = f"t{i}-{n}"
            hit = engine.lookup(tokens=truth[pid][0], lookup_id=lid, pin=True)
            try:
                if hit != TOKENS:
                    errors.append(f"lookup of a stored prompt hit {hit}")
                    continue
                for layer in range(SPEC.num_layers):
                    objs = core.get_layer(backend._ns(keys[pid][0][0]), layer,
                                          [k[layer].chunk_hash for k in keys[pid]], SPEC.num_layers)
                    try:
                        got = torch.cat([o.tensor for o in objs])  # [T, 2, H*D]
                        want = truth[pid][1][layer].reshape(TOKENS, 2, -1)
                        if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
                            errors.append(f"wrong KV: prompt {pid} layer {layer}")
                    finally:
                        for o in objs:
                            o.ref_count_down()
                served[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))
            finally:
                engine.lookup_unpin(lid)

    def writer():
        n = 0
        while time.monotonic() < t_end and not stop.is_set():
            tokens = make_tokens(TOKENS, seed=80_000 + n)
            lanes.write(1, make_token_kv(SPEC, TOKENS, seed=5000 + n))
            for _ in engine.store_layer(tokens, kvcaches=lanes.caches, slot_mapping=Lanes.slots(1), offset=0,
                                        sync=True, req_id=f"n{n}"):
                pass
            n += 1

    threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=writer, daemon=True)]
    threads += [threading.Thread(target=retriever, args=(i,), daemon=True) for i in range(RETRIEVALS)]
    try:
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(timeout=RUN_S + 60)
        stop.set()
        hung = [t.name for t in threads[1:] if t.is_alive()]
        assert backend.flush(60)
        assert core.prefetcher.wait_idle(15)
        after = (core.prefetcher.staging_bytes, core.index.pinned_count(),
                 lcb.memory_allocator.pin_allocator.num_active_allocations)
    finally:
        stop.set()
        destroy_engine(engine)
    assert not hung, hung
    assert not errors, errors[:5]
    assert served[0] >= RETRIEVALS
    assert peak[0] <= TIGHT_BUDGET and core.prefetcher.stats.peak_staging_bytes <= TIGHT_BUDGET
    assert after == (0, 0, 0), after


def _run_load(s3_endpoint, bucket, storm: bool, budget: int):
    engine, backend, core, lcb = _load_engine(s3_endpoint, bucket, budget)
    lanes = Lanes()
    truth: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt id -> (tokens, KV)
    stored: list[int] = []
    peak = [0]
    stop = threading.Event()
    lookups_done = [0]
    errors: list[str] = []

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], core.prefetcher.staging_bytes)
            time.sleep(0.002)

    def lookup_storm():
        # The scheduler's lookups keep arriving while the forward thread works.
        n = 0
        while not stop.is_set():
            if stored:
                pid = stored[n % len(stored)]
                try:
                    engine.lookup(tokens=truth[pid][0], lookup_id=f"storm-{n}", pin=True)
                    engine.lookup_unpin(f"storm-{n}")
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(f"lookup: {exc!r}")
                n += 1
            time.sleep(0.01)
        lookups_done[0] = n

    def new_prompt(pid: int) -> None:
        truth[pid] = (make_tokens(TOKENS, seed=50_000 + pid), make_token_kv(SPEC, TOKENS, seed=pid))

    def store_gen(pid: int, lane: int):
        lanes.write(lane, truth[pid][1])
        return engine.store_layer(truth[pid][0], kvcaches=lanes.caches, slot_mapping=Lanes.slots(lane),
                                  offset=0, sync=True, req_id=f"store-{pid}")

    threads = [threading.Thread(target=sampler, daemon=True)]
    if storm:
        threads.append(threading.Thread(target=lookup_storm, daemon=True))
    next_pid = 0
    served = 0
    try:
        # warm-up: enough stored prompts for the first batch of retrievals
        gens = []
        for lane in range(RETRIEVALS):
            new_prompt(next_pid)
            gens.append(store_gen(next_pid, lane))
            next_pid += 1
        while any(g is not None for g in gens):
            _step_all(gens)
        assert backend.flush(60)
        stored.extend(range(next_pid))
        for t in threads:
            t.start()

        t_end = time.monotonic() + RUN_S
        rounds = 0
        while time.monotonic() < t_end and rounds < MAX_ROUNDS:
            rounds += 1
            picks = [stored[(rounds * 7 + i) % len(stored)] for i in range(RETRIEVALS)]
            picks = list(dict.fromkeys(picks))  # one request per prompt in a batch
            hits = {}
            for lane, pid in enumerate(picks):
                hits[pid] = engine.lookup(tokens=truth[pid][0], lookup_id=f"req-{rounds}-{pid}", pin=True)
                lanes.clear(lane)
            gens = [engine.retrieve_layer(truth[pid][0], kvcaches=lanes.caches, slot_mapping=Lanes.slots(lane),
                                          sync=True, req_id=f"req-{rounds}-{pid}")
                    for lane, pid in enumerate(picks)]
            new = []
            for k in range(STORES):
                new_prompt(next_pid)
                new.append(next_pid)
                gens.append(store_gen(next_pid, RETRIEVALS + k))
                next_pid += 1
            last = [None] * len(gens)
            while any(g is not None for g in gens):
                for i, v in enumerate(_step_all(gens)):
                    if v is not None:
                        last[i] = v
            for lane, pid in enumerate(picks):
                engine.lookup_unpin(f"req-{rounds}-{pid}")
                ret_mask = last[lane]
                assert isinstance(ret_mask, torch.Tensor) and ret_mask.dtype == torch.bool
                n = int(ret_mask.sum())
                assert n == hits[pid], f"prompt {pid}: lookup hit {hits[pid]}, loaded {n}"
                got = lanes.read(lane)
                assert torch.equal(got[:, :n].view(torch.int16), truth[pid][1][:, :n].view(torch.int16)), \
                    f"prompt {pid}: wrong KV"
                assert bool((got[:, n:] == SENTINEL).all())
                served += n > 0
            assert backend.flush(60)
            stored.extend(new)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        try:
            # Everything handed out or staged must go back to LMCache's pool.
            assert core.prefetcher.wait_idle(10) and backend._handoff.wait_idle(10)
            staged_after = core.prefetcher.staging_bytes
            pinned_after = core.index.pinned_count()
            handed_after = backend._handoff.held_buffers() + backend._handoff.live_retrievals()
            active_after = lcb.memory_allocator.pin_allocator.num_active_allocations
        finally:
            destroy_engine(engine)

    assert not errors, errors[:5]
    assert served >= RETRIEVALS  # the run did real work
    assert lookups_done[0] > 0 or not storm
    assert peak[0] <= budget and core.prefetcher.stats.peak_staging_bytes <= budget, \
        (peak[0], core.prefetcher.stats.peak_staging_bytes, budget)
    assert core.prefetcher.stats.layers_evicted >= 0
    assert (staged_after, pinned_after, handed_after, active_after) == (0, 0, 0, 0)
