"""LMCache 0.5.6 storage plugin: a table of LMCache methods -> ``S3LayerCore`` calls.

LMCache types stop here. Everything below speaks namespaces, chunk hashes and byte buffers.

Where each method runs (LMCache non-MP mode inside a vLLM worker):
- ``batched_contains`` / ``contains(pin=True)``: the worker's lookup server thread, on the
  scheduler's critical path (vLLM's ``get_num_new_matched_tokens``);
- ``contains(pin=False)``: the forward thread, once per chunk, in ``store_layer`` and
  ``retrieve_layer``; answered from memory;
- ``batched_submit_put_task``: the forward thread, once per layer (layerwise) or once per
  store (non-layerwise); never blocks on I/O;
- ``batched_get_non_blocking``: a coroutine on the StorageManager's event loop thread,
  once per layer; the blocking wait runs on our own executor so the loop stays free;
- ``get_blocking`` / ``batched_get_blocking``: the forward thread (non-layerwise retrieve).

Configure it in LMCache's YAML (see README, "Configuration"):
``storage_plugins: [s3layer]`` and, under ``extra_config``,
``storage_plugin.s3layer.module_path: lmcache_s3layer.backend`` /
``storage_plugin.s3layer.class_name: S3LayerBackend`` plus ``s3layer.*`` settings.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence

import torch

from lmcache.utils import CacheEngineKey, LayerCacheEngineKey
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from .config import S3LayerConfig
from .core import S3LayerCore
from .errors import ConfigError, RetrievalFailed, S3LayerError, StorageError
from .guards import StartupError, check_engine_config, plugin_name_of
from .layout import Namespace

log = logging.getLogger(__name__)


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
        self._handed: dict[tuple, list[MemoryObj]] = {}
        self._handed_lock = threading.Lock()
        extra = dict(getattr(config, "extra_config", None) or {})
        _warn_on_literal_secrets(extra)
        fail_fast = str(extra.get("s3layer.fail_fast", "true")).lower() not in ("0", "false", "no", "off")
        extra.pop("s3layer.fail_fast", None)
        try:
            self.cfg = S3LayerConfig.from_extra_config(extra)
            self.name = plugin_name_of(config, type(self))
            check_engine_config(config, self.cfg, self.name)
            if metadata is None:
                raise ConfigError("LMCache gave the plugin no engine metadata")
            self.num_layers = int(metadata.kv_shape[0])
            self.use_layerwise = bool(getattr(config, "use_layerwise", False))
            if local_cpu_backend is None:
                # Scheduler role: no KV moves here; lookups are answered by the workers.
                log.info("s3layer: no LocalCPUBackend (scheduler role); plugin idle in this process")
                return
            self._fmt = MemoryFormat.KV_T2D
            self._dtype = metadata.kv_dtype
            self._token_shape = _token_shape(metadata)
            allocator = MemoryObjAllocator(local_cpu_backend, self._dtype, self._token_shape, self._fmt)
            cfg = _fit_budget_to_pool(self.cfg, config)
            self.core = S3LayerCore(cfg, allocator=allocator)
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
        log.info("s3layer: bucket %s, prefix %r, %d layers, staging budget %d MiB, layerwise=%s",
                 self.cfg.bucket, self.cfg.prefix, self.num_layers, cfg.staging_budget_bytes >> 20,
                 self.use_layerwise)

    # ---- key translation -------------------------------------------------------------------

    def _ns(self, key: CacheEngineKey) -> Namespace:
        k = (key.model_name, key.world_size, key.worker_id, key._dtype_str, key.tags)
        ns = self._ns_cache.get(k)
        if ns is None:
            ns = self._ns_cache[k] = Namespace(key.model_name, key.world_size, key.worker_id,
                                               key._dtype_str, tuple(sorted(key.tags or ())))
        return ns

    @staticmethod
    def _is_primary(key: CacheEngineKey) -> bool:
        """LMCache pins/unpins all L layer keys of a chunk; we count the chunk once."""
        return not isinstance(key, LayerCacheEngineKey) or key.layer_id == 0

    # ---- lookup ----------------------------------------------------------------------------

    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        if self.core is None:
            return False
        ns = self._ns(key)
        if pin:
            return self.core.lookup(ns, [key.chunk_hash], pin=True, num_layers=self.num_layers,
                                    token_shape=self._token_shape) == 1
        return self.core.contains(ns, key.chunk_hash)

    def batched_contains(self, keys: List[CacheEngineKey], pin: bool = False) -> int:
        """Prefix hit count. Layerwise lookup passes the L layer keys of one chunk: one check
        for the chunk answers all of them (a chunk is committed with every layer or not at all)."""
        if self.core is None or not keys:
            return 0
        ns = self._ns(keys[0])
        if all(isinstance(k, LayerCacheEngineKey) for k in keys) and len({k.chunk_hash for k in keys}) == 1:
            hit = self.core.lookup(ns, [keys[0].chunk_hash], pin=pin, num_layers=self.num_layers,
                                   token_shape=self._token_shape)
            return len(keys) if hit else 0
        return self.core.lookup(ns, [k.chunk_hash for k in keys], pin=pin, num_layers=self.num_layers,
                                token_shape=self._token_shape)

    async def batched_async_contains(self, lookup_id: str, keys: List[CacheEngineKey], pin: bool = False) -> int:
        if self.core is None:
            return 0
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.batched_contains, keys, pin)

    def pin(self, key: CacheEngineKey) -> bool:
        if self.core is None:
            return False
        return self.core.pin(self._ns(key), key.chunk_hash) if self._is_primary(key) else \
            self.core.contains(self._ns(key), key.chunk_hash)

    def unpin(self, key: CacheEngineKey) -> bool:
        if self.core is None or not self._is_primary(key):
            return False
        return self.core.unpin(self._ns(key), key.chunk_hash)

    # ---- write -----------------------------------------------------------------------------

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        return self.core is not None and self.core.is_pending(self._ns(key), key.chunk_hash)

    def batched_submit_put_task(self, keys: Sequence[CacheEngineKey], objs: List[MemoryObj], transfer_spec=None,
                                on_complete_callback: Optional[Callable[[CacheEngineKey], None]] = None):
        if self.core is None or not keys:
            return None
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
                    if not self.core.put_layer(ns, layer, self.num_layers, [k.chunk_hash for k in keys], tokens,
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

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[CacheEngineKey],
                                       transfer_spec=None) -> list[MemoryObj]:
        """All chunks of one layer, complete, ordered and verified, or an exception.

        Never a short list: LMCache would silently leave those tokens unloaded (its
        ``batched_to_gpu`` zips objects with token ranges) while vLLM believes them loaded.
        """
        if self.core is None:
            raise RetrievalFailed("s3layer is not running in this process")
        if not keys:
            return []
        layer = keys[0].layer_id if isinstance(keys[0], LayerCacheEngineKey) else 0
        ns = self._ns(keys[0])
        hashes = [k.chunk_hash for k in keys]
        rid = (ns, tuple(hashes))
        fut = self._executor.submit(self.core.get_layer, ns, layer, hashes, self.num_layers)
        try:
            objs = await asyncio.wrap_future(fut)
        except RetrievalFailed:
            self._release_handed(rid)
            log.error("s3layer: layer %d of %d chunks could not be fetched and verified; failing this "
                      "retrieval (no partial KV is served)", layer, len(keys))
            raise
        with self._handed_lock:
            if layer == self.num_layers - 1:
                self._handed.pop(rid, None)  # LMCache counts down every layer's objects at the end
            else:
                self._handed.setdefault(rid, []).extend(objs)
        return objs

    def _release_handed(self, rid) -> None:
        # LMCache's retrieve_layer dies at ``task.result()`` and never reaches its
        # ref_count_down loop, so the layers we already handed out are ours to free.
        with self._handed_lock:
            objs = self._handed.pop(rid, [])
        for o in objs:
            o.ref_count_down()

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
        for key, layers in zip(keys, per_chunk):
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

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every accepted store is committed (tests, examples, graceful shutdown)."""
        if self.core is None:
            return True
        self._convert.submit(lambda: None).result(timeout=timeout)
        return self.core.flush(timeout)


def _token_shape(metadata) -> tuple[int, ...]:
    kv_shape = metadata.kv_shape  # (layers, 2 | 1, chunk, kv_heads, head_size)
    hidden = int(kv_shape[3]) * int(kv_shape[4])
    if getattr(metadata, "use_mla", False):
        return (hidden,)
    return (2, hidden)


def _fit_budget_to_pool(cfg: S3LayerConfig, config) -> S3LayerConfig:
    """Staging buffers come from LocalCPU's pool; a budget larger than the pool would only
    make allocations fail, so cap it (leaving room for stores) and say so."""
    pool = int(float(getattr(config, "max_local_cpu_size", 0) or 0) * 1024**3)
    if pool and cfg.staging_budget_bytes > pool * 3 // 4:
        capped = pool * 3 // 4
        log.warning("s3layer: staging_budget_bytes %d exceeds 3/4 of max_local_cpu_size (%d bytes); using %d",
                    cfg.staging_budget_bytes, pool, capped)
        return cfg.replace(staging_budget_bytes=capped)
    return cfg
