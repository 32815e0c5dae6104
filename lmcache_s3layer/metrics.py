"""Prometheus metrics, readable in-process and optionally served on a port (off by default).

Label values are bounded sets (event names, error kinds, layer numbers up to the model's
depth, hit/miss): never hashes, keys or segment ids, so cardinality cannot grow with traffic.
Metric text never contains configuration values, so no secret can reach a scrape.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily

_LAT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BYTE_BUCKETS = tuple(float(1 << k) for k in range(12, 36, 2))


class Metrics:
    _instance: "Metrics | None" = None
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("s3layer_events_total", "Store/retrieval outcomes", ["event"], registry=r)
        self.lookups = Counter("s3layer_lookup_chunks_total", "Chunks asked about at lookup", ["result"], registry=r)
        self.errors = Counter("s3layer_storage_errors_total", "Object-store errors by kind (retried or not)",
                              ["kind"], registry=r)
        self.requests = Counter("s3layer_requests_total", "Object-store requests by operation", ["op"], registry=r)
        self.stall = Histogram("s3layer_layer_stall_seconds",
                               "Time the forward pass waited for a layer (0 when it was already staged)",
                               ["layer"], buckets=_LAT_BUCKETS, registry=r)
        self.fetch = Histogram("s3layer_layer_fetch_seconds", "Admission to verified staging of one layer",
                               buckets=_LAT_BUCKETS, registry=r)
        self.fetch_bytes = Histogram("s3layer_layer_fetch_bytes", "Bytes of one fetched layer",
                                     buckets=_BYTE_BUCKETS, registry=r)
        self._cores: "weakref.WeakSet[Any]" = weakref.WeakSet()
        r.register(_StateCollector(self._cores))
        self._server_port: int | None = None

    @classmethod
    def get(cls) -> "Metrics":
        with cls._lock:
            if cls._instance is None:
                cls._instance = Metrics()
            return cls._instance

    def bind_core(self, core: Any) -> None:
        self._cores.add(core)
        core.client.on_request = lambda op: self.requests.labels(op).inc()
        core.client.on_error = lambda kind: self.errors.labels(kind).inc()
        port = core.cfg.metrics_port
        if port is not None and self._server_port is None:
            # All interfaces: Prometheus scrapes from another host; the text holds no secrets.
            start_http_server(port, addr="0.0.0.0", registry=self.registry)
            self._server_port = port

    def event(self, name: str, n: int = 1) -> None:
        self.events.labels(name).inc(n)

    def lookup(self, hits: int, misses: int) -> None:
        if hits:
            self.lookups.labels("hit").inc(hits)
        if misses:
            self.lookups.labels("miss").inc(misses)

    def layer_stall(self, layer: int, seconds: float) -> None:
        self.stall.labels(str(layer)).observe(seconds)

    def layer_fetched(self, layer: int, nbytes: int, seconds: float) -> None:
        self.fetch.observe(seconds)
        self.fetch_bytes.observe(nbytes)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


class _StateCollector:
    """Gauges read at scrape time from the live cores (no polling thread)."""

    def __init__(self, cores):
        self._cores = cores

    def collect(self):
        cores = list(self._cores)
        g = {
            "s3layer_staging_bytes": ("Bytes staged by the prefetch pipeline",
                                      lambda c: c.prefetcher.staging_bytes),
            "s3layer_staging_peak_bytes": ("Peak staged bytes", lambda c: c.prefetcher.stats.peak_staging_bytes),
            "s3layer_staging_budget_bytes": ("Staging budget", lambda c: c.prefetcher.budget),
            "s3layer_prefetch_active_retrievals": ("Live retrievals", lambda c: c.prefetcher.active()),
            "s3layer_upload_inflight_bytes": ("Bytes accepted but not yet uploaded",
                                              lambda c: c.writer.inflight_bytes()),
            "s3layer_index_entries": ("Chunks in the in-memory index", lambda c: len(c.index)),
            "s3layer_index_pinned": ("Pinned chunk references", lambda c: c.index.pinned_count()),
            "s3layer_prefetch_depth_layers": ("Current adaptive prefetch depth (layers)",
                                              lambda c: c.prefetcher.current_depth()),
        }
        for name, (doc, fn) in g.items():
            fam = GaugeMetricFamily(name, doc)
            fam.add_metric([], float(sum(fn(c) for c in cores)))
            yield fam
