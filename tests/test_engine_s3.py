"""The plugin inside LMCache 0.5.6's real engine on CPU, against the real S3 server.

Layerwise store and retrieve are stepped exactly as vLLM's adapter steps them (one ``next()``
per layer); a *new* engine instance (as after a restart, or on another machine) retrieves.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmcache_s3layer.format.objects import layer_of_key
from lmcache_s3layer.testing.engine import (
    KVSpec,
    build_engine,
    destroy_engine,
    fill_paged_kv_cache,
    make_paged_kv_cache,
    make_slot_mapping,
    make_tokens,
    plugin_engine_config,
    run_retrieve_layer,
    run_store_layer,
    snapshot_tokens,
)
from lmcache_s3layer.testing.engine import plugin_backend as backend_of

pytestmark = pytest.mark.engine

SPEC = KVSpec(num_layers=32, num_kv_heads=2, head_size=32, chunk_size=16, dtype=torch.bfloat16)
BLOCKS, BLOCK = 16, 16
SENTINEL = 7.0  # random bf16 data never equals it exactly


def plugin_config(ep, bucket, **s3layer) -> dict:
    return plugin_engine_config(ep, bucket, prefix="engine-test", retry_base_s=0.01, retrieval_deadline_s=20,
                                **s3layer)


def store_prompt(ep, bucket, tokens, caches, slots, **s3layer):
    engine = build_engine(plugin_config(ep, bucket, **s3layer), SPEC)
    try:
        run_store_layer(engine, tokens, caches, slots)
        assert backend_of(engine).flush(60)
        return backend_of(engine).core.writer.stats
    finally:
        destroy_engine(engine)


def lookup(engine, tokens, req="req-1"):
    return engine.lookup(tokens=tokens, lookup_id=req, pin=True)


@pytest.fixture
def prompt():
    tokens = make_tokens(80, seed=3)  # 5 chunks of 16
    caches = make_paged_kv_cache(SPEC, BLOCKS, BLOCK, seed=4)
    slots = make_slot_mapping(80, BLOCKS, BLOCK, seed=5)
    return tokens, caches, slots


def test_layerwise_round_trip_in_a_new_engine_is_bit_identical(s3_endpoint, bucket, prompt):
    tokens, caches, slots = prompt
    want = snapshot_tokens(caches, slots)
    stats = store_prompt(s3_endpoint, bucket, tokens, caches, slots)
    assert stats.segments_committed == 1 and stats.layers_uploaded == SPEC.num_layers

    engine = build_engine(plugin_config(s3_endpoint, bucket), SPEC)
    try:
        assert lookup(engine, tokens) == 80
        fill_paged_kv_cache(caches, SENTINEL)
        res = run_retrieve_layer(engine, tokens, caches, slots)
        engine.lookup_unpin("req-1")
        assert int(res.ret_mask.sum()) == 80 and int(res.first_yield) == 80
        assert torch.equal(snapshot_tokens(caches, slots), want)
        b = backend_of(engine)
        assert b.core.prefetcher.wait_idle(5)
        assert b.core.prefetcher.staging_bytes == 0
        assert b.core.index.pinned_count() == 0
    finally:
        destroy_engine(engine)


def test_partial_prefix_hit_loads_exactly_the_prefix(s3_endpoint, bucket):
    tokens = make_tokens(80, seed=8)
    caches = make_paged_kv_cache(SPEC, BLOCKS, BLOCK, seed=9)
    slots = make_slot_mapping(80, BLOCKS, BLOCK, seed=10)
    want = snapshot_tokens(caches, slots)
    store_prompt(s3_endpoint, bucket, tokens[:48], caches, slots[:48])

    engine = build_engine(plugin_config(s3_endpoint, bucket), SPEC)
    try:
        assert lookup(engine, tokens) == 48
        fill_paged_kv_cache(caches, SENTINEL)
        res = run_retrieve_layer(engine, tokens, caches, slots)
        engine.lookup_unpin("req-1")
        assert int(res.ret_mask.sum()) == 48 and bool(res.ret_mask[:48].all())
        got = snapshot_tokens(caches, slots)
        assert torch.equal(got[:, :48], want[:, :48])
        assert bool((got[:, 48:] == SENTINEL).all())  # nothing beyond the prefix was written
    finally:
        destroy_engine(engine)


def test_a_batch_of_requests_with_one_prefix_reads_each_byte_once(s3_endpoint, bucket):
    """Two requests for the same cached prompt in one batch (a shared system prompt): vLLM
    looks both up, then steps their layerwise retrievals in lockstep. Both load bit-identical
    KV, and every layer of the prompt is read from S3 once, not once per request."""
    tokens = make_tokens(80, seed=21)
    caches = make_paged_kv_cache(SPEC, BLOCKS, BLOCK, seed=22)
    slots = make_slot_mapping(160, BLOCKS, BLOCK, seed=23)
    lanes = {"req-a": slots[:80], "req-b": slots[80:]}
    want = snapshot_tokens(caches, lanes["req-a"])
    store_prompt(s3_endpoint, bucket, tokens, caches, lanes["req-a"])

    fetched = {}
    for batch in ({"req-a": lanes["req-a"]}, lanes):  # one request alone, then both
        engine = build_engine(plugin_config(s3_endpoint, bucket), SPEC)
        try:
            for req in batch:
                assert lookup(engine, tokens, req) == 80
            fill_paged_kv_cache(caches, SENTINEL)
            gens = [engine.retrieve_layer(tokens, kvcaches=list(caches), slot_mapping=s, sync=True, req_id=req)
                    for req, s in batch.items()]
            for _ in range(SPEC.num_layers + 2):
                for g in gens:
                    next(g)
            for req, s in batch.items():
                engine.lookup_unpin(req)
                assert torch.equal(snapshot_tokens(caches, s), want), req
            prefetcher = backend_of(engine).core.prefetcher
            assert prefetcher.wait_idle(5) and prefetcher.staging_bytes == 0
            fetched[len(batch)] = (prefetcher.stats.gets, prefetcher.stats.bytes_fetched)
            # one request alone copies nothing; the second of two gets a copy of every chunk
            assert prefetcher.stats.chunks_copied == (len(batch) - 1) * 5 * SPEC.num_layers
        finally:
            destroy_engine(engine)
    assert fetched[2] == fetched[1]


def test_storage_manager_batched_put_and_layerwise_batched_get(s3_endpoint, bucket):
    engine = build_engine(plugin_config(s3_endpoint, bucket), SPEC)
    try:
        sm = engine.storage_manager
        lcb = sm.storage_backends["LocalCPUBackend"]
        keys = [key.split_layers(SPEC.num_layers)
                for _, _, key in engine.token_database.process_tokens(tokens=make_tokens(48, seed=1))]
        want = {}
        for layer in range(SPEC.num_layers):
            objs = []
            for c in range(len(keys)):
                o = lcb.allocate(torch.Size([16, 2, SPEC.hidden]), SPEC.dtype, busy_loop=False)
                o.tensor.copy_(torch.randn(16, 2, SPEC.hidden).to(SPEC.dtype))
                want[(layer, c)] = o.tensor.clone()
                objs.append(o)
            sm.batched_put([keys[c][layer] for c in range(len(keys))], objs)
        assert backend_of(engine).flush(60)
        # a fresh index, as in another process: look the chunks up from S3 again
        backend_of(engine).core.index._entries.clear()
        assert engine.lookup(tokens=make_tokens(48, seed=1), lookup_id="r", pin=True) == 48
        gen = sm.layerwise_batched_get([[keys[c][l] for c in range(len(keys))] for l in range(SPEC.num_layers)],
                                       location="s3layer")
        for layer in range(SPEC.num_layers):
            objs = next(gen).result(timeout=20)
            assert len(objs) == len(keys)
            for c, o in enumerate(objs):
                assert torch.equal(o.tensor, want[(layer, c)])
                o.ref_count_down()
        engine.lookup_unpin("r")
    finally:
        destroy_engine(engine)


def test_non_layerwise_store_is_read_layerwise(s3_endpoint, bucket, prompt):
    tokens, caches, slots = prompt
    want = snapshot_tokens(caches, slots)
    spec = SPEC
    engine = build_engine({**plugin_config(s3_endpoint, bucket), "use_layerwise": False}, spec,
                          connector=_mock_connector(spec))
    try:
        sm = engine.storage_manager
        lcb = sm.storage_backends["LocalCPUBackend"]
        chunk_keys = [key for _, _, key in engine.token_database.process_tokens(tokens=tokens)]
        objs = []
        for c, _key in enumerate(chunk_keys):
            o = lcb.allocate(torch.Size([2, spec.num_layers, 16, spec.hidden]), spec.dtype,
                             fmt=_fmt("KV_2LTD"), busy_loop=False)
            snap = want[:, c * 16:(c + 1) * 16]  # [L, T, 2, H, D]
            o.tensor.copy_(snap.permute(2, 0, 1, 3, 4).reshape(2, spec.num_layers, 16, spec.hidden))
            objs.append(o)
        sm.batched_put(chunk_keys, objs)
        assert backend_of(engine).flush(60)
    finally:
        destroy_engine(engine)

    engine = build_engine(plugin_config(s3_endpoint, bucket), SPEC)
    try:
        assert lookup(engine, tokens) == 80
        fill_paged_kv_cache(caches, SENTINEL)
        res = run_retrieve_layer(engine, tokens, caches, slots)
        engine.lookup_unpin("req-1")
        assert int(res.ret_mask.sum()) == 80
        assert torch.equal(snapshot_tokens(caches, slots), want)
    finally:
        destroy_engine(engine)


def test_layerwise_store_is_read_non_layerwise(s3_endpoint, bucket, prompt):
    tokens, caches, slots = prompt
    want = snapshot_tokens(caches, slots)
    store_prompt(s3_endpoint, bucket, tokens, caches, slots)
    engine = build_engine({**plugin_config(s3_endpoint, bucket), "use_layerwise": False}, SPEC,
                          connector=_mock_connector(SPEC))
    try:
        chunk_keys = [key for _, _, key in engine.token_database.process_tokens(tokens=tokens)]
        assert engine.lookup(tokens=tokens, lookup_id="r", pin=True) == 80
        objs = backend_of(engine).batched_get_blocking(chunk_keys)
        assert all(o is not None for o in objs)
        for c, o in enumerate(objs):
            snap = want[:, c * 16:(c + 1) * 16]
            assert torch.equal(o.tensor, snap.permute(2, 0, 1, 3, 4).reshape(2, SPEC.num_layers, 16, SPEC.hidden))
            o.ref_count_down()
        engine.lookup_unpin("r")
    finally:
        destroy_engine(engine)


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_object_lost_between_lookup_and_retrieve_never_yields_wrong_kv(s3_endpoint, bucket, s3_boto_client,
                                                                       prompt, damage):
    from lmcache_s3layer.errors import RetrievalFailed
    tokens, caches, slots = prompt
    store_prompt(s3_endpoint, bucket, tokens, caches, slots)
    engine = build_engine(plugin_config(s3_endpoint, bucket, prefetch_on_lookup=False), SPEC)
    try:
        assert lookup(engine, tokens) == 80
        # between lookup and retrieve, layer 5 of the segment disappears or rots
        key = next(o["Key"] for o in s3_boto_client.list_objects_v2(Bucket=bucket)["Contents"]
                   if layer_of_key(o["Key"]) == 5)
        if damage == "delete":
            s3_boto_client.delete_object(Bucket=bucket, Key=key)
        else:
            body = bytearray(s3_boto_client.get_object(Bucket=bucket, Key=key)["Body"].read())
            body[100] ^= 0x40
            s3_boto_client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        fill_paged_kv_cache(caches, SENTINEL)
        layers_done = []
        with pytest.raises(RetrievalFailed):
            run_retrieve_layer(engine, tokens, caches, slots, between_layers=layers_done.append)
        engine.lookup_unpin("req-1")
        # layers up to 4 arrived verified; nothing of layer 5 or later was written
        got = snapshot_tokens(caches, slots)
        assert bool((got[5:] == SENTINEL).all())
        # the engine is still alive: the damaged segment is now a clean miss...
        assert lookup(engine, tokens, "req-2") == 0
        engine.lookup_unpin("req-2")
        # ...every staging buffer went back, and a new prompt stores and loads fine
        b = backend_of(engine)
        assert b.core.prefetcher.wait_idle(5) and b.core.prefetcher.staging_bytes == 0
        assert b._handoff.wait_idle(5) and b._handoff.held_buffers() == 0 and b._handoff.live_retrievals() == 0
        other = make_tokens(32, seed=77)
        run_store_layer(engine, other, caches, slots[:32])
        assert b.flush(60)
    finally:
        destroy_engine(engine)


# ---- start-up guard rails ------------------------------------------------------------------


def _storage_loops() -> int:
    return sum(t.name == "storage-manager-event-loop" and t.is_alive() for t in threading.enumerate())


def _build_expecting(cfg, match):
    from lmcache_s3layer.integration.lmcache.guards import StartupError
    before = _storage_loops()
    with pytest.raises(StartupError, match=match) as ei:
        e = build_engine(cfg, SPEC)
        destroy_engine(e)
    # The half-built StorageManager's loop thread is not a daemon: left running, it would keep
    # the failed process (a vLLM worker) from ever exiting.
    deadline = time.monotonic() + 10
    while _storage_loops() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _storage_loops() <= before, "a failed start-up left LMCache's event-loop thread running"
    return str(ei.value)


def test_guard_hash_seed(s3_endpoint, bucket, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    cfg = {**plugin_config(s3_endpoint, bucket), "pre_caching_hash_algorithm": "builtin"}
    _build_expecting(cfg, "PYTHONHASHSEED is not set")


def test_guard_mixed_locations(s3_endpoint, bucket):
    cfg = {**plugin_config(s3_endpoint, bucket), "local_cpu": True}
    _build_expecting(cfg, "same location")


def test_guard_missing_bucket(s3_endpoint):
    _build_expecting(plugin_config(s3_endpoint, "no-such-bucket-s3layer"), "does not exist")


def test_guard_missing_bucket_setting(s3_endpoint, bucket):
    cfg = plugin_config(s3_endpoint, bucket)
    del cfg["extra_config"]["s3layer.bucket"]
    _build_expecting(cfg, "s3layer.bucket is not set")


def test_guard_wrong_credentials_without_leaking_the_secret(s3_endpoint, bucket, caplog, monkeypatch):
    # LMCache logs its configuration verbatim, so the secret is passed as an env: reference
    # (the README's advice); our own messages must not contain it either.
    secret = "wrong-secret-0123456789abcdef"
    monkeypatch.setenv("S3LAYER_TEST_WRONG_SECRET", secret)
    cfg = plugin_config(s3_endpoint, bucket, secret_access_key="env:S3LAYER_TEST_WRONG_SECRET", max_attempts=1)
    msg = _build_expecting(cfg, "access denied")
    assert secret not in msg and secret not in caplog.text


def test_literal_secret_in_extra_config_is_warned_about_without_repeating_it(s3_endpoint, bucket, caplog):
    engine = build_engine(plugin_config(s3_endpoint, bucket, secret_access_key=s3_endpoint.secret_key), SPEC)
    destroy_engine(engine)
    warnings = [r.getMessage() for r in caplog.records if r.name == "lmcache_s3layer.integration.lmcache.backend"
                and "written literally" in r.getMessage()]
    assert warnings and all(s3_endpoint.secret_key not in w for w in warnings)


def test_guard_failed_construction_is_not_swallowed(s3_endpoint, bucket):
    # LMCache's launcher catches Exception and merely logs it; our error must escape.
    cfg = plugin_config(s3_endpoint, bucket, staging_budget_bytes=-1)
    _build_expecting(cfg, "staging_budget_bytes must be > 0")


def test_fail_fast_off_runs_without_cache(s3_endpoint):
    cfg = plugin_config(s3_endpoint, "no-such-bucket-s3layer", fail_fast=False)
    engine = build_engine(cfg, SPEC)
    try:
        assert engine.lookup(tokens=make_tokens(32), lookup_id="x", pin=True) == 0
    finally:
        destroy_engine(engine)


# ---- helpers -------------------------------------------------------------------------------


def _fmt(name):
    from lmcache.v1.memory_management import MemoryFormat
    return getattr(MemoryFormat, name)


def _mock_connector(spec):
    from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector
    return MockGPUConnector(kv_shape=spec.kv_shape)
