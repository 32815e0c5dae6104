"""LMCache 0.5.6 storage plugin: a table of LMCache methods -> ``S3LayerCore`` calls.

LMCache types stop here. Everything below speaks namespaces, chunk hashes and byte buffers.

Where each method runs (LMCache non-MP mode inside a vLLM worker):
- ``batched_contains`` / ``contains(pin=True)``: the worker's lookup server thread, on the
  scheduler's critical path (vLLM's ``get_num_new_matched_tokens``);
- ``contains(pin=False)``: the forward thread, once per chunk, in ``store_layer`` and
  ``retrieve_layer``; answered from memory;
- ``batched_submit_put_task``: the forward thread, once per layer (layerwise) or once per
  store (non-layerwise); never blocks on I/O;
- ``batched_get_non_blocking``: called on the forward thread (``retrieve_layer`` creates the
  request there, once per layer and retrieval, in stepping order); the coroutine it returns
  runs on the StorageManager's event loop thread and waits on our own executor, so the loop
  stays free;
- ``get_blocking`` / ``batched_get_blocking``: the forward thread (non-layerwise retrieve).

Configure it in LMCache's YAML (see README, "Configuration"):
``storage_plugins: [s3layer]`` and, under ``extra_config``,
``storage_plugin.s3layer.module_path: lmcache_s3layer.backend`` /
``storage_plugin.s3layer.class_name: S3LayerBackend`` plus ``s3layer.*`` settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch

from lmcache_s3layer.cache.core import S3LayerCore
from lmcache_s3layer.config import S3LayerConfig, parse_bool
from lmcache_s3layer.errors import ConfigError, FormatError, RetrievalFailed, S3LayerError, StorageError
from lmcache_s3layer.format.objects import Namespace
from lmcache_s3layer.integration import compat
from lmcache_s3layer.integration.compat import (
    CacheEngineKey,
    LayerCacheEngineKey,
    MemoryFormat,
    MemoryObj,
    StoragePluginInterface,
)
from lmcache_s3layer.integration.lmcache.guards import StartupError, check_engine_config, plugin_name_of
from lmcache_s3layer.integration.lmcache.handoff import HandOff, Retrieval

log = logging.getLogger(__name__)

_ALL = object()  # prefetch_suppressed() without hashes: no chunk is prefetched


class MemoryObjAllocator:
    """Staging buffers are LMCache MemoryObjs from the LocalCPUBackend, so a fetched layer is
    handed over without a copy. ``busy_loop=False``: with ``local_cpu: false`` the busy loop
    never evicts and can spin forever (LMCache #2942); a full pool means "try again later"."""

    def __init__(self, local_cpu_backend, dtype: torch.dtype, token_shape: Sequence[int], fmt: MemoryFormat):
        self._lcb = local_cpu_backend
        self._dtype = dtype
        self._token_shape = tuple(token_shape)
        self._fmt = fmt

    def allocate(self, tokens: int, nbytes: int):
        obj = self._lcb.allocate(torch.Size([tokens, *self._token_shape]), self._dtype, fmt=self._fmt,
                                 eviction=True, busy_loop=False)
        if obj is None:
            return None
        view = memoryview(obj.byte_array).cast("B")
        if len(view) != nbytes:
            obj.ref_count_down()
            raise StorageError(f"staging buffer has {len(view)} bytes, expected {nbytes}: "
                               "the stored KV shape does not match this engine's")
        return obj, view

    def release(self, handle: MemoryObj) -> None:
        handle.ref_count_down()


def _warn_on_literal_secrets(extra: dict) -> None:
    """LMCache has already logged its whole configuration, extra_config included, by the time
    a plugin is built: a literal secret there is in the log. Say so (never the value)."""
    for key in ("s3layer.secret_access_key", "s3layer.session_token"):
        value = extra.get(key)
        if isinstance(value, str) and value and not value.startswith("env:"):
            log.warning("%s is written literally in LMCache's extra_config, so LMCache's start-up "
                        "log line of its configuration contains it; use env:NAME or the AWS "
                        "credential chain instead, and rotate this secret", key)


class S3LayerBackend(StoragePluginInterface):
    def __init__(self, dst_device: str = "cpu", config=None, metadata=None, local_cpu_backend=None, loop=None):
        super().__init__(dst_device=dst_device, config=config, metadata=metadata,
                         local_cpu_backend=local_cpu_backend, loop=loop)
        self.core: S3LayerCore | None = None
        self._ns_cache: dict[tuple, Namespace] = {}
        self._handoff: HandOff | None = None
        self._no_prefetch = threading.local()
        extra = dict(getattr(config, "extra_config", None) or {})
        _warn_on_literal_secrets(extra)
        fail_fast_error: ConfigError | None = None
        try:
            fail_fast = parse_bool(extra.pop("s3layer.fail_fast", True), "s3layer.fail_fast")
        except ConfigError as exc:
            fail_fast, fail_fast_error = True, exc  # a switch we cannot read fails safe: stop
        try:
            if fail_fast_error is not None:
                raise fail_fast_error
            # First: every LMCache internal used below exists in this LMCache (else a clear
            # error naming it, not an AttributeError in the forward path later).
            compat.check_versions("plugin")
            self.cfg = S3LayerConfig.from_extra_config(extra)
            self.name = plugin_name_of(config, type(self))
            if metadata is None:
                raise ConfigError("LMCache gave the plugin no engine metadata")
            check_engine_config(config, self.cfg, self.name, metadata=metadata)
            self.num_layers = int(metadata.kv_shape[0])
            self.use_layerwise = bool(getattr(config, "use_layerwise", False))
            self.use_mla = bool(getattr(metadata, "use_mla", False))
            # With MLA every TP rank holds the same latent KV and LMCache collapses the keys'
            # world size to 1 (save_only_first_rank): rank 0 stores, every rank reads rank
            # 0's objects. Ranks > 0 get no lookup (LMCache runs the MLA lookup server on
            # rank 0 only), so their forward-path ``contains`` must resolve misses itself.
            self._follower = self.use_mla and int(getattr(metadata, "worker_id", 0)) > 0
            _check_namespace(metadata)
            if local_cpu_backend is None:
                # Scheduler role: no KV moves here; lookups are answered by the workers.
                log.info("s3layer: no LocalCPUBackend (scheduler role); plugin idle in this process")
                return
            compat.check_instance(local_cpu_backend, ("allocate", "close"), "LMCache's LocalCPUBackend")
            # LMCache's layerwise connectors assert the per-layer format: [T, 2, D] for
            # K/V models, [T, D] for MLA's single latent.
            self._fmt = MemoryFormat.KV_MLA_FMT if self.use_mla else MemoryFormat.KV_T2D
            self._dtype = metadata.kv_dtype
            self._token_shape = _token_shape(metadata)
            allocator = MemoryObjAllocator(local_cpu_backend, self._dtype, self._token_shape, self._fmt)
            cfg = _fit_budget_to_pool(self.cfg, config, local_cpu_backend)
            # LMCache fills a store's buffers with asynchronous device copies and puts them
            # when its sync flags say so, which only the first storing request of a step
            # has: an upload reads them only after a device fence.
            fence = device_fence(dst_device)
            self.core = S3LayerCore(cfg, allocator=allocator, before_read=fence)
            self.core.client.check_bucket()
        except (S3LayerError, ValueError) as exc:
            msg = (f"lmcache-s3layer could not start: {exc}. The KV cache would silently do nothing, "
                   "so start-up stops here (set s3layer.fail_fast: false to run without the cache).")
            if self.core is not None:
                self.core.close()
                self.core = None
            if fail_fast:
                # The StorageManager that is constructing us started its event-loop thread
                # (not a daemon) and will never be closed once we raise: stop the loop, or the
                # failed process could never exit.
                if loop is not None:
                    loop.call_soon_threadsafe(loop.stop)
                # BaseException on purpose: LMCache's plugin launcher catches Exception and
                # only logs it, which would leave a server running without its cache.
                raise StartupError(msg) from exc
            log.error(msg)
            return
        self._executor = ThreadPoolExecutor(8, thread_name_prefix="s3layer-handoff")
        self._convert = ThreadPoolExecutor(1, thread_name_prefix="s3layer-2ltd")
        self._handoff = HandOff(fence)
        # StorageManager closes its backends in creation order, LocalCPU first and plugins
        # last, so our prefetch workers, uploads and hand-off releases would otherwise still be
        # writing into, reading from or returning buffers of a pool already freed.
        compat.run_before_local_cpu_close(local_cpu_backend, self.close)
        log.info("s3layer: bucket %s, prefix %r, %d layers, staging budget %d MiB, layerwise=%s",
                 self.cfg.bucket, self.cfg.prefix, self.num_layers, cfg.staging_budget_bytes >> 20,
                 self.use_layerwise)

    # ---- key translation -------------------------------------------------------------------

    def _ns(self, key: CacheEngineKey) -> Namespace:
        dtype = compat.key_dtype_name(key)
        k = (key.model_name, key.world_size, key.worker_id, dtype, key.tags)
        ns = self._ns_cache.get(k)
        if ns is None:
            # A key whose worker id is past its world size is LMCache's MLA collapse
            # (world size 1 on every rank): every rank shares rank 0's objects.
            worker = key.worker_id if key.worker_id < key.world_size else 0
            ns = self._ns_cache[k] = Namespace(key.model_name, key.world_size, worker,
                                               dtype, tuple(sorted(key.tags or ())))
        return ns

    def _ns_or_none(self, key: CacheEngineKey) -> Namespace | None:
        """The namespace of a key, or None (a miss) for a key no object can belong to: a
        lookup must never raise into LMCache's forward path."""
        try:
            return self._ns(key)
        except FormatError as exc:
            log.warning("s3layer: treating key %s as a miss: %s", key.to_string(), exc)
            return None

    def _is_mla_copy(self, key: CacheEngineKey) -> bool:
        """A store of MLA KV by a rank > 0: the same bytes rank 0 stores."""
        return self.use_mla and key.worker_id >= key.world_size

    @contextlib.contextmanager
    def prefetch_suppressed(self, chunk_hashes: Optional[Iterable[int]] = None):
        """Pinned look-ups on this thread inside the block answer and pin as usual but start
        no prefetch for these chunks (all chunks when None): chunks the engine already holds
        (vLLM's own prefix cache), which LMCache will not retrieve. LMCache's lookup server
        calls ``contains``/``batched_contains`` synchronously on its own thread, so a
        thread-local reaches exactly that look-up. Such a chunk is still fetched on demand if
        a retrieval asks for it after all."""
        before = getattr(self._no_prefetch, "hashes", None)
        self._no_prefetch.hashes = _ALL if chunk_hashes is None else frozenset(chunk_hashes)
        try:
            yield
        finally:
            self._no_prefetch.hashes = before

    def _lookup(self, ns: Namespace, hashes: list[int], pin: bool) -> int:
        skip = getattr(self._no_prefetch, "hashes", None)
        # The chunks vLLM holds are a prefix of any look-up (hashes are chained from token 0).
        n = 0 if skip is None else len(hashes) if skip is _ALL else \
            next((i for i, h in enumerate(hashes) if h not in skip), len(hashes))
        hits = self._core_lookup(ns, hashes[:n], pin, prefetch=False) if n else 0
        if hits < n or n == len(hashes):
            return hits
        return hits + self._core_lookup(ns, hashes[n:], pin, prefetch=None)

    def _core_lookup(self, ns: Namespace, hashes: list[int], pin: bool, prefetch: bool | None) -> int:
        assert self.core is not None  # callers return early when the plugin is not running
        return self.core.lookup(ns, hashes, pin=pin, num_layers=self.num_layers, token_shape=self._token_shape,
                                prefetch=prefetch)

    @staticmethod
    def _is_primary(key: CacheEngineKey) -> bool:
        """LMCache pins/unpins all L layer keys of a chunk; we count the chunk once."""
        return not isinstance(key, LayerCacheEngineKey) or key.layer_id == 0

    # ---- lookup ----------------------------------------------------------------------------

    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        if self.core is None:
            return False
        ns = self._ns_or_none(key)
        if ns is None:
            return False
        if pin:
            return self._lookup(ns, [key.chunk_hash], True) == 1
        if self.core.contains(ns, key.chunk_hash):
            return True
        # An MLA follower rank was never asked to look up: resolve from the store (pointer
        # look-ups bounded by lookup_timeout_s, misses remembered by the negative cache).
        return self._follower and self._lookup(ns, [key.chunk_hash], False) == 1

    def batched_contains(self, keys: List[CacheEngineKey], pin: bool = False) -> int:
        """Prefix hit count. Layerwise lookup passes the L layer keys of one chunk: one check
        for the chunk answers all of them (a chunk is committed with every layer or not at all)."""
        if self.core is None or not keys:
            return 0
        ns = self._ns_or_none(keys[0])
        if ns is None:
            return 0
        if all(isinstance(k, LayerCacheEngineKey) for k in keys) and len({k.chunk_hash for k in keys}) == 1:
            return len(keys) if self._lookup(ns, [keys[0].chunk_hash], pin) else 0
        return self._lookup(ns, [k.chunk_hash for k in keys], pin)

    async def batched_async_contains(self, lookup_id: str, keys: List[CacheEngineKey], pin: bool = False) -> int:
        if self.core is None:
            return 0
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.batched_contains, keys, pin)

    def _target(self, key: CacheEngineKey) -> tuple[S3LayerCore, Namespace] | None:
        """The running core and the key's namespace, or None (not running, or no namespace)."""
        core = self.core
        ns = None if core is None else self._ns_or_none(key)
        return None if core is None or ns is None else (core, ns)

    def pin(self, key: CacheEngineKey) -> bool:
        target = self._target(key)
        if target is None:
            return False
        core, ns = target
        return core.pin(ns, key.chunk_hash) if self._is_primary(key) else core.contains(ns, key.chunk_hash)

    def unpin(self, key: CacheEngineKey) -> bool:
        target = self._target(key) if self._is_primary(key) else None
        if target is None:
            return False
        core, ns = target
        return core.unpin(ns, key.chunk_hash)

    # ---- write -----------------------------------------------------------------------------

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        target = self._target(key)
        return target is not None and target[0].is_pending(target[1], key.chunk_hash)

    def batched_submit_put_task(self, keys: Sequence[CacheEngineKey], objs: List[MemoryObj], transfer_spec=None,
                                on_complete_callback: Optional[Callable[[CacheEngineKey], None]] = None):
        if self.core is None or not keys or self._is_mla_copy(keys[0]):
            return None  # (LMCache drops its reference to objs when we return)
        fmt = objs[0].get_memory_format()
        if fmt == MemoryFormat.KV_2LTD:
            self._put_2ltd(list(keys), list(objs), on_complete_callback)
            return None
        if not all(isinstance(k, LayerCacheEngineKey) for k in keys):
            log.warning("s3layer: ignoring a put of %s objects without layer keys", fmt)
            return None
        layer = keys[0].layer_id
        for o in objs:
            o.ref_count_up()  # StorageManager drops its reference as soon as we return

        def release() -> None:
            for o in objs:
                o.ref_count_down()
            if on_complete_callback is not None:
                for k in keys:
                    on_complete_callback(k)

        tokens = [int(o.get_shape()[0]) for o in objs]
        shape = tuple(int(d) for d in objs[0].get_shape()[1:])
        self.core.put_layer(self._ns(keys[0]), layer, self.num_layers, [k.chunk_hash for k in keys], tokens,
                            shape, [o.byte_array for o in objs], release)
        return None

    def _put_2ltd(self, keys: list[CacheEngineKey], objs: list[MemoryObj], on_complete) -> None:
        """Non-layerwise chunks ([2, L, T, D]) are stored as the same layer-major segments, so a
        cache written in one mode is read in the other. The transpose runs off the caller."""
        core = self.core
        assert core is not None  # the caller checked; the convert thread keeps this one
        for o in objs:
            o.ref_count_up()
        ns = self._ns(keys[0])

        def convert() -> None:
            try:
                tokens = [int(o.get_shape()[2]) for o in objs]
                for layer in range(self.num_layers):
                    bufs = [o.tensor[:, layer].permute(1, 0, 2).contiguous() for o in objs]
                    views = [b.view(torch.uint8).numpy() for b in bufs]
                    shape = tuple(int(d) for d in bufs[0].shape[1:])
                    if not core.put_layer(ns, layer, self.num_layers, [k.chunk_hash for k in keys], tokens,
                                               shape, views, lambda: None):
                        break
            except Exception as exc:  # noqa: BLE001 - a failed store is only a future miss
                log.warning("s3layer: non-layerwise store failed: %s", exc)
            finally:
                for o in objs:
                    o.ref_count_down()
                if on_complete is not None:
                    for k in keys:
                        on_complete(k)

        self._convert.submit(convert)

    # ---- layerwise read --------------------------------------------------------------------

    def batched_get_non_blocking(self, lookup_id: str, keys: list[CacheEngineKey],
                                 transfer_spec=None):
        """All chunks of one layer, complete, ordered and verified, or an exception.

        Never a short list: LMCache would silently leave those tokens unloaded (its
        ``batched_to_gpu`` zips objects with token ranges) while vLLM believes them loaded.

        Deliberately a plain method returning the coroutine: LMCache calls it on the forward
        thread, in stepping order, which is what tells the hand-off which retrieval a request
        belongs to (``handoff.HandOff``); the coroutine then runs on LMCache's event loop.
        """
        core, handoff = self.core, self._handoff
        if core is None or handoff is None:
            return self._not_running()
        if not keys:
            return self._nothing()
        layer = keys[0].layer_id if isinstance(keys[0], LayerCacheEngineKey) else 0
        ns = self._ns(keys[0])
        retrieval = handoff.begin((ns, tuple(k.chunk_hash for k in keys)), layer)
        return self._get_layer(core, handoff, ns, layer, keys, retrieval)

    @staticmethod
    async def _not_running() -> list[MemoryObj]:
        raise RetrievalFailed("s3layer is not running in this process")

    @staticmethod
    async def _nothing() -> list[MemoryObj]:
        return []

    async def _get_layer(self, core: S3LayerCore, handoff: HandOff, ns: Namespace, layer: int,
                         keys: list[CacheEngineKey], retrieval: Retrieval) -> list[MemoryObj]:
        fut = self._executor.submit(core.get_layer, ns, layer, [k.chunk_hash for k in keys], self.num_layers)
        try:
            objs = await asyncio.wrap_future(fut)
        except RetrievalFailed:
            handoff.failed(retrieval)
            log.error("s3layer: layer %d of %d chunks could not be fetched and verified; failing this "
                      "retrieval (no partial KV is served)", layer, len(keys))
            raise
        handoff.handed(retrieval, objs, last=layer == self.num_layers - 1)
        return objs

    # ---- non-layerwise read ----------------------------------------------------------------

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return self.batched_get_blocking([key])[0]

    def batched_get_blocking(self, keys: List[CacheEngineKey]) -> List[Optional[MemoryObj]]:
        """``KV_2LTD`` chunks reassembled from layer ranges; None from the first failed chunk
        on (LMCache's non-layerwise retrieve handles a None as a shorter prefix)."""
        if self.core is None or not keys:
            return [None] * len(keys)
        ns = self._ns(keys[0])
        per_chunk = self.core.read_chunks_all_layers(ns, [k.chunk_hash for k in keys])
        out: list[Optional[MemoryObj]] = []
        for _key, layers in zip(keys, per_chunk):
            if layers is None or (out and out[-1] is None):
                out.append(None)
                continue
            out.append(self._assemble_2ltd(layers))
        return out

    def _assemble_2ltd(self, layers: list[memoryview]) -> Optional[MemoryObj]:
        hidden = self._token_shape[-1]
        per_layer = [torch.frombuffer(bytearray(v), dtype=self._dtype).view(-1, *self._token_shape) for v in layers]
        tokens = per_layer[0].shape[0]
        obj = self.local_cpu_backend.allocate(torch.Size([2, len(layers), tokens, hidden]), self._dtype,
                                              fmt=MemoryFormat.KV_2LTD, eviction=True, busy_loop=False)
        if obj is None:
            return None
        for l, t in enumerate(per_layer):
            obj.tensor[:, l].copy_(t.permute(1, 0, 2))
        return obj

    # ---- the rest of the interface ---------------------------------------------------------

    def remove(self, key: CacheEngineKey, force: bool = True) -> bool:
        # The bucket is shared by every engine and outlives this process: deleting is gc's job
        # (``lmcache-s3layer gc``), never a side effect of one engine's local eviction.
        return False

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
            self.core = None
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._convert.shutdown(wait=True)
            if self._handoff is not None:
                self._handoff.close()

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every accepted store is committed (tests, examples, graceful shutdown)."""
        if self.core is None:
            return True
        self._convert.submit(lambda: None).result(timeout=timeout)
        return self.core.flush(timeout)


def device_fence(dst_device: Any) -> Callable[[], None]:
    """A call that returns once every device copy queued before it has finished."""
    device = torch.device(dst_device or "cpu")
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    # CPU: LMCache's copies are synchronous, except in the CPU connector's deferred copy
    # mode, which models a device's streams and has its own synchronisation.
    from lmcache_s3layer.integration.lmcache.cpu_connector import device_synchronize

    return device_synchronize


def _check_namespace(metadata) -> None:
    """Refuse at start-up an engine whose keys no object could be stored under."""
    dtype = compat.dtype_name(metadata.kv_dtype)
    if dtype is None:
        raise ConfigError(f"KV cache dtype {metadata.kv_dtype} has no LMCache name")
    Namespace(str(metadata.model_name), int(metadata.world_size), 0, dtype)


def _token_shape(metadata) -> tuple[int, ...]:
    kv_shape = metadata.kv_shape  # (layers, 2 | 1, chunk, kv_heads, head_size)
    hidden = int(kv_shape[3]) * int(kv_shape[4])
    if getattr(metadata, "use_mla", False):
        return (hidden,)
    return (2, hidden)


def _fit_budget_to_pool(cfg: S3LayerConfig, config, local_cpu_backend=None) -> S3LayerConfig:
    """Fit the read path to LocalCPU's pool, as really allocated (LMCache may size it other
    than ``max_local_cpu_size``): staging buffers come from it, so a staging budget larger
    than the pool would only make allocations fail (capped at 3/4, leaving room for stores);
    and LMCache holds every layer it was handed in it until a retrieval ends, so look-ups may
    promise no more than it holds (``handoff_budget_bytes``; a smaller user setting stands)."""
    pool = compat.local_cpu_pool_bytes(local_cpu_backend)
    if pool <= 0:
        pool = int(float(getattr(config, "max_local_cpu_size", 0) or 0) * 1024**3)
    if pool <= 0:
        return cfg
    align = compat.local_cpu_align_bytes(local_cpu_backend)
    changes: dict[str, int] = {"handoff_budget_bytes": min(cfg.handoff_budget_bytes or pool, pool)}
    if align is not None:
        changes["handoff_align_bytes"] = align
    if cfg.staging_budget_bytes > pool * 3 // 4:
        changes["staging_budget_bytes"] = pool * 3 // 4
        log.warning("s3layer: staging_budget_bytes %d exceeds 3/4 of LMCache's CPU pool (%d bytes); using %d",
                    cfg.staging_budget_bytes, pool, changes["staging_budget_bytes"])
    log.info("s3layer: LMCache CPU pool %d bytes; look-ups may promise retrievals up to %d bytes of it",
             pool, changes["handoff_budget_bytes"])
    return cfg.replace(**changes)
