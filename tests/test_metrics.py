"""Metrics: the plugin inside LMCache's real engine (CPU) against the S3 server moves the
in-process values, serves them over HTTP when ``s3layer.metrics_port`` is set, and never puts a
chunk hash, a segment id or a secret into a label. Plus the core-level fault and drop paths."""

from __future__ import annotations

import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lmcache_s3layer.cache import metrics as metrics_mod
from lmcache_s3layer.cache.core import S3LayerCore
from lmcache_s3layer.cache.metrics import Metrics
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import ConfigError, RetrievalFailed
from lmcache_s3layer.format.objects import Names, Namespace
from lmcache_s3layer.testing.engine import (
    KVSpec,
    build_engine,
    chunk_layer_keys,
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

SPEC = KVSpec(num_layers=4, num_kv_heads=2, head_size=32, chunk_size=16, dtype=torch.bfloat16)
BLOCKS, BLOCK = 8, 16
TOKENS = 80  # 5 chunks of 16
# One token of one layer in KV_T2D: K and V, each kv_heads x head_size bf16 values.
BPT = 2 * SPEC.num_kv_heads * SPEC.head_size * 2  # = 256 bytes
SENTINEL = 7.0


def plugin_config(ep, bucket, **s3layer) -> dict:
    return plugin_engine_config(ep, bucket, prefix="metrics-test", retry_base_s=0.01, retrieval_deadline_s=20,
                                **s3layer)


class Delta:
    """Sample values relative to a baseline: the plugin's registry is process-wide, so other
    engines in this process may have moved it before the test started."""

    def __init__(self, m: Metrics):
        self.m = m
        self.base: dict[tuple, float] = {}

    def mark(self, *samples: tuple[str, dict]) -> None:
        for name, labels in samples:
            self.base[(name, tuple(sorted(labels.items())))] = self.m.value(name, labels)

    def __call__(self, name: str, labels: dict | None = None) -> float:
        labels = labels or {}
        return self.m.value(name, labels) - self.base[(name, tuple(sorted(labels.items())))]


def label_values(text: str) -> list[tuple[str, str, str]]:
    return [(s.name, k, v) for fam in text_string_to_metric_families(text) for s in fam.samples
            for k, v in s.labels.items()]


# Every label value the package can emit, by label name (``le`` is the histogram bucket bound).
def allowed_label(name: str, value: str, num_layers: int) -> bool:
    vocab = {
        "event": metrics_mod.EVENTS, "op": metrics_mod.OPS, "kind": metrics_mod.FAULT_KINDS,
        "result": {"hit", "miss"}, "outcome": {"staged", "taken", "evicted", "failed", "started",
                                               "cancelled", "idle_expired"},
        "source": {"memory", "remote", "miss"},
    }
    if name == "le":
        return value == "+Inf" or float(value) >= 0
    if name == "layer":
        # The registry is process-wide: engines of other tests (more layers) share it, so the
        # bound is the package's cap, not this test's layer count.
        return value == "other" or (value.isdigit() and int(value) < metrics_mod.MAX_LAYER_LABEL)
    return name in vocab and (value in vocab[name] or value == "other")


def test_engine_store_and_layerwise_retrieve_move_the_metrics(s3_endpoint, bucket):
    m = Metrics.get()
    m.stop_serving()  # the test owns the process-wide server for its duration
    tokens = make_tokens(TOKENS, seed=11)
    caches = make_paged_kv_cache(SPEC, BLOCKS, BLOCK, seed=12)
    slots = make_slot_mapping(TOKENS, BLOCKS, BLOCK, seed=13)
    want = snapshot_tokens(caches, slots)
    layer_bytes = TOKENS * BPT  # one layer of all 5 chunks, the data one retrieve fetches per layer
    put = ("s3layer_requests_total", {"op": "put"})
    get = ("s3layer_requests_total", {"op": "get"})
    committed = ("s3layer_events_total", {"event": "segment_committed"})
    written = ("s3layer_written_bytes_total", {})
    read = ("s3layer_read_bytes_total", {})
    retries = ("s3layer_retries_total", {})
    hit = ("s3layer_lookup_chunks_total", {"result": "hit"})
    miss = ("s3layer_lookup_chunks_total", {"result": "miss"})
    fetch_n = ("s3layer_layer_fetch_seconds_count", {})
    fetch_b = ("s3layer_layer_fetch_bytes_sum", {})
    stalls = [("s3layer_layer_stall_seconds_count", {"layer": str(i)}) for i in range(SPEC.num_layers)]
    copies = ("s3layer_prefetch_shared_copies_total", {})
    d = Delta(m)
    d.mark(put, get, committed, written, read, retries, hit, miss, fetch_n, fetch_b, copies, *stalls)

    try:
        # ---- store: one segment = 4 layer objects + manifest + 1 start pointer ----------------
        engine = build_engine(plugin_config(s3_endpoint, bucket), SPEC)
        try:
            run_store_layer(engine, tokens, caches, slots)
            assert backend_of(engine).flush(60)
            hashes = {k[0].chunk_hash for _, _, k in chunk_layer_keys(engine, tokens)}
        finally:
            destroy_engine(engine)
        assert len(hashes) == 5
        assert d(*committed) == 1
        expected_puts = SPEC.num_layers + 1 + 1
        # A retried try is counted once per try, so only retries may add to the exact count.
        assert expected_puts <= d(*put) <= expected_puts + d(*retries)
        assert d(*written) >= SPEC.num_layers * layer_bytes

        # ---- retrieve in a new engine (a restart): lookup hits, then layer by layer --------------
        engine = build_engine(plugin_config(s3_endpoint, bucket, metrics_port=0, metrics_addr="127.0.0.1"),
                              SPEC)
        try:
            core = backend_of(engine).core
            port = m.server_port
            assert port, "metrics_port=0 should have bound a free loopback port"
            assert engine.lookup(tokens=tokens, lookup_id="req-m", pin=True) == TOKENS
            assert d(*hit) == 5 and d(*miss) == 0
            other = make_tokens(TOKENS, seed=99)
            assert engine.lookup(tokens=other, lookup_id="req-miss", pin=True) == 0
            assert d(*miss) >= 1 and d(*hit) == 5

            fill_paged_kv_cache(caches, SENTINEL)
            res = run_retrieve_layer(engine, tokens, caches, slots, req_id="req-m")
            engine.lookup_unpin("req-m")
            engine.lookup_unpin("req-miss")
            assert int(res.ret_mask.sum()) == TOKENS
            assert torch.equal(snapshot_tokens(caches, slots), want)  # the metrics watched a real load
            assert core.prefetcher.wait_idle(10)

            # One GET per layer at least (the 20 KiB layer fits one part), plus pointer and
            # manifest reads of the cold index.
            assert d(*get) >= SPEC.num_layers
            assert d(*read) >= SPEC.num_layers * layer_bytes
            assert d(*fetch_n) == SPEC.num_layers
            assert d(*fetch_b) == SPEC.num_layers * layer_bytes
            for sample in stalls:  # the forward waited (or not) exactly once for every layer
                assert d(*sample) == 1, sample
            assert m.value("s3layer_staging_bytes") == 0  # every staged layer was handed back
            assert m.value("s3layer_staging_peak_bytes") >= layer_bytes
            assert m.value("s3layer_prefetch_layers_total", {"outcome": "taken"}) >= SPEC.num_layers
            assert d(*copies) == 0  # one request: nothing shared
            assert m.value("s3layer_staging_budget_bytes") > 0

            text = m.text()
            first_key = chunk_layer_keys(engine, tokens)[0][2][0]
            ns = backend_of(engine)._ns(first_key)
            segment_ids = {core.index.get(ns, h).manifest.segment_id for h in hashes}
            assert segment_ids, "the index should hold the retrieved segment"
            forbidden = {s3_endpoint.secret_key, *segment_ids}
            for h in hashes:
                forbidden |= {str(h), f"{h & ((1 << 64) - 1):016x}", f"{h & ((1 << 64) - 1):x}"}
            labels = label_values(text)
            assert labels
            for metric, name, value in labels:
                assert allowed_label(name, value, SPEC.num_layers), (metric, name, value)
                assert not any(f in value for f in forbidden if len(f) >= 8), (metric, name)
            assert s3_endpoint.secret_key not in text

            # ---- the same numbers over HTTP --------------------------------------------------------
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                assert resp.status == 200
                served = resp.read().decode()
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for fam in text_string_to_metric_families(served) for s in fam.samples}
            key = ("s3layer_layer_fetch_bytes_sum", ())
            assert samples[key] == m.value(*fetch_b)
            assert samples[("s3layer_lookup_chunks_total", (("result", "hit"),))] == m.value(*hit)
            assert samples[("s3layer_layer_stall_seconds_count", (("layer", "3"),))] == m.value(*stalls[3])
            assert samples[("s3layer_staging_bytes", ())] == 0
            assert s3_endpoint.secret_key not in served
        finally:
            destroy_engine(engine)
    finally:
        m.stop_serving()


# ---- core-level paths: faults, dropped stores, bounded labels -----------------------------------


def core_cfg(ep, bucket, **kw) -> S3LayerConfig:
    return S3LayerConfig(bucket=bucket, endpoint_url=ep.endpoint_url, access_key_id=ep.access_key,
                         secret_access_key=ep.secret_key, region=ep.region, prefix="metrics-core",
                         retry_base_s=0.01, retrieval_deadline_s=5, negative_cache_ttl_s=0, **kw)


NS = Namespace("s3layer/metrics-model", 1, 0, "bfloat16")
LAYERS, HIDDEN, CHUNK = 3, 64, 16
TOKEN_BYTES = 2 * HIDDEN * 2


def store_segment(core: S3LayerCore, hashes: list[int], seed: int) -> list[bytes]:
    import random

    rng = random.Random(seed)
    layers = [rng.randbytes(len(hashes) * CHUNK * TOKEN_BYTES) for _ in range(LAYERS)]
    for layer, buf in enumerate(layers):
        views = [memoryview(buf)[i * CHUNK * TOKEN_BYTES:(i + 1) * CHUNK * TOKEN_BYTES]
                 for i in range(len(hashes))]
        assert core.put_layer(NS, layer, LAYERS, hashes, [CHUNK] * len(hashes), (2, HIDDEN), views, lambda: None)
    assert core.flush(30)
    return layers


def test_corruption_and_missing_objects_are_counted_by_kind(s3_endpoint, bucket, s3_boto_client):
    m = Metrics()
    writer = S3LayerCore(core_cfg(s3_endpoint, bucket), metrics=m)
    try:
        layers = store_segment(writer, [501, 502], seed=1)
        store_segment(writer, [601], seed=2)
        seg = writer.index.get(NS, 501).manifest
        gone = writer.index.get(NS, 601).manifest
        names = writer.store.names(NS)
    finally:
        writer.close()
    bad = bytearray(layers[1])
    bad[10] ^= 0xFF
    s3_boto_client.put_object(Bucket=bucket, Key=names.layer_object(seg.segment_id, 1), Body=bytes(bad))
    s3_boto_client.delete_object(Bucket=bucket, Key=names.layer_object(gone.segment_id, 0))

    reader = S3LayerCore(core_cfg(s3_endpoint, bucket), metrics=m)
    try:
        # A cold miss reads a pointer that does not exist: a miss, not a fault.
        assert reader.lookup(NS, [999], pin=True, num_layers=LAYERS, prefetch=False) == 0
        assert m.value("s3layer_lookup_chunks_total", {"result": "miss"}) == 1
        assert m.value("s3layer_index_resolutions_total", {"source": "miss"}) >= 1
        assert m.value("s3layer_storage_errors_total", {"kind": "ObjectNotFound"}) == 0
        assert reader.lookup(NS, [501, 502], pin=True, num_layers=LAYERS, prefetch=False) == 2
        assert len(reader.get_layer(NS, 0, [501, 502], LAYERS)) == 2
        with pytest.raises(RetrievalFailed):
            reader.get_layer(NS, 1, [501, 502], LAYERS)
        assert m.value("s3layer_storage_errors_total", {"kind": "ChecksumMismatch"}) >= 1
        assert m.value("s3layer_events_total", {"event": "retrieval_failed"}) == 1
        assert m.value("s3layer_layer_stall_seconds_count", {"layer": "0"}) == 1
        assert m.value("s3layer_layer_stall_seconds_count", {"layer": "1"}) == 0  # failed: no stall sample

        assert reader.lookup(NS, [601], pin=True, num_layers=LAYERS, prefetch=False) == 1
        with pytest.raises(RetrievalFailed):
            reader.get_layer(NS, 0, [601], LAYERS)
        assert m.value("s3layer_storage_errors_total", {"kind": "ObjectNotFound"}) >= 1
        assert m.value("s3layer_events_total", {"event": "retrieval_failed"}) == 2
        for metric, name, value in label_values(m.text()):
            assert allowed_label(name, value, LAYERS), (metric, name, value)
            assert seg.segment_id not in value and gone.segment_id not in value
    finally:
        reader.close()


def test_stores_over_the_upload_budget_are_dropped_and_counted(s3_endpoint, bucket):
    m = Metrics()
    # Room for one layer of one chunk in flight: a store of two chunks cannot be accepted.
    core = S3LayerCore(core_cfg(s3_endpoint, bucket, put_inflight_budget_bytes=CHUNK * TOKEN_BYTES), metrics=m)
    try:
        buf = bytes(2 * CHUNK * TOKEN_BYTES)
        views = [memoryview(buf)[:CHUNK * TOKEN_BYTES], memoryview(buf)[CHUNK * TOKEN_BYTES:]]
        assert not core.put_layer(NS, 0, LAYERS, [701, 702], [CHUNK, CHUNK], (2, HIDDEN), views, lambda: None)
        assert m.value("s3layer_events_total", {"event": "store_dropped_budget"}) == 1
        assert m.value("s3layer_upload_budget_bytes") == CHUNK * TOKEN_BYTES
        assert m.value("s3layer_requests_total", {"op": "put"}) == 0
        assert core.flush(10)
        assert m.value("s3layer_upload_inflight_bytes") == 0
    finally:
        core.close()


def test_client_faults_skip_pointer_misses_only():
    m = Metrics()
    names = Names("kvcache", Namespace("llama", 1, 0, "bfloat16"))
    m.client_fault("ObjectNotFound", "get", names.pointer_object(0xAB))
    assert m.value("s3layer_storage_errors_total", {"kind": "ObjectNotFound"}) == 0
    m.client_fault("ObjectNotFound", "get", names.layer_object("cd" * 16, 3))
    m.client_fault("Throttled", "get", names.pointer_object(0xAB))
    assert m.value("s3layer_storage_errors_total", {"kind": "ObjectNotFound"}) == 1
    assert m.value("s3layer_storage_errors_total", {"kind": "Throttled"}) == 1
    assert "cdcdcd" not in m.text() and "00000000000000ab" not in m.text()


def test_label_values_are_folded_into_bounded_sets():
    m = Metrics()
    m.event("segment_committed")
    m.event("an-event-nobody-declared")
    m.fault("SomeNewError")
    m.request("copy")
    m.layer_stall(metrics_mod.MAX_LAYER_LABEL + 5, 0.1)
    m.layer_stall(-1, 0.1)
    m.lookup(3, 1)
    assert m.value("s3layer_events_total", {"event": "other"}) == 1
    assert m.value("s3layer_storage_errors_total", {"kind": "other"}) == 1
    assert m.value("s3layer_requests_total", {"op": "other"}) == 1
    assert m.value("s3layer_layer_stall_seconds_count", {"layer": "other"}) == 2
    assert m.value("s3layer_lookup_chunks_total", {"result": "hit"}) == 3
    assert m.value("s3layer_lookup_chunks_total", {"result": "miss"}) == 1


def test_serving_is_off_by_default_and_a_taken_port_is_not_fatal(s3_endpoint, bucket):
    m = Metrics()
    core = S3LayerCore(core_cfg(s3_endpoint, bucket), metrics=m)
    try:
        assert m.server_port is None  # no metrics_port: in-process only
    finally:
        core.close()
    first = Metrics()
    port = first.serve(0, "127.0.0.1")
    try:
        assert port
        second = Metrics()
        assert second.serve(port, "127.0.0.1") is None  # logged, not raised
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b"s3layer_staging_bytes" in resp.read()
    finally:
        first.stop_serving()
    with pytest.raises(ConfigError, match="metrics_port"):
        core_cfg(s3_endpoint, bucket, metrics_port=70000)
    with pytest.raises(ConfigError, match="metrics_addr"):
        core_cfg(s3_endpoint, bucket, metrics_addr="")


def test_counters_never_go_down_when_an_engine_goes_away(s3_endpoint, bucket):
    # Prometheus counters must be monotonic: a closed (and collected) core's requests stay in
    # the process totals instead of vanishing from them.
    import gc

    m = Metrics.get()
    core = S3LayerCore(core_cfg(s3_endpoint, bucket))
    try:
        core.client.put_bytes("metrics-core/probe", b"x" * 1000)
    finally:
        core.close()
    written = m.value("s3layer_written_bytes_total")
    del core
    gc.collect()
    assert m.value("s3layer_written_bytes_total") >= written
