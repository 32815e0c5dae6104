"""GPU check: TTFT of a long prompt recomputed, loaded from S3 through lmcache-s3layer, and
loaded from LMCache's LocalCPU tier, on a real paged KV cache with real per-layer compute.

There is no vLLM on the GPU test machine (its CUDA wheels are too big to carry), so this
driver plays vLLM's part with transformers' Llama decoder layers: a paged KV cache in vLLM's
flash-attn layout (one ``[2, num_blocks, block_size, kv_heads, head_dim]`` tensor per layer),
a shuffled block table, and the layerwise protocol vLLM's LMCache adapter runs (lookup, then
``retrieve_layer``: two steps before the forward, one before each layer's attention;
``store_layer``: one step after each layer, one at the end). LMCache's own CUDA layerwise
connector (``VLLMPagedMemLayerwiseGPUConnector``) moves the KV; ``--device cpu`` swaps in our
``CPULayerwiseConnector`` (same layout, same protocol) so every other line runs on CPU too.

Scenarios (prompt = prefix of whole chunks + a suffix that is always computed):

* ``recompute``: the whole prompt through all layers, no cache;
* ``s3 +X ms``: a fresh engine looks the prefix up in S3 (through the latency proxy adding X
  ms to every response) and loads it layer by layer while the suffix is computed;
* ``localcpu``: the same from LMCache's LocalCPU layerwise path (KV in host memory).

Each loaded run checks that the prefix KV in the paged cache is bit-identical to what the
recompute wrote (the paged cache is filled with garbage first), and reports the largest
difference of the suffix's last hidden state from the recomputed one. Output: one table and,
with ``--json``, the rows as JSON.

    PYTHONHASHSEED=0 python scripts/gpu_check.py                      # CUDA, Llama-8B-shaped
    PYTHONHASHSEED=0 python scripts/gpu_check.py --device cpu --dry-run   # tiny, on CPU

Without ``--endpoint`` a local SeaweedFS (``lmcache_s3layer.server``) is started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Llama-3.1-8B's shape (4 KiB of bf16 KV per token per layer), and a tiny one for --dry-run.
FULL = dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
            chunk=256, prefix_chunks=32, suffix=256, block=16)
TINY = dict(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256,
            chunk=64, prefix_chunks=4, suffix=24, block=16)


@dataclass
class Row:
    scenario: str
    ttft_ms: float
    loaded_tokens: int
    kv_identical: bool | None
    max_abs_diff: float | None
    note: str = ""


# ----------------------------------------------------------------------------- the model


class PagedLlama:
    """Decoder layers of a random-weight Llama over a paged KV cache, one layer at a time."""

    def __init__(self, s: dict, device, dtype, seed: int = 0):
        import torch
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        torch.manual_seed(seed)
        self.torch, self.device, self.dtype, self.s = torch, device, dtype, s
        cfg = LlamaConfig(vocab_size=32000, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                          max_position_embeddings=max(8192, 2 * (s["chunk"] * s["prefix_chunks"] + s["suffix"])))
        with torch.device(device):
            self.layers = [LlamaDecoderLayer(cfg, i).to(dtype).eval() for i in range(s["layers"])]
            self.rope = LlamaRotaryEmbedding(cfg)
            self.embed = torch.nn.Embedding(cfg.vocab_size, s["hidden"]).to(dtype)
        self.scale = s["head_dim"] ** -0.5

    def new_cache(self, num_tokens: int, seed: int):
        """Per-layer ``[2, NB, BS, H, D]`` tensors and a slot mapping over shuffled blocks."""
        torch, s = self.torch, self.s
        bs = s["block"]
        nb = (num_tokens + bs - 1) // bs + 4
        g = torch.Generator().manual_seed(seed)
        table = torch.randperm(nb, generator=g)[: (num_tokens + bs - 1) // bs]
        t = torch.arange(num_tokens)
        slots = (table[t // bs] * bs + t % bs).to(self.device)
        caches = [torch.zeros(2, nb, bs, s["kv_heads"], s["head_dim"], dtype=self.dtype, device=self.device)
                  for _ in range(s["layers"])]
        return caches, slots

    def layer(self, i: int, h, positions, caches, slots_new, slots_ctx):
        """Layer ``i`` for new tokens at ``positions`` attending to every token in ``slots_ctx``
        (the new ones included, written to the cache first, as vLLM's attention does)."""
        torch = self.torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        lay, s = self.layers[i], self.s
        n = h.shape[0]
        res = h
        x = lay.input_layernorm(h)
        att = lay.self_attn
        q = att.q_proj(x).view(n, s["heads"], s["head_dim"]).transpose(0, 1)[None]
        k = att.k_proj(x).view(n, s["kv_heads"], s["head_dim"]).transpose(0, 1)[None]
        v = att.v_proj(x).view(n, s["kv_heads"], s["head_dim"]).transpose(0, 1)[None]
        cos, sin = self.rope(x[None], positions[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kv = caches[i].view(2, -1, s["kv_heads"], s["head_dim"])
        kv[0, slots_new] = k[0].transpose(0, 1)
        kv[1, slots_new] = v[0].transpose(0, 1)
        kc = kv[0, slots_ctx].transpose(0, 1)[None]
        vc = kv[1, slots_ctx].transpose(0, 1)[None]
        ctx = slots_ctx.shape[0]
        if ctx == n:
            out = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, is_causal=True, enable_gqa=True)
        else:
            key_pos = torch.arange(ctx, device=self.device)
            mask = key_pos[None, :] <= positions[:, None]
            out = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
        h = res + att.o_proj(out[0].transpose(0, 1).reshape(n, -1))
        return h + lay.mlp(lay.post_attention_layernorm(h))

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


# ----------------------------------------------------------------------------- LMCache


def lmcache_config(s: dict, plugin: dict | None, cpu_gib: float):
    from lmcache.v1.config import LMCacheEngineConfig

    values = {"chunk_size": s["chunk"], "use_layerwise": True, "save_unfull_chunk": False,
              "pre_caching_hash_algorithm": "builtin", "enable_controller": False,
              "internal_api_server_enabled": False, "max_local_cpu_size": cpu_gib}
    if plugin is None:
        values["local_cpu"] = True
    else:
        values.update({"local_cpu": False, "storage_plugins": ["s3layer"], "extra_config": plugin})
    return LMCacheEngineConfig.from_dict(values)


def build_engine(s: dict, dtype, device, plugin: dict | None, cpu_gib: float):
    import torch
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.metadata import LMCacheMetadata

    config = lmcache_config(s, plugin, cpu_gib)
    meta = LMCacheMetadata(model_name="s3layer/gpu-check", world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=dtype,
                           kv_shape=(s["layers"], 2, s["chunk"], s["kv_heads"], s["head_dim"]),
                           use_mla=False, role="worker", chunk_size=s["chunk"])
    if device.type == "cuda":
        # LMCache's own CUDA layerwise connector, exactly as its vLLM path creates it.
        from lmcache.v1.gpu_connector.gpu_connectors import VLLMPagedMemLayerwiseGPUConnector

        try:
            from lmcache.v1.gpu_connector import need_gpu_interm_buffer
            use_gpu = bool(need_gpu_interm_buffer(config))
        except ImportError:
            use_gpu = False
        connector = VLLMPagedMemLayerwiseGPUConnector.from_metadata(meta, use_gpu, device)
    else:
        from lmcache_s3layer.cpu_connector import CPULayerwiseConnector

        connector = CPULayerwiseConnector.from_metadata(meta, device=torch.device("cpu"), kv_layout="flash_attn")
    iid = f"gpu-check-{uuid.uuid4().hex[:8]}"
    engine = LMCacheEngineBuilder.get_or_create(iid, config, meta, connector, lambda t, src: t, lambda o, src: o)
    engine.post_init()
    engine._gpu_check_id = iid
    return engine


def destroy_engine(engine) -> None:
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    LMCacheEngineBuilder.destroy(engine._gpu_check_id)


# ----------------------------------------------------------------------------- runs


def forward_all(model, ids, caches, slots, store_gens=()):
    """The whole prompt, layer by layer; each store generator steps after each layer."""
    torch = model.torch
    pos = torch.arange(ids.shape[0], device=model.device)
    h = model.embed(ids)
    for i in range(model.s["layers"]):
        h = model.layer(i, h, pos, caches, slots, slots)
        model.sync()  # the store reads layer i from the cache right after
        for g in store_gens:
            next(g)
    for g in store_gens:
        next(g)  # vLLM's wait_for_save: puts the last layer
    return h[-1]


def forward_with_load(model, engine, ids, prefix: int, caches, slots, req: str):
    """Lookup (starts the plugin's prefetch), then the suffix, loading layer i before layer i's
    attention. Returns (last hidden, loaded tokens)."""
    torch = model.torch
    hit = engine.lookup(tokens=ids.cpu(), lookup_id=req, pin=True)
    load_n = min(hit, prefix)
    mask = torch.zeros(ids.shape[0], dtype=torch.bool)
    mask[:load_n] = True
    gen = engine.retrieve_layer(ids[:load_n].cpu(), mask=None, kvcaches=caches, slot_mapping=slots[:load_n],
                                sync=True, req_id=req)
    next(gen)
    next(gen)  # vLLM's start_load_kv: two steps before the forward
    pos = torch.arange(load_n, ids.shape[0], device=model.device)
    h = model.embed(ids[load_n:])
    ret_mask = None
    for i in range(model.s["layers"]):
        # vLLM's wait_for_layer_load(i): layer i is resident after it (the retriever runs one
        # layer ahead); the step before the last layer's attention yields the loaded mask.
        ret_mask = next(gen)
        h = model.layer(i, h, pos, caches, slots[load_n:], slots)
    model.sync()
    engine.lookup_unpin(req)
    loaded = int(ret_mask.sum()) if ret_mask is not None else 0
    return h[-1], loaded


def prefix_kv(caches, slots, prefix: int):
    out = []
    for c in caches:
        kv = c.view(2, -1, c.shape[-2], c.shape[-1])
        out.append(kv[:, slots[:prefix]].clone())
    return out


def same_bits(a, b) -> bool:
    return all(x.view(-1).view(dtype=__import__("torch").int16).equal(y.view(-1).view(dtype=__import__("torch").int16))
               for x, y in zip(a, b))


def garble(caches, seed: int):
    import torch

    g = torch.Generator(device=caches[0].device).manual_seed(seed)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=g, device=c.device, dtype=torch.float32).to(c.dtype))


def plugin_extra(endpoint: str, bucket: str, prefix: str, staging: int) -> dict:
    return {
        "storage_plugin.s3layer.module_path": "lmcache_s3layer.backend",
        "storage_plugin.s3layer.class_name": "S3LayerBackend",
        "s3layer.bucket": bucket, "s3layer.prefix": prefix, "s3layer.endpoint_url": endpoint,
        "s3layer.addressing_style": "path", "s3layer.region": "us-east-1",
        # LMCache logs its whole config: reference the credentials, never inline them.
        "s3layer.access_key_id": "env:AWS_ACCESS_KEY_ID", "s3layer.secret_access_key": "env:AWS_SECRET_ACCESS_KEY",
        # Staging is carved from LMCache's LocalCPU allocator (max_local_cpu_size).
        "s3layer.staging_budget_bytes": staging, "s3layer.put_inflight_budget_bytes": "4GiB",
        "s3layer.retrieval_deadline_s": 60,
    }


@contextlib.contextmanager
def s3_server(args):
    """(endpoint, access key, secret key): --endpoint with AWS_* credentials, or a local SeaweedFS."""
    if args.endpoint:
        yield args.endpoint, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        return
    sys.path.insert(0, str(REPO))
    from lmcache_s3layer.server import LocalS3Server

    srv = LocalS3Server(data_dir=Path(tempfile.mkdtemp(prefix="gpu-check-s3-"))).start(timeout=60)
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = srv.access_key, srv.secret_key
    try:
        yield srv.endpoint_url, srv.access_key, srv.secret_key
    finally:
        srv.stop()


def run(args) -> list[Row]:
    import torch
    from lmcache_s3layer.proxy import LatencyProxy

    s = dict(TINY if args.dry_run else FULL)
    for k in ("layers", "prefix_chunks", "suffix"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    prefix = s["chunk"] * s["prefix_chunks"]
    total = prefix + s["suffix"]
    model = PagedLlama(s, device, dtype)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 32000, (total,), generator=g).to(device)
    caches, slots = model.new_cache(total, seed=8)
    cpu_gib = max(0.25, 3 * s["layers"] * prefix * 2 * s["kv_heads"] * s["head_dim"] * 2 / 2**30)
    rows: list[Row] = []
    print(f"[gpu-check] device {device}, {s['layers']} layers, hidden {s['hidden']}, kv heads {s['kv_heads']}x"
          f"{s['head_dim']}, prompt {total} tokens = {prefix} cached + {s['suffix']} new", flush=True)

    with torch.inference_mode(), s3_server(args) as (endpoint, ak, sk):
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ak, aws_secret_access_key=sk,
                          region_name="us-east-1")
        bucket = args.bucket or f"gpu-check-{uuid.uuid4().hex[:8]}"
        if not args.bucket:
            s3.create_bucket(Bucket=bucket)
        up = endpoint.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        proxy = LatencyProxy(up[0], int(up[1])).start()
        try:
            key_prefix = f"gpu-check-{uuid.uuid4().hex[:8]}"
            extra = plugin_extra(proxy.endpoint_url, bucket, key_prefix, int(cpu_gib * 0.7 * 2**30))

            # (a) recompute; the first pass warms kernels and allocators up, the second is timed
            # and also stores to S3 and LocalCPU (the stores' time is not what is measured here).
            forward_all(model, ids, caches, slots)
            model.sync()
            t0 = time.perf_counter()
            ref_h = forward_all(model, ids, caches, slots)
            model.sync()
            rows.append(Row("recompute", (time.perf_counter() - t0) * 1000, 0, None, None,
                            f"{total} tokens through {s['layers']} layers"))
            ref_kv = prefix_kv(caches, slots, prefix)

            cpu_engine = build_engine(s, dtype, device, None, cpu_gib)
            s3_store = build_engine(s, dtype, device, extra, cpu_gib)
            try:
                stores = [e.store_layer(ids[:prefix].cpu(), mask=None, kvcaches=caches, slot_mapping=slots[:prefix],
                                        offset=0, sync=True, req_id=f"store-{n}")
                          for n, e in enumerate((s3_store, cpu_engine))]
                forward_all(model, ids, caches, slots, stores)
                backend = s3_store.storage_manager.storage_backends["s3layer"]
                if not backend.flush(300):
                    raise SystemExit("[gpu-check] uploads did not finish in 300 s")
            finally:
                destroy_engine(s3_store)

            def loaded_row(name: str, engine, req: str, note: str) -> None:
                garble(caches, seed=len(rows))
                assert not same_bits(prefix_kv(caches, slots, prefix), ref_kv)
                model.sync()
                t0 = time.perf_counter()
                h, loaded = forward_with_load(model, engine, ids, prefix, caches, slots, req)
                ttft = (time.perf_counter() - t0) * 1000
                ok = same_bits(prefix_kv(caches, slots, prefix), ref_kv) if loaded == prefix else False
                diff = float((h.float() - ref_h.float()).abs().max())
                rows.append(Row(name, ttft, loaded, ok, diff, note))

            try:
                for ms in args.latency_ms:
                    proxy.set_delay(ms)
                    engine = build_engine(s, dtype, device, extra, cpu_gib)  # a new instance: index from S3
                    try:
                        loaded_row(f"s3 +{ms:g} ms", engine, f"load-{ms}", "fresh engine, pointers from S3")
                        loaded_row(f"s3 +{ms:g} ms again", engine, f"load-{ms}-2", "same engine, index warm")
                    finally:
                        destroy_engine(engine)
                loaded_row("localcpu", cpu_engine, "load-cpu", "LMCache LocalCPU layerwise")
            finally:
                destroy_engine(cpu_engine)
        finally:
            proxy.stop()
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"\n{'scenario':<22} {'TTFT ms':>9} {'loaded':>7} {'KV identical':>13} {'max|dh|':>9}  note")
    for r in rows:
        ident = "-" if r.kv_identical is None else ("yes" if r.kv_identical else "NO")
        diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}"
        print(f"{r.scenario:<22} {r.ttft_ms:>9.1f} {r.loaded_tokens:>7} {ident:>13} {diff:>9}  {r.note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (LMCache's CUDA connector) or cpu (ours)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (seconds, any device)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--prefix-chunks", type=int)
    ap.add_argument("--suffix", type=int)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    ap.add_argument("--endpoint", help="S3 endpoint (credentials from AWS_*); default: a local SeaweedFS")
    ap.add_argument("--bucket", help="an existing bucket (default: a new one)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        # LMCache's builtin chunk hash needs a fixed seed; it is read at interpreter start.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
    rows = run(args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    bad = [r.scenario for r in rows if r.kv_identical is False]
    if bad:
        print(f"[gpu-check] FAILED: loaded KV differs from the recomputed KV in: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
