"""Helpers that drive LMCache 0.5.6's real ``LMCacheEngine`` on CPU, layerwise.

The one engine builder (``build_engine``, ``plugin_extra_config``): the connector and plugin
engine tests, the benchmark harness (``testing.bench``) and ``scripts/gpu_check.py`` all build
their engines here. Everything LMCache-related is imported inside the functions, so importing
this module is cheap and never imports lmcache or vllm (collection of unrelated tests stays
fast).

Typical use::

    spec = KVSpec(num_layers=4, num_kv_heads=2, head_size=32, chunk_size=16)
    caches = make_paged_kv_cache(spec, num_blocks=8, block_size=16)
    slots = make_slot_mapping(70, num_blocks=8, block_size=16, seed=1)
    token_kv = make_token_kv(spec, 70, seed=2)          # [L, T, 2, H, D]
    write_token_kv(caches, token_kv, slots)              # as vLLM's attention would
    tokens = make_tokens(70, seed=3)
    with lmcache_engine({"local_cpu": True}, spec) as engine:
        run_store_layer(engine, tokens, caches, slots)
        fill_paged_kv_cache(caches, 7.0)
        ret_mask = run_retrieve_layer(engine, tokens, caches, slots).ret_mask
    for got, want in zip(caches, expected_paged_kv_cache(caches, token_kv, slots, ret_mask, 7.0)):
        assert_same_bytes(got, want)
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch

# LMCache phones home from every engine start unless told not to; tests must not.
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

LAYOUT_VLLM_CPU = "vllm_cpu"  # [NB, H, BS, 2*D]; K rows then V rows per (block, head)
LAYOUT_FLASH_ATTN = "flash_attn"  # [2, NB, BS, H, D]
LAYOUT_FLASH_INFER = "flash_infer"  # [NB, 2, BS, H, D]
LAYOUT_MLA = "mla"  # [NB, BS, D]: one latent per token, no K/V split


@dataclass(frozen=True)
class KVSpec:
    """Model-side numbers an engine is built for (per TP rank)."""

    num_layers: int = 4
    num_kv_heads: int = 2
    head_size: int = 32
    chunk_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    model_name: str = "s3layer/test-model"
    world_size: int = 1
    worker_id: int = 0
    use_mla: bool = False  # then num_kv_heads is 1 and head_size the latent width

    @property
    def hidden(self) -> int:
        return self.num_kv_heads * self.head_size

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        # LMCache's (num_layers, 2 | 1, chunk_size, num_kv_heads, head_size).
        return (self.num_layers, 1 if self.use_mla else 2, self.chunk_size, self.num_kv_heads, self.head_size)


def mla_spec(**overrides: Any) -> KVSpec:
    """A DeepSeek-V2-Lite-like MLA shape: 27 layers, one 576-wide latent (512 + 64 rope), bf16."""
    values: dict[str, Any] = dict(num_layers=27, num_kv_heads=1, head_size=576, chunk_size=16,
                                  dtype=torch.bfloat16, use_mla=True, model_name="s3layer/test-mla")
    values.update(overrides)
    return KVSpec(**values)


# Deterministic across processes, unlike the default "builtin" (whose NONE_HASH seed
# is a str hash, i.e. random per process without PYTHONHASHSEED). LMCache resolves it
# through vllm.utils.hashing, so vllm must be importable (it is in this venv).
DEFAULT_HASH_ALGORITHM = "sha256_cbor"

DEFAULT_CONFIG: dict[str, Any] = {
    "use_layerwise": True,
    "local_cpu": True,
    "max_local_cpu_size": 0.25,  # GB; the allocator is created eagerly
    "save_unfull_chunk": False,
    "pre_caching_hash_algorithm": DEFAULT_HASH_ALGORITHM,
    "enable_controller": False,
    "internal_api_server_enabled": False,
}


def make_config(overrides: Optional[dict] = None, spec: Optional[KVSpec] = None):
    """An ``LMCacheEngineConfig`` from :data:`DEFAULT_CONFIG` + ``overrides`` (plain keys)."""
    from lmcache.v1.config import LMCacheEngineConfig

    values = dict(DEFAULT_CONFIG)
    if spec is not None:
        values["chunk_size"] = spec.chunk_size
    values.update(overrides or {})
    return LMCacheEngineConfig.from_dict(values)


def make_metadata(spec: KVSpec, role: str = "worker"):
    from lmcache.v1.metadata import LMCacheMetadata

    return LMCacheMetadata(
        model_name=spec.model_name,
        world_size=spec.world_size,
        local_world_size=spec.world_size,
        worker_id=spec.worker_id,
        local_worker_id=spec.worker_id,
        kv_dtype=spec.dtype,
        kv_shape=spec.kv_shape,
        use_mla=spec.use_mla,
        role=role,
        chunk_size=spec.chunk_size,
    )


def make_cpu_connector(spec: KVSpec, **kwargs: Any):
    """Our :class:`CPULayerwiseConnector` for ``spec`` (``kwargs``: ``kv_layout``, ...)."""
    from lmcache_s3layer.integration.lmcache.cpu_connector import CPULayerwiseConnector

    return CPULayerwiseConnector.from_metadata(
        make_metadata(spec), device=torch.device("cpu"), **kwargs
    )


# ------------------------------------------------------------------ our plugin's config

_SECRET_ENV = "S3LAYER_TEST_ENGINE_SECRET"


def secret_ref(env_name: str, secret: str) -> str:
    """Put ``secret`` in the environment and return its ``env:`` reference, as the README tells
    users to write it: LMCache logs its whole config, ``extra_config`` included, so a literal
    would put it in every log (the secret-scanning tests read them)."""
    os.environ[env_name] = secret
    return f"env:{env_name}"


def plugin_extra_config(**settings: Any) -> dict:
    """LMCache ``extra_config`` that loads our plugin; each of ``settings`` (bucket,
    endpoint_url, credentials, ...) becomes ``s3layer.<name>``."""
    return {
        "storage_plugin.s3layer.module_path": "lmcache_s3layer.backend",
        "storage_plugin.s3layer.class_name": "S3LayerBackend",
        **{f"s3layer.{k}": v for k, v in settings.items()},
    }


def plugin_overrides(extra: dict, *, max_local_cpu_gb: Optional[float] = None) -> dict:
    """LMCache config overrides that make our plugin (``extra``: ``plugin_extra_config``) the
    storage tier: layerwise, LocalCPU as the staging allocator only."""
    cfg = {"local_cpu": False, "storage_plugins": ["s3layer"], "extra_config": extra}
    if max_local_cpu_gb is not None:
        cfg["max_local_cpu_size"] = max_local_cpu_gb
    return cfg


def plugin_engine_config(ep, bucket: str, *, max_local_cpu_gb: Optional[float] = None, **s3layer) -> dict:
    """``plugin_overrides`` for endpoint ``ep`` (the tests' ``S3Endpoint``); ``s3layer`` items
    become ``s3layer.<name>`` settings. The secret goes in as an ``env:`` reference."""
    settings = {"bucket": bucket, "endpoint_url": ep.endpoint_url, "access_key_id": ep.access_key,
                "secret_access_key": secret_ref(_SECRET_ENV, ep.secret_key), "region": ep.region, **s3layer}
    return plugin_overrides(plugin_extra_config(**settings), max_local_cpu_gb=max_local_cpu_gb)


# ------------------------------------------------------------------ the engine


def build_engine(
    config_overrides: Optional[dict],
    spec: KVSpec,
    connector: Any = None,
    instance_id: Optional[str] = None,
    *,
    connector_factory: Optional[Callable[[Any, Any], Any]] = None,
    name: str = "s3layer-test",
    release_on_failure: bool = False,
):
    """Build and ``post_init`` an ``LMCacheEngine`` the way LMCache's vLLM path does.

    Goes through ``LMCacheEngineBuilder.get_or_create`` (token database, stats logger)
    with no-op broadcast functions (single rank). ``connector`` defaults to
    ``connector_factory(config, metadata)`` if given, else a :class:`CPULayerwiseConnector`.
    The instance id is ``name`` plus a random suffix unless given. Release with
    :func:`destroy_engine`. ``release_on_failure``: an engine whose ``post_init`` raised is
    released here (off by default: the start-up tests check that the plugin's own clean-up
    stops LMCache's threads, as nothing else does in a vLLM worker).
    """
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    config = make_config(config_overrides, spec)
    metadata = make_metadata(spec)
    if connector is None:
        connector = connector_factory(config, metadata) if connector_factory else make_cpu_connector(spec)
    instance_id = instance_id or f"{name}-{uuid.uuid4().hex[:12]}"
    engine = LMCacheEngineBuilder.get_or_create(
        instance_id,
        config,
        metadata,
        connector,
        lambda tensor, src: tensor,
        lambda obj, src: obj,
    )
    engine._s3layer_instance_id = instance_id  # for destroy_engine
    try:
        engine.post_init()
    except BaseException:
        if release_on_failure:
            LMCacheEngineBuilder.destroy(instance_id)
        raise
    return engine


def plugin_backend(engine):
    """Our storage backend inside ``engine`` (KeyError when LMCache did not load it)."""
    return engine.storage_manager.storage_backends["s3layer"]


def destroy_engine(engine) -> None:
    """Close the engine and drop it from the builder (stats logger, storage threads)."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    instance_id = getattr(engine, "_s3layer_instance_id", None)
    if instance_id is not None:
        LMCacheEngineBuilder.destroy(instance_id)
    else:
        engine.close()


@contextlib.contextmanager
def lmcache_engine(
    config_overrides: Optional[dict],
    spec: KVSpec,
    connector: Any = None,
    **build: Any,
) -> Iterator[Any]:
    """:func:`build_engine` (``build``: its keyword arguments) as a context manager."""
    engine = build_engine(config_overrides, spec, connector, **build)
    try:
        yield engine
    finally:
        destroy_engine(engine)


# --------------------------------------------------------------------- paged caches
#
# Ground truth for "where does token t's K/V live" is the attention backend's own
# cache writer, not the connector under test: for the vLLM CPU layout that is vLLM's
# ``cpu_attn_reshape_and_cache`` kernel (its within-block packing depends on the ISA).

def make_paged_kv_cache(
    spec: KVSpec,
    num_blocks: int,
    block_size: int,
    layout: str = LAYOUT_VLLM_CPU,
    seed: int = 0,
    fill: Optional[float] = None,
) -> List[torch.Tensor]:
    """One tensor per layer in ``layout``: random (``seed``) unless ``fill`` is given.

    Random bytes are fine for round trips; to compare against the model's K/V, start
    from ``fill=0.0`` and put tokens in with :func:`write_token_kv`.
    """
    h, d = spec.num_kv_heads, spec.head_size
    if spec.use_mla:
        layout = LAYOUT_MLA
    shape = {
        LAYOUT_VLLM_CPU: (num_blocks, h, block_size, 2 * d),
        LAYOUT_FLASH_ATTN: (2, num_blocks, block_size, h, d),
        LAYOUT_FLASH_INFER: (num_blocks, 2, block_size, h, d),
        LAYOUT_MLA: (num_blocks, block_size, d),
    }[layout]
    if fill is not None:
        return [torch.full(shape, fill, dtype=spec.dtype) for _ in range(spec.num_layers)]
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=g, dtype=torch.float32).to(spec.dtype)
        for _ in range(spec.num_layers)
    ]


def fill_paged_kv_cache(kvcaches: Sequence[torch.Tensor], value: float) -> None:
    """Overwrite every slot, e.g. with a sentinel that random K/V never equals."""
    for t in kvcaches:
        t.fill_(value)


def zero_paged_kv_cache(kvcaches: Sequence[torch.Tensor]) -> None:
    fill_paged_kv_cache(kvcaches, 0.0)


def make_token_kv(spec: KVSpec, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """The model's K/V per token: ``[L, T, 2, H, D]`` (values exact in ``spec.dtype``)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(
        (spec.num_layers, num_tokens, 2, spec.num_kv_heads, spec.head_size),
        generator=g,
        dtype=torch.float32,
    )
    return kv.to(spec.dtype)


def vllm_cpu_isa(kvcache: torch.Tensor) -> str:
    """The attention ISA vLLM would use for this CPU cache (fixes its K/V packing)."""
    from lmcache_s3layer.integration.lmcache.cpu_connector import vllm_cpu_attn_isa

    nb, h, bs, two_d = kvcache.shape
    return vllm_cpu_attn_isa(kvcache.dtype, bs, two_d // 2)


def write_token_kv(
    kvcaches: Sequence[torch.Tensor],
    token_kv: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str = LAYOUT_VLLM_CPU,
    token_mask: Optional[torch.Tensor] = None,
) -> None:
    """Write ``token_kv`` (``[L, T, 2, H, D]``) the way the attention backend would.

    Slots < 0 are skipped; so are tokens where ``token_mask`` is False. The vLLM CPU
    layout goes through vLLM's real kernel (imports vllm; ~5 s the first time).
    """
    slots = slot_mapping.to(torch.long).clone()
    if token_mask is not None:
        slots[~token_mask] = -1
    if layout == LAYOUT_VLLM_CPU:
        import vllm._custom_ops as ops

        for layer, cache in enumerate(kvcaches):
            nb, h, bs, two_d = cache.shape
            key_cache, value_cache = cache.view(nb, h, 2 * bs, two_d // 2).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                token_kv[layer, :, 0].contiguous(),
                token_kv[layer, :, 1].contiguous(),
                key_cache,
                value_cache,
                slots,
                vllm_cpu_isa(cache),
            )
        return
    valid = slots >= 0
    for layer, cache in enumerate(kvcaches):
        bs = cache.shape[2]
        blk, off = slots[valid] // bs, slots[valid] % bs
        src = token_kv[layer, valid]  # [n, 2, H, D]
        if layout == LAYOUT_FLASH_ATTN:
            cache[0, blk, off] = src[:, 0]
            cache[1, blk, off] = src[:, 1]
        elif layout == LAYOUT_FLASH_INFER:
            cache[blk, 0, off] = src[:, 0]
            cache[blk, 1, off] = src[:, 1]
        else:
            raise ValueError(layout)


def expected_paged_kv_cache(
    like: Sequence[torch.Tensor],
    token_kv: torch.Tensor,
    slot_mapping: torch.Tensor,
    restored: torch.Tensor,
    fill: float,
    layout: str = LAYOUT_VLLM_CPU,
) -> List[torch.Tensor]:
    """What a ``fill``-ed cache must look like after exactly ``restored`` tokens were loaded."""
    out = [torch.full_like(t, fill) for t in like]
    write_token_kv(out, token_kv, slot_mapping, layout, token_mask=restored)
    return out


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    a = actual.contiguous().view(torch.uint8)
    e = expected.contiguous().view(torch.uint8)
    if not torch.equal(a, e):
        n = int((actual != expected).sum())
        raise AssertionError(f"{what}: {n} elements differ")


def kv_at(kvcache: torch.Tensor, slot: int, layout: str = LAYOUT_VLLM_CPU) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of one slot, each ``[H, D]``, by explicit element offsets.

    For the vLLM CPU layout the offsets follow the kernel's packing for the ISA vLLM
    would pick (vec/vec16: K column-major; amx: pair-packed groups); a separate code
    path from the connector's tensor views, and checked against the kernel in
    test_cpu_connector.
    """
    if layout == LAYOUT_VLLM_CPU:
        nb, h, bs, two_d = kvcache.shape
        d = two_d // 2
        flat = kvcache.view(nb, h, 2 * bs * d)
        b, o = divmod(slot, bs)
        dims = torch.arange(d)
        isa = vllm_cpu_isa(kvcache)
        if isa in ("vec", "vec16"):
            k_idx, v_idx = dims * bs + o, o * d + dims
        elif isa == "amx":
            k_idx = 2 * ((o // 16) * 16 * (d // 2) + (dims // 2) * 16 + o % 16) + dims % 2
            v_idx = (dims // 16) * bs * 16 + (o // 2) * 32 + (dims % 16) * 2 + o % 2
        else:
            raise NotImplementedError(isa)
        return flat[b][:, k_idx], flat[b][:, bs * d + v_idx]
    if layout == LAYOUT_FLASH_ATTN:
        b, o = divmod(slot, kvcache.shape[2])
        return kvcache[0, b, o], kvcache[1, b, o]
    if layout == LAYOUT_FLASH_INFER:
        b, o = divmod(slot, kvcache.shape[2])
        return kvcache[b, 0, o], kvcache[b, 1, o]
    if layout == LAYOUT_MLA:
        b, o = divmod(slot, kvcache.shape[1])
        return kvcache[b, o].view(1, -1), kvcache[b, o].view(1, -1)  # one latent, no K/V split
    raise ValueError(layout)


def snapshot_tokens(
    kvcaches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    layout: str = LAYOUT_VLLM_CPU,
) -> torch.Tensor:
    """``[L, T, 2, H, D]`` copy of every token's K/V (zeros where the slot is < 0); an MLA
    cache (3-D) gives its latent twice."""
    if kvcaches[0].dim() == 3:
        layout = LAYOUT_MLA
    first_k = kv_at(kvcaches[0], 0, layout)[0]
    out = torch.zeros((len(kvcaches), len(slot_mapping), 2, *first_k.shape), dtype=kvcaches[0].dtype)
    for layer, cache in enumerate(kvcaches):
        for t, slot in enumerate(slot_mapping.tolist()):
            if slot >= 0:
                out[layer, t, 0], out[layer, t, 1] = kv_at(cache, slot, layout)
    return out


def make_tokens(num_tokens: int, seed: int = 0, vocab: int = 32000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_tokens,), generator=g, dtype=torch.long)


def make_slot_mapping(
    num_tokens: int,
    num_blocks: int,
    block_size: int,
    seed: int = 0,
    padding_positions: Sequence[int] = (),
    avoid_last_slot: bool = True,
) -> torch.Tensor:
    """Distinct slots in shuffled blocks/offsets; ``padding_positions`` get -1.

    The cache's last slot stays unused by default, so a connector that lets -1
    index from the end (Python negative indexing) shows up as a write there.
    """
    usable = num_blocks * block_size - (1 if avoid_last_slot else 0)
    if num_tokens > usable:
        raise ValueError("not enough slots")
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(usable, generator=g)[:num_tokens].to(torch.long)
    for pos in padding_positions:
        slots[pos] = -1
    return slots


def chunk_layer_keys(engine, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """``[(start, end, [LayerCacheEngineKey per layer])]`` as store/retrieve_layer derive them."""
    return [
        (start, end, key.split_layers(engine.num_layers))
        for start, end, key in engine.token_database.process_tokens(tokens=tokens, mask=mask)
    ]


# ------------------------------------------------------------------ stepping drivers

@dataclass
class RetrieveResult:
    ret_mask: torch.Tensor
    first_yield: Any  # torch.sum(ret_mask) as yielded by step 1 (for SGLang)
    steps: int
    yields: List[Any] = field(default_factory=list)


def run_store_layer(
    engine,
    tokens: torch.Tensor,
    kvcaches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    sync: bool = True,
    between_layers: Optional[Callable[[int], None]] = None,
    **kwargs: Any,
) -> int:
    """Step ``engine.store_layer`` exactly as vLLM's adapter does; return the step count.

    One ``next()`` per layer (``save_kv_layer``), then one more (``wait_for_save``) which
    puts the last layer. Asserts the generator then ends, i.e. it yielded
    ``num_layers + 1`` times. ``between_layers(i)`` runs after step ``i + 1``.
    """
    gen = engine.store_layer(
        tokens,
        mask=mask,
        kvcaches=list(kvcaches),
        slot_mapping=slot_mapping,
        offset=0 if mask is None else int((~mask).sum()),
        sync=sync,
        req_id=kwargs.pop("req_id", "s3layer-test-store"),
        **kwargs,
    )
    steps = 0
    for layer in range(engine.num_layers + 1):
        next(gen)
        steps += 1
        if between_layers is not None and layer < engine.num_layers:
            between_layers(layer)
    _assert_exhausted(gen, "store_layer", engine.num_layers + 1)
    return steps


def run_retrieve_layer(
    engine,
    tokens: torch.Tensor,
    kvcaches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    sync: bool = True,
    between_layers: Optional[Callable[[int], None]] = None,
    **kwargs: Any,
) -> RetrieveResult:
    """Step ``engine.retrieve_layer`` as vLLM does: 2 ``next()`` in ``start_load_kv``,
    then one per layer in ``wait_for_layer_load``; ``num_layers + 2`` in all.

    The last yield is the boolean ``ret_mask``; the first is ``ret_mask.sum()``.
    ``between_layers(i)`` runs after the step that made layer ``i`` resident
    (step ``i + 2``).
    """
    gen = engine.retrieve_layer(
        tokens,
        mask=mask,
        kvcaches=list(kvcaches),
        slot_mapping=slot_mapping,
        sync=sync,
        req_id=kwargs.pop("req_id", "s3layer-test-retrieve"),
        **kwargs,
    )
    yields = []
    for step in range(engine.num_layers + 2):
        yields.append(next(gen))
        if between_layers is not None and 1 <= step <= engine.num_layers:
            between_layers(step - 1)
    _assert_exhausted(gen, "retrieve_layer", engine.num_layers + 2)
    ret_mask = yields[-1]
    assert isinstance(ret_mask, torch.Tensor) and ret_mask.dtype == torch.bool, ret_mask
    return RetrieveResult(ret_mask=ret_mask, first_yield=yields[0], steps=len(yields), yields=yields)


def _assert_exhausted(gen, name: str, expected_yields: int) -> None:
    try:
        next(gen)
    except StopIteration:
        return
    raise AssertionError(f"{name} yielded more than {expected_yields} times")
