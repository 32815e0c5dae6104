"""fp8 KV caches and gaps in a stored prefix, through LMCache 0.5.6's real engine on CPU.

- fp8: LMCache names fp8 dtypes ``fp8_e4m3fn``, ``fp8_e5m2``, ... in its cache keys; each is a
  namespace of its own (both are one byte per element, the same bytes mean other numbers), and
  a prompt stored in one is loaded bit-identically and never seen by the other.
- gaps: a prompt whose middle chunks are missing (their segment deleted) while the chunks
  after them are committed gets the middle refilled by the next store of the prompt, so the
  lookup no longer stops at the gap. Unit-level cases are in test_writer_gaps.py.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_s3layer.format.objects import is_manifest_key, is_pointer_key
from lmcache_s3layer.testing.engine import (
    LAYOUT_FLASH_ATTN,
    KVSpec,
    build_engine,
    destroy_engine,
    fill_paged_kv_cache,
    make_cpu_connector,
    make_paged_kv_cache,
    make_slot_mapping,
    make_tokens,
    plugin_engine_config,
    run_retrieve_layer,
    run_store_layer,
)
from lmcache_s3layer.testing.engine import plugin_backend as backend_of

pytestmark = pytest.mark.engine

BLOCKS, BLOCK = 16, 16
SENTINEL = 7.0


def spec_for(dtype: torch.dtype) -> KVSpec:
    return KVSpec(num_layers=4, num_kv_heads=2, head_size=32, chunk_size=16, dtype=dtype)


def plugin_config(ep, bucket, **s3layer) -> dict:
    return plugin_engine_config(ep, bucket, prefix="fp8-gaps", retry_base_s=0.01, retrieval_deadline_s=20,
                                **s3layer)


def engine_for(ep, bucket, spec: KVSpec, **s3layer):
    # vLLM's CPU layout refuses fp8 (its fp8 kernels pack differently): flash-attention layout.
    return build_engine(plugin_config(ep, bucket, **s3layer), spec,
                        connector=make_cpu_connector(spec, kv_layout="flash_attn"))


def token_bytes(caches, slots) -> torch.Tensor:
    """``[L, 2, T, H*D]`` raw bytes of each token's K and V (flash-attention layout). Bytes,
    not values: fp8 has NaN encodings, and NaN != NaN."""
    out = []
    for cache in caches:
        two, nb, bs, h, d = cache.shape
        flat = cache.contiguous().view(torch.uint8).reshape(two, nb * bs, h * d * cache.element_size())
        out.append(flat[:, slots])
    return torch.stack(out)


def store(ep, bucket, spec, tokens, caches, slots, **s3layer):
    engine = engine_for(ep, bucket, spec, **s3layer)
    try:
        run_store_layer(engine, tokens, caches, slots)
        assert backend_of(engine).flush(60)
        return backend_of(engine).core.writer.stats
    finally:
        destroy_engine(engine)


def lookup_hits(ep, bucket, spec, tokens) -> int:
    engine = engine_for(ep, bucket, spec)
    try:
        # Unpinned: a pinned hit would start a prefetch into LocalCPU memory for a retrieval
        # that never comes (and LMCache frees that memory before it closes the plugin).
        return engine.lookup(tokens=tokens, lookup_id="probe", pin=False)
    finally:
        destroy_engine(engine)


def retrieve(ep, bucket, spec, tokens, caches, slots) -> torch.Tensor:
    """Look up and load in a new engine; returns ret_mask (caches are filled with a sentinel
    first, so whatever was not loaded shows)."""
    engine = engine_for(ep, bucket, spec)
    try:
        assert engine.lookup(tokens=tokens, lookup_id="req", pin=True) == len(tokens)
        fill_paged_kv_cache(caches, SENTINEL)
        res = run_retrieve_layer(engine, tokens, caches, slots)
        engine.lookup_unpin("req")
        b = backend_of(engine)
        assert b.core.prefetcher.wait_idle(5) and b.core.prefetcher.staging_bytes == 0
        return res.ret_mask
    finally:
        destroy_engine(engine)


def test_every_dtype_name_lmcache_writes_is_known_to_the_layout():
    from lmcache.utils import TORCH_DTYPE_TO_STR_DTYPE

    from lmcache_s3layer.format.objects import DTYPE_SIZES, LMCACHE_DTYPE_SIZES, Namespace

    names = set(TORCH_DTYPE_TO_STR_DTYPE.values())
    assert {"fp8_e4m3fn", "fp8_e5m2"} <= names
    assert set(LMCACHE_DTYPE_SIZES) == names  # the table is LMCache's, name for name
    for dtype, name in TORCH_DTYPE_TO_STR_DTYPE.items():
        assert DTYPE_SIZES[name] == torch.empty(0, dtype=dtype).element_size(), name
        assert Namespace("m", 1, 0, name).dtype == name  # kept exactly as LMCache writes it


def test_fp8_e4m3fn_and_e5m2_round_trip_bit_identical_and_never_see_each_other(s3_endpoint, bucket):
    tokens = make_tokens(80, seed=31)  # 5 chunks of 16; the same tokens for both dtypes
    slots = make_slot_mapping(80, BLOCKS, BLOCK, seed=32)
    e4, e5 = spec_for(torch.float8_e4m3fn), spec_for(torch.float8_e5m2)
    caches = {s: make_paged_kv_cache(s, BLOCKS, BLOCK, layout=LAYOUT_FLASH_ATTN, seed=seed)
              for s, seed in ((e4, 33), (e5, 34))}
    want = {s: token_bytes(c, slots) for s, c in caches.items()}
    assert not torch.equal(want[e4], want[e5])

    stats = store(s3_endpoint, bucket, e4, tokens, caches[e4], slots)
    assert stats.segments_committed == 1 and stats.layers_uploaded == e4.num_layers
    assert lookup_hits(s3_endpoint, bucket, e5, tokens) == 0  # same tokens, other fp8 format: a miss

    stats = store(s3_endpoint, bucket, e5, tokens, caches[e5], slots)
    assert stats.segments_committed == 1  # its own segment, not "already stored"

    for s in (e4, e5):
        mask = retrieve(s3_endpoint, bucket, s, tokens, caches[s], slots)
        assert int(mask.sum()) == 80
        assert torch.equal(token_bytes(caches[s], slots), want[s]), s.dtype


def test_fp8_namespaces_have_their_own_objects(s3_endpoint, bucket, s3_boto_client):
    tokens = make_tokens(32, seed=41)
    slots = make_slot_mapping(32, BLOCKS, BLOCK, seed=42)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        s = spec_for(dtype)
        store(s3_endpoint, bucket, s, tokens, make_paged_kv_cache(s, BLOCKS, BLOCK, layout=LAYOUT_FLASH_ATTN), slots)
    keys = [o["Key"] for o in s3_boto_client.list_objects_v2(Bucket=bucket)["Contents"]]
    manifests = [k for k in keys if is_manifest_key(k)]
    assert sorted(k.split("/")[4] for k in manifests) == ["fp8_e4m3fn", "fp8_e5m2"]
    # one segment (two chunks) per dtype, each with its own start pointer: nothing is shared
    pointers = [k for k in keys if is_pointer_key(k)]
    assert sorted(k.split("/")[4] for k in pointers) == ["fp8_e4m3fn", "fp8_e5m2"]


def test_a_gap_in_a_stored_prompt_is_refilled_by_the_next_store(s3_endpoint, bucket, s3_boto_client):
    spec = spec_for(torch.bfloat16)
    tokens = make_tokens(96, seed=51)  # 6 chunks
    slots = make_slot_mapping(96, BLOCKS, BLOCK, seed=52)
    caches = make_paged_kv_cache(spec, BLOCKS, BLOCK, layout=LAYOUT_FLASH_ATTN, seed=53)
    want = token_bytes(caches, slots)

    # stored as three segments of two chunks; then the middle one is deleted (gc, an operator)
    store(s3_endpoint, bucket, spec, tokens, caches, slots, segment_max_chunks=2)
    engine = engine_for(s3_endpoint, bucket, spec)
    try:
        core = backend_of(engine).core
        keys = [key for _, _, key in engine.token_database.process_tokens(tokens=tokens)]
        ns = backend_of(engine)._ns(keys[0])
        middle = core.store.read_manifest(ns, core.store.read_pointer(ns, keys[2].chunk_hash).segment_id)
        assert middle.num_chunks == 2
        core.store.delete_segment(middle)
    finally:
        destroy_engine(engine)
    assert lookup_hits(s3_endpoint, bucket, spec, tokens) == 32  # stops at the gap

    # the next request for the prompt: its lookup hits chunks 0-1, so LMCache's store_layer hands
    # the plugin 2..5; this process has never heard of 4-5, which are committed
    engine = engine_for(s3_endpoint, bucket, spec)
    try:
        assert engine.lookup(tokens=tokens, lookup_id="again", pin=False) == 32
        run_store_layer(engine, tokens, caches, slots)
        assert backend_of(engine).flush(60)
        stats = backend_of(engine).core.writer.stats
        assert stats.segments_committed == 1 and stats.stores_lost_race == 0
        assert stats.chunks_already_committed == 2
    finally:
        destroy_engine(engine)

    assert lookup_hits(s3_endpoint, bucket, spec, tokens) == 96
    mask = retrieve(s3_endpoint, bucket, spec, tokens, caches, slots)
    assert int(mask.sum()) == 96
    assert torch.equal(token_bytes(caches, slots), want)
    manifests = [o["Key"] for o in s3_boto_client.list_objects_v2(Bucket=bucket)["Contents"]
                 if is_manifest_key(o["Key"])]
    assert len(manifests) == 3  # chunks 0-1 and 4-5 were not written again

