#!/usr/bin/env python
"""PUTs of a real store, counted where the S3 server receives them, against ``plan``'s count.

    benchmarks/put_count.py                      # 1,000,000 tokens, 32 layers, local SeaweedFS
    benchmarks/put_count.py --tokens 200000      # faster
    benchmarks/put_count.py --endpoint-url URL --bucket B   # another S3 endpoint (AWS_* credentials)

A prompt is stored through the real write path (``SegmentWriter``: planning against the
index, segments of at most ``segment_max_chunks`` chunks, layer objects, manifest, start
pointer) as LMCache's layerwise ``store_layer`` hands it over: one ``submit_layer`` per layer
with every chunk's buffer. The count of PUTs depends on tokens, layers, chunk size and
segment size, not on bytes per token, so the KV is tiny (``--token-shape 2 8``, half: 32
bytes per token per layer) and a million tokens take seconds to upload.

Counting at the server: the client talks to S3 through a small TCP proxy that forwards bytes
unchanged and parses the request stream (request line, then a body of Content-Length bytes,
or chunked) to count requests per method, so every request that reaches the server is
counted (retries included), whatever the client believes it sent. The bucket is created
before the proxy is in the path. The result is compared with ``lmcache-s3layer plan`` for
Llama-3.1-8B (32 layers) at the same token count, chunk size and segment size.

Prints one JSON object: plan's PUTs, the counted PUTs (and by object kind), and their ratio.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmcache_s3layer.format.objects import DTYPE_SIZES, Namespace, parse_key  # noqa: E402


class CountingProxy:
    """Forwards TCP connections to ``upstream`` byte for byte and counts the HTTP requests
    in each client->server stream, per method and per object kind (layer, manifest,
    pointer, other)."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.methods: collections.Counter[str] = collections.Counter()
        self.puts_by_kind: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="put-count-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def reset(self) -> None:
        with self._lock:
            self.methods.clear()
            self.puts_by_kind.clear()

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._client_to_server, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _client_to_server(self, src: socket.socket, dst: socket.socket) -> None:
        parser = _RequestParser(self._count)
        try:
            while data := src.recv(1 << 16):
                parser.feed(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _count(self, method: str, target: str) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
        key = path.lstrip("/").split("/", 1)[1] if path.count("/") >= 2 else ""  # path-style: /bucket/key
        parsed = parse_key(key) if key else None
        kind = "other" if parsed is None else parsed.kind if parsed.kind == "pointer" else (
            "manifest" if parsed.is_manifest else "layer")
        with self._lock:
            self.methods[method] += 1
            if method == "PUT":
                self.puts_by_kind[kind] += 1


class _RequestParser:
    """Incremental HTTP/1.1 request framing: heads, then Content-Length or chunked bodies."""

    def __init__(self, on_request):
        self.on_request = on_request
        self.buf = b""
        self.body_left = 0  # bytes of a Content-Length body still to skip
        self.chunked = False  # inside a chunked body

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.body_left:
                n = min(self.body_left, len(self.buf))
                self.buf, self.body_left = self.buf[n:], self.body_left - n
                if self.body_left:
                    return
            elif self.chunked:
                if not self._skip_chunk():
                    return
            else:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4:]
                lines = head.split("\r\n")
                method, target = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
                self.on_request(method, target)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self.chunked = True
                else:
                    self.body_left = int(headers.get("content-length", "0"))

    def _skip_chunk(self) -> bool:
        """Consume one chunk (or the last chunk and trailers); False when more bytes are needed."""
        line_end = self.buf.find(b"\r\n")
        if line_end < 0:
            return False
        size = int(self.buf[:line_end].split(b";")[0], 16)
        if size:
            need = line_end + 2 + size + 2
            if len(self.buf) < need:
                return False
            self.buf = self.buf[need:]
            return True
        trailers_end = self.buf.find(b"\r\n\r\n", line_end)
        if trailers_end < 0 and self.buf[line_end + 2:line_end + 4] != b"\r\n":
            return False
        self.buf = self.buf[(line_end + 4 if trailers_end < 0 else trailers_end + 4):]
        self.chunked = False
        return True


def plan_puts(tokens: int, chunk_size: int, segment_max_chunks: int, model: str = "llama-3.1-8b") -> dict[str, Any]:
    from lmcache_s3layer.admin import planner

    pl = planner.plan(planner.get_model(model), context_tokens=tokens, new_tokens=1,
                      layout=planner.LayoutSpec(chunk_size=chunk_size, segment_max_chunks=segment_max_chunks))
    return {"model": model, "layers": pl.model.num_layers, "puts": pl.put_requests, "detail": pl.ours.detail}


def count_store_puts(endpoint_url: str, access_key: str, secret_key: str, region: str, *, bucket: str | None = None,
                     tokens: int = 1_000_000, layers: int = 32, chunk_size: int = 256, segment_max_chunks: int = 64,
                     token_shape: tuple[int, ...] = (2, 8), dtype: str = "half",
                     put_workers: int = 4) -> dict[str, Any]:
    """Store ``tokens`` tokens through ``SegmentWriter`` against the server behind
    ``endpoint_url`` and count the requests the server receives."""
    import boto3
    from botocore.config import Config

    from lmcache_s3layer.cache.index import ChunkIndex
    from lmcache_s3layer.cache.writer import SegmentWriter
    from lmcache_s3layer.config import S3LayerConfig
    from lmcache_s3layer.store.client import S3Client
    from lmcache_s3layer.store.segments import SegmentStore

    own_bucket = bucket is None
    bucket = bucket or f"put-count-{uuid.uuid4().hex[:12]}"
    admin = boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name=region, config=Config(s3={"addressing_style": "path"}))
    if own_bucket:
        admin.create_bucket(Bucket=bucket)  # not through the proxy: only the store is counted
    host_port = urllib.parse.urlsplit(endpoint_url)
    proxy = CountingProxy(host_port.hostname or "127.0.0.1", host_port.port or 80)
    prefix = f"put-count-{uuid.uuid4().hex[:8]}"
    bpt = DTYPE_SIZES[dtype]
    for d in token_shape:
        bpt *= d
    chunk_tokens = [min(chunk_size, tokens - i) for i in range(0, tokens, chunk_size)]
    hashes = [hash(("put-count", prefix, i)) for i in range(len(chunk_tokens))]
    # Every chunk's buffer may be the same bytes: the writer only reads them.
    full, last = bytes(chunk_size * bpt), bytes(chunk_tokens[-1] * bpt)
    buffers = [full] * (len(chunk_tokens) - 1) + [last]
    layer_bytes = tokens * bpt
    cfg = S3LayerConfig(bucket=bucket, endpoint_url=proxy.endpoint_url, access_key_id=access_key,
                        secret_access_key=secret_key, region=region, prefix=prefix,
                        segment_max_chunks=segment_max_chunks, put_workers=put_workers,
                        put_inflight_budget_bytes=max(1 << 30, 2 * layers * layer_bytes))
    client = S3Client(cfg)
    store = SegmentStore(client, prefix)
    pool = ThreadPoolExecutor(16)
    index = ChunkIndex(store, pool=pool, lookup_timeout_s=60.0)
    writer = SegmentWriter(cfg, store, index)
    ns = Namespace("put-count/model", 1, 0, dtype)
    released = [0]
    t0 = time.perf_counter()
    try:
        for layer in range(layers):
            accepted = writer.submit_layer(ns, layer, layers, hashes, chunk_tokens, token_shape, buffers,
                                           lambda: released.__setitem__(0, released[0] + 1))
            if not accepted:
                raise RuntimeError(f"layer {layer} of the store was dropped (budget?): {writer.stats}")
        if not writer.flush(600):
            raise RuntimeError("the store did not finish within 10 minutes")
        seconds = time.perf_counter() - t0
        stats = writer.stats
        if stats.stores_failed or stats.segments_committed == 0:
            raise RuntimeError(f"the store failed: {stats}")
    finally:
        writer.close()
        pool.shutdown()
        client.close()
        proxy.close()
    counted = dict(proxy.methods)
    return {
        "tokens": tokens, "chunks": len(chunk_tokens), "layers": layers, "chunk_size": chunk_size,
        "segment_max_chunks": segment_max_chunks, "token_shape": list(token_shape), "dtype": dtype,
        "segments_committed": stats.segments_committed, "requests_by_method": counted,
        "counted_puts": counted.get("PUT", 0), "counted_puts_by_kind": dict(proxy.puts_by_kind),
        "client_retries": client.stats.retries, "seconds": round(seconds, 2),
        "bucket": bucket if not own_bucket else None,
    }


def run(tokens: int = 1_000_000, layers: int = 32, chunk_size: int = 256, segment_max_chunks: int = 64,
        token_shape: tuple[int, ...] = (2, 8), dtype: str = "half", endpoint: dict[str, str] | None = None,
        bucket: str | None = None) -> dict[str, Any]:
    """Counted vs planned PUTs; starts a local SeaweedFS server when no endpoint is given."""
    server = None
    if endpoint is None:
        from lmcache_s3layer.testing.server import LocalS3Server

        tmp = tempfile.mkdtemp(prefix="put-count-")
        server = LocalS3Server(data_dir=tmp)
        server.start(timeout=60)
        endpoint = {"endpoint_url": server.endpoint_url, "access_key": server.access_key,
                    "secret_key": server.secret_key, "region": server.region}
    try:
        counted = count_store_puts(endpoint["endpoint_url"], endpoint["access_key"], endpoint["secret_key"],
                                   endpoint["region"], bucket=bucket, tokens=tokens, layers=layers,
                                   chunk_size=chunk_size, segment_max_chunks=segment_max_chunks,
                                   token_shape=token_shape, dtype=dtype)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    planned = plan_puts(tokens, chunk_size, segment_max_chunks)
    if planned["layers"] != layers:
        raise ValueError(f"plan's model has {planned['layers']} layers, the store {layers}")
    return {"plan": planned, "plan_puts": planned["puts"], "counted": counted,
            "counted_puts": counted["counted_puts"], "ratio": round(counted["counted_puts"] / planned["puts"], 4)}


def main(argv: list[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=32, help="must match plan's model (llama-3.1-8b: 32)")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--segment-max-chunks", type=int, default=64)
    ap.add_argument("--token-shape", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--dtype", default="half")
    ap.add_argument("--endpoint-url", help="an existing S3 endpoint (credentials: AWS_ACCESS_KEY_ID/...); "
                    "default: start a local SeaweedFS server")
    ap.add_argument("--bucket", help="an existing bucket at --endpoint-url (default: a new one)")
    ap.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    args = ap.parse_args(argv)
    endpoint = None
    if args.endpoint_url:
        endpoint = {"endpoint_url": args.endpoint_url, "access_key": os.environ.get("AWS_ACCESS_KEY_ID", ""),
                    "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY", ""), "region": args.region}
    out = run(args.tokens, args.layers, args.chunk_size, args.segment_max_chunks, tuple(args.token_shape),
              args.dtype, endpoint, args.bucket)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
