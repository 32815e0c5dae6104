"""CPULayerwiseConnector under LMCache 0.5.6's real layerwise engine, on CPU.

Ground truth for the paged layouts is the attention backend's own writer (for the vLLM
CPU layout: vLLM's ``cpu_attn_reshape_and_cache`` kernel), never the connector: caches
are filled by it, LMCache objects are compared with the model's K/V per token, and
restored caches are compared byte for byte with a cache the kernel wrote.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_s3layer.testing.engine import (
    LAYOUT_FLASH_ATTN,
    LAYOUT_FLASH_INFER,
    LAYOUT_VLLM_CPU,
    KVSpec,
    assert_same_bytes,
    chunk_layer_keys,
    expected_paged_kv_cache,
    fill_paged_kv_cache,
    lmcache_engine,
    make_config,
    make_cpu_connector,
    make_metadata,
    make_paged_kv_cache,
    make_slot_mapping,
    make_token_kv,
    make_tokens,
    run_retrieve_layer,
    run_store_layer,
    snapshot_tokens,
    write_token_kv,
)

pytestmark = pytest.mark.engine


@pytest.fixture(autouse=True)
def immediate_copies(monkeypatch):
    """The layout math and the generator protocol, layer by layer, with synchronous copies
    (several tests look at a layer right after its step, before any sync). The deferred,
    GPU-like mode the rest of the suite runs is tested in test_engine_device_model."""
    monkeypatch.setenv("S3LAYER_CPU_COPY", "immediate")

SPEC = KVSpec(num_layers=4, num_kv_heads=2, head_size=32, chunk_size=16, dtype=torch.bfloat16)
NUM_BLOCKS = 8
BLOCK_SIZE = 16
NUM_TOKENS = 70  # 4 full chunks of 16 + a 6-token tail
PADDING = (3, 21)  # -1 slots inside full chunks (vLLM pads, e.g. for CUDA graphs)
SENTINEL = 7.0  # randn data in bf16 never equals it exactly


def _setup(layout=LAYOUT_VLLM_CPU, padding=PADDING, seed=0, spec=SPEC, block_size=BLOCK_SIZE,
           num_blocks=NUM_BLOCKS, num_tokens=NUM_TOKENS):
    caches = make_paged_kv_cache(spec, num_blocks, block_size, layout=layout, fill=0.0)
    slots = make_slot_mapping(num_tokens, num_blocks, block_size, seed=seed + 1,
                              padding_positions=padding)
    token_kv = make_token_kv(spec, num_tokens, seed=seed + 2)
    write_token_kv(caches, token_kv, slots, layout)
    tokens = make_tokens(num_tokens, seed=seed + 3)
    return caches, slots, token_kv, tokens


def _mask(n_true, total=NUM_TOKENS, start=0):
    m = torch.zeros(total, dtype=torch.bool)
    m[start:n_true] = True
    return m


def _assert_cache_is(caches, token_kv, slots, restored, layout=LAYOUT_VLLM_CPU, layers=None):
    want = expected_paged_kv_cache(caches, token_kv, slots, restored, SENTINEL, layout)
    for layer in layers if layers is not None else range(len(caches)):
        assert_same_bytes(caches[layer], want[layer], f"layer {layer}")


def _assert_objects_hold(engine, tokens, token_kv, slots):
    """Every stored KV_T2D object is [token, K|V, head*D + d] of the model's K/V."""
    from lmcache.v1.memory_management import MemoryFormat

    backend = engine.storage_manager.storage_backends["LocalCPUBackend"]
    for start, end, keys in chunk_layer_keys(engine, tokens):
        for layer, key in enumerate(keys):
            obj = backend.hot_cache[key]
            assert obj.metadata.fmt == MemoryFormat.KV_T2D
            assert tuple(obj.tensor.shape) == (end - start, 2, SPEC.hidden)
            want = token_kv[layer, start:end].reshape(end - start, 2, SPEC.hidden).clone()
            want[slots[start:end] < 0] = 0  # padding tokens are stored as zeros
            assert_same_bytes(obj.tensor, want, f"object layer {layer} [{start}, {end})")


@pytest.mark.parametrize("layout,block_size", [(LAYOUT_VLLM_CPU, 16), (LAYOUT_VLLM_CPU, 32),
                                               (LAYOUT_FLASH_ATTN, 16), (LAYOUT_FLASH_INFER, 16)])
def test_snapshot_helper_reads_what_the_backend_wrote(layout, block_size):
    """engine_helpers.snapshot_tokens (used by the S3 engine tests) agrees with the writer."""
    caches, slots, token_kv, _ = _setup(layout=layout, block_size=block_size, seed=5)
    want = token_kv.clone()
    want[:, slots < 0] = 0
    assert_same_bytes(snapshot_tokens(caches, slots, layout), want, layout)


def test_store_then_retrieve_layer_by_layer_vllm_cpu_layout():
    caches, slots, token_kv, tokens = _setup()
    with lmcache_engine({"save_unfull_chunk": False}, SPEC) as engine:
        chunks = chunk_layer_keys(engine, tokens)
        assert [(s, e) for s, e, _ in chunks] == [(0, 16), (16, 32), (32, 48), (48, 64)]
        sm = engine.storage_manager

        def after_store_step(layer):
            # After step layer+1 the connector has filled `layer`; the engine puts
            # layer-1 at that step, so exactly layers < layer are in the backend.
            for l in range(SPEC.num_layers):
                present = [sm.contains(keys[l]) is not None for _, _, keys in chunks]
                assert present == [l < layer] * len(chunks), (layer, l)

        assert run_store_layer(engine, tokens, caches, slots,
                               between_layers=after_store_step) == SPEC.num_layers + 1
        for _, _, keys in chunks:
            assert all(sm.contains(key) == "LocalCPUBackend" for key in keys)
        _assert_objects_hold(engine, tokens, token_kv, slots)

        fill_paged_kv_cache(caches, SENTINEL)
        restored = _mask(64)

        def after_retrieve_step(layer):
            # Copies are synchronous: the step that sends `layer` leaves it resident
            # and the later layers untouched.
            _assert_cache_is(caches, token_kv, slots, restored, layers=[layer])
            _assert_cache_is(caches, token_kv, slots, _mask(0), layers=range(layer + 1, SPEC.num_layers))

        res = run_retrieve_layer(engine, tokens, caches, slots, between_layers=after_retrieve_step)
        assert res.steps == SPEC.num_layers + 2
        assert int(res.first_yield) == 64
        assert all(y is None for y in res.yields[1:-1])
        assert torch.equal(res.ret_mask, restored)
        # Byte-exact against vLLM's own writer: restored tokens match, padding slots
        # (-1), the 6 tail tokens, unused slots and the last slot still hold SENTINEL.
        _assert_cache_is(caches, token_kv, slots, restored)


def test_unfull_chunk_is_stored_and_restored_when_enabled():
    caches, slots, token_kv, tokens = _setup(seed=10)
    with lmcache_engine({"save_unfull_chunk": True}, SPEC) as engine:
        run_store_layer(engine, tokens, caches, slots)
        _assert_objects_hold(engine, tokens, token_kv, slots)
        fill_paged_kv_cache(caches, SENTINEL)
        res = run_retrieve_layer(engine, tokens, caches, slots)
        assert torch.equal(res.ret_mask, _mask(NUM_TOKENS))
        _assert_cache_is(caches, token_kv, slots, res.ret_mask)


def test_vllm_block_size_32_head_64():
    """The shape vLLM's CPU backend really uses (blocks are multiples of 32)."""
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_size=64, chunk_size=32, dtype=torch.bfloat16)
    caches, slots, token_kv, tokens = _setup(spec=spec, block_size=32, num_blocks=4,
                                             num_tokens=100, padding=(40,), seed=15)
    with lmcache_engine({}, spec) as engine:
        run_store_layer(engine, tokens, caches, slots)
        fill_paged_kv_cache(caches, SENTINEL)
        res = run_retrieve_layer(engine, tokens, caches, slots)
        assert int(res.ret_mask.sum()) == 96
        want = expected_paged_kv_cache(caches, token_kv, slots, res.ret_mask, SENTINEL)
        for got, exp in zip(caches, want):
            assert_same_bytes(got, exp)


def test_retrieve_honours_mask_of_tokens_vllm_already_has():
    caches, slots, token_kv, tokens = _setup(seed=30)
    with lmcache_engine({}, SPEC) as engine:
        run_store_layer(engine, tokens, caches, slots)
        fill_paged_kv_cache(caches, SENTINEL)
        mask = _mask(64, total=64, start=16)  # vLLM's prefix cache holds chunk 0
        res = run_retrieve_layer(engine, tokens[:64], caches, slots[:64], mask=mask,
                                 vllm_cached_tokens=16)
        assert torch.equal(res.ret_mask, mask)
        _assert_cache_is(caches, token_kv, slots, _mask(64, start=16))


def test_retrieved_objects_are_released():
    caches, slots, _, tokens = _setup(seed=40)
    with lmcache_engine({}, SPEC) as engine:
        run_store_layer(engine, tokens, caches, slots)
        backend = engine.storage_manager.storage_backends["LocalCPUBackend"]
        objs = [backend.hot_cache[k] for _, _, keys in chunk_layer_keys(engine, tokens) for k in keys]
        before = [(o.get_ref_count(), o.is_pinned) for o in objs]
        run_retrieve_layer(engine, tokens, caches, slots)
        assert [(o.get_ref_count(), o.is_pinned) for o in objs] == before


@pytest.mark.parametrize("layout", [LAYOUT_FLASH_ATTN, LAYOUT_FLASH_INFER])
def test_gpu_style_layouts_round_trip(layout):
    caches, slots, token_kv, tokens = _setup(layout=layout, seed=50)
    with lmcache_engine({}, SPEC) as engine:
        run_store_layer(engine, tokens, caches, slots)
        _assert_objects_hold(engine, tokens, token_kv, slots)
        fill_paged_kv_cache(caches, SENTINEL)
        res = run_retrieve_layer(engine, tokens, caches, slots)
        assert torch.equal(res.ret_mask, _mask(64))
        _assert_cache_is(caches, token_kv, slots, res.ret_mask, layout=layout)


def test_same_objects_from_cpu_and_gpu_layouts():
    """A vLLM-CPU instance and a flash-attn instance store identical objects."""
    stored = []
    for layout in (LAYOUT_VLLM_CPU, LAYOUT_FLASH_ATTN):
        caches, slots, token_kv, tokens = _setup(layout=layout, seed=55)
        with lmcache_engine({}, SPEC) as engine:
            run_store_layer(engine, tokens, caches, slots)
            backend = engine.storage_manager.storage_backends["LocalCPUBackend"]
            stored.append([backend.hot_cache[k].tensor.clone()
                           for _, _, keys in chunk_layer_keys(engine, tokens) for k in keys])
    for a, b in zip(*stored):
        assert_same_bytes(a, b, "cpu vs flash object")


def test_flash_layout_with_hnd_hint_reads_physical_head_major():
    """An HND hint on a 5-D cache means [2, NB, H, BS, D], as in LMCache's CUDA path."""
    h, d = SPEC.num_kv_heads, SPEC.head_size
    g = torch.Generator().manual_seed(60)
    caches = [torch.randn(2, NUM_BLOCKS, h, BLOCK_SIZE, d, generator=g).to(SPEC.dtype)
              for _ in range(SPEC.num_layers)]
    slots = make_slot_mapping(64, NUM_BLOCKS, BLOCK_SIZE, seed=61)
    tokens = make_tokens(64, seed=62)
    conn = make_cpu_connector(SPEC, layout_hints={"kv_layout": "HND"})
    with lmcache_engine({}, SPEC, connector=conn) as engine:
        run_store_layer(engine, tokens, caches, slots)
        backend = engine.storage_manager.storage_backends["LocalCPUBackend"]
        _, _, keys = chunk_layer_keys(engine, tokens)[1]
        obj = backend.hot_cache[keys[2]]
        b, o = divmod(int(slots[16 + 5]), BLOCK_SIZE)
        assert torch.equal(obj.tensor[5, 1], caches[2][1, b, :, o, :].reshape(-1))


# ------------------------------------------------------------------ connector alone

def _objs_for(n_layers, sizes, fmt=None, fill=None):
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    fmt = fmt or MemoryFormat.KV_T2D
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n_layers):
        row = []
        for n in sizes:
            t = torch.randn(n, 2, SPEC.hidden, generator=g).to(SPEC.dtype)
            meta = MemoryObjMetadata(shape=t.shape, dtype=t.dtype, address=0,
                                     phy_size=t.numel() * t.element_size(), ref_count=1,
                                     pin_count=0, fmt=fmt)
            row.append(TensorMemoryObj(raw_data=t, metadata=meta, parent_allocator=None))
        out.append(row)
    return out


def test_generator_yield_counts_match_the_cuda_parent():
    from lmcache.v1.gpu_connector.utils import assert_layerwise_gpu_connector

    conn = make_cpu_connector(SPEC)
    assert_layerwise_gpu_connector(conn)
    assert not hasattr(conn, "load_stream")  # no CUDA streams were created
    assert conn.get_shape(5) == torch.Size([5, 2, SPEC.hidden])
    caches, slots, _, _ = _setup(seed=70)
    objs = _objs_for(SPEC.num_layers, [16, 16])
    kw = dict(kvcaches=caches, slot_mapping=slots, sync=True)

    gen = conn.batched_from_gpu(objs, [0, 16], [16, 32], **kw)
    for _ in range(SPEC.num_layers + 1):
        assert next(gen) is None
    with pytest.raises(StopIteration):
        next(gen)

    gen = conn.batched_to_gpu([0, 16], [16, 32], **kw)
    assert next(gen) is None
    for layer in range(SPEC.num_layers):
        assert gen.send(objs[layer]) is None
    assert next(gen) is None  # the parent's "wait for the last layer" step
    with pytest.raises(StopIteration):
        next(gen)


def test_short_object_list_is_an_error_not_silent_corruption():
    conn = make_cpu_connector(SPEC)
    caches, slots, _, _ = _setup(seed=80)
    gen = conn.batched_to_gpu([0, 16], [16, 32], kvcaches=caches, slot_mapping=slots, sync=True)
    next(gen)
    with pytest.raises(ValueError, match="2 chunks"):
        gen.send(_objs_for(1, [16])[0])


def test_wrong_memory_format_rejected():
    from lmcache.v1.memory_management import MemoryFormat

    conn = make_cpu_connector(SPEC)
    caches, slots, _, _ = _setup(seed=90)
    gen = conn.batched_to_gpu([0], [16], kvcaches=caches, slot_mapping=slots, sync=True)
    next(gen)
    with pytest.raises(ValueError, match="memory format"):
        gen.send(_objs_for(1, [16], fmt=MemoryFormat.KV_2LTD)[0])


def test_unknown_cpu_isa_is_refused():
    conn = make_cpu_connector(SPEC, cpu_attn_isa="neon")
    caches, slots, _, _ = _setup(seed=95)
    gen = conn.batched_to_gpu([0], [16], kvcaches=caches, slot_mapping=slots, sync=True)
    with pytest.raises(NotImplementedError, match="neon"):
        next(gen)


def test_mla_cache_round_trip():
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    from lmcache_s3layer.integration.lmcache.cpu_connector import CPULayerwiseConnector

    d, bs, nb, n_layers = 64, 16, 4, 2
    conn = CPULayerwiseConnector(hidden_dim_size=d, num_layers=n_layers, chunk_size=16,
                                 dtype=torch.bfloat16, use_mla=True)
    assert conn.get_shape(3) == torch.Size([3, d])
    g = torch.Generator().manual_seed(7)
    caches = [torch.randn(nb, bs, d, generator=g).to(torch.bfloat16) for _ in range(n_layers)]
    slots = make_slot_mapping(32, nb, bs, seed=8, padding_positions=(2,))

    def obj(n):
        t = torch.empty(n, d, dtype=torch.bfloat16)
        meta = MemoryObjMetadata(shape=t.shape, dtype=t.dtype, address=0, phy_size=t.numel() * 2,
                                 ref_count=1, pin_count=0, fmt=MemoryFormat.KV_T2D)
        return TensorMemoryObj(raw_data=t, metadata=meta, parent_allocator=None)

    objs = [[obj(16), obj(16)] for _ in range(n_layers)]
    kw = dict(kvcaches=caches, slot_mapping=slots, sync=True)
    gen = conn.batched_from_gpu(objs, [0, 16], [16, 32], **kw)
    for _ in range(n_layers + 1):
        next(gen)
    assert all(o.metadata.fmt == MemoryFormat.KV_MLA_FMT for row in objs for o in row)
    b, o = divmod(int(slots[20]), bs)
    assert torch.equal(objs[1][1].tensor[4], caches[1][b, o])

    restored = [torch.full_like(c, SENTINEL) for c in caches]
    gen = conn.batched_to_gpu([0, 16], [16, 32], **{**kw, "kvcaches": restored})
    next(gen)
    for layer in range(n_layers):
        gen.send(objs[layer])
    valid = slots[slots >= 0]
    for c, r in zip(caches, restored):
        flat_c, flat_r = c.view(-1, d), r.view(-1, d)
        assert_same_bytes(flat_r[valid], flat_c[valid])
        untouched = torch.ones(nb * bs, dtype=torch.bool)
        untouched[valid] = False
        assert bool((flat_r[untouched] == SENTINEL).all())


def _amx_reference_write(cache, token_kv_layer, slots, bs, d):
    """Per-element transliteration of vLLM's AMX reshape_and_cache index math
    (csrc/cpu/cpu_attn_amx.hpp), on bf16 elements instead of int32 quadwords."""
    nb, h = cache.shape[0], cache.shape[1]
    flat = cache.view(nb, h, 2 * bs * d)  # per (block, head): K region, then V region
    for t, pos in enumerate(slots.tolist()):
        if pos < 0:
            continue
        b, o = divmod(pos, bs)
        for head in range(h):
            key, val = token_kv_layer[t, 0, head], token_kv_layer[t, 1, head]
            g, go = divmod(o, 16)
            for j in range(d // 2):  # quadword j = elements 2j, 2j+1
                q = g * (16 * d // 2) + j * 16 + go
                flat[b, head, 2 * q] = key[2 * j]
                flat[b, head, 2 * q + 1] = key[2 * j + 1]
            s, e = divmod(o, 2)
            for i in range(d // 16):
                for jj in range(16):
                    flat[b, head, bs * d + i * bs * 16 + s * 32 + jj * 2 + e] = val[i * 16 + jj]


def test_amx_packing_matches_vllm_index_math():
    """No AMX CPU here to run the kernel; check the views against its index math."""
    spec = KVSpec(num_layers=1, num_kv_heads=2, head_size=32, chunk_size=32, dtype=torch.bfloat16)
    bs, nb = 32, 3
    slots = make_slot_mapping(64, nb, bs, seed=5, padding_positions=(7,))
    token_kv = make_token_kv(spec, 64, seed=6)
    cache = torch.full((nb, 2, bs, 64), SENTINEL, dtype=torch.bfloat16)
    _amx_reference_write(cache, token_kv[0], slots, bs, 32)

    conn = make_cpu_connector(spec, cpu_attn_isa="amx")
    objs = _objs_for(1, [32, 32])
    gen = conn.batched_from_gpu(objs, [0, 32], [32, 64], kvcaches=[cache], slot_mapping=slots, sync=True)
    next(gen)
    for c, obj in enumerate(objs[0]):
        want = token_kv[0, 32 * c:32 * (c + 1)].reshape(32, 2, 64).clone()
        want[slots[32 * c:32 * (c + 1)] < 0] = 0
        assert_same_bytes(obj.tensor, want, f"amx gather chunk {c}")

    restored = torch.full_like(cache, SENTINEL)
    gen = conn.batched_to_gpu([0, 32], [32, 64], kvcaches=[restored], slot_mapping=slots, sync=True)
    next(gen)
    gen.send(objs[0])
    assert_same_bytes(restored, cache, "amx scatter")


# --------------------------------------------------------- LMCache behaviour we rely on

def test_backend_get_exception_surfaces_from_the_step_that_consumes_that_layer():
    """Documents 0.5.6: nothing between the backend and vLLM catches a fetch error.

    retrieve_layer reads layer i's future at step i+2 (vLLM: start_load_kv does steps 1-2,
    wait_for_layer_load(j) does step j+3), and the error ends the generator.
    """
    caches, slots, _, tokens = _setup(seed=100)
    with lmcache_engine({}, SPEC) as engine:
        run_store_layer(engine, tokens, caches, slots)
        backend = engine.storage_manager.storage_backends["LocalCPUBackend"]
        original = backend.batched_get_non_blocking
        calls = []

        async def flaky(lookup_id, keys, transfer_spec=None):
            calls.append(keys[0].layer_id)
            if keys[0].layer_id == 2:
                raise ConnectionError("injected S3 failure")
            return await original(lookup_id, keys, transfer_spec)

        backend.batched_get_non_blocking = flaky
        gen = engine.retrieve_layer(tokens, kvcaches=caches, slot_mapping=slots, sync=True)
        for _ in range(3):  # steps 1..3 consume layers 0 and 1
            next(gen)
        with pytest.raises(ConnectionError, match="injected"):
            next(gen)  # step 4 consumes layer 2
        with pytest.raises(StopIteration):
            next(gen)
        assert calls == [0, 1, 2]  # layer i+1 is only scheduled after layer i arrived
        # The aborted generator skipped its ref_count_down for layers 0 and 1.
        leaked = [backend.hot_cache[keys[layer]]
                  for _, _, keys in chunk_layer_keys(engine, tokens) for layer in (0, 1)]
        assert all(o.get_ref_count() == 2 for o in leaked)
        for o in leaked:  # keep the teardown quiet
            o.ref_count_down()


def test_retrieve_with_no_hit_crashes_on_last_step():
    """Documents LMCache issue #899, still in 0.5.6: no chunk found -> UnboundLocalError."""
    caches, slots, _, tokens = _setup(seed=110)
    with lmcache_engine({}, SPEC) as engine:
        gen = engine.retrieve_layer(tokens, kvcaches=caches, slot_mapping=slots, sync=True)
        for _ in range(SPEC.num_layers + 1):
            assert next(gen) is None
        with pytest.raises(UnboundLocalError):
            next(gen)


# ---------------------------------------------------------------------- installer

@pytest.fixture
def patch_env(monkeypatch):
    from lmcache_s3layer.integration.lmcache import cpu_connector

    cpu_connector.uninstall_cpu_connector_patch()
    yield monkeypatch
    cpu_connector.uninstall_cpu_connector_patch()


def test_patch_routes_only_cpu_vllm_layerwise(patch_env):
    import lmcache.v1.gpu_connector as gc_pkg
    from lmcache.utils import EngineType

    from lmcache_s3layer.integration.lmcache.cpu_connector import (
        CPULayerwiseConnector,
        install_cpu_connector_patch,
        uninstall_cpu_connector_patch,
    )

    patch_env.delenv("S3LAYER_CPU_CONNECTOR", raising=False)
    original = gc_pkg.CreateGPUConnector
    assert install_cpu_connector_patch() is True
    assert install_cpu_connector_patch() is True  # idempotent
    wrapped = gc_pkg.CreateGPUConnector
    assert wrapped is not original and wrapped.__s3layer_original__ is original

    meta = make_metadata(SPEC)
    conn = gc_pkg.CreateGPUConnector(make_config({"use_layerwise": True}, SPEC), meta,
                                     EngineType.VLLM, layout_hints={"kv_layout": "HND"})
    assert isinstance(conn, CPULayerwiseConnector)
    assert conn.layout_hints == {"kv_layout": "HND"} and conn.num_layers == SPEC.num_layers

    # Non-layerwise on CPU still goes to LMCache, which has no CPU connector.
    with pytest.raises(RuntimeError, match="No supported cpu connector"):
        gc_pkg.CreateGPUConnector(make_config({"use_layerwise": False}, SPEC), meta, EngineType.VLLM)
    # Other engines are untouched.
    mock = gc_pkg.CreateGPUConnector(make_config({"use_layerwise": True}, SPEC), meta, EngineType.MOCK)
    assert not isinstance(mock, CPULayerwiseConnector)

    uninstall_cpu_connector_patch()
    assert gc_pkg.CreateGPUConnector is original


def test_patch_env_zero_disables(patch_env):
    import lmcache.v1.gpu_connector as gc_pkg

    from lmcache_s3layer.integration.lmcache.cpu_connector import (
        cpu_connector_patch_installed,
        install_cpu_connector_patch,
    )

    patch_env.setenv("S3LAYER_CPU_CONNECTOR", "0")
    original = gc_pkg.CreateGPUConnector
    assert install_cpu_connector_patch() is False
    assert install_cpu_connector_patch(force=True) is False
    assert gc_pkg.CreateGPUConnector is original and not cpu_connector_patch_installed()
