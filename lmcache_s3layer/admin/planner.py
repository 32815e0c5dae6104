"""Capacity planner: will a layer-major S3 KV tier hide behind compute, and what does it cost?

Pure arithmetic (no I/O apart from reading a ``config.json`` on request, no lmcache/torch), so
it runs anywhere and can be checked by hand. Every formula follows
``shared/reference/performance-anchors.md`` ("anchors" below); section numbers are cited where a
formula or constant comes from, and the tests re-derive the anchors' table cells.

Units: bytes are exact integers; bandwidths are decimal (1 Gbps = 1e9 bit/s, 1 GB/s = 1e9 B/s,
as NIC and S3 throughput figures are quoted); prices are per binary GB (2**30 B), see
``GIB_BILLING``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lmcache_s3layer.cache.prefetch import staging_budget_needed
from lmcache_s3layer.config import fmt_bytes
from lmcache_s3layer.store.ranges import count_parts

MIB = 1 << 20
GIB = 1 << 30

# AWS bills "GB" as 2**30 bytes: the S3 FAQ's worked examples divide byte-hours by
# 1,073,741,824 bytes per GB, and S3 Express's per-GB upload/retrieval fees by 1,048,576 KB.
# The anchors (§5.5) used 2**30 for Express's per-GB fees but 1e9 for storage, so their
# $3.01/$14.42 per month for 1M tokens of 8B are ~7% above what this module prints.
GIB_BILLING = GIB

# §4.1 (dvassallo/s3-benchmark): ~93 MB/s per connection once the first byte has arrived.
DEFAULT_STREAM_MBPS = 93.0
# §4.3: per *partitioned* prefix of an S3 Standard bucket.
S3_GET_PER_S_PER_PREFIX = 5_500
S3_PUT_PER_S_PER_PREFIX = 3_500
# §4.4: a single PUT may carry up to 5 GiB; beyond that an object needs multipart.
S3_MAX_SINGLE_PUT = 5 * GIB


class PlannerError(ValueError):
    """Bad planner input; the message is meant for the person at the command line."""


DTYPE_BYTES = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "fp8": 1,
    "float8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


def dtype_bytes(dtype: str) -> int:
    key = str(dtype).lower().removeprefix("torch.")
    try:
        return DTYPE_BYTES[key]
    except KeyError:
        known = ", ".join(sorted(DTYPE_BYTES))
        raise PlannerError(f"unknown dtype {dtype!r}; known: {known}") from None


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a decoder-only transformer.

    ``params_per_layer`` is what one token multiplies through (FLOPs); ``weight_params_per_layer``
    is what a forward pass reads from HBM. They differ only for mixture-of-experts layers, where
    a long prefill touches every expert but each token uses only top-k of them.
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_q_heads: int
    params_per_layer: float
    dtype: str = "bfloat16"
    kv_dtype: str | None = None  # None: the KV cache is stored in the model dtype
    weight_params_per_layer: float | None = None
    embedding_params: float = 0.0  # only used for the "does it fit in HBM" check
    source: str = ""

    def __post_init__(self) -> None:
        for attr in ("num_layers", "num_kv_heads", "head_dim", "num_q_heads"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value <= 0:
                raise PlannerError(f"model {attr} must be a positive integer, got {value!r}")
        if not self.params_per_layer > 0:
            raise PlannerError(f"params per layer must be > 0, got {self.params_per_layer!r}")
        dtype_bytes(self.dtype)
        dtype_bytes(self.effective_kv_dtype)

    @property
    def effective_kv_dtype(self) -> str:
        return self.kv_dtype or self.dtype

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        # design.md "The physics": K and V, each kv_heads x head_dim elements.
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes(self.effective_kv_dtype)

    @property
    def attn_width(self) -> int:
        # §5.3's n_heads*head_dim: the width of QK^T and AV, which is not hidden_size for models
        # such as Qwen3-32B (64 x 128 = 8192 against a 5120 residual stream).
        return self.num_q_heads * self.head_dim

    @property
    def layer_weight_bytes(self) -> float:
        weights = self.weight_params_per_layer or self.params_per_layer
        return weights * dtype_bytes(self.dtype)


def dense_layer_params(
    hidden: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate: int,
    *,
    qk_norm: bool = False,
    attn_bias: bool = False,
) -> int:
    """Parameters of one Llama-style layer: GQA attention, SwiGLU MLP (3 matrices), 2 RMSNorms.

    Reproduces §5.1: 218.1M for Llama-3.1-8B and 855.6M for Llama-3.1-70B.
    """
    q = hidden * num_q_heads * head_dim
    kv = 2 * hidden * num_kv_heads * head_dim
    o = num_q_heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    norms = 2 * hidden + (2 * head_dim if qk_norm else 0)
    bias = (num_q_heads + 2 * num_kv_heads) * head_dim if attn_bias else 0
    return q + kv + o + mlp + norms + bias


def _builtin(
    name: str,
    *,
    layers: int,
    hidden: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    vocab: int,
    tied: bool,
    qk_norm: bool = False,
    source: str,
) -> ModelShape:
    return ModelShape(
        name=name,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_q_heads=q_heads,
        params_per_layer=dense_layer_params(
            hidden, q_heads, kv_heads, head_dim, intermediate, qk_norm=qk_norm
        ),
        embedding_params=vocab * hidden * (1 if tied else 2),
        source=source,
    )


MODELS: dict[str, ModelShape] = {
    # Dims: anchors §5.1 (= the published config.json). 32 x 218.1M + 2 x 128256 x 4096
    # embeddings = 8.03B, the advertised size.
    "llama-3.1-8b": _builtin(
        "llama-3.1-8b", layers=32, hidden=4096, q_heads=32, kv_heads=8, head_dim=128,
        intermediate=14336, vocab=128256, tied=False,
        source="anchors §5.1 / meta-llama/Llama-3.1-8B config.json",
    ),
    # 80 x 855.6M + 2 x 128256 x 8192 = 70.55B (§5.1).
    "llama-3.1-70b": _builtin(
        "llama-3.1-70b", layers=80, hidden=8192, q_heads=64, kv_heads=8, head_dim=128,
        intermediate=28672, vocab=128256, tied=False,
        source="anchors §5.1 / meta-llama/Llama-3.1-70B config.json",
    ),
    # Not in the anchors: dims from Qwen/Qwen3-32B's config.json as recalled (hidden 5120,
    # intermediate 25600, vocab 151936, untied, per-head q/k RMSNorm). They reproduce the model
    # card's 31.2B non-embedding / 32.8B total parameters, which is the cross-check.
    "qwen3-32b": _builtin(
        "qwen3-32b", layers=64, hidden=5120, q_heads=64, kv_heads=8, head_dim=128,
        intermediate=25600, vocab=151936, tied=False, qk_norm=True,
        source="Qwen/Qwen3-32B config.json (checked against the 31.2B non-embedding count)",
    ),
}


def _normalise_model_name(name: str) -> str:
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = key.removeprefix("meta-")
    for suffix in ("-instruct", "-hf"):
        key = key.removesuffix(suffix)
    return key


def get_model(name: str) -> ModelShape:
    """A built-in model by name; Hugging Face ids such as ``meta-llama/Llama-3.1-8B-Instruct``
    resolve too, since the KV shape does not depend on the fine-tune."""
    key = _normalise_model_name(name)
    if key not in MODELS:
        raise PlannerError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))} "
            "(or pass --hf-config PATH, or the explicit shape flags)"
        )
    return MODELS[key]


def model_from_dims(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    num_q_heads: int,
    params_per_layer: float | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    dtype: str = "bfloat16",
    name: str = "custom",
) -> ModelShape:
    if params_per_layer is None:
        if hidden_size is None or intermediate_size is None:
            raise PlannerError(
                "an explicit shape needs the parameters per layer (for compute time): give "
                "params per layer, or hidden size and intermediate (MLP) size"
            )
        for label, value in (("hidden size", hidden_size), ("intermediate size", intermediate_size)):
            if value <= 0:
                raise PlannerError(f"{label} must be > 0, got {value}")
        params_per_layer = dense_layer_params(
            hidden_size, num_q_heads, num_kv_heads, head_dim, intermediate_size
        )
    return ModelShape(
        name=name,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_q_heads=num_q_heads,
        params_per_layer=params_per_layer,
        dtype=dtype,
        source="explicit shape",
    )


def _cfg_int(cfg: dict[str, Any], key: str, path: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlannerError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return value


def model_from_hf_config(path: str | Path) -> ModelShape:
    """Read a Hugging Face ``config.json`` (Llama, Mistral, Qwen2/3 and their MoE variants)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise PlannerError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlannerError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PlannerError(f"{path} does not hold a JSON object")

    cfg = raw
    # Multimodal wrappers keep the language model under text_config.
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"]}
        cfg.setdefault("torch_dtype", raw.get("torch_dtype") or raw.get("dtype"))

    if "kv_lora_rank" in cfg:
        # DeepSeek-style MLA caches one compressed latent per token, not K and V per head.
        raise PlannerError(
            f"{path}: MLA models (kv_lora_rank) cache a compressed latent; the planner's "
            "2 x kv_heads x head_dim KV formula does not apply to them"
        )

    layers = _cfg_int(cfg, "num_hidden_layers", path)
    hidden = _cfg_int(cfg, "hidden_size", path)
    q_heads = _cfg_int(cfg, "num_attention_heads", path)
    kv_heads = cfg.get("num_key_value_heads") or q_heads  # absent means plain multi-head
    if not isinstance(kv_heads, int) or kv_heads <= 0:
        raise PlannerError(f"{path}: 'num_key_value_heads' must be a positive integer")
    head_dim = cfg.get("head_dim") or hidden // q_heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise PlannerError(f"{path}: 'head_dim' must be a positive integer")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    vocab = cfg.get("vocab_size") or 0
    tied = bool(cfg.get("tie_word_embeddings", False))
    model_type = str(cfg.get("model_type", ""))
    qk_norm = model_type.startswith("qwen3")
    attn_bias = bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe")))

    attn_and_norms = dense_layer_params(
        hidden, q_heads, kv_heads, head_dim, 0, qk_norm=qk_norm, attn_bias=attn_bias
    )
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if experts:
        top_k = _cfg_int(cfg, "num_experts_per_tok", path)
        expert_ff = cfg.get("moe_intermediate_size") or _cfg_int(cfg, "intermediate_size", path)
        shared_ff = cfg.get("shared_expert_intermediate_size") or 0
        dense_ff = cfg.get("intermediate_size") or expert_ff
        router = hidden * experts
        moe_active = 3 * hidden * (top_k * expert_ff + shared_ff) + router
        moe_weights = 3 * hidden * (experts * expert_ff + shared_ff) + router
        dense_mlp = 3 * hidden * dense_ff
        # Qwen-MoE places MoE blocks every decoder_sparse_step layers, except mlp_only_layers.
        step = cfg.get("decoder_sparse_step") or 1
        dense_only = set(cfg.get("mlp_only_layers") or [])
        n_moe = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        n_dense = layers - n_moe
        active = attn_and_norms + (n_moe * moe_active + n_dense * dense_mlp) / layers
        weights = attn_and_norms + (n_moe * moe_weights + n_dense * dense_mlp) / layers
    else:
        active = attn_and_norms + 3 * hidden * _cfg_int(cfg, "intermediate_size", path)
        weights = None

    return ModelShape(
        name=str(raw.get("_name_or_path") or path.parent.name or path.name),
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_q_heads=q_heads,
        params_per_layer=active,
        weight_params_per_layer=weights,
        dtype=str(dtype),
        embedding_params=vocab * hidden * (1 if tied else 2),
        source=str(path),
    )


# --------------------------------------------------------------------------------------------
# GPU, link, prices, layout


@dataclass(frozen=True)
class GpuSpec:
    name: str
    flops: float  # dense bf16 peak, FLOP/s per GPU
    hbm_bandwidth: float  # B/s per GPU
    hbm_bytes: float = 80e9
    efficiency: float = 0.5  # §5.1: 50% of dense peak
    count: int = 1  # tensor-parallel GPUs serving the request (§5.1: 70B at TP=8)

    def __post_init__(self) -> None:
        if not self.flops > 0 or not self.hbm_bandwidth > 0 or not self.hbm_bytes > 0:
            raise PlannerError("GPU FLOP/s, HBM bandwidth and HBM size must be > 0")
        if not 0 < self.efficiency <= 1:
            raise PlannerError(f"GPU efficiency must be in (0, 1], got {self.efficiency}")
        if self.count < 1:
            raise PlannerError(f"GPU count must be >= 1, got {self.count}")

    @property
    def effective_flops(self) -> float:
        # Ideal tensor parallelism; the anchors' 70B TP=8 rows assume the same.
        return self.flops * self.efficiency * self.count

    @property
    def total_hbm_bandwidth(self) -> float:
        return self.hbm_bandwidth * self.count


GPUS: dict[str, GpuSpec] = {
    # §5.1 for H100 SXM; H200 has the same compute with faster HBM3e; A100 SXM 80GB.
    "h100": GpuSpec("h100", 989e12, 3.35e12, 80e9),
    "h200": GpuSpec("h200", 989e12, 4.8e12, 141e9),
    "a100": GpuSpec("a100", 312e12, 2.0e12, 80e9),
}


def get_gpu(
    name: str = "h100",
    *,
    tflops: float | None = None,
    hbm_tbps: float | None = None,
    hbm_gb: float | None = None,
    efficiency: float | None = None,
    count: int | None = None,
) -> GpuSpec:
    try:
        gpu = GPUS[name.lower()]
    except KeyError:
        raise PlannerError(f"unknown GPU {name!r}; known GPUs: {', '.join(sorted(GPUS))}") from None
    changes: dict[str, Any] = {}
    if tflops is not None:
        changes["flops"] = tflops * 1e12
    if hbm_tbps is not None:
        changes["hbm_bandwidth"] = hbm_tbps * 1e12
    if hbm_gb is not None:
        changes["hbm_bytes"] = hbm_gb * 1e9
    if efficiency is not None:
        changes["efficiency"] = efficiency
    if count is not None:
        changes["count"] = count
    return replace(gpu, **changes) if changes else gpu


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_gbps: float = 100.0  # §5.3's 12.5 GB/s reference point
    latency_ms: float = 20.0  # §4.1: p90 time-to-first-byte on S3 Standard
    stream_mbps: float = DEFAULT_STREAM_MBPS  # MB/s per connection after the first byte
    # How far above ``latency_ms`` a slow first byte lands (the tail). The staging budget is
    # sized on latency + jitter, so the pipeline keeps the link busy through slow responses.
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise PlannerError(f"link bandwidth must be > 0 Gbps, got {self.bandwidth_gbps}")
        if self.latency_ms < 0:
            raise PlannerError(f"first-byte latency must be >= 0 ms, got {self.latency_ms}")
        if self.jitter_ms < 0:
            raise PlannerError(f"latency jitter must be >= 0 ms, got {self.jitter_ms}")
        if not self.stream_mbps > 0:
            raise PlannerError(f"per-stream throughput must be > 0 MB/s, got {self.stream_mbps}")

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8


@dataclass(frozen=True)
class PriceSheet:
    name: str
    put_per_1k: float
    get_per_1k: float
    storage_per_gb_month: float
    upload_per_gb: float = 0.0
    retrieval_per_gb: float = 0.0

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if key != "name" and value < 0:
                raise PlannerError(f"price {key} must be >= 0, got {value}")


PRICES: dict[str, PriceSheet] = {
    # §4.5, us-east-1 list prices; transfer EC2<->S3 inside a region is free.
    "s3-standard": PriceSheet("s3-standard", 0.005, 0.0004, 0.023),
    # §4.5 "current" S3 Express One Zone prices (the S3 FAQ's worked examples). Assumed: the
    # per-GB upload/retrieval fees apply to every byte (the FAQ example charges them on 10 KB
    # requests; the 512 KB threshold was launch-era pricing), no fee beyond those per request.
    "s3-express": PriceSheet("s3-express", 0.00113, 0.00003, 0.11, 0.0032, 0.0006),
}


def get_prices(name: str = "s3-standard", **overrides: float | None) -> PriceSheet:
    """A named price sheet with optional per-field overrides; ``custom`` needs the three
    request/storage prices, so a forgotten flag cannot silently price something at $0."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f for f in PriceSheet.__dataclass_fields__ if f != "name"}
    if unknown:
        raise PlannerError(f"unknown price fields: {', '.join(sorted(unknown))}")
    if name == "custom":
        missing = [k for k in ("put_per_1k", "get_per_1k", "storage_per_gb_month") if k not in given]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise PlannerError(f"--prices custom needs {flags}")
        return PriceSheet("custom", **given)
    try:
        sheet = PRICES[name]
    except KeyError:
        known = ", ".join([*sorted(PRICES), "custom"])
        raise PlannerError(f"unknown price sheet {name!r}; known: {known}") from None
    return replace(sheet, name=sheet.name + " (modified)", **given) if given else sheet


@dataclass(frozen=True)
class LayoutSpec:
    chunk_size: int = 256  # LMCache's default chunk (§2)
    segment_max_chunks: int = 64
    part_size: int = 8 * MIB  # §4.2: AWS advises 8-16 MB ranged GETs
    # Tokens written per store call. None: the whole prefix arrived in one store, the best case
    # for segment size; a multi-turn conversation or chunked prefill stores less at a time.
    store_tokens: int | None = None

    def __post_init__(self) -> None:
        for attr in ("chunk_size", "segment_max_chunks", "part_size"):
            if getattr(self, attr) < 1:
                raise PlannerError(f"{attr.replace('_', ' ')} must be >= 1, got {getattr(self, attr)}")
        if self.store_tokens is not None and self.store_tokens < 1:
            raise PlannerError(f"store tokens must be >= 1, got {self.store_tokens}")


# --------------------------------------------------------------------------------------------
# The arithmetic


def layer_flops(model: ModelShape, new_tokens: int, prefix_tokens: int) -> float:
    """§5.3: FLOPs/layer = 2*N*P_layer + 4*N*(L + N/2)*(n_heads*head_dim).

    The first term is the GEMMs; the second is QK^T and AV over the cached prefix plus,
    causally, half of the new tokens on average.
    """
    n = new_tokens
    return 2 * n * model.params_per_layer + 4 * n * (prefix_tokens + n / 2) * model.attn_width


def layer_time_s(model: ModelShape, gpu: GpuSpec, new_tokens: int, prefix_tokens: int) -> float:
    """§5.3: t_layer = max(FLOPs / F_eff, bytes / HBM_BW), bytes = layer weights + KV read."""
    compute = layer_flops(model, new_tokens, prefix_tokens) / gpu.effective_flops
    kv_read = (prefix_tokens + new_tokens) * model.kv_bytes_per_token_per_layer
    memory = (model.layer_weight_bytes + kv_read) / gpu.total_hbm_bandwidth
    return max(compute, memory)


def stream_throughput(request_bytes: float, latency_s: float, stream_bps: float) -> float:
    """§5.6: one connection delivers size / (TTFB + size / per-connection rate)."""
    if request_bytes <= 0:
        return stream_bps
    return request_bytes / (latency_s + request_bytes / stream_bps)


def streams_needed(target_bps: float, request_bytes: float, latency_s: float, stream_bps: float) -> int:
    """Little's law (§5.6): in-flight requests = throughput wanted / throughput per request."""
    if target_bps <= 0:
        return 0
    return math.ceil(target_bps / stream_throughput(request_bytes, latency_s, stream_bps) - 1e-9)


def _segment_sizes(context_tokens: int, layout: LayoutSpec) -> list[tuple[int, int]]:
    """(count, tokens) groups of the segments that storing the prefix produces.

    A store's chunks are cut into segments of at most segment_max_chunks; a segment never
    spans two stores, because each store is one request's forward pass.
    """
    if context_tokens == 0:
        return []
    per_store = layout.store_tokens or context_tokens
    seg_tokens = layout.segment_max_chunks * layout.chunk_size
    groups: dict[int, int] = {}

    def add_store(tokens: int, times: int) -> None:
        if times == 0 or tokens == 0:
            return
        full, rest = divmod(tokens, seg_tokens)
        if full:
            groups[seg_tokens] = groups.get(seg_tokens, 0) + full * times
        if rest:
            groups[rest] = groups.get(rest, 0) + times

    full_stores, last = divmod(context_tokens, per_store)
    add_store(per_store, full_stores)
    add_store(last, 1)
    return sorted(((count, tokens) for tokens, count in groups.items()), key=lambda g: -g[1])


def _chunks(tokens: int, chunk_size: int) -> int:
    # A trailing partial chunk is still an object (the anchors count 3,907 chunks for 10^6).
    return -(-tokens // chunk_size)


@dataclass
class LayoutPlan:
    """Objects, requests, time and money for one way of laying the same KV out in S3."""

    name: str
    description: str
    objects: int
    put_requests: int
    get_requests_data: int
    get_requests_lookup: int
    mean_get_bytes: float
    largest_object_bytes: int
    layer_pipelined: bool
    ttft_floor_ms: float
    per_stream_mbytes_per_s: float
    concurrency_for_link: int
    get_rate_floor_ms: float
    put_rate_floor_ms: float
    usd_per_store: float
    usd_per_load: float
    usd_per_month: float
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def get_requests(self) -> int:
        return self.get_requests_data + self.get_requests_lookup

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["get_requests"] = self.get_requests
        return out


@dataclass
class Plan:
    model: ModelShape
    gpu: GpuSpec
    link: LinkSpec
    prices: PriceSheet
    layout: LayoutSpec
    context_tokens: int
    new_tokens: int

    bytes_per_token_per_layer: int
    bytes_per_layer: int
    kv_bytes: int
    t_layer_ms: float
    compute_ms: float
    fetch_per_layer_ms: float
    load_ms: float
    hides: bool
    new_tokens_to_hide: int
    bandwidth_needed_gbytes_per_s: float
    ttft_floor_ms: float
    recompute_ms: float
    load_vs_recompute: float
    concurrency_needed: int
    staging_budget_bytes: int
    hbm_needed_bytes: float
    fits_in_hbm: bool
    layouts: dict[str, LayoutPlan]

    @property
    def ours(self) -> LayoutPlan:
        return self.layouts["segments"]

    # The headline request and cost figures are this package's layout; the others are there
    # to compare against in ``layouts``.
    @property
    def objects(self) -> int:
        return self.ours.objects

    @property
    def put_requests(self) -> int:
        return self.ours.put_requests

    @property
    def get_requests(self) -> int:
        return self.ours.get_requests

    @property
    def usd_per_store(self) -> float:
        return self.ours.usd_per_store

    @property
    def usd_per_load(self) -> float:
        return self.ours.usd_per_load

    @property
    def usd_per_month(self) -> float:
        return self.ours.usd_per_month

    def to_dict(self) -> dict[str, Any]:
        ours = self.ours
        return {
            "model": {
                "name": self.model.name,
                "source": self.model.source,
                "num_layers": self.model.num_layers,
                "num_kv_heads": self.model.num_kv_heads,
                "head_dim": self.model.head_dim,
                "num_q_heads": self.model.num_q_heads,
                "params_per_layer": self.model.params_per_layer,
                "weight_params_per_layer": self.model.weight_params_per_layer
                or self.model.params_per_layer,
                "dtype": self.model.dtype,
                "kv_dtype": self.model.effective_kv_dtype,
            },
            "gpu": {**asdict(self.gpu), "effective_flops": self.gpu.effective_flops},
            "link": {**asdict(self.link), "bytes_per_s": self.link.bytes_per_s},
            "prices": asdict(self.prices),
            "layout": asdict(self.layout),
            "context_tokens": self.context_tokens,
            "new_tokens": self.new_tokens,
            "bytes_per_token_per_layer": self.bytes_per_token_per_layer,
            "bytes_per_layer": self.bytes_per_layer,
            "kv_bytes": self.kv_bytes,
            "kv_gib": self.kv_bytes / GIB,
            "t_layer_ms": self.t_layer_ms,
            "compute_ms": self.compute_ms,
            "fetch_per_layer_ms": self.fetch_per_layer_ms,
            "load_ms": self.load_ms,
            "hides": self.hides,
            "new_tokens_to_hide": self.new_tokens_to_hide,
            "bandwidth_needed_gbytes_per_s": self.bandwidth_needed_gbytes_per_s,
            "bandwidth_needed_gbps": self.bandwidth_needed_gbytes_per_s * 8,
            "ttft_floor_ms": self.ttft_floor_ms,
            "recompute_ms": self.recompute_ms,
            "load_vs_recompute": self.load_vs_recompute,
            "concurrency_needed": self.concurrency_needed,
            "staging_budget_bytes": self.staging_budget_bytes,
            "concurrency_for_link": ours.concurrency_for_link,
            "hbm_needed_bytes": self.hbm_needed_bytes,
            "fits_in_hbm": self.fits_in_hbm,
            "objects": ours.objects,
            "put_requests": ours.put_requests,
            "get_requests": ours.get_requests,
            "get_requests_data": ours.get_requests_data,
            "get_requests_lookup": ours.get_requests_lookup,
            "usd_per_store": ours.usd_per_store,
            "usd_per_load": ours.usd_per_load,
            "usd_per_month": ours.usd_per_month,
            "layouts": {name: lp.to_dict() for name, lp in self.layouts.items()},
        }


def _ttft_pipelined_s(layers: int, t_layer: float, t_fetch: float, latency: float) -> float:
    """design.md "The physics": max(compute, load) plus one layer of whichever finishes last.

    With layer i's KV arriving at latency + (i+1)*t_fetch (one stream of parts at link rate, the
    first byte paid once) and layer i computing once both its KV and layer i-1 are done:
      compute-bound: latency + t_fetch + L*t_layer  (layer 0's fetch cannot overlap anything);
      fetch-bound:   latency + L*t_fetch + t_layer  (the last layer computes after it lands).
    """
    if t_fetch == 0:
        return layers * t_layer
    compute = layers * t_layer
    load = latency + layers * t_fetch
    return max(compute + latency + t_fetch, load + t_layer)


def _new_tokens_to_hide(model: ModelShape, gpu: GpuSpec, prefix: int, bw: float) -> int:
    """Smallest N with per-layer fetch <= t_layer(N, prefix): the exact version of §5.3's
    closed form N* = F_eff / (GQA * BW), which ignores the GEMM term."""
    if prefix == 0:
        return 1
    t_fetch = prefix * model.kv_bytes_per_token_per_layer / bw

    def ok(n: int) -> bool:
        return layer_time_s(model, gpu, n, prefix) >= t_fetch

    hi = 1
    while not ok(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:  # invariant: ok(hi), not ok(lo) (or lo == 0)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def plan(
    model: ModelShape,
    *,
    context_tokens: int,
    new_tokens: int,
    gpu: GpuSpec | None = None,
    link: LinkSpec | None = None,
    prices: PriceSheet | None = None,
    layout: LayoutSpec | None = None,
) -> Plan:
    """Plan a store of ``context_tokens`` of KV and its layer-wise load ahead of a prefill of
    ``new_tokens`` new tokens."""
    gpu = gpu or GPUS["h100"]
    link = link or LinkSpec()
    prices = prices or PRICES["s3-standard"]
    layout = layout or LayoutSpec()
    if context_tokens < 0:
        raise PlannerError(f"context tokens must be >= 0, got {context_tokens}")
    if new_tokens < 1:
        # vLLM always computes at least the last prompt token, even on a full prefix hit.
        raise PlannerError(f"new tokens must be >= 1, got {new_tokens}")

    L = model.num_layers
    P = context_tokens
    bpt = model.kv_bytes_per_token_per_layer
    bytes_per_layer = P * bpt
    kv_bytes = L * bytes_per_layer
    bw = link.bytes_per_s
    latency = link.latency_ms / 1e3
    stream_bps = link.stream_mbps * 1e6

    t_layer = layer_time_s(model, gpu, new_tokens, P)
    t_fetch = bytes_per_layer / bw
    hides = t_fetch <= t_layer
    ttft = _ttft_pipelined_s(L, t_layer, t_fetch, latency)
    load = (latency + kv_bytes / bw) if P else 0.0
    # Recompute = the same per-layer model with nothing cached: a prefill of P+N tokens,
    # i.e. L * max((2*T*P_layer + 2*T^2*attn_width) / F_eff, bytes / HBM_BW), T = P + N.
    # The anchors' "recompute" column (§5.3) charges 2*T*(all 8.03B params), embeddings
    # included; embeddings are a lookup, so this is ~4% lower for 8B at 128K (12.8 s vs 13.4 s),
    # which errs against loading.
    recompute = L * layer_time_s(model, gpu, P + new_tokens, 0)
    bw_needed = bytes_per_layer / t_layer  # §5.3: 4096*L / t_layer in the anchors' notation

    chunks = _chunks(P, layout.chunk_size)
    segments = _segment_sizes(P, layout)
    n_segments = sum(count for count, _ in segments)
    chunk_layer_bytes = min(P, layout.chunk_size) * bpt

    def money(puts: int, gets: int) -> tuple[float, float, float]:
        # Manifests and pointers are a few KB against MBs of KV per segment, so only KV bytes
        # are charged per GB.
        gib = kv_bytes / GIB_BILLING
        store = puts * prices.put_per_1k / 1e3 + gib * prices.upload_per_gb
        load_usd = gets * prices.get_per_1k / 1e3 + gib * prices.retrieval_per_gb
        month = gib * prices.storage_per_gb_month
        return store, load_usd, month

    def layout_plan(
        name: str,
        description: str,
        *,
        objects: int,
        puts: int,
        data_gets: int,
        lookup_gets: int,
        largest: int,
        pipelined: bool,
        detail: dict[str, int] | None = None,
    ) -> LayoutPlan:
        mean_get = kv_bytes / data_gets if data_gets else 0.0
        per_stream = stream_throughput(mean_get, latency, stream_bps)
        if pipelined:
            ttft_s = ttft
        else:
            # Every object holds every layer, so layer 0 needs all of them: no overlap.
            ttft_s = load + L * t_layer
        store, load_usd, month = money(puts, data_gets + lookup_gets)
        return LayoutPlan(
            name=name,
            description=description,
            objects=objects,
            put_requests=puts,
            get_requests_data=data_gets,
            get_requests_lookup=lookup_gets,
            mean_get_bytes=mean_get,
            largest_object_bytes=largest,
            layer_pipelined=pipelined,
            ttft_floor_ms=ttft_s * 1e3,
            per_stream_mbytes_per_s=per_stream / 1e6,
            concurrency_for_link=streams_needed(bw, mean_get, latency, stream_bps) if P else 0,
            # §4.3/§5.5: the time one partitioned prefix needs to serve the requests.
            get_rate_floor_ms=(data_gets + lookup_gets) / S3_GET_PER_S_PER_PREFIX * 1e3,
            put_rate_floor_ms=puts / S3_PUT_PER_S_PER_PREFIX * 1e3,
            usd_per_store=store,
            usd_per_load=load_usd,
            usd_per_month=month,
            detail=detail or {},
        )

    # Ours: per segment, one object per layer + a manifest (commit point) + one pointer at the
    # segment's first chunk (design.md "Object layout", format v2). Each layer of a segment is
    # read as ranged GETs of at most part_size. A lookup on a cold index reads, in one parallel
    # round, the pointer of every chunk it does not know (a 404 for every chunk that does not
    # start a segment) and one manifest per segment found; a warm index needs neither.
    layer_objects = n_segments * L
    ours_data_gets = sum(count * L * count_parts(tokens * bpt, layout.part_size) for count, tokens in segments)
    largest_segment = max((tokens for _, tokens in segments), default=0) * bpt
    if largest_segment > S3_MAX_SINGLE_PUT:
        raise PlannerError(
            f"a segment layer object would be {fmt_bytes(largest_segment)}, above S3's 5 GiB "
            "single-PUT limit; lower --segment-max-chunks"
        )
    ours = layout_plan(
        "segments",
        "layer-major segments (this package): one object per (segment, layer) + manifest + "
        "a pointer at the segment's first chunk; ranged GETs of part_size",
        objects=layer_objects + 2 * n_segments,
        puts=layer_objects + 2 * n_segments,
        data_gets=ours_data_gets,
        lookup_gets=chunks + n_segments,
        largest=largest_segment,
        pipelined=True,
        detail={
            "segments": n_segments,
            "layer_objects": layer_objects,
            "manifests": n_segments,
            "pointers": n_segments,
            "chunks": chunks,
            "lookup_pointer_gets": chunks,
            "lookup_manifest_gets": n_segments,
        },
    )
    # Per-(chunk, layer) objects, the naive layer-major reading (§0.2, "key explosion").
    # Lookup is charged one HEAD per chunk, which is generous: LMCache's layerwise lookup asks
    # batched_contains about all L keys of a chunk (lmcache-0.5.6.md, §1).
    chunk_layer = layout_plan(
        "chunk_layer",
        "one object per (256-token chunk, layer)",
        objects=chunks * L,
        puts=chunks * L,
        data_gets=chunks * L,
        lookup_gets=chunks,
        largest=chunk_layer_bytes,
        pipelined=True,
    )
    # LMCache's stock S3 connector (§2): one object per chunk holding all layers, fetched
    # whole (s3_part_size == chunk size), sized with a HEAD per key.
    token_major = layout_plan(
        "token_major",
        "one object per chunk holding all layers (LMCache's stock S3 connector)",
        objects=chunks,
        puts=chunks,
        data_gets=chunks,
        lookup_gets=chunks,
        largest=chunk_layer_bytes * L,
        pipelined=False,
    )

    # The in-flight GETs worth having: enough to reach the link, or, when less bandwidth
    # already hides the fetch, enough for that (more only buys the first layer's fetch time).
    target_bps = min(bw, bw_needed)
    concurrency = streams_needed(target_bps, ours.mean_get_bytes, latency, stream_bps) if P else 0

    # Decode runs from HBM (§5.4): the loaded prefix plus the new tokens must be resident.
    hbm_needed = (
        L * model.layer_weight_bytes
        + model.embedding_params * dtype_bytes(model.dtype)
        + L * (P + new_tokens) * bpt
    )

    return Plan(
        model=model,
        gpu=gpu,
        link=link,
        prices=prices,
        layout=layout,
        context_tokens=P,
        new_tokens=new_tokens,
        bytes_per_token_per_layer=bpt,
        bytes_per_layer=bytes_per_layer,
        kv_bytes=kv_bytes,
        t_layer_ms=t_layer * 1e3,
        compute_ms=L * t_layer * 1e3,
        fetch_per_layer_ms=t_fetch * 1e3,
        load_ms=load * 1e3,
        hides=hides,
        new_tokens_to_hide=_new_tokens_to_hide(model, gpu, P, bw),
        bandwidth_needed_gbytes_per_s=bw_needed / 1e9,
        ttft_floor_ms=ttft * 1e3,
        recompute_ms=recompute * 1e3,
        load_vs_recompute=recompute / ttft,
        concurrency_needed=concurrency,
        # s3layer.staging_budget_bytes for one retrieval to run at its pipeline's rate
        # through the latency tail (the prefetcher's own rule, cache/prefetch.py).
        staging_budget_bytes=staging_budget_needed(
            layer_bytes=bytes_per_layer, num_layers=L, link_bps=bw, latency_s=latency,
            jitter_s=link.jitter_ms / 1e3, compute_s=t_layer) if P else 0,
        hbm_needed_bytes=hbm_needed,
        fits_in_hbm=hbm_needed <= gpu.hbm_bytes * gpu.count,
        layouts={"segments": ours, "chunk_layer": chunk_layer, "token_major": token_major},
    )
