"""The plugin in LMCache's real engine when copies are asynchronous, as on a GPU.

Every test here runs the CPU connector's deferred copy mode (``DeferredCopies``): a device
copy lands only when LMCache's ``sync`` flag or a device fence says so, and a buffer that goes
back to LMCache's pool is poisoned at once. A use-before-copy or a use-after-free then shows
as wrong KV, as it would on a GPU, instead of passing because a CPU copy happened to be done.

Shapes and ranks users run: MLA (DeepSeek-V2-Lite-like), a 64-layer GQA model, TP=2 as two
processes, partial chunks and other chunk sizes; stores happen in one process and loads in a
fresh one.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from lmcache_s3layer.format.objects import layer_key_at, layer_of_key, segment_dir_of_key
from lmcache_s3layer.integration.lmcache.cpu_connector import DEVICE
from lmcache_s3layer.testing.engine import (
    LAYOUT_FLASH_ATTN,
    LAYOUT_MLA,
    KVSpec,
    build_engine,
    destroy_engine,
    fill_paged_kv_cache,
    make_cpu_connector,
    make_paged_kv_cache,
    make_slot_mapping,
    make_tokens,
    mla_spec,
    plugin_engine_config,
    run_retrieve_layer,
    run_store_layer,
)
from lmcache_s3layer.testing.engine import plugin_backend as backend_of
from lmcache_s3layer.testing.engine import snapshot_tokens as _snapshot

pytestmark = pytest.mark.engine

SENTINEL = 7.0
GQA = KVSpec(num_layers=8, num_kv_heads=2, head_size=32, chunk_size=16, dtype=torch.bfloat16)


def deferred(spec: KVSpec):
    return make_cpu_connector(spec, copy_mode="deferred", kv_layout=None if spec.use_mla else "flash_attn")


def caches_for(spec: KVSpec, tokens: int, seed: int):
    blocks = tokens // 16 + 4
    layout = "mla" if spec.use_mla else "flash_attn"
    return make_paged_kv_cache(spec, blocks, 16, layout=layout, seed=seed), make_slot_mapping(tokens, blocks, 16,
                                                                                               seed=seed + 1)


def snapshot_tokens(caches, slots):
    """Every token's KV; the caches here are flash-attention (GPU) or MLA shaped."""
    return _snapshot(caches, slots, LAYOUT_MLA if caches[0].dim() == 3 else LAYOUT_FLASH_ATTN)


def config(ep, bucket, **extra):
    return plugin_engine_config(ep, bucket, prefix="device-model", retry_base_s=0.01, retrieval_deadline_s=20,
                                **extra)


def store(ep, bucket, spec, tokens, caches, slots, *, sync=True, cfg=None, **kw):
    engine = build_engine(cfg or config(ep, bucket), spec, deferred(spec))
    try:
        run_store_layer(engine, tokens, caches, slots, sync=sync, **kw)
        assert backend_of(engine).flush(60)
        return backend_of(engine).core.writer.stats.segments_committed
    finally:
        destroy_engine(engine)


def load(ep, bucket, spec, tokens, caches, slots, *, cfg=None, req="req-1", sync=True):
    """Look up and retrieve in a fresh engine; returns (ret_mask, KV as attention saw it)."""
    engine = build_engine(cfg or config(ep, bucket), spec, deferred(spec))
    try:
        hit = engine.lookup(tokens=tokens, lookup_id=req, pin=True)
        fill_paged_kv_cache(caches, SENTINEL)
        ret_mask, seen = step_like_vllm(engine, tokens, caches, slots, sync=sync, req_id=req)
        engine.lookup_unpin(req)
        b = backend_of(engine)
        assert b._handoff.wait_idle(10)
        assert b._handoff.held_buffers() == 0 and b._handoff.live_retrievals() == 0
        return hit, ret_mask, seen
    finally:
        destroy_engine(engine)


def step_like_vllm(engine, tokens, caches, slots, **kw):
    """Step ``retrieve_layer`` as vLLM does and record what each layer's attention reads when
    it runs: two steps in ``start_load_kv``, then attention of layer i right after the
    (i + 3)-th step (``wait_for_layer_load(i)``). Returns (ret_mask, [L, T, 2, H, D])."""
    gen = engine.retrieve_layer(tokens, kvcaches=list(caches), slot_mapping=slots, **kw)
    next(gen)
    next(gen)
    seen = []
    for layer in range(engine.num_layers):
        out = next(gen)
        seen.append(snapshot_tokens([caches[layer]], slots)[0])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool
    return out, torch.stack(seen)



# ---- the device model itself ------------------------------------------------------------


def test_deferred_store_leaves_poison_until_the_sync_and_lands_then(s3_endpoint, bucket):
    """The model is as hostile as claimed: without a sync, the host buffers hold poison."""
    spec = GQA
    caches, slots = caches_for(spec, 32, seed=2)
    conn = deferred(spec)
    objs = [[torch.empty(16, 2, spec.hidden, dtype=spec.dtype) for _ in range(2)] for _ in range(spec.num_layers)]

    class Obj:
        def __init__(self, t):
            self.tensor, self.metadata, self.parent_allocator = t, type("M", (), {"fmt": None})(), None

    mobjs = [[Obj(t) for t in layer] for layer in objs]
    gen = conn.batched_from_gpu(mobjs, [0, 16], [16, 32], kvcaches=caches, slot_mapping=slots, sync=False)
    next(gen)
    assert bool((objs[0][0].view(torch.uint8) == DeferredPoison).all())
    DEVICE.synchronize()
    want = snapshot_tokens(caches, slots)
    assert torch.equal(objs[0][0].view(16, 2, spec.num_kv_heads, spec.head_size), want[0, :16])
    gen.close()


DeferredPoison = DEVICE.POISON


# ---- the hazards of asynchronous copies ---------------------------------------------------


def test_store_without_sync_uploads_the_bytes_the_device_copied(s3_endpoint, bucket):
    """vLLM creates only the first storing request of a step with sync=True; a store stepped
    without any sync (a held-back store catching up alone, a later request of the batch) must
    still upload the copied KV, never the host buffer's stale bytes."""
    spec = GQA
    tokens = make_tokens(64, seed=11)
    caches, slots = caches_for(spec, 64, seed=12)
    want = snapshot_tokens(caches, slots)
    assert store(s3_endpoint, bucket, spec, tokens, caches, slots, sync=False) == 1
    hit, mask, seen = load(s3_endpoint, bucket, spec, tokens, caches, slots)
    assert hit == 64 and int(mask.sum()) == 64
    assert torch.equal(seen, want)


def test_buffers_handed_to_lmcache_are_not_reused_before_their_copy_lands(s3_endpoint, bucket):
    """LMCache drops its references right after queueing the last layer's copy; that copy
    reads the buffer later. Freed buffers are poisoned, so releasing them early shows."""
    spec = GQA
    tokens = make_tokens(64, seed=21)
    caches, slots = caches_for(spec, 64, seed=22)
    want = snapshot_tokens(caches, slots)
    store(s3_endpoint, bucket, spec, tokens, caches, slots)
    hit, mask, seen = load(s3_endpoint, bucket, spec, tokens, caches, slots)
    assert int(mask.sum()) == 64
    assert torch.equal(seen, want), "a layer's KV was read from a buffer returned to the pool"


def test_two_identical_concurrent_requests_each_get_their_own_buffers(s3_endpoint, bucket):
    spec = GQA
    tokens = make_tokens(48, seed=31)
    caches, slots = caches_for(spec, 96, seed=32)
    lanes = {"a": slots[:48], "b": slots[48:]}
    want = snapshot_tokens(caches, lanes["a"])
    store(s3_endpoint, bucket, spec, tokens, caches, lanes["a"])
    engine = build_engine(config(s3_endpoint, bucket), spec, deferred(spec))
    try:
        for req in lanes:
            assert engine.lookup(tokens=tokens, lookup_id=req, pin=True) == 48
        fill_paged_kv_cache(caches, SENTINEL)
        # As vLLM's adapter: one batch, only the last loading request syncs.
        gens = [engine.retrieve_layer(tokens, kvcaches=list(caches), slot_mapping=s, sync=req == "b", req_id=req)
                for req, s in lanes.items()]
        for _ in range(spec.num_layers + 2):
            outs = [next(g) for g in gens]
        for req in lanes:
            engine.lookup_unpin(req)
        assert all(int(o.sum()) == 48 for o in outs)
        for s in lanes.values():
            assert torch.equal(snapshot_tokens(caches, s), want)
        h = backend_of(engine)._handoff
        assert h.wait_idle(10) and h.held_buffers() == 0 and h.live_retrievals() == 0
        assert h.stats.retrievals == 2
    finally:
        destroy_engine(engine)


# ---- shapes and ranks --------------------------------------------------------------------


@pytest.mark.parametrize("spec,tokens", [
    pytest.param(mla_spec(), 80, id="mla-27x576"),
    pytest.param(KVSpec(num_layers=64, num_kv_heads=8, head_size=32, chunk_size=16), 96, id="gqa-64-layers"),
    pytest.param(KVSpec(num_layers=4, num_kv_heads=2, head_size=32, chunk_size=64), 256, id="chunk-64"),
    pytest.param(KVSpec(num_layers=4, num_kv_heads=2, head_size=32, chunk_size=256), 512, id="chunk-256"),
])
def test_store_in_one_process_load_in_a_fresh_one_bit_identical(s3_endpoint, bucket, spec, tokens):
    toks = make_tokens(tokens, seed=41)
    caches, slots = caches_for(spec, tokens, seed=42)
    want = snapshot_tokens(caches, slots)
    _in_fresh_process(_store_worker, s3_endpoint, bucket, spec, toks, caches, slots)
    hit, mask, seen = load(s3_endpoint, bucket, spec, toks, caches, slots)
    assert hit == tokens and int(mask.sum()) == tokens
    assert torch.equal(seen, want)


def test_save_unfull_chunk_round_trips_the_partial_tail(s3_endpoint, bucket):
    spec = GQA
    cfg = {**config(s3_endpoint, bucket), "save_unfull_chunk": True}
    tokens = make_tokens(70, seed=51)  # 4 chunks of 16 and a tail of 6
    caches, slots = caches_for(spec, 70, seed=52)
    want = snapshot_tokens(caches, slots)
    store(s3_endpoint, bucket, spec, tokens, caches, slots, cfg=cfg)
    hit, mask, seen = load(s3_endpoint, bucket, spec, tokens, caches, slots, cfg=cfg)
    assert hit == 70 and int(mask.sum()) == 70
    assert torch.equal(seen, want)


@pytest.mark.parametrize("use_mla", [False, True], ids=["gqa", "mla"])
def test_tp2_two_processes_store_then_two_fresh_processes_load(s3_endpoint, bucket, use_mla):
    """Each rank is its own process with its own engine (world size 2). GQA: each rank stores
    and loads its own heads. MLA: LMCache collapses the keys' world size (every rank holds
    the same latent), rank 0 stores, and both ranks load rank 0's objects — rank 1 without
    having been asked to look up, as LMCache runs the MLA lookup server on rank 0 only."""
    results = _run_ranks(_tp_store_worker, s3_endpoint, bucket, use_mla)
    assert [r["stored_segments"] for r in results] == ([1, 0] if use_mla else [1, 1])
    results = _run_ranks(_tp_load_worker, s3_endpoint, bucket, use_mla)
    for rank, r in enumerate(results):
        assert r["retrieved"] == 64, (rank, r)
        assert r["identical"], (rank, r)


# ---- helpers run in other processes ---------------------------------------------------------


def _tp_spec(use_mla: bool, rank: int) -> KVSpec:
    if use_mla:
        return mla_spec(num_layers=6, world_size=2, worker_id=rank, model_name="s3layer/tp-mla")
    return KVSpec(num_layers=6, num_kv_heads=2, head_size=32, chunk_size=16, world_size=2, worker_id=rank,
                  model_name="s3layer/tp-gqa")


def _tp_data(use_mla: bool, rank: int):
    spec = _tp_spec(use_mla, rank)
    # MLA: every rank computes the same latent; GQA: each rank its own heads.
    caches, slots = caches_for(spec, 64, seed=60 if use_mla else 60 + 10 * rank)
    return spec, make_tokens(64, seed=59), caches, slots


def _tp_store_worker(ep, bucket, use_mla, rank):
    spec, tokens, caches, slots = _tp_data(use_mla, rank)
    return {"stored_segments": store(ep, bucket, spec, tokens, caches, slots)}


def _tp_load_worker(ep, bucket, use_mla, rank):
    spec, tokens, caches, slots = _tp_data(use_mla, rank)
    want = snapshot_tokens(caches, slots)
    engine = build_engine(config(ep, bucket), spec, deferred(spec))
    try:
        if rank == 0 or not use_mla:
            engine.lookup(tokens=tokens, lookup_id="r", pin=True)
        fill_paged_kv_cache(caches, SENTINEL)
        res = run_retrieve_layer(engine, tokens, caches, slots, req_id="r")
        engine.lookup_unpin("r")
        return {"retrieved": int(res.ret_mask.sum()), "identical": bool(torch.equal(snapshot_tokens(caches, slots),
                                                                                    want))}
    finally:
        destroy_engine(engine)


def _store_worker(ep, bucket, spec, tokens, caches, slots):
    return store(ep, bucket, spec, tokens, caches, slots)


def _child(fn, args, queue):
    os.environ["S3LAYER_CPU_COPY"] = "deferred"
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent test
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _start(fn, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue), daemon=True)
    proc.start()
    return proc, queue


def _collect(proc, queue, timeout=240):
    status, value = queue.get(timeout=timeout)
    proc.join(timeout=30)
    assert status == "ok", value
    return value


def _in_fresh_process(fn, *args):
    return _collect(*_start(fn, *args))


def _run_ranks(fn, ep, bucket, use_mla):
    started = [_start(fn, ep, bucket, use_mla, rank) for rank in range(2)]
    return [_collect(*s) for s in started]


# ---- what the plugin refuses at start-up ------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    ({"enable_pd": True}, "enable_pd"),
    ({"enable_blending": True}, "enable_blending"),
    ({"use_layerwise": False}, "MLA"),
])
def test_modes_the_plugin_cannot_serve_are_refused_with_the_reason(overrides, match):
    from types import SimpleNamespace

    from lmcache_s3layer.errors import ConfigError
    from lmcache_s3layer.integration.lmcache.guards import check_supported_mode

    config = SimpleNamespace(**{"use_layerwise": True, "enable_pd": False, "enable_blending": False, **overrides})
    with pytest.raises(ConfigError, match=match):
        check_supported_mode(config, SimpleNamespace(use_mla=True))
    if "use_layerwise" in overrides:
        check_supported_mode(config, SimpleNamespace(use_mla=False))  # K/V models are fine non-layerwise


def test_mla_without_layerwise_stops_the_engine_at_start_up(s3_endpoint, bucket):
    from lmcache_s3layer.integration.lmcache.guards import StartupError

    with pytest.raises(StartupError, match="MLA"):
        destroy_engine(build_engine({**config(s3_endpoint, bucket), "use_layerwise": False}, mla_spec(),
                                    deferred(mla_spec())))


# ---- a batch where one load fails --------------------------------------------------------------


def test_a_batch_where_the_sync_load_fails_still_lands_the_others_before_attention(s3_endpoint, bucket,
                                                                                   s3_boto_client):
    """Three requests load in one step, stepped as vLLM's adapter does (only the last, C, with
    sync=True) through the load-failure guard. C's objects rot in S3 from layer 3 on. A and B
    must still read their own, complete KV at every layer's attention, C reports its blocks
    for recompute, and every buffer goes back to the pool."""
    from types import SimpleNamespace

    from lmcache_s3layer.integration.vllm.connector import LoadFailureGuard

    spec = GQA
    n = 32
    caches, slots = caches_for(spec, 3 * n, seed=71)
    reqs = {r: (make_tokens(n, seed=72 + i), slots[i * n:(i + 1) * n]) for i, r in enumerate("ABC")}
    want = {r: snapshot_tokens(caches, s) for r, (_, s) in reqs.items()}
    for toks, s in reqs.values():
        before = _segments(s3_boto_client, bucket)
        store(s3_endpoint, bucket, spec, toks, caches, s)
    (c_segment,) = _segments(s3_boto_client, bucket) - before
    for layer in range(3, spec.num_layers):
        key = layer_key_at(c_segment, layer)
        body = bytearray(s3_boto_client.get_object(Bucket=bucket, Key=key)["Body"].read())
        body[0] ^= 0xFF
        s3_boto_client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    engine = build_engine(config(s3_endpoint, bucket, prefetch_on_lookup=False), spec, deferred(spec))
    try:
        for r, (toks, _) in reqs.items():
            assert engine.lookup(tokens=toks, lookup_id=r, pin=True) == n
        fill_paged_kv_cache(caches, SENTINEL)
        impl = SimpleNamespace(lmcache_engine=engine, num_layers=spec.num_layers,
                               record_failed_blocks=lambda req, expected, got, sm: {
                                   int(x) // 16 for x in sm[expected & ~got]})
        guard = LoadFailureGuard(impl)
        guard.begin_step(SimpleNamespace(requests=[SimpleNamespace(req_id=r, load_spec=SimpleNamespace(can_load=True))
                                                   for r in reqs]))
        gens = {r: engine.retrieve_layer(toks, kvcaches=list(caches), slot_mapping=s, sync=r == "C", req_id=r)
                for r, (toks, s) in reqs.items()}
        for g in gens.values():  # start_load_kv
            next(g)
            next(g)
        seen = {r: [] for r in reqs}
        for layer in range(spec.num_layers):  # wait_for_layer_load(layer), then attention(layer)
            outs = {r: next(g) for r, g in gens.items()}
            for r, (_, s) in reqs.items():
                seen[r].append(snapshot_tokens([caches[layer]], s)[0])
        for r in reqs:
            engine.lookup_unpin(r)
        assert int(outs["A"].sum()) == n and int(outs["B"].sum()) == n
        for r in "AB":
            assert torch.equal(torch.stack(seen[r]), want[r]), f"attention of {r} read KV that had not landed"
        assert guard.stats.retrievals_failed == 1 and guard.take_invalid_blocks()
        h = backend_of(engine)._handoff
        assert h.wait_idle(10) and h.held_buffers() == 0 and h.live_retrievals() == 0
        assert h.stats.retrievals_failed == 1
    finally:
        destroy_engine(engine)


def _segments(client, bucket) -> set[str]:
    """The directories of the segments that have layer objects."""
    return {segment_dir_of_key(o["Key"]) for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])
            if layer_of_key(o["Key"]) == 0}
