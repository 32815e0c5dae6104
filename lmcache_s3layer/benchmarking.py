"""Harness for the benchmarks: LMCache 0.5.6's real engine on CPU, a local S3 behind a latency
proxy, and per-layer timings of stepping ``retrieve_layer`` the way vLLM steps it.

Everything LMCache- and torch-related is imported inside functions: ``python -m
lmcache_s3layer.benchmarking serve-proxy`` (the proxy process) must start in a fraction of a
second, and importing this module must not import lmcache before vLLM initialises (see the
package docstring).

Pieces (used by ``benchmarks/pipeline.py`` and ``benchmarks/s3_throughput.py``):

- ``Testbed``: SeaweedFS (``LocalS3Server``) plus a ``LatencyProxy`` in its own process, so
  the proxy's Python byte pumping neither holds the benchmark's GIL nor counts as our CPU time.
  The proxy listens twice: on 127.0.0.1 for path-style clients (boto3, ours), and on
  127.0.0.2 for LMCache's stock ``s3://`` connector, which only speaks virtual-hosted style
  (its ``Host`` header is the whole ``s3://`` authority; LMCache issue #2621). SeaweedFS is
  started with ``-s3.domainName=0.0.2``, so ``Host: 127.0.0.2:<port>`` reads as bucket
  ``127`` in domain ``0.0.2`` while ``127.0.0.1`` keeps meaning path style. ``<bucket>.localhost``
  would be the usual trick, but it does not resolve here (glibc has no ``*.localhost`` rule)
  and awscrt resolves the Host header itself.
- ``build_engine`` / ``destroy_engine``: an ``LMCacheEngine`` built through
  ``LMCacheEngineBuilder`` as LMCache's vLLM adapter does (copied from tests/engine_helpers,
  which users cannot import), with our ``CPULayerwiseConnector`` (layerwise) or
  ``ChunkConnector`` (non-layerwise, for the stock connector, which cannot store layers).
- ``retrieve_layerwise_timed`` / ``retrieve_blocking_timed``: TTFT timelines with a
  simulated per-layer compute time (``simulate_compute``: ``time.sleep``, see there).
- ``ranged_get_seconds``: a plain boto3 parallel ranged-GET read, the bandwidth reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .server import LocalS3Server

# LMCache phones home from every engine start unless told not to; its INFO lines (one per
# store and retrieve) would drown the benchmark's output.
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

MIB = 1024 * 1024
VHOST_DOMAIN = "0.0.2"
VHOST_LISTEN = "127.0.0.2"
VHOST_BUCKET = "127"  # Host 127.0.0.2 = bucket "127" + domain "0.0.2"
PATH_LISTEN = "127.0.0.1"
HASH_ALGORITHM = "sha256_cbor"  # process-independent chunk hashes, no PYTHONHASHSEED needed


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# model shape


@dataclass(frozen=True)
class KVShape:
    """Per-TP-rank KV geometry of a model."""

    model_name: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    chunk_size: int = 256
    dtype: str = "bfloat16"

    @property
    def hidden(self) -> int:
        return self.num_kv_heads * self.head_size

    @property
    def dtype_bytes(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]

    @property
    def bytes_per_token_layer(self) -> int:
        return 2 * self.hidden * self.dtype_bytes

    def layer_bytes(self, tokens: int) -> int:
        return tokens * self.bytes_per_token_layer

    def kv_bytes(self, tokens: int) -> int:
        return self.num_layers * self.layer_bytes(tokens)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


LLAMA_31_8B = KVShape("meta-llama/Llama-3.1-8B", num_layers=32, num_kv_heads=8, head_size=128)


# --------------------------------------------------------------------------------------------
# S3 testbed: SeaweedFS + latency proxy process


class VirtualHostServer(LocalS3Server):
    """``LocalS3Server`` that also routes ``Host: <bucket>.<VHOST_DOMAIN>`` (virtual-hosted
    style) requests, for LMCache's stock connector. Path style keeps working for any Host that
    does not end in the domain."""

    def _command(self, binary: str) -> list[str]:
        return super()._command(binary) + [f"-s3.domainName={VHOST_DOMAIN}"]


class ProxyProcess:
    """Two ``LatencyProxy`` listeners (path style, virtual host) in a child process, driven
    over its stdin/stdout with one JSON line per command."""

    def __init__(self, upstream_port: int, delay_ms: float = 0.0):
        self.upstream_port = upstream_port
        self._delay_ms = delay_ms
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 20.0) -> "ProxyProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(repo_root()), env.get("PYTHONPATH", "")])
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache_s3layer.benchmarking", "serve-proxy",
             "--upstream-port", str(self.upstream_port), "--delay-ms", str(self._delay_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=env, start_new_session=True)
        hello = self._read(timeout)
        self.ports = {"path": int(hello["path_port"]), "vhost": int(hello["vhost_port"])}
        return self

    def _read(self, timeout: float) -> dict:
        assert self._proc is not None and self._proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self._proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise RuntimeError(f"latency proxy process did not answer (exit status {self._proc.poll()})")
        return json.loads(result[0])

    def command(self, **cmd: Any) -> dict:
        with self._lock:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(cmd) + "\n")
            self._proc.stdin.flush()
            return self._read(10.0)

    def set_delay(self, ms: float) -> None:
        self.command(op="delay", ms=ms)

    def stats(self) -> dict:
        return self.command(op="stats")

    def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(Exception):
            self.command(op="quit")
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None


def _serve_proxies(argv: Sequence[str]) -> int:
    """Child-process side of ``ProxyProcess``."""
    from .proxy import LatencyProxy

    p = argparse.ArgumentParser(prog="python -m lmcache_s3layer.benchmarking serve-proxy")
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    args = p.parse_args(argv)
    proxies = {
        "path": LatencyProxy("127.0.0.1", args.upstream_port, listen_host=PATH_LISTEN, delay_ms=args.delay_ms),
        "vhost": LatencyProxy("127.0.0.1", args.upstream_port, listen_host=VHOST_LISTEN, delay_ms=args.delay_ms),
    }
    for px in proxies.values():
        px.start()

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"path_port": proxies["path"].port, "vhost_port": proxies["vhost"].port})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "delay":
                for px in proxies.values():
                    px.set_delay(float(cmd["ms"]))
                reply({"ok": True})
            elif op == "stats":
                total: dict[str, int] = {}
                for px in proxies.values():
                    for k, v in px.stats().items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            total[k] = total.get(k, 0) + v
                reply(total)
            elif op == "quit":
                reply({"ok": True})
                break
            else:
                reply({"error": f"unknown op {op!r}"})
    finally:
        for px in proxies.values():
            px.stop()
    return 0


class Testbed:
    """SeaweedFS in a temporary directory behind a latency proxy process; a context manager.

    ``endpoint_url`` goes through the proxy (path style); ``direct_endpoint_url`` does not
    (set-up work such as bucket creation need not pay the injected latency).
    """

    def __init__(self, delay_ms: float = 0.0, data_dir: str | os.PathLike | None = None):
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="s3layer-bench-")
        self.data_dir = Path(data_dir or self._tmp)
        self.server = VirtualHostServer(data_dir=self.data_dir / "seaweedfs", name="bench")
        self.proxy: ProxyProcess | None = None
        self._delay_ms = delay_ms

    def __enter__(self) -> "Testbed":
        try:
            self.server.start(timeout=60)
            self.proxy = ProxyProcess(self.server.s3_port, self._delay_ms).start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        self.server.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{PATH_LISTEN}:{self.proxy.ports['path']}"

    @property
    def direct_endpoint_url(self) -> str:
        return self.server.endpoint_url

    @property
    def vhost_authority(self) -> str:
        """What goes after ``s3://`` in LMCache's ``remote_url`` (bucket ``VHOST_BUCKET``)."""
        return f"{VHOST_LISTEN}:{self.proxy.ports['vhost']}"

    @property
    def access_key(self) -> str:
        return self.server.access_key

    @property
    def secret_key(self) -> str:
        return self.server.secret_key

    @property
    def region(self) -> str:
        return self.server.region

    def set_delay(self, ms: float) -> None:
        self.proxy.set_delay(ms)

    def responses(self) -> int:
        """Responses the proxy has started (both listeners): one per S3 request."""
        return int(self.proxy.stats().get("responses", 0))

    def boto_client(self, direct: bool = False, max_pool_connections: int = 64):
        return make_boto_client(self.direct_endpoint_url if direct else self.endpoint_url, self.access_key,
                                self.secret_key, self.region, max_pool_connections)

    def create_bucket(self, name: str) -> str:
        self.boto_client(direct=True).create_bucket(Bucket=name)
        return name


def make_boto_client(endpoint_url: str, access_key: str, secret_key: str, region: str = "us-east-1",
                     max_pool_connections: int = 64):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=max_pool_connections,
                      retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30,
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"))


def unique_bucket(prefix: str = "s3layer-bench") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------------------------
# LMCache engine on CPU (logic from tests/engine_helpers.py)


def plugin_engine_values(bed: Testbed, bucket: str, prefix: str, *, max_local_cpu_gb: float,
                         **s3layer: Any) -> dict:
    """LMCache config (plain keys) for our plugin, layerwise, no LocalCPU cache tier."""
    extra = {
        "storage_plugin.s3layer.module_path": "lmcache_s3layer.backend",
        "storage_plugin.s3layer.class_name": "S3LayerBackend",
        "s3layer.bucket": bucket,
        "s3layer.prefix": prefix,
        "s3layer.endpoint_url": bed.endpoint_url,
        "s3layer.access_key_id": bed.access_key,
        "s3layer.secret_access_key": bed.secret_key,
        "s3layer.region": bed.region,
    }
    extra.update({f"s3layer.{k}": v for k, v in s3layer.items()})
    return {"use_layerwise": True, "local_cpu": False, "max_local_cpu_size": max_local_cpu_gb,
            "storage_plugins": ["s3layer"], "extra_config": extra}


def stock_s3_engine_values(bed: Testbed, *, max_local_cpu_gb: float, io_threads: int = 64) -> dict:
    """LMCache config for its own ``s3://`` connector (token-major, non-layerwise)."""
    return {
        "use_layerwise": False, "local_cpu": False, "max_local_cpu_size": max_local_cpu_gb,
        "remote_url": f"s3://{bed.vhost_authority}", "remote_serde": "naive",
        "blocking_timeout_secs": 60,
        "extra_config": {
            "s3_region": bed.region, "disable_tls": True, "s3_num_io_threads": io_threads,
            "aws_access_key_id": bed.access_key, "aws_secret_access_key": bed.secret_key,
            "save_chunk_meta": False,
        },
    }


def engine_config(values: dict, shape: KVShape):
    from lmcache.v1.config import LMCacheEngineConfig

    merged = {"chunk_size": shape.chunk_size, "save_unfull_chunk": False,
              "pre_caching_hash_algorithm": HASH_ALGORITHM, "enable_controller": False,
              "internal_api_server_enabled": False}
    merged.update(values)
    return LMCacheEngineConfig.from_dict(merged)


def engine_metadata(shape: KVShape):
    from lmcache.v1.metadata import LMCacheMetadata

    return LMCacheMetadata(
        model_name=shape.model_name, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=shape.torch_dtype(),
        kv_shape=(shape.num_layers, 2, shape.chunk_size, shape.num_kv_heads, shape.head_size),
        use_mla=False, role="worker", chunk_size=shape.chunk_size)


def build_engine(values: dict, shape: KVShape, connector: Any = None, instance_id: str | None = None):
    """``LMCacheEngineBuilder.get_or_create`` + ``post_init``, single rank, as LMCache's vLLM
    adapter builds it. ``connector``: default ``CPULayerwiseConnector`` (flash-attn layout
    caches from ``paged_kv_caches``). Release with ``destroy_engine``."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    config = engine_config(values, shape)
    metadata = engine_metadata(shape)
    if connector is None:
        connector = layerwise_connector(shape)
    instance_id = instance_id or f"s3layer-bench-{uuid.uuid4().hex[:12]}"
    engine = LMCacheEngineBuilder.get_or_create(instance_id, config, metadata, connector,
                                                lambda tensor, src: tensor, lambda obj, src: obj)
    engine.post_init()
    engine._s3layer_instance_id = instance_id
    return engine


def destroy_engine(engine) -> None:
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    LMCacheEngineBuilder.destroy(engine._s3layer_instance_id)


@contextlib.contextmanager
def lmcache_engine(values: dict, shape: KVShape, connector: Any = None) -> Iterator[Any]:
    engine = build_engine(values, shape, connector)
    try:
        yield engine
    finally:
        destroy_engine(engine)


def layerwise_connector(shape: KVShape):
    import torch

    from .cpu_connector import CPULayerwiseConnector

    return CPULayerwiseConnector.from_metadata(engine_metadata(shape), device=torch.device("cpu"),
                                               kv_layout="flash_attn")


def chunk_connector(shape: KVShape):
    """A non-layerwise CPU connector (``KV_2LTD`` chunks <-> the same paged caches)."""
    return _chunk_connector_class()(shape)


_CHUNK_CONNECTOR = None


def _chunk_connector_class():
    global _CHUNK_CONNECTOR
    if _CHUNK_CONNECTOR is not None:
        return _CHUNK_CONNECTOR
    import torch
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface

    class ChunkConnector(GPUConnectorInterface):
        """LMCache's non-layerwise path on CPU: each chunk object is ``[2, L, T, hidden]``.
        Per-layer copies reuse ``CPULayerwiseConnector``'s slot gather/scatter, so both
        variants pay the same copy cost per byte."""

        def __init__(self, shape: KVShape):
            self.inner = layerwise_connector(shape)
            self.num_layers = shape.num_layers
            self.hidden = shape.hidden
            self.kvcaches = None

        def initialize_kvcaches_ptr(self, **kwargs):
            self.inner.initialize_kvcaches_ptr(**kwargs)

        def get_shape(self, num_tokens: int) -> torch.Size:
            return torch.Size([2, self.num_layers, num_tokens, self.hidden])

        def _each(self, memory_objs, starts, ends, kwargs, fn):
            inner = self.inner
            plans = inner._prepare(starts, ends, kwargs)
            for plan, obj in zip(plans, memory_objs):
                t = obj.tensor.view(2, self.num_layers, plan.num_tokens, inner._layout.num_heads,
                                    inner._layout.head_size)
                for layer in range(self.num_layers):
                    fn(inner.kvcaches[layer], plan, t[:, layer].transpose(0, 1))  # [T, 2, H, D]

        def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
            def out(cache, plan, dst):
                dst.copy_(self.inner._gather(cache, plan.block_idx, plan.block_off))
            self._each(memory_objs, starts, ends, kwargs, out)

        def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
            def into(cache, plan, src):
                self.inner._scatter(cache, plan.block_idx, plan.block_off, src)
            self._each(memory_objs, starts, ends, kwargs, into)

        def from_gpu(self, memory_obj, start, end, **kwargs):
            self.batched_from_gpu([memory_obj], [start], [end], **kwargs)

        def to_gpu(self, memory_obj, start, end, **kwargs):
            self.batched_to_gpu([memory_obj], [start], [end], **kwargs)

    _CHUNK_CONNECTOR = ChunkConnector
    return ChunkConnector


@dataclass
class Prompt:
    tokens: Any  # torch.LongTensor [T]
    kvcaches: list  # per layer [2, NB, BS, H, D] (flash-attn layout)
    slot_mapping: Any  # torch.LongTensor [T]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def make_prompt(shape: KVShape, num_tokens: int, seed: int = 0, block_size: int = 16) -> Prompt:
    """Random tokens and random KV in paged caches, slots in order (a fresh request)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    blocks = -(-num_tokens // block_size)
    caches = [torch.randn((2, blocks, block_size, shape.num_kv_heads, shape.head_size), generator=g,
                          dtype=torch.float32).to(shape.torch_dtype()) for _ in range(shape.num_layers)]
    tokens = torch.randint(0, 128000, (num_tokens,), generator=g, dtype=torch.long)
    return Prompt(tokens, caches, torch.arange(num_tokens, dtype=torch.long))


def clear_prompt_kv(prompt: Prompt) -> None:
    for t in prompt.kvcaches:
        t.zero_()


# --------------------------------------------------------------------------------------------
# stepping with timings


def simulate_compute(seconds: float) -> None:
    """One layer's forward pass. ``time.sleep``, not a busy spin: on a GPU the layer runs on
    the device while the host thread waits, so it must leave the CPU and the GIL to the fetch
    threads as a GPU would; a Python spin would hold the GIL and one of the two cores and
    charge the pipeline for compute it does not share with. Sleep overshoot (~0.1 ms) is
    measured, not assumed: the timeline records real start/end times."""
    if seconds > 0:
        time.sleep(seconds)


@dataclass
class Timeline:
    """Times in seconds on ``time.monotonic`` (the prefetcher's trace clock)."""

    t0: float = 0.0  # lookup started
    retrieve_start: float = 0.0
    retrieve_end: float = 0.0  # blocking retrieve returned (non-layerwise only)
    resident: list[float] = field(default_factory=list)  # layer i in the paged cache
    compute: list[tuple[float, float]] = field(default_factory=list)
    end: float = 0.0  # last layer's compute finished
    hit_tokens: int = 0
    retrieved_tokens: int = 0

    @property
    def ttft_s(self) -> float:
        return self.end - self.t0


def store_layerwise(engine, prompt: Prompt, req_id: str = "bench-store") -> None:
    """``store_layer`` stepped as vLLM does: one ``next()`` per layer, one more at the end."""
    gen = engine.store_layer(prompt.tokens, mask=None, kvcaches=list(prompt.kvcaches),
                             slot_mapping=prompt.slot_mapping, offset=0, sync=True, req_id=req_id)
    for _ in range(engine.num_layers + 1):
        next(gen)
    with contextlib.suppress(StopIteration):
        next(gen)


def store_blocking(engine, prompt: Prompt, req_id: str = "bench-store") -> None:
    engine.store(prompt.tokens, kvcaches=list(prompt.kvcaches), slot_mapping=prompt.slot_mapping,
                 req_id=req_id)


def retrieve_layerwise_timed(engine, prompt: Prompt, compute_s: float, *, gap_s: float = 0.0,
                             lookup_id: str = "bench-req", before_retrieve: Callable[[], None] | None = None
                             ) -> Timeline:
    """lookup(pin=True), the scheduling gap, then ``retrieve_layer`` stepped as vLLM does:
    two ``next()`` in ``start_load_kv``, then one per layer, each followed by that layer's
    compute (step k+1 makes layer k resident). TTFT ends when the last layer's compute ends."""
    tl = Timeline()
    tl.t0 = time.monotonic()
    tl.hit_tokens = engine.lookup(tokens=prompt.tokens, lookup_id=lookup_id, pin=True)
    if gap_s > 0:
        time.sleep(gap_s)
    if before_retrieve is not None:
        before_retrieve()
    tl.retrieve_start = time.monotonic()
    gen = engine.retrieve_layer(prompt.tokens, mask=None, kvcaches=list(prompt.kvcaches),
                                slot_mapping=prompt.slot_mapping, sync=True, req_id=lookup_id)
    first = next(gen)
    tl.retrieved_tokens = int(first) if first is not None else 0
    for _layer in range(engine.num_layers):
        next(gen)
        start = time.monotonic()
        tl.resident.append(start)
        simulate_compute(compute_s)
        tl.compute.append((start, time.monotonic()))
    tl.end = tl.compute[-1][1] if tl.compute else time.monotonic()
    ret_mask = next(gen)  # the trailing sync step (after the last layer, off the TTFT)
    tl.retrieved_tokens = int(ret_mask.sum())
    with contextlib.suppress(StopIteration):
        next(gen)
    engine.lookup_unpin(lookup_id)
    return tl


def retrieve_blocking_timed(engine, prompt: Prompt, compute_s: float, *, gap_s: float = 0.0,
                            lookup_id: str = "bench-req") -> Timeline:
    """The non-layerwise path: lookup, gap, ``retrieve`` (everything loaded), then all layers'
    compute back to back, which is what vLLM does with a non-layerwise connector."""
    tl = Timeline()
    tl.t0 = time.monotonic()
    tl.hit_tokens = engine.lookup(tokens=prompt.tokens, lookup_id=lookup_id, pin=True)
    if gap_s > 0:
        time.sleep(gap_s)
    tl.retrieve_start = time.monotonic()
    ret_mask = engine.retrieve(prompt.tokens, kvcaches=list(prompt.kvcaches),
                               slot_mapping=prompt.slot_mapping, req_id=lookup_id)
    tl.retrieve_end = time.monotonic()
    tl.retrieved_tokens = int(ret_mask.sum())
    for _layer in range(engine.num_layers):
        start = time.monotonic()
        tl.resident.append(tl.retrieve_end)
        simulate_compute(compute_s)
        tl.compute.append((start, time.monotonic()))
    tl.end = tl.compute[-1][1]
    engine.lookup_unpin(lookup_id)
    return tl


# --------------------------------------------------------------------------------------------
# plain ranged GETs (the bandwidth reference)


def split_ranges(objects: Sequence[tuple[str, int, int]], part_size: int) -> list[tuple[str, int, int]]:
    """(key, offset, length) ranges of at most ``part_size`` covering each (key, offset, length)."""
    out = []
    for key, offset, length in objects:
        pos = offset
        while pos < offset + length:
            n = min(part_size, offset + length - pos)
            out.append((key, pos, n))
            pos += n
    return out


def ranged_get_seconds(client, bucket: str, ranges: Sequence[tuple[str, int, int]], concurrency: int) -> float:
    """Wall time for ``concurrency`` threads to GET every range with ``.read()`` into bytes."""
    def one(r):
        key, off, n = r
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + n - 1}")["Body"]
        data = body.read()
        if len(data) != n:
            raise RuntimeError(f"{key}: got {len(data)} of {n} bytes")
        return n

    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        total = sum(pool.map(one, ranges))
        elapsed = time.perf_counter() - t0
    assert total == sum(r[2] for r in ranges)
    return elapsed


_LAYER_OBJECT = re.compile(r"/seg/[0-9a-f]{2}/[^/]+/L\d{4}$")


def layer_objects(client, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """(key, size) of every layer object under ``prefix`` (our format v1 names)."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for o in page.get("Contents", []):
            if _LAYER_OBJECT.search(o["Key"]):
                out.append((o["Key"], int(o["Size"])))
    return sorted(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve-proxy"]:
        return _serve_proxies(argv[1:])
    print("usage: python -m lmcache_s3layer.benchmarking serve-proxy --upstream-port PORT [--delay-ms MS]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
