"""Unit tests of ``lmcache_s3layer.integration.vllm.connector``'s load-failure guard, the TP step agreement
and the vLLM prefix-cache lookup hint.

The worker-side tests drive LMCache 0.5.6's *real* adapter methods (``start_load_kv``,
``wait_for_layer_load``, ``save_kv_layer``, ``wait_for_save``, ``record_failed_blocks``,
``get_num_new_matched_tokens``) bound to a small fake ``LMCacheConnectorV1Impl``, so the call
pattern (which retrieval gets ``sync=True``, how many ``next()`` each generator gets, when)
is LMCache's own, over a fake engine that models the CUDA connector's shared load stream.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

from lmcache_s3layer.errors import RetrievalFailed  # noqa: E402
from lmcache_s3layer.integration.vllm import connector as vc  # noqa: E402

NUM_LAYERS = 4
CHUNK = 16
BLOCK = 16


# ------------------------------------------------------------------------------------------
# a fake engine with a model of the CUDA layerwise connector's streams


class StreamModel:
    """One shared load stream and the compute stream's waits on it (what LMCache's
    ``current_stream.wait_stream(load_stream)`` orders): a copy has landed for attention once
    the compute stream waited after it was enqueued."""

    def __init__(self) -> None:
        self.load: list[tuple[str, int]] = []
        self.waited = 0

    def enqueue(self, item: tuple[str, int]) -> None:
        self.load.append(item)

    def wait(self) -> None:
        self.waited = len(self.load)

    def landed(self) -> set[tuple[str, int]]:
        return set(self.load[: self.waited])


class FakeLoadStream:
    def __init__(self, model: StreamModel):
        self.model = model


class FakeComputeStream:
    def wait_stream(self, stream: FakeLoadStream) -> None:
        stream.model.wait()


@pytest.fixture
def fake_cuda_streams(monkeypatch):
    """The guard's CUDA fence path, over the fake streams."""
    monkeypatch.setattr(vc, "_compute_stream_for",
                        lambda s: FakeComputeStream() if isinstance(s, FakeLoadStream) else None,
                        raising=False)


class FakeEngine:
    """``retrieve_layer``/``store_layer`` with LMCache's yield counts. A retrieval models
    ``retrieve_layer`` + ``VLLMPagedMemLayerwiseGPUConnector.batched_to_gpu``: step ``k + 2``
    takes layer ``k`` (where a failed download raises), waits on the load stream if ``sync``,
    then enqueues the layer's copy; the last step waits if ``sync``."""

    def __init__(self, num_layers: int = NUM_LAYERS):
        self.num_layers = num_layers
        self.streams = StreamModel()
        self.gpu_connector = SimpleNamespace(load_stream=FakeLoadStream(self.streams))
        self.plans: dict[int, dict] = {}  # first token -> {"req", "fail_at", "delay_at", "delay_s"}
        self.sync_flags: dict[str, bool] = {}
        self.store_calls: list[str] = []
        self.stored_layers: list[tuple[str, int]] = []
        self.puts: list[str] = []

    def plan(self, req: str, first_token: int, fail_at: Optional[int] = None,
             delay_at: Optional[int] = None, delay_s: float = 0.0) -> None:
        self.plans[first_token] = dict(req=req, fail_at=fail_at, delay_at=delay_at, delay_s=delay_s)

    def retrieve_layer(self, tokens, mask=None, **kw):
        plan = self.plans[int(tokens[0])]
        req, sync = plan["req"], bool(kw["sync"])
        self.sync_flags[req] = sync
        wanted = torch.ones(len(tokens), dtype=torch.bool) if mask is None else mask.clone()
        yield wanted.sum()
        for layer in range(self.num_layers):
            if plan["delay_at"] == layer:
                time.sleep(plan["delay_s"])
            if plan["fail_at"] == layer:
                raise RetrievalFailed(f"{req}: layer {layer} is gone")
            if sync:
                self.streams.wait()
            self.streams.enqueue((req, layer))
            yield None
        if sync:
            self.streams.wait()
        yield wanted

    def store_layer(self, tokens, mask=None, **kw):
        req = kw["req_id"]
        self.store_calls.append(req)
        for layer in range(self.num_layers):
            self.stored_layers.append((req, layer))
            yield None
        self.puts.append(req)
        yield None

    def lookup_unpin(self, req_id) -> None:
        pass


def _adapter_class():
    from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl as Impl

    class FakeImpl:
        """Just the state LMCache's layerwise worker methods read; the methods are LMCache's."""

        start_load_kv = Impl.start_load_kv
        wait_for_layer_load = Impl.wait_for_layer_load
        save_kv_layer = Impl.save_kv_layer
        wait_for_save = Impl.wait_for_save
        record_failed_blocks = Impl.record_failed_blocks
        get_block_ids_with_load_errors = Impl.get_block_ids_with_load_errors

        def __init__(self, engine: FakeEngine):
            self.lmcache_engine = engine
            self.num_layers = engine.num_layers
            self.use_layerwise = True
            self.enable_blending = False
            self.kv_role = "kv_both"
            self.device = "cpu"
            self.kv_caches = {f"layer{i}": torch.zeros(1) for i in range(engine.num_layers)}
            self.current_layer = 0
            self.layerwise_retrievers = []
            self._layerwise_save_storers = {}
            self._invalid_block_ids = set()
            self._lmcache_chunk_size = CHUNK
            self._block_size = BLOCK
            self._stats_monitor = SimpleNamespace(update_interval_vllm_hit_tokens=lambda n: None,
                                                  update_interval_prompt_tokens=lambda n: None)
            self._parent = SimpleNamespace(_connector_metadata=None)
            self._parent._get_connector_metadata = lambda: self._parent._connector_metadata

    return FakeImpl


def make_impl(engine: Optional[FakeEngine] = None):
    return _adapter_class()(engine or FakeEngine())


def req_meta(req: str, first_token: int, num_tokens: int, *, load: int = 0, vllm_cached: int = 0,
             save_from: Optional[int] = None):
    """A request of the step: loads its first ``load`` tokens (LMCache hit) if ``load``, and
    stores from ``save_from`` on if given. Slots: block ``first_token // 100`` and up."""
    from lmcache.integration.vllm.vllm_v1_adapter import LoadSpec, ReqMeta, SaveSpec

    base = (first_token // 100) * 4 * BLOCK
    return ReqMeta(
        req_id=req,
        token_ids=list(range(first_token, first_token + num_tokens)),
        slot_mapping=torch.arange(base, base + num_tokens, dtype=torch.long),
        load_spec=(LoadSpec(vllm_cached_tokens=vllm_cached, lmcache_cached_tokens=load, can_load=True)
                   if load else None),
        save_spec=SaveSpec(skip_leading_tokens=save_from, can_save=True) if save_from is not None else None,
    )


def run_step(impl, guard: vc.LoadFailureGuard, requests: list, on_attention=None) -> set[int]:
    """One vLLM step through LMCache's adapter methods, as ``S3LayerConnectorV1`` wires them;
    returns the block ids reported as failed."""
    from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata

    metadata = LMCacheConnectorMetadata(requests=list(requests))
    impl._parent._connector_metadata = metadata
    guard.begin_step(metadata)
    impl.start_load_kv(SimpleNamespace(attn_metadata=object()))
    for layer in range(impl.num_layers):
        impl.wait_for_layer_load(f"layer{layer}")
        if on_attention is not None:
            on_attention(layer)
        impl.save_kv_layer(f"layer{layer}", None, None)
    impl.wait_for_save()
    impl._parent._connector_metadata = None
    return set(impl.get_block_ids_with_load_errors()) | guard.take_invalid_blocks()


def loads_landed_check(engine: FakeEngine, ok_requests: list[str]):
    """``on_attention``: every loaded layer of a request that loaded fine must have landed
    before attention reads that layer."""
    seen = []

    def check(layer: int) -> None:
        landed = engine.streams.landed()
        missing = [r for r in ok_requests if (r, layer) not in landed]
        assert not missing, f"attention of layer {layer} would read KV of {missing} before it lands"
        seen.append(layer)

    check.seen = seen
    return check


# ------------------------------------------------------------------------------------------
# 1. batched loads: the sync retrieval fails


def test_lmcache_makes_only_the_last_loading_request_sync(fake_cuda_streams):
    """The premise of the fence: LMCache 0.5.6 creates one sync retrieval per step, the last."""
    engine = FakeEngine()
    impl = make_impl(engine)
    guard = vc.LoadFailureGuard(impl)
    for i, req in enumerate("ABC"):
        engine.plan(req, 100 * (i + 1))
    check = loads_landed_check(engine, list("ABC"))
    run_step(impl, guard, [req_meta(r, 100 * (i + 1), 48, load=32) for i, r in enumerate("ABC")], check)
    assert engine.sync_flags == {"A": False, "B": False, "C": True}
    assert check.seen == list(range(NUM_LAYERS))
    assert getattr(guard.stats, "load_fences", 0) == 0


def test_failed_sync_retrieval_still_orders_the_other_requests_loads(fake_cuda_streams):
    """C (the step's only sync retrieval) fails at layer 1: A's and B's copies of layers 1.. must
    still be waited for before attention reads them. Fails without the guard's load fence."""
    engine = FakeEngine()
    impl = make_impl(engine)
    guard = vc.LoadFailureGuard(impl)
    engine.plan("A", 100)
    engine.plan("B", 200)
    engine.plan("C", 300, fail_at=1)
    check = loads_landed_check(engine, ["A", "B"])
    invalid = run_step(impl, guard, [req_meta("A", 100, 48, load=32), req_meta("B", 200, 48, load=32),
                                     req_meta("C", 300, 48, load=32)], check)
    assert check.seen == list(range(NUM_LAYERS))
    # Everything enqueued (C's layer 0 too, which vLLM will overwrite on recompute) has landed
    # by the end of the step.
    assert engine.streams.waited == len(engine.streams.load)
    assert guard.stats.retrievals_failed == 1 and guard.stats.load_fences == NUM_LAYERS  # its steps 3 .. L+2
    assert invalid == {(300 // 100) * 4 + 0, (300 // 100) * 4 + 1}  # C's two loaded blocks


@pytest.mark.parametrize("fail_at", [0, 2, NUM_LAYERS - 1])
def test_single_failed_sync_retrieval_lands_its_own_copies(fake_cuda_streams, fail_at):
    """A step's only retrieval fails: the copies it enqueued before failing are waited for
    within the step (vLLM recomputes into those blocks next step)."""
    engine = FakeEngine()
    impl = make_impl(engine)
    guard = vc.LoadFailureGuard(impl)
    engine.plan("A", 100, fail_at=fail_at)
    run_step(impl, guard, [req_meta("A", 100, 48, load=32)])
    assert engine.streams.load == [("A", k) for k in range(fail_at)]
    assert engine.streams.waited == len(engine.streams.load)


def test_failed_non_sync_retrieval_needs_no_fence(fake_cuda_streams):
    """A fails, C (sync) carries on waiting as LMCache made it: no extra waits."""
    engine = FakeEngine()
    impl = make_impl(engine)
    guard = vc.LoadFailureGuard(impl)
    engine.plan("A", 100, fail_at=1)
    engine.plan("C", 300)
    check = loads_landed_check(engine, ["C"])
    run_step(impl, guard, [req_meta("A", 100, 48, load=32), req_meta("C", 300, 48, load=32)], check)
    assert check.seen == list(range(NUM_LAYERS))
    assert getattr(guard.stats, "load_fences", 0) == 0 and guard.stats.retrievals_failed == 1


def test_load_fence_kinds():
    assert vc._load_fence(SimpleNamespace()) is None
    assert vc._load_fence(SimpleNamespace(gpu_connector=SimpleNamespace())) is None
    calls = []
    hook = vc._load_fence(SimpleNamespace(gpu_connector=SimpleNamespace(wait_for_loads=lambda: calls.append(1))))
    hook()()
    assert calls == [1]
    # A load stream that is not a CUDA stream: the fence does nothing (and does not fail).
    vc._load_fence(SimpleNamespace(gpu_connector=SimpleNamespace(load_stream=object())))()()


def test_load_fence_for_the_deferred_cpu_connector():
    from lmcache_s3layer.integration.lmcache.cpu_connector import DEVICE
    from lmcache_s3layer.testing.engine import KVSpec, make_cpu_connector

    conn = make_cpu_connector(KVSpec(), copy_mode="deferred")
    fence = vc._load_fence(SimpleNamespace(gpu_connector=conn))()
    landed = []
    DEVICE.enqueue("load", lambda: landed.append("load"))
    DEVICE.enqueue("store", lambda: landed.append("store"))
    try:
        fence()
        assert landed == ["load"]  # like wait_stream(load_stream): the store stream is not touched
    finally:
        DEVICE.synchronize()


# ------------------------------------------------------------------------------------------
# 2. stores of a loading step: held to the last layer, then one agreed verdict


class RecordingAgreement:  # duck-typed vc.StepAgreement
    def __init__(self, others_failed: bool = False):
        self.calls: list[bool] = []
        self.others_failed = others_failed

    def any_failed(self, local_failed: bool) -> bool:
        self.calls.append(local_failed)
        return local_failed or self.others_failed


def _loading_step(engine: FakeEngine, fail_at: Optional[int] = None):
    engine.plan("A", 100, fail_at=fail_at)
    return [req_meta("A", 100, 48, load=32, save_from=32), req_meta("B", 200, 40, save_from=0)]


def test_stores_of_a_loading_step_run_after_one_agreement():
    engine = FakeEngine()
    impl = make_impl(engine)
    agreement = RecordingAgreement()
    guard = vc.LoadFailureGuard(impl, agreement=agreement)
    stored_before = {}
    run_step(impl, guard, _loading_step(engine),
             lambda layer: stored_before.setdefault(layer, list(engine.stored_layers)))
    # nothing read from the paged cache before the last layer's save_kv_layer
    assert stored_before[NUM_LAYERS - 1] == []
    assert agreement.calls == [False]  # once per step, not once per store
    assert sorted(engine.puts) == ["A", "B"]
    assert sorted(engine.stored_layers) == sorted((r, k) for r in "AB" for k in range(NUM_LAYERS))


def test_a_local_load_failure_stores_nothing_and_is_told_to_the_others():
    engine = FakeEngine()
    impl = make_impl(engine)
    agreement = RecordingAgreement()
    guard = vc.LoadFailureGuard(impl, agreement=agreement)
    run_step(impl, guard, _loading_step(engine, fail_at=1))
    assert agreement.calls == [True]
    assert engine.store_calls == [] and engine.puts == []
    assert guard.stats.stores_suppressed == 2


def test_another_ranks_failure_stores_nothing_here():
    engine = FakeEngine()
    impl = make_impl(engine)
    agreement = RecordingAgreement(others_failed=True)
    guard = vc.LoadFailureGuard(impl, agreement=agreement)
    invalid = run_step(impl, guard, _loading_step(engine))
    assert agreement.calls == [False]
    assert engine.store_calls == [] and engine.puts == []
    assert guard.stats.steps_failed_elsewhere == 1
    # The failed rank reports the blocks; vLLM unions all workers' invalid_block_ids.
    assert invalid == set()


def test_a_step_without_loads_stores_at_once_without_agreement():
    engine = FakeEngine()
    impl = make_impl(engine)
    agreement = RecordingAgreement(others_failed=True)
    guard = vc.LoadFailureGuard(impl, agreement=agreement)
    after_layer0 = []
    run_step(impl, guard, [req_meta("B", 200, 40, save_from=0)],
             lambda layer: after_layer0.append(list(engine.stored_layers)) if layer == 1 else None)
    assert agreement.calls == []
    assert after_layer0 == [[("B", 0)]]  # stores as LMCache does, layer by layer
    assert engine.puts == ["B"]


def test_one_layer_model_still_agrees():
    engine = FakeEngine(num_layers=1)
    impl = make_impl(engine)
    agreement = RecordingAgreement(others_failed=True)
    guard = vc.LoadFailureGuard(impl, agreement=agreement)
    run_step(impl, guard, _loading_step(engine))
    assert agreement.calls == [False] and engine.puts == []


def test_tp_step_agreement_uses_vllms_tp_cpu_group(monkeypatch):
    import vllm.distributed.parallel_state as ps

    group = object()
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(ps, "get_tp_group", lambda: SimpleNamespace(cpu_group=group, world_size=2))
    agreement = vc.tp_step_agreement(7.0)
    assert isinstance(agreement, vc.ProcessGroupAgreement)
    assert agreement._group is group and agreement._timeout.total_seconds() == 7.0
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 1)
    assert type(vc.tp_step_agreement()) is vc.StepAgreement


def test_tp_step_agreement_outside_a_vllm_worker_is_local(monkeypatch):
    import vllm.distributed.parallel_state as ps

    def not_initialised():
        raise AssertionError("tensor model parallel group is not initialized")

    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", not_initialised)
    assert type(vc.tp_step_agreement()) is vc.StepAgreement


def test_process_group_agreement_error_counts_as_failed(monkeypatch):
    import torch.distributed as dist

    def broken(*a, **k):
        raise RuntimeError("connection reset")

    monkeypatch.setattr(dist, "all_reduce", broken)
    agreement = vc.ProcessGroupAgreement(object(), 1.0)
    assert agreement.any_failed(False) is True and agreement.errors == 1


def test_connector_options_new_keys():
    o = vc.ConnectorOptions.from_extra_config({})
    assert o.skip_vllm_cached_prefetch is True and o.tp_agreement_timeout_s == 120.0
    o = vc.ConnectorOptions.from_extra_config({"s3layer.skip_vllm_cached_prefetch": "off",
                                               "s3layer.tp_agreement_timeout_s": "5"})
    assert o.skip_vllm_cached_prefetch is False and o.tp_agreement_timeout_s == 5.0
    with pytest.raises(ValueError):
        vc.ConnectorOptions.from_extra_config({"s3layer.tp_agreement_timeout_s": 0})
    with pytest.raises(ValueError):
        vc.ConnectorOptions.from_extra_config({"s3layer.skip_vllm_cached_prefetch": "maybe"})


# ---- two real ranks --------------------------------------------------------------------------

AGREE_TIMEOUT_S = 3.0
SLOW_RANK_DELAY_S = 5.0


def _tp_rank_main(rank: int, port: int, out_dir: str) -> None:
    """One TP rank: a LoadFailureGuard over a fake engine, agreeing over a gloo group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        engine = FakeEngine()
        impl = make_impl(engine)
        agreement = vc.ProcessGroupAgreement(dist.group.WORLD, AGREE_TIMEOUT_S)
        guard = vc.LoadFailureGuard(impl, agreement=agreement)
        dist.barrier()
        results = []
        # step 1: rank 0's load fails at layer 1, rank 1's does not -> nobody stores
        # step 2: nobody fails -> both store
        # step 3: rank 1 is slow (its last layer arrives after rank 0's agreement timed out):
        #         rank 0 stores nothing, rank 1 gets rank 0's "ok" late and stores
        # step 4: both on time again: the collectives still pair up -> both store
        for step in range(1, 5):
            first = 100 * step
            engine.plan(f"L{step}", first, fail_at=1 if (step == 1 and rank == 0) else None,
                        delay_at=NUM_LAYERS - 1 if (step == 3 and rank == 1) else None,
                        delay_s=SLOW_RANK_DELAY_S)
            engine.puts.clear()
            invalid = run_step(impl, guard, [req_meta(f"L{step}", first, 48, load=32, save_from=32),
                                             req_meta(f"S{step}", first + 1000, 40, save_from=0)])
            results.append(dict(step=step, puts=sorted(engine.puts), invalid=sorted(invalid)))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(results=results, stats=vars(guard.stats), agreement_errors=agreement.errors), f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned gloo processes, four steps (~15 s)
def test_tp_ranks_agree_before_storing(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_tp_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "TP ranks did not finish in time"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    by_step = [{r["step"]: r for r in rank["results"]} for rank in ranks]
    # step 1: rank 0 failed, so neither rank stores (rank 1 loaded fine: without the agreement
    # it would store KV computed from rank 0's stale heads)
    assert by_step[0][1]["puts"] == [] and by_step[1][1]["puts"] == []
    assert by_step[0][1]["invalid"] == [4, 5] and by_step[1][1]["invalid"] == []
    assert ranks[1]["stats"]["steps_failed_elsewhere"] == 1
    # step 2: nobody failed
    assert by_step[0][2]["puts"] == ["L2", "S2"] and by_step[1][2]["puts"] == ["L2", "S2"]
    # step 3: rank 0's agreement timed out -> rank 0 stores nothing; rank 1 got the real flags
    assert by_step[0][3]["puts"] == [] and by_step[1][3]["puts"] == ["L3", "S3"]
    assert ranks[0]["agreement_errors"] == 1 and ranks[1]["agreement_errors"] == 0
    # step 4: still paired
    assert by_step[0][4]["puts"] == ["L4", "S4"] and by_step[1][4]["puts"] == ["L4", "S4"]


# ------------------------------------------------------------------------------------------
# 3. vLLM's prefix cache: no prefetch of what vLLM holds


class RecordingLookupClient:
    def __init__(self, answer: int = 64):
        self.calls: list[dict] = []
        self.answer = answer

    def lookup_cache(self, lookup_id):
        return -1

    def lookup(self, token_ids, lookup_id, request_configs=None):
        self.calls.append(dict(lookup_id=lookup_id, request_configs=request_configs, n=len(token_ids)))
        return self.answer


def _scheduler_connector(client: RecordingLookupClient):
    """``S3LayerConnectorV1`` in the scheduler role around LMCache's real
    ``get_num_new_matched_tokens`` (on a fake impl: no LMCache services)."""
    from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl as Impl

    class FakeSchedulerImpl:
        get_num_new_matched_tokens = Impl.get_num_new_matched_tokens

        def __init__(self):
            self.kv_role = "kv_both"
            self.lookup_client = client
            self._requests_priority = {}
            self.skip_last_n_tokens = 0
            self.config = SimpleNamespace(min_retrieve_tokens=0, enable_async_loading=False,
                                          external_lookup_client=None, enable_scheduler_bypass_lookup=False)
            self._max_tokens_per_load = 0
            self._lmcache_chunk_size = CHUNK
            self.load_specs = {}

    impl = FakeSchedulerImpl()
    conn = object.__new__(vc.S3LayerConnectorV1)
    conn._lmcache_engine = impl
    conn._prefix_hint = vc.CachedPrefixHint(impl)
    return conn


def _request(req_id: str, n: int, kv_transfer_params: Optional[dict] = None):
    extra_args = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    return SimpleNamespace(request_id=req_id, all_token_ids=list(range(n)), prompt_token_ids=list(range(n)),
                           num_tokens=n, priority=0, mm_features=None,
                           sampling_params=SimpleNamespace(extra_args=extra_args))


def test_scheduler_puts_vllms_prefix_hit_into_the_lookups_request_configs():
    client = RecordingLookupClient(answer=64)
    conn = _scheduler_connector(client)
    params = {"lmcache.tag.user": "u1", "other": "x"}
    n, _async = conn.get_num_new_matched_tokens(_request("r1", 80, params), 32)
    assert n == 64 - 32
    assert client.calls[-1]["request_configs"] == {"lmcache.tag.user": "u1", vc.VLLM_CACHED_TOKENS_KEY: "32"}
    # no prefix hit: LMCache's request_configs untouched (None when there are none)
    conn.get_num_new_matched_tokens(_request("r2", 80), 0)
    assert client.calls[-1]["request_configs"] is None
    conn.get_num_new_matched_tokens(_request("r3", 80), 16)
    assert client.calls[-1]["request_configs"] == {vc.VLLM_CACHED_TOKENS_KEY: "16"}
    # only the lookup of the request being scheduled carries it
    assert client.lookup("t", lookup_id="r3", request_configs=None) == 64
    assert client.calls[-1]["request_configs"] is None


def test_the_hint_changes_no_cache_key():
    from lmcache.utils import CacheEngineKey

    plain = CacheEngineKey("m", 1, 0, 1234, torch.bfloat16, {"lmcache.tag.user": "u1"})
    hinted = CacheEngineKey("m", 1, 0, 1234, torch.bfloat16,
                            {"lmcache.tag.user": "u1", vc.VLLM_CACHED_TOKENS_KEY: "32"})
    assert hinted == plain and hash(hinted) == hash(plain) and hinted.to_string() == plain.to_string()


def test_hint_is_off_for_lookup_paths_that_would_not_carry_it():
    ok = SimpleNamespace(enable_async_loading=False, external_lookup_client=None,
                         enable_scheduler_bypass_lookup=False)
    assert vc._lookup_channel_unsupported(ok) is None
    assert vc._lookup_channel_unsupported(SimpleNamespace(**{**vars(ok), "enable_async_loading": True}))
    assert vc._lookup_channel_unsupported(None)


class SuppressionRecorder:
    """The backend API the filter relies on: ``prefetch_suppressed(chunk_hashes=None)``."""

    def __init__(self):
        self._local = threading.local()
        self.seen: list[tuple[int, bool]] = []  # (chunk_hash, prefetch suppressed) per pinned lookup

    @contextlib.contextmanager
    def prefetch_suppressed(self, chunk_hashes=None):
        before = (getattr(self._local, "on", False), getattr(self._local, "hashes", None))
        self._local.on, self._local.hashes = True, None if chunk_hashes is None else frozenset(chunk_hashes)
        try:
            yield
        finally:
            self._local.on, self._local.hashes = before

    def suppressed(self, chunk_hash: int) -> bool:
        if not getattr(self._local, "on", False):
            return False
        hashes = self._local.hashes
        return hashes is None or chunk_hash in hashes


def _filter_for(engine):
    f = vc.CachedPrefixPrefetchFilter(SimpleNamespace(lmcache_engine=engine))
    f.install()
    return f


def test_worker_lookup_skips_prefetch_of_vllm_cached_chunks_real_engine():
    """LMCache's real ``LMCacheEngine.lookup`` (layerwise, CPU), as its lookup server calls it:
    same answer and pins as without the hint; the chunks vLLM holds are not prefetched."""
    from lmcache_s3layer.testing.engine import (
        KVSpec,
        lmcache_engine,
        make_paged_kv_cache,
        make_slot_mapping,
        make_tokens,
        run_store_layer,
    )

    spec = KVSpec(num_layers=2, num_kv_heads=2, head_size=16, chunk_size=CHUNK)
    tokens = make_tokens(5 * CHUNK, seed=11)
    caches = make_paged_kv_cache(spec, num_blocks=8, block_size=16)
    slots = make_slot_mapping(len(tokens), num_blocks=8, block_size=16, seed=3)
    with lmcache_engine({"local_cpu": True}, spec) as engine:
        run_store_layer(engine, tokens, caches, slots)
        backend = next(iter(engine.storage_manager.storage_backends.values()))
        recorder = SuppressionRecorder()
        contains = backend.batched_contains

        def recording_contains(keys, pin=False):
            if pin:
                recorder.seen.append((keys[0].chunk_hash, recorder.suppressed(keys[0].chunk_hash)))
            return contains(keys, pin)

        backend.batched_contains = recording_contains
        backend.prefetch_suppressed = recorder.prefetch_suppressed
        # what LMCache's lookup client sends: the hashes and offsets of all chunks
        chunks = list(engine.token_database.process_tokens(tokens, make_key=False))
        hashes, offsets = [h for _, _, h in chunks], [e - s for s, e, _ in chunks]

        want = engine.lookup(hashes=hashes, offsets=offsets, lookup_id="plain", pin=True, request_configs=None)
        plain_seen, recorder.seen = recorder.seen, []
        assert want == 5 * CHUNK and not any(s for _, s in plain_seen)

        f = _filter_for(engine)
        got = engine.lookup(hashes=hashes, offsets=offsets, lookup_id="hinted", pin=True,
                            request_configs={vc.VLLM_CACHED_TOKENS_KEY: str(2 * CHUNK + 5)})
        assert got == want
        assert recorder.seen == [(h, i < 2) for i, h in enumerate(hashes)]
        assert f.chunks_not_prefetched == 2
        assert ({k: [key.to_string() for key in v] for k, v in engine.lookup_pins["hinted"].items()}
                == {k: [key.to_string() for key in v] for k, v in engine.lookup_pins["plain"].items()})
        engine.lookup_unpin("plain")
        engine.lookup_unpin("hinted")


class FakeLookupEngine:
    """``lookup`` that records what LMCache's would get; a token database with prefix hashes."""

    def __init__(self, backend):
        self.config = SimpleNamespace(chunk_size=CHUNK)
        self.token_database = self
        self.chunk_size = CHUNK
        self.storage_manager = SimpleNamespace(storage_backends={"s3layer": backend})
        self.calls: list[dict] = []
        self.backend = backend

    def process_tokens(self, tokens=None, hashes=None, offsets=None, mask=None, make_key=True,
                       request_configs=None):
        if tokens is not None:
            for start in range(0, len(tokens), CHUNK):
                end = min(start + CHUNK, len(tokens))
                yield start, end, hash(tuple(tokens[:end]))
        else:
            start = 0
            for h, off in zip(hashes, offsets):
                yield start, start + off, h
                start += off

    def lookup(self, tokens=None, hashes=None, offsets=None, search_range=None, lookup_id=None, pin=False,
               request_configs=None):
        self.calls.append(dict(lookup_id=lookup_id, request_configs=request_configs, pin=pin))
        hit = 0
        for _s, end, h in self.process_tokens(tokens=tokens, hashes=hashes, offsets=offsets):
            self.backend.seen.append((h, self.backend.suppressed(h)))
            hit = end
        return hit


def test_worker_lookup_filter_tokens_path_and_passthrough():
    recorder = SuppressionRecorder()
    engine = FakeLookupEngine(recorder)
    _filter_for(engine)
    tokens = list(range(70))
    configs = {"lmcache.tag.user": "u1", vc.VLLM_CACHED_TOKENS_KEY: "48"}
    assert engine.lookup(tokens=tokens, lookup_id="r", pin=True, request_configs=configs) == 70
    # LMCache sees its own request_configs only
    assert engine.calls[-1]["request_configs"] == {"lmcache.tag.user": "u1"}
    assert [s for _, s in recorder.seen] == [True, True, True, False, False]
    assert recorder.seen[2][0] == hash(tuple(tokens[:48]))
    # below one chunk, no hint, unpinned: nothing suppressed, request_configs as LMCache sent them
    for configs, pin in (({vc.VLLM_CACHED_TOKENS_KEY: "15"}, True), (None, True),
                         ({vc.VLLM_CACHED_TOKENS_KEY: "48"}, False), ({vc.VLLM_CACHED_TOKENS_KEY: "x"}, True)):
        recorder.seen.clear()
        engine.lookup(tokens=tokens, lookup_id="r", pin=pin, request_configs=configs)
        assert not any(s for _, s in recorder.seen), configs
        assert engine.calls[-1]["request_configs"] is None


def test_worker_lookup_filter_with_a_backend_without_chunk_hashes():
    """The backend's older ``prefetch_suppressed()`` (no arguments) cannot split a lookup: the
    lookup runs normally, prefetching everything."""

    class OldBackend(SuppressionRecorder):
        @contextlib.contextmanager
        def prefetch_suppressed(self):
            yield

    backend = OldBackend()
    engine = FakeLookupEngine(backend)
    _filter_for(engine)
    hashes, offsets = [11, 22, 33], [CHUNK] * 3
    for _ in range(2):
        assert engine.lookup(hashes=hashes, offsets=offsets, lookup_id="r", pin=True,
                             request_configs={vc.VLLM_CACHED_TOKENS_KEY: "40"}) == 3 * CHUNK
    assert engine.calls[-1]["request_configs"] is None
