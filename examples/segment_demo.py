"""The object format without LMCache: write one layer-major KV segment to a local S3 server,
read layers back with ranged GETs, verify them, and show what a corrupt byte does.

    .venv/bin/python examples/segment_demo.py            # starts its own SeaweedFS
    .venv/bin/python examples/segment_demo.py --endpoint-url http://127.0.0.1:8333 --bucket kv
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import CorruptObject
from lmcache_s3layer.format.objects import Namespace
from lmcache_s3layer.store.client import S3Client
from lmcache_s3layer.store.segments import SegmentStore
from lmcache_s3layer.testing.server import LocalS3Server

# Llama-3.1-8B per token per layer: 2 (K,V) x 8 kv heads x 128 x bf16 = 4 KiB.
LAYERS, HIDDEN, CHUNK = 32, 8 * 128, 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint-url")
    ap.add_argument("--bucket", default="s3layer-demo")
    ap.add_argument("--chunks", type=int, default=4)
    args = ap.parse_args()

    server = None
    if args.endpoint_url is None:
        server = LocalS3Server(data_dir=tempfile.mkdtemp(prefix="s3layer-demo-")).start()
        print(f"started SeaweedFS at {server.endpoint_url} (pid {server.pid})")
        endpoint, key, secret = server.endpoint_url, server.access_key, server.secret_key
    else:
        endpoint = args.endpoint_url
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    try:
        cfg = S3LayerConfig(bucket=args.bucket, endpoint_url=endpoint, access_key_id=key,
                            secret_access_key=secret, prefix="demo")
        client = S3Client(cfg)
        client.create_bucket_if_missing()
        store = SegmentStore(client, cfg.prefix)
        ns = Namespace("meta-llama/Llama-3.1-8B", 1, 0, "bfloat16")
        tokens = [CHUNK] * args.chunks
        rng = random.Random(0)
        layers = [rng.randbytes(sum(tokens) * 2 * HIDDEN * 2) for _ in range(LAYERS)]
        hashes = [rng.getrandbits(63) for _ in tokens]

        t0 = time.perf_counter()
        m = store.write_segment(ns, hashes, tokens, (2, HIDDEN), layers)
        dt = time.perf_counter() - t0
        total = sum(len(b) for b in layers)
        print(f"wrote segment {m.segment_id}: {LAYERS} layer objects of {m.layer_bytes >> 20} MiB "
              f"({args.chunks} chunks x {CHUNK} tokens), manifest, 1 pointer (its first chunk) "
              f"= {client.stats.puts} PUTs, {total / dt / 2**20:.0f} MiB/s")
        print(f"  per-(chunk, layer) objects would have been {LAYERS * args.chunks} PUTs")

        ptr = store.read_pointer(ns, hashes[0])
        m2 = store.read_manifest(ns, ptr.segment_id)
        print(f"pointer of chunk 0 -> segment {ptr.segment_id[:8]}... ({ptr.chunks} chunks); manifest verified")

        gets0, t0 = client.stats.gets, time.perf_counter()
        for layer in range(LAYERS):
            buf = store.read_layer(m2, layer, 1, 2)  # chunks 1..2 of every layer, one ranged GET each
            lo = tokens[0] * m2.bytes_per_token
            assert bytes(buf) == layers[layer][lo:lo + 2 * CHUNK * m2.bytes_per_token]
        dt = time.perf_counter() - t0
        print(f"read chunks 1..2 of all {LAYERS} layers: {client.stats.gets - gets0} ranged GETs, "
              f"{2 * CHUNK * m2.bytes_per_token * LAYERS >> 20} MiB in {dt * 1e3:.0f} ms, every chunk CRC32C-verified")

        k = store.names(ns).layer_object(m.segment_id, 7)
        bad = bytearray(layers[7])
        bad[12345] ^= 1
        client.put_bytes(k, bytes(bad))
        try:
            store.read_layer(m2, 7, 0, args.chunks - 1)
            print("ERROR: corruption went unnoticed")
            return 1
        except CorruptObject as exc:
            print(f"flipped one bit in layer 7 -> {type(exc).__name__}: {exc}; no data returned")
        store.delete_segment(m2)
        print("deleted the segment (pointer, then manifest, then layers)")
        return 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
