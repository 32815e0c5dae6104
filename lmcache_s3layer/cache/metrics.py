"""Prometheus metrics, readable in-process and optionally served on a port (off by default).

Label values are bounded sets (event names, operation names, error kinds, layer numbers up to
the model's depth, hit/miss): never hashes, keys or segment ids, so cardinality cannot grow
with traffic. Metric text never contains configuration values, so no secret can reach a scrape.

Two kinds of sources: counters and histograms that the code paths feed as things happen
(hooks on ``S3Client``, ``SegmentWriter``'s ``on_event``, ``Prefetcher``'s callbacks, calls
from ``S3LayerCore``), and values read from the live cores at scrape time (``_StateCollector``:
gauges, and counters the components already keep in their ``stats``), so nothing is counted
twice and no polling thread exists.
"""

from __future__ import annotations

import logging
import operator
import threading
import weakref
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lmcache_s3layer.format.objects import is_pointer_key

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

_LAT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BYTE_BUCKETS = tuple(float(1 << k) for k in range(12, 36, 2))

# Closed vocabularies. A value outside them is folded into "other" so that a future code path
# (or a typo) cannot mint new series.
EVENTS = frozenset({"segment_committed", "store_dropped_budget", "store_failed", "store_lost_race",
                    "store_abandoned", "retrieval_failed"})
OPS = frozenset({"get", "head", "list", "put", "delete", "head_bucket", "create_bucket"})
FAULT_KINDS = frozenset({"StorageError", "ObjectNotFound", "BucketNotFound", "AccessDenied",
                         "PreconditionFailed", "Throttled", "Unavailable", "StorageTimeout",
                         "CorruptObject", "ChecksumMismatch"})
MAX_LAYER_LABEL = 1024  # layout.MAX_LAYERS: no model has more layers than a manifest allows


def _bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else "other"


class Metrics:
    _instance: "Metrics | None" = None
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("s3layer_events_total", "Store/retrieval outcomes", ["event"], registry=r)
        self.lookups = Counter("s3layer_lookup_chunks_total", "Chunks asked about at lookup", ["result"], registry=r)
        self.errors = Counter("s3layer_storage_errors_total",
                              "Faults by kind: failed object-store tries (retried or not; a chunk "
                              "pointer that does not exist is a miss, not a fault) and fetched "
                              "bytes that failed their checksum (ChecksumMismatch)",
                              ["kind"], registry=r)
        self.requests = Counter("s3layer_requests_total", "Object-store requests (tries) by operation",
                                ["op"], registry=r)
        self.request_seconds = Histogram("s3layer_request_seconds",
                                         "Duration of one successful object-store try, body included",
                                         ["op"], buckets=_LAT_BUCKETS, registry=r)
        self.stall = Histogram("s3layer_layer_stall_seconds",
                               "Time the forward pass waited for a layer (~0 when it was already staged)",
                               ["layer"], buckets=_LAT_BUCKETS, registry=r)
        self.fetch = Histogram("s3layer_layer_fetch_seconds", "Admission to verified staging of one layer",
                               buckets=_LAT_BUCKETS, registry=r)
        self.fetch_bytes = Histogram("s3layer_layer_fetch_bytes", "Bytes of one fetched layer",
                                     buckets=_BYTE_BUCKETS, registry=r)
        self._cores: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._counted: list[_Counted] = []
        r.register(_StateCollector(self._cores, self._counted))
        self._server: WSGIServer | None = None
        self._serve_lock = threading.Lock()
        self.server_port: int | None = None

    @classmethod
    def get(cls) -> "Metrics":
        with cls._lock:
            if cls._instance is None:
                cls._instance = Metrics()
            return cls._instance

    def bind_core(self, core: Any) -> None:
        self._cores.add(core)
        self._counted.append(_Counted(core))
        core.client.on_request = self.request
        core.client.on_error = self.client_fault
        core.client.on_latency = self.request_latency
        port = core.cfg.metrics_port
        if port is not None:
            self.serve(port, core.cfg.metrics_addr)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int | None:
        """Serve ``/metrics`` once per registry; returns the bound port (0 picks a free one).

        All interfaces by default: Prometheus scrapes from another host, and the text holds no
        secrets. A port already taken (several tensor-parallel workers of one host configured
        with the same port) is logged, not fatal: losing a scrape target must not stop the
        engine from starting.
        """
        with self._serve_lock:
            if self._server is not None:
                return self.server_port
            try:
                server, _thread = start_http_server(port, addr=addr, registry=self.registry)
            except OSError as exc:
                log.warning("s3layer metrics: cannot listen on %s:%d (%s); this process's metrics "
                            "are not served (give each worker its own s3layer.metrics_port)", addr, port, exc)
                return None
            self._server = server
            self.server_port = server.server_port
            log.info("s3layer metrics on http://%s:%d/metrics", addr, self.server_port)
            return self.server_port

    def stop_serving(self) -> None:
        with self._serve_lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
                self.server_port = None

    # ---- feeds -------------------------------------------------------------------------------

    def event(self, name: str, n: int = 1) -> None:
        self.events.labels(_bounded(name, EVENTS)).inc(n)

    def request(self, op: str) -> None:
        self.requests.labels(_bounded(op, OPS)).inc()

    def request_latency(self, op: str, seconds: float) -> None:
        self.request_seconds.labels(_bounded(op, OPS)).observe(seconds)

    def fault(self, kind: str) -> None:
        self.errors.labels(_bounded(kind, FAULT_KINDS)).inc()

    def client_fault(self, kind: str, op: str, key: str) -> None:
        # A pointer that does not exist is how a lookup learns that no segment starts at a
        # chunk (``<ns root>/ptr/<xx>/<hash>``): a miss, or a chunk in the middle of a segment
        # (format v2 has pointers only at segment starts, so most 404s of a cold lookup are
        # expected). Counting them as faults would make every cold lookup look like an error
        # on a dashboard. Misses are in s3layer_index_resolutions instead.
        if kind == "ObjectNotFound" and is_pointer_key(key):
            return
        self.fault(kind)

    def lookup(self, hits: int, misses: int) -> None:
        if hits:
            self.lookups.labels("hit").inc(hits)
        if misses:
            self.lookups.labels("miss").inc(misses)

    def layer_stall(self, layer: int, seconds: float) -> None:
        label = str(layer) if 0 <= layer < MAX_LAYER_LABEL else "other"
        self.stall.labels(label).observe(seconds)

    def layer_fetched(self, layer: int, nbytes: int, seconds: float) -> None:
        self.fetch.observe(seconds)
        self.fetch_bytes.observe(nbytes)

    # ---- reading -----------------------------------------------------------------------------

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


def _sum(cores: list, fn: Callable[[Any], float]) -> float:
    total = 0.0
    for c in cores:
        try:
            total += fn(c)
        except Exception as exc:  # noqa: BLE001
            # One core half-way through close() must not turn the whole scrape into a 500.
            log.debug("s3layer metrics: skipping a core at scrape time: %s", exc)
    return total


class _Counted:
    """The stats objects a core's counters are read from, kept after the core is gone: a
    Prometheus counter must never go down, and summing over live cores only would drop a
    closed engine's requests from the totals."""

    __slots__ = ("client", "prefetcher", "index")

    def __init__(self, core: Any):
        self.client = SimpleNamespace(stats=core.client.stats)
        self.prefetcher = SimpleNamespace(stats=core.prefetcher.stats)
        self.index = SimpleNamespace(stats=core.index.stats)


class _StateCollector:
    """Values read at scrape time (no polling thread): gauges from the live cores, counters
    from every core this process ever bound."""

    def __init__(self, cores, counted: list[_Counted]):
        self._cores = cores
        self._counted = counted

    def collect(self):
        cores = list(self._cores)
        counted = list(self._counted)
        gauges = {
            "s3layer_staging_bytes": ("Bytes staged by the prefetch pipeline",
                                      lambda c: c.prefetcher.staging_bytes),
            "s3layer_staging_peak_bytes": ("Peak staged bytes", lambda c: c.prefetcher.stats.peak_staging_bytes),
            "s3layer_staging_budget_bytes": ("Staging budget", lambda c: c.prefetcher.budget),
            "s3layer_prefetch_active_retrievals": ("Live retrievals", lambda c: c.prefetcher.active()),
            "s3layer_prefetch_depth_layers": ("Current adaptive prefetch depth (layers)",
                                              lambda c: c.prefetcher.current_depth()),
            "s3layer_upload_inflight_bytes": ("Bytes accepted but not yet uploaded",
                                              lambda c: c.writer.inflight_bytes()),
            "s3layer_upload_budget_bytes": ("Upload in-flight budget (stores beyond it are dropped)",
                                            lambda c: c.cfg.put_inflight_budget_bytes),
            "s3layer_index_entries": ("Chunks in the in-memory index", lambda c: len(c.index)),
            "s3layer_index_pinned": ("Pinned chunk references", lambda c: c.index.pinned_count()),
        }
        for name, (doc, fn) in gauges.items():
            fam = GaugeMetricFamily(name, doc)
            fam.add_metric([], _sum(cores, fn))
            yield fam

        # Counters the components keep anyway; exported rather than counted a second time.
        counters = {
            "s3layer_read_bytes": ("Bytes read from the object store", lambda c: c.client.stats.bytes_read),
            "s3layer_written_bytes": ("Bytes written to the object store",
                                      lambda c: c.client.stats.bytes_written),
            "s3layer_retries": ("Object-store tries repeated after a retryable error",
                                lambda c: c.client.stats.retries),
            "s3layer_prefetch_shared_copies": ("(chunk, layer) buffers copied for another request of a batch "
                                               "sharing the prefix, instead of fetched again",
                                               lambda c: c.prefetcher.stats.chunks_copied),
        }
        for name, (doc, fn) in counters.items():
            cfam = CounterMetricFamily(name, doc)
            cfam.add_metric([], _sum(counted, fn))
            yield cfam

        layers = CounterMetricFamily("s3layer_prefetch_layers", "Prefetched layers by outcome", labels=["outcome"])
        for outcome, attr in (("staged", "layers_staged"), ("taken", "layers_taken"),
                              ("evicted", "layers_evicted"), ("failed", "layers_failed")):
            layers.add_metric([outcome], _sum(counted, operator.attrgetter(f"prefetcher.stats.{attr}")))
        yield layers

        retr = CounterMetricFamily("s3layer_prefetch_retrievals", "Retrievals started, and how they ended early",
                                   labels=["outcome"])
        for outcome, attr in (("started", "retrievals"), ("cancelled", "cancelled"),
                              ("idle_expired", "idle_expired")):
            retr.add_metric([outcome], _sum(counted, operator.attrgetter(f"prefetcher.stats.{attr}")))
        yield retr

        res = CounterMetricFamily("s3layer_index_resolutions", "Chunk look-ups by where the answer came from",
                                  labels=["source"])
        for source, attr in (("memory", "memory_hits"), ("remote", "remote_hits"), ("miss", "misses")):
            res.add_metric([source], _sum(counted, operator.attrgetter(f"index.stats.{attr}")))
        yield res

        bad = CounterMetricFamily("s3layer_index_bad_objects", "Malformed or inconsistent pointers/manifests seen")
        bad.add_metric([], _sum(counted, lambda c: c.index.stats.bad_objects))
        yield bad
