"""A CPU layerwise KV connector for LMCache 0.5.6, and a narrow installer for it.

Why this exists: LMCache's layerwise path (``LMCacheEngine.store_layer`` /
``retrieve_layer``) only accepts connectors that pass
``lmcache.v1.gpu_connector.utils.assert_layerwise_gpu_connector`` (an ``isinstance``
check), and the only vLLM one, ``VLLMPagedMemLayerwiseGPUConnector``, creates CUDA
streams in ``__init__`` and has no transfer routine for vLLM's CPU KV cache. On a CPU
worker ``CreateGPUConnector`` raises "No supported cpu connector found" and LMCache runs
in degraded (recompute) mode. :class:`CPULayerwiseConnector` subclasses the CUDA class
(to pass the check) but replaces everything that touches a device.

LMCache objects are always ``KV_T2D``: ``[tokens, 2 (K, V), num_kv_heads * head_size]``
with the hidden index ``head * head_size + d``, the bytes the CUDA connector writes, so
objects are interchangeable between CPU and GPU instances. Layouts of the paged cache
(one tensor per layer; values copied bit-exactly, never converted):

``vllm_cpu``
    vLLM's ``CPU_ATTN`` backend: ``[NB, H, BS, 2*D]``. vLLM only uses it as raw storage
    (``cpu_attn.py`` views it as ``[NB, H, 2*BS, D]`` and splits dim 2), so per (block,
    head) there is a K region of ``BS*D`` elements followed by a V region, and the
    inside of each region depends on the attention ISA vLLM picked
    (``_get_attn_isa``), as written by ``cpu_attn_reshape_and_cache``:

    * ``vec`` / ``vec16``: K column-major ``[D, BS]``, V row-major ``[BS, D]``
      (verified against the installed kernel);
    * ``amx`` (bf16, AMX CPU, BS % 32 == 0): K in 16-token groups of bf16 pairs
      ``[BS/16, D/2, 16, 2]``, V in 16-dim groups of token pairs ``[D/16, BS/2, 16, 2]``
      (from vLLM's ``csrc/cpu/cpu_attn_amx.hpp``; no AMX CPU here to run it);
    * ``plain``: K ``[BS, D]`` then V ``[BS, D]`` (no vLLM ISA; for hand-built caches).

    Other ISAs (neon, vsx, vxe, rvv) are refused rather than guessed.
``flash_attn``
    ``[2, NB, BS, H, D]`` (``HND`` hint: ``[2, NB, H, BS, D]``), vLLM flash-attn on GPU.
``flash_infer``
    ``[NB, 2, BS, H, D]`` (``HND``: ``[NB, 2, H, BS, D]``), vLLM flashinfer on GPU.
``mla``
    ``[NB, BS, D]``.

The layout comes from the tensors' rank (3: mla, 4: vllm_cpu, 5: K/V axis first or
second) and the ``kv_layout`` hint (vLLM's ``layout_hints`` or the constructor's
``kv_layout``), after the stride normalisation LMCache itself applies
(``attempt_permute_to_contiguous_view``), so a tensor list means the same here as it
does to LMCache's CUDA connector. Token ``t`` lives in block ``slot // BS`` at offset
``slot % BS`` (``slot = slot_mapping[t]``); slots ``< 0`` are padding, never touched.

This module imports lmcache (it is LMCache-facing) but imports vllm only lazily, to ask
it which attention ISA it uses; every LMCache/vLLM name comes through
:mod:`lmcache_s3layer.integration.compat`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch

from lmcache_s3layer.integration import CPU_CONNECTOR_ENV_VAR, OFF, ON, compat, cpu_connector_env_mode
from lmcache_s3layer.integration.compat import MemoryFormat, MemoryObj, VLLMPagedMemLayerwiseGPUConnector

logger = logging.getLogger(__name__)

__all__ = [
    "CPULayerwiseConnector",
    "create_cpu_layerwise_connector",
    "install_cpu_connector_patch",
    "uninstall_cpu_connector_patch",
    "cpu_connector_patch_installed",
    "vllm_cpu_attn_isa",
    "ENV_VAR",
    "LAYOUT_VLLM_CPU",
    "LAYOUT_FLASH_ATTN",
    "LAYOUT_FLASH_INFER",
    "LAYOUT_MLA",
    "COPY_ENV_VAR",
    "DeferredCopies",
    "device_synchronize",
]

# S3LAYER_CPU_CONNECTOR: auto (default) | on (1, true, always, force...) | off (0, never...)
ENV_VAR = CPU_CONNECTOR_ENV_VAR
# "immediate" (default) or "deferred": see DeferredCopies.
COPY_ENV_VAR = "S3LAYER_CPU_COPY"
COPY_IMMEDIATE = "immediate"
COPY_DEFERRED = "deferred"

LAYOUT_VLLM_CPU = "vllm_cpu"
LAYOUT_FLASH_ATTN = "flash_attn"
LAYOUT_FLASH_INFER = "flash_infer"
LAYOUT_MLA = "mla"
_LAYOUTS = (LAYOUT_VLLM_CPU, LAYOUT_FLASH_ATTN, LAYOUT_FLASH_INFER, LAYOUT_MLA)

# Within-block packings of the vllm_cpu layout, by vLLM attention ISA name.
_CPU_PACKING_BY_ISA = {"vec": "vec", "vec16": "vec", "amx": "amx", "plain": "plain"}

# vLLM/LMCache layout-hint names -> head-major (True) or token-major (False) block
# interiors. The blocks-first names only change stride(0) of the per-layer view,
# which advanced indexing does not care about.
_HND_BY_HINT = {
    "HND": True,
    "LBHNC": True,
    "BLHNC": True,
    "NHD": False,
    "LBNHC": False,
    "BLNHC": False,
}


def vllm_cpu_attn_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The ISA vLLM's CPU attention picks for these numbers (it decides the K/V packing).

    Asks vLLM itself when importable (in a vLLM worker it already is); otherwise
    mirrors its x86 rule: vec16 for head sizes that are 16 but not 32 aligned, amx for
    bf16 on AMX CPUs with 32-aligned blocks, vec for 32-aligned blocks, else vec16.
    """
    _get_attn_isa = compat.vllm_attn_isa_picker()  # None: vllm absent or not the CPU build
    if _get_attn_isa is not None:
        return str(_get_attn_isa(dtype, block_size, head_size))
    if head_size % 32 != 0 and head_size % 16 == 0:
        return "vec16"
    if dtype == torch.bfloat16 and block_size % 32 == 0 and torch.cpu._is_amx_tile_supported():
        return "amx"
    return "vec" if block_size % 32 == 0 else "vec16"

class DeferredCopies:
    """A CPU model of a CUDA device's asynchronous copies, as hostile as the GPU is.

    LMCache's CUDA layerwise connector enqueues each layer's device<->host copy on a stream
    of its own and returns at once; only a ``sync`` flag (one request per batch) or a device
    synchronisation makes the host wait for it, and LMCache hands buffers back to its pool
    by reference count, not by copy completion. A synchronous CPU connector hides every
    mistake that timing allows. In the ``deferred`` copy mode the CPU connector behaves like
    the device instead:

    - store (device -> host): the paged KV is read when the copy is enqueued (the stream is
      ordered after the compute that wrote it), but the host buffer is filled only at a
      synchronisation point; until then it holds poison bytes, so a reader that does not
      wait uploads poison;
    - load (host -> device): the host buffer is read only at a synchronisation point (a
      ``sync`` request's wait, or :func:`device_synchronize`), so a buffer freed and reused
      in between delivers someone else's bytes;
    - a buffer returned to LMCache's pool is poisoned at once, so any late read of a freed
      buffer shows up as wrong KV instead of passing by luck.

    The streams are shared by every request of a connector, as LMCache's are (one
    ``load_stream``, one ``store_stream``): one request's sync covers everything enqueued
    before it. Thread-safe: device synchronisation may come from any thread.
    """

    POISON = 0xA5  # bf16/fp16 0xA5A5 is a finite value no random test tensor holds exactly

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pending: dict[str, list[Callable[[], None]]] = {"load": [], "store": []}
        self.copies_enqueued = 0
        self.copies_done = 0
        self.buffers_poisoned = 0

    def enqueue(self, stream: str, copy: Callable[[], None]) -> None:
        with self._lock:
            self._pending[stream].append(copy)
            self.copies_enqueued += 1

    def synchronize(self, stream: Optional[str] = None) -> None:
        """Run the pending copies of ``stream`` (all streams when None), in order."""
        # Any thread may synchronise (a fence on an upload or release thread), and the KV
        # caches are inference tensors LMCache writes under inference mode. A copy that raises
        # is reported to the synchronising caller; the copies after it stay pending.
        with self._lock, torch.inference_mode():
            for name in (stream,) if stream else tuple(self._pending):
                queue = self._pending[name]
                while queue:
                    queue.pop(0)()
                    self.copies_done += 1

    def pending(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._pending.values())

    def poison(self, memory_obj: MemoryObj) -> None:
        t = memory_obj.tensor
        if t is not None:
            t.view(-1).view(torch.uint8).fill_(self.POISON)

    def poison_freed_buffers_of(self, memory_obj: MemoryObj) -> None:
        """Poison every buffer the pool that ``memory_obj`` came from takes back (idempotent)."""
        alloc = compat.memory_obj_allocator(memory_obj)
        if alloc is None or getattr(alloc, "_s3layer_poisons_freed", False):
            return
        free, batched_free = alloc.free, getattr(alloc, "batched_free", None)

        def poison_all(objs) -> None:
            # A pool already closed has no memory left to write (late garbage collection).
            if compat.allocator_closed(alloc):
                return
            for obj in objs:
                self.poison(obj)
            self.buffers_poisoned += len(objs)

        def poisoning_free(obj, *args, **kwargs):
            poison_all([obj])
            return free(obj, *args, **kwargs)

        alloc.free = poisoning_free
        if batched_free is not None:
            def poisoning_batched_free(objs, *args, **kwargs):
                poison_all(objs)
                return batched_free(objs, *args, **kwargs)

            alloc.batched_free = poisoning_batched_free
        alloc._s3layer_poisons_freed = True


# One modelled device per process, like one CUDA device per vLLM worker.
DEVICE = DeferredCopies()


def device_synchronize() -> None:
    """``torch.cuda.synchronize()`` for the CPU connector: every pending deferred copy lands.
    A no-op in the immediate copy mode (nothing is ever pending)."""
    DEVICE.synchronize()


def _copy_mode(explicit: Optional[str]) -> str:
    mode = (explicit or os.environ.get(COPY_ENV_VAR) or COPY_IMMEDIATE).strip().lower()
    if mode not in (COPY_IMMEDIATE, COPY_DEFERRED):
        raise ValueError(f"{COPY_ENV_VAR} / copy_mode must be {COPY_IMMEDIATE!r} or {COPY_DEFERRED!r}, "
                         f"got {mode!r}")
    return mode


@dataclass(frozen=True)
class _Layout:
    name: str
    hnd: bool = False
    packing: Optional[str] = None  # vllm_cpu only: "vec" | "amx" | "plain"
    block_size: int = 0
    num_heads: int = 0
    head_size: int = 0


@dataclass(frozen=True)
class _ChunkPlan:
    """Where one chunk's tokens live in the paged cache (computed once per request)."""

    num_tokens: int
    # Positions (within the chunk) of non-padding tokens; None when all are valid,
    # so the common case copies whole objects without an index tensor.
    token_idx: Optional[torch.Tensor]
    block_idx: torch.Tensor
    block_off: torch.Tensor


class CPULayerwiseConnector(VLLMPagedMemLayerwiseGPUConnector):
    """Layerwise connector for paged KV caches held in CPU tensors.

    Subclassing the CUDA connector is what lets ``LMCacheEngine`` accept it; nothing of
    the parent's device machinery (streams, intermediate GPU buffer, native kernels)
    is used. The generator protocols match the parent exactly:

    * ``batched_from_gpu(memory_objs, starts, ends, **kw)``: ``memory_objs[layer][chunk]``;
      yields ``num_layers + 1`` times; in the immediate copy mode layer ``i``'s objects
      are filled before the ``(i+1)``-th ``next()`` returns (``store_layer`` puts layer
      ``i`` right after the ``(i+2)``-th); in the deferred mode only at a ``sync``.
    * ``batched_to_gpu(starts, ends, **kw)``: primed with one ``next()``, then receives
      each layer's object list through ``send()``; yields ``num_layers + 2`` times in
      all. In the immediate mode each ``send()`` returns only after that layer is in the
      paged cache; in the deferred mode, as on a GPU, only a ``sync`` wait makes it land.

    Like the parent it never changes reference counts or pins of the objects it is
    given: ``retrieve_layer`` does the ``ref_count_down``/``unpin`` itself, and there is
    no intermediate buffer to free.

    Where it runs (vLLM worker process, model-forward thread, via LMCache's adapter):
    ``batched_to_gpu`` is stepped twice in ``start_load_kv`` before the forward, then
    once per ``wait_for_layer_load`` (before each attention layer); ``batched_from_gpu``
    once per ``save_kv_layer`` (after each attention layer) and a last time in
    ``wait_for_save``. Storage I/O happens elsewhere (StorageManager's event loop).

    Extra keyword arguments: ``kv_layout`` (a layout name above or a hint such as
    ``"HND"``), ``cpu_attn_isa`` (``vec``/``vec16``/``amx``/``plain``; default: ask
    vLLM), ``strict_chunk_count`` (default True), ``copy_mode`` (``immediate`` or
    ``deferred``, default from ``S3LAYER_CPU_COPY``; see :class:`DeferredCopies`).
    """

    def __init__(
        self,
        hidden_dim_size: int,
        num_layers: int,
        use_gpu: bool = False,
        **kwargs: Any,
    ):
        # Deliberately not calling super().__init__: it creates torch.cuda.Stream()s.
        for name in ("chunk_size", "dtype"):
            if name not in kwargs:
                raise ValueError(f"{name} must be given to {type(self).__name__}")
        self.hidden_dim_size = int(hidden_dim_size)
        self.num_layers = int(num_layers)
        # Requested by CreateGPUConnector for CUDA; there is no device buffer here.
        self.requested_use_gpu = bool(use_gpu)
        self.use_gpu = False
        self.gpu_buffer_allocator = None
        self.chunk_size = int(kwargs["chunk_size"])
        self.dtype: torch.dtype = kwargs["dtype"]
        self.device = torch.device(kwargs.get("device") or "cpu")
        self.use_mla = bool(kwargs.get("use_mla", False))
        self.layout_hints = dict(kwargs.get("layout_hints") or {})
        self.element_size = torch.tensor([], dtype=self.dtype).element_size()
        self.kvcaches: Optional[List[torch.Tensor]] = None
        self.kv_layout: Optional[str] = kwargs.get("kv_layout")
        self.cpu_attn_isa: Optional[str] = kwargs.get("cpu_attn_isa")
        # A short object list would leave tokens unloaded while ret_mask claims them;
        # the CUDA parent zips silently, we fail loudly unless told otherwise.
        self.strict_chunk_count = bool(kwargs.get("strict_chunk_count", True))
        # "deferred": copies land only at sync points, freed buffers are poisoned
        # (DeferredCopies); the default copies synchronously.
        self.copy_mode = _copy_mode(kwargs.get("copy_mode"))
        self._layout: Optional[_Layout] = None
        # No load_stream/store_stream attributes on purpose: LMCacheEngine falls back
        # to torch_dev.Stream() (a CPU stub) when they are absent.

    @classmethod
    def from_metadata(
        cls,
        metadata: Any,
        use_gpu: bool = False,
        device: Optional[torch.device] = None,
        layout_hints: Optional[dict] = None,
        **kwargs: Any,
    ) -> "CPULayerwiseConnector":
        """Same arguments as the parent's ``from_metadata`` (``kwargs`` go to ``__init__``)."""
        num_layers, _, chunk_size, num_kv_heads, head_size = metadata.kv_shape
        return cls(
            hidden_dim_size=num_kv_heads * head_size,
            num_layers=num_layers,
            use_gpu=use_gpu,
            chunk_size=chunk_size,
            dtype=metadata.kv_dtype,
            device=device if device is not None else torch.device("cpu"),
            use_mla=metadata.use_mla,
            layout_hints=layout_hints,
            **kwargs,
        )

    # ------------------------------------------------------------------ layouts

    def _resolve_layout(self, t: torch.Tensor) -> _Layout:
        hint = self.layout_hints.get("kv_layout")
        name = None
        if self.kv_layout in _LAYOUTS:
            name = self.kv_layout
        elif self.kv_layout is not None:
            hint = self.kv_layout  # an explicit hint name overrides vLLM's
        if hint is not None and hint not in _HND_BY_HINT:
            raise ValueError(f"unsupported kv_layout hint {hint!r}")
        hnd = None if hint is None else _HND_BY_HINT[hint]

        if name is None:
            if t.dim() == 3:
                name = LAYOUT_MLA
            elif t.dim() == 4:
                name = LAYOUT_VLLM_CPU
            elif t.dim() == 5 and t.shape[0] == 2:  # LMCache checks the K/V axis first too
                name = LAYOUT_FLASH_ATTN
            elif t.dim() == 5 and t.shape[1] == 2:
                name = LAYOUT_FLASH_INFER
            else:
                raise NotImplementedError(
                    f"unsupported per-layer KV cache shape {tuple(t.shape)} "
                    f"(hints {self.layout_hints}, kv_layout {self.kv_layout!r})"
                )

        if name == LAYOUT_MLA:
            if t.dim() != 3 or t.shape[-1] != self.hidden_dim_size:
                raise ValueError(f"MLA cache shape {tuple(t.shape)} != [NB, BS, {self.hidden_dim_size}]")
            return _Layout(name, block_size=t.shape[1], num_heads=1, head_size=t.shape[2])

        if name == LAYOUT_VLLM_CPU:
            # vLLM's CPU backend only produces head-major (LBHNC) block interiors.
            if hnd is False:
                raise NotImplementedError(
                    "a 4-D per-layer KV cache is only understood as vLLM's CPU layout "
                    f"[NB, H, BS, 2*D] (head-major); got hint {hint!r}"
                )
            if t.dim() != 4 or t.shape[3] % 2:
                raise ValueError(f"vLLM CPU cache shape {tuple(t.shape)} is not [NB, H, BS, 2*D]")
            if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                # fp8 caches go through separate quantising kernels with their own packing.
                raise NotImplementedError(f"vLLM CPU cache dtype {t.dtype} is not supported")
            _, h, bs, two_d = t.shape
            d = two_d // 2
            isa = self.cpu_attn_isa or vllm_cpu_attn_isa(self.dtype, bs, d)
            packing = _CPU_PACKING_BY_ISA.get(isa)
            if packing is None:
                raise NotImplementedError(
                    f"vLLM CPU attention ISA {isa!r} packs K/V in a layout this connector "
                    "does not know; pass cpu_attn_isa explicitly only if you know it matches"
                )
            if packing == "amx" and (bs % 32 or d % 32 or self.dtype != torch.bfloat16):
                raise ValueError(f"amx packing needs bf16, BS % 32 == 0, D % 32 == 0 (BS={bs}, D={d})")
            layout = _Layout(name, True, packing, bs, h, d)
        else:
            # Without a hint the 5-D layouts default to token-major, unlike LMCache's
            # CPU default (HND): on a CPU box only tests emulating GPU layouts make them.
            hnd = bool(hnd)
            if t.dim() != 5:
                raise ValueError(f"{name} cache must be 5-D, got {tuple(t.shape)}")
            kv_axis = 0 if name == LAYOUT_FLASH_ATTN else 1
            if t.shape[kv_axis] != 2:
                raise ValueError(f"{name} cache {tuple(t.shape)} has no K/V axis at dim {kv_axis}")
            a, b = t.shape[2], t.shape[3]
            bs, h = (b, a) if hnd else (a, b)
            layout = _Layout(name, hnd, None, bs, h, t.shape[4])
        if layout.num_heads * layout.head_size != self.hidden_dim_size:
            raise ValueError(
                f"KV cache {tuple(t.shape)} ({layout}) holds {layout.num_heads}x"
                f"{layout.head_size} per token, connector expects {self.hidden_dim_size}"
            )
        return layout

    def _current_layout(self) -> _Layout:
        """The layout resolved by ``_prepare`` for the request being copied."""
        if self._layout is None:
            raise RuntimeError("KV cache layout used before a request resolved it")
        return self._layout

    def _flash_view(self, t: torch.Tensor) -> torch.Tensor:
        """A no-copy ``[block, kv, offset, head, dim]`` view of a flash-style layer."""
        lay = self._current_layout()
        if lay.name == LAYOUT_FLASH_ATTN:
            return t.permute(1, 0, 3, 2, 4) if lay.hnd else t.permute(1, 0, 2, 3, 4)
        return t.permute(0, 1, 3, 2, 4) if lay.hnd else t

    def _cpu_views(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No-copy views of the K and V regions of a vllm_cpu layer, shaped per packing."""
        lay = self._current_layout()
        nb, h, bs, d = t.shape[0], lay.num_heads, lay.block_size, lay.head_size
        if lay.packing == "vec":
            k = t.view(nb, h, 2, d, bs)[:, :, 0]  # [NB, H, D, BS]
            v = t.view(nb, h, 2, bs, d)[:, :, 1]  # [NB, H, BS, D]
        elif lay.packing == "amx":
            k = t.view(nb, h, 2, bs // 16, d // 2, 16, 2)[:, :, 0]  # [NB,H,BS/16,D/2,16,2]
            v = t.view(nb, h, 2, d // 16, bs // 2, 16, 2)[:, :, 1]  # [NB,H,D/16,BS/2,16,2]
        else:  # plain
            k = t.view(nb, h, 2, bs, d)[:, :, 0]
            v = t.view(nb, h, 2, bs, d)[:, :, 1]
        return k, v

    def _gather(self, t: torch.Tensor, blk: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """K/V of the given slots as ``[n, 2, H, D]`` (MLA: ``[n, D]``)."""
        lay = self._current_layout()
        n = blk.numel()
        if lay.name == LAYOUT_MLA:
            return t[blk, off]
        if lay.name != LAYOUT_VLLM_CPU:
            return self._flash_view(t)[blk, :, off]  # advanced dims go first: [n, 2, H, D]
        k, v = self._cpu_views(t)
        h, d = lay.num_heads, lay.head_size
        if lay.packing == "vec":
            kk, vv = k[blk, :, :, off], v[blk, :, off]
        elif lay.packing == "amx":
            kk = k[blk, :, off // 16, :, off % 16].reshape(n, h, d)
            vv = v[blk, :, :, off // 2, :, off % 2].reshape(n, h, d)
        else:
            kk, vv = k[blk, :, off], v[blk, :, off]
        return torch.stack((kk, vv), dim=1)

    def _scatter(self, t: torch.Tensor, blk: torch.Tensor, off: torch.Tensor, src: torch.Tensor) -> None:
        """Inverse of :meth:`_gather`; writes land in ``t`` through the views."""
        lay = self._current_layout()
        n = blk.numel()
        if lay.name == LAYOUT_MLA:
            t[blk, off] = src
            return
        if lay.name != LAYOUT_VLLM_CPU:
            self._flash_view(t)[blk, :, off] = src
            return
        k, v = self._cpu_views(t)
        h, d = lay.num_heads, lay.head_size
        if lay.packing == "vec":
            k[blk, :, :, off] = src[:, 0]
            v[blk, :, off] = src[:, 1]
        elif lay.packing == "amx":
            k[blk, :, off // 16, :, off % 16] = src[:, 0].reshape(n, h, d // 2, 2)
            v[blk, :, :, off // 2, :, off % 2] = src[:, 1].reshape(n, h, d // 16, 16)
        else:
            k[blk, :, off] = src[:, 0]
            v[blk, :, off] = src[:, 1]

    # ----------------------------------------------------------------- plumbing

    def initialize_kvcaches_ptr(self, **kwargs: Any) -> None:
        super().initialize_kvcaches_ptr(**kwargs)
        if self.kvcaches is not None:
            self.kvcaches = list(self.kvcaches)

    def _prepare(self, starts: Sequence[int], ends: Sequence[int], kwargs: dict) -> List[_ChunkPlan]:
        self.initialize_kvcaches_ptr(**kwargs)
        if not self.kvcaches:
            raise ValueError("kvcaches should be provided in kwargs or initialized beforehand.")
        if len(self.kvcaches) != self.num_layers:
            raise ValueError(f"got {len(self.kvcaches)} KV cache layers, expected {self.num_layers}")
        if "slot_mapping" not in kwargs:
            raise ValueError("'slot_mapping' should be provided in kwargs.")
        if "sync" not in kwargs:
            raise ValueError("'sync' should be provided in kwargs.")
        if len(starts) != len(ends):
            raise ValueError(f"{len(starts)} starts but {len(ends)} ends")
        first = self.kvcaches[0]
        if first.device.type != "cpu":
            raise ValueError(f"{type(self).__name__} needs CPU KV caches, got {first.device}")
        if first.dtype != self.dtype:
            raise ValueError(f"KV cache dtype {first.dtype} != connector dtype {self.dtype}")
        # Layers of one model share a layout; resolving it per request is cheap and
        # keeps the connector right if the engine re-registers its caches.
        layout = self._resolve_layout(first)
        if layout != self._layout:
            logger.info("CPULayerwiseConnector: KV cache %s -> %s", tuple(first.shape), layout)
        self._layout = layout
        block_size = self._layout.block_size

        slot_mapping = torch.as_tensor(kwargs["slot_mapping"]).to(device="cpu", dtype=torch.long)
        plans = []
        for start, end in zip(starts, ends):
            slots = slot_mapping[start:end]
            if slots.numel() != end - start:
                raise ValueError(
                    f"slot_mapping has {slot_mapping.numel()} entries, chunk needs [{start}, {end})"
                )
            valid = slots >= 0
            if bool(valid.all()):
                token_idx = None
            else:
                token_idx = torch.nonzero(valid, as_tuple=True)[0]
                slots = slots[token_idx]
            plans.append(
                _ChunkPlan(
                    num_tokens=end - start,
                    token_idx=token_idx,
                    block_idx=torch.div(slots, block_size, rounding_mode="floor"),
                    block_off=torch.remainder(slots, block_size),
                )
            )
        return plans

    def _obj_view(self, memory_obj: MemoryObj, plan: _ChunkPlan) -> torch.Tensor:
        t = memory_obj.tensor
        if t is None:
            raise ValueError("memory object has no tensor")
        expected = tuple(self.get_shape(plan.num_tokens))
        if tuple(t.shape) != expected:
            raise ValueError(f"memory object shape {tuple(t.shape)} != {expected}")
        if t.dtype != self.dtype:
            raise ValueError(f"memory object dtype {t.dtype} != {self.dtype}")
        if self.use_mla:
            return t
        # hidden index = head * D + d, as LMCache's CUDA kernels lay it out
        return t.view(plan.num_tokens, 2, self._current_layout().num_heads, self._current_layout().head_size)

    def _check_count(self, n_objs: int, n_chunks: int, what: str) -> None:
        if n_objs != n_chunks and self.strict_chunk_count:
            raise ValueError(
                f"{what}: got {n_objs} memory objects for {n_chunks} chunks; a short "
                "list would leave tokens unloaded that ret_mask reports as loaded"
            )

    def _copy_out(self, cache: torch.Tensor, plan: _ChunkPlan, memory_obj: MemoryObj) -> None:
        if self.copy_mode == COPY_IMMEDIATE:
            self._write_obj(memory_obj, plan, self._gather(cache, plan.block_idx, plan.block_off))
            return
        # Deferred: the device reads the paged KV in stream order (now), but the host buffer
        # is written only when the store stream is synchronised; until then it is poison.
        DEVICE.poison_freed_buffers_of(memory_obj)
        gathered = self._gather(cache, plan.block_idx, plan.block_off).clone()
        DEVICE.poison(memory_obj)
        DEVICE.enqueue("store", lambda: self._write_obj(memory_obj, plan, gathered))

    def _write_obj(self, memory_obj: MemoryObj, plan: _ChunkPlan, gathered: torch.Tensor) -> None:
        dst = self._obj_view(memory_obj, plan)
        if plan.token_idx is None:
            dst.copy_(gathered)
        else:
            # Padding tokens get zeros so stored objects never carry stale bytes.
            dst.zero_()
            dst[plan.token_idx] = gathered

    def _copy_in(self, cache: torch.Tensor, plan: _ChunkPlan, memory_obj: MemoryObj) -> None:
        src = self._obj_view(memory_obj, plan)
        if plan.token_idx is not None:
            src = src[plan.token_idx]
        self._scatter(cache, plan.block_idx, plan.block_off, src)

    def _expected_fmt(self) -> MemoryFormat:
        return MemoryFormat.KV_MLA_FMT if self.use_mla else MemoryFormat.KV_T2D

    # ---------------------------------------------------------------- protocols

    def batched_from_gpu(self, memory_objs, starts: List[int], ends: List[int], **kwargs: Any):
        """Paged CPU cache -> ``memory_objs[layer][chunk]``; yields ``num_layers + 1`` times.

        As in LMCache's CUDA connector, layer ``i``'s copy is issued at step ``i + 1`` and,
        when ``sync``, waited for at step ``i + 2`` (before ``store_layer`` puts layer ``i``)."""
        plans = self._prepare(starts, ends, kwargs)
        sync = bool(kwargs["sync"])
        if len(memory_objs) != self.num_layers:
            raise ValueError(f"memory_objs has {len(memory_objs)} layers, expected {self.num_layers}")
        for layer_id in range(self.num_layers):
            cache = self.kvcaches[layer_id]  # type: ignore[index]
            layer_objs = memory_objs[layer_id]
            self._check_count(len(layer_objs), len(plans), f"store layer {layer_id}")
            for plan, memory_obj in zip(plans, layer_objs):
                self._copy_out(cache, plan, memory_obj)
                if self.use_mla:
                    memory_obj.metadata.fmt = MemoryFormat.KV_MLA_FMT
            yield
            if sync:
                DEVICE.synchronize("store")  # the parent's store_stream.synchronize()
        yield

    def batched_to_gpu(self, starts: List[int], ends: List[int], **kwargs: Any):
        """Objects sent per layer -> paged CPU cache; yields ``num_layers + 2`` times in all.

        In the deferred copy mode a layer's copy reads the objects only when a ``sync``
        request waits on the load stream (the parent's ``current_stream.wait_stream``), at its
        next layer or its last step, or at :func:`device_synchronize`."""
        plans = self._prepare(starts, ends, kwargs)
        sync = bool(kwargs["sync"])
        deferred = self.copy_mode == COPY_DEFERRED
        fmt = self._expected_fmt()
        for layer_id in range(self.num_layers):
            layer_objs = yield
            if layer_objs is None:
                raise ValueError(f"layer {layer_id}: expected send(list of MemoryObj), got next()")
            if sync:
                DEVICE.synchronize("load")
            self._check_count(len(layer_objs), len(plans), f"retrieve layer {layer_id}")
            cache = self.kvcaches[layer_id]  # type: ignore[index]
            for plan, memory_obj in zip(plans, layer_objs):
                if memory_obj.metadata.fmt != fmt:
                    raise ValueError(f"expected memory format {fmt}, got {memory_obj.metadata.fmt}")
                if deferred:
                    DEVICE.poison_freed_buffers_of(memory_obj)
                    DEVICE.enqueue("load", functools.partial(self._copy_in, cache, plan, memory_obj))
                else:
                    self._copy_in(cache, plan, memory_obj)
        # Parent: the first post-loop yield lets retrieve_layer drop its references,
        # the second is its "wait for the last layer" step.
        yield
        if sync:
            DEVICE.synchronize("load")
        yield

    def wait_for_loads(self) -> None:
        """What a ``sync`` retrieval's wait does (the parent's ``current_stream.wait_stream(
        load_stream)``): every load copy enqueued so far lands before compute goes on."""
        DEVICE.synchronize("load")

    def get_shape(self, num_tokens: int) -> torch.Size:
        if self.use_mla:
            return torch.Size([num_tokens, self.hidden_dim_size])
        return torch.Size([num_tokens, 2, self.hidden_dim_size])


def create_cpu_layerwise_connector(
    config: Any,
    metadata: Any,
    engine: Any = None,
    layout_hints: Optional[dict] = None,
    **kwargs: Any,
) -> CPULayerwiseConnector:
    """Drop-in for ``CreateGPUConnector(config, metadata, engine, layout_hints)``.

    ``engine`` is accepted for signature compatibility only. Blending needs
    ``VLLMBufferLayerwiseGPUConnector`` semantics this class does not provide.
    """
    if getattr(config, "enable_blending", False):
        raise NotImplementedError("CPULayerwiseConnector does not support enable_blending")
    return CPULayerwiseConnector.from_metadata(
        metadata, use_gpu=False, device=torch.device("cpu"), layout_hints=layout_hints, **kwargs
    )


# ---------------------------------------------------------------------- installer

_patch_lock = threading.Lock()
_original_create: Optional[Callable[..., Any]] = None
# Modules whose ``CreateGPUConnector`` name we replaced, to undo exactly that.
_patched_modules: List[str] = []

# ``lmcache.v1.gpu_connector.CreateGPUConnector`` and the modules that bind it by value:
# ``compat.CREATE_GPU_CONNECTOR_MODULES`` (why each: see there).


def _should_use_cpu_connector(config: Any, engine: Any) -> bool:
    return (
        compat.is_vllm_engine(engine)
        and compat.lmcache_device_type() == "cpu"
        and bool(getattr(config, "use_layerwise", False))
        and not bool(getattr(config, "enable_blending", False))
    )


def cpu_connector_patch_installed() -> bool:
    return _original_create is not None


def install_cpu_connector_patch(force: bool = False) -> bool:
    """Route LMCache's vLLM layerwise connector creation to :class:`CPULayerwiseConnector` on CPU.

    Wraps ``lmcache.v1.gpu_connector.CreateGPUConnector`` (and the same name in the
    few modules that import it by value, if already imported:
    ``compat.CREATE_GPU_CONNECTOR_MODULES``). The wrapper returns
    our connector only for ``EngineType.VLLM`` with ``use_layerwise`` on, blending off,
    and LMCache's device type ``cpu``; every other call goes to the original.

    ``S3LAYER_CPU_CONNECTOR``: ``auto`` (default) installs only when LMCache's device
    is CPU; ``0`` (off) never installs (``force`` does not override it); ``1`` (on) installs
    even where the device is not CPU (the per-call check still applies). Checks first that
    the LMCache internals it relies on exist (``compat.check_versions("cpu_connector")``).

    Must run in each process that builds an LMCacheEngine, i.e. in vLLM worker
    processes after vLLM has initialised them (importing lmcache earlier breaks
    vllm-cpu workers); nothing here runs at import time. Idempotent; returns whether
    the patch is in place after the call.
    """
    global _original_create
    mode = cpu_connector_env_mode(logger)
    if mode == OFF:
        return cpu_connector_patch_installed()
    with _patch_lock:
        if _original_create is not None:
            return True
        compat.check_versions("cpu_connector")
        if mode != ON and not force and compat.lmcache_device_type() != "cpu":
            logger.info("LMCache device is %s; CPU connector patch not installed", compat.lmcache_device_type())
            return False

        original = compat.create_gpu_connector()

        @functools.wraps(original)
        def create_gpu_connector(config, metadata, engine, layout_hints=None):
            if _should_use_cpu_connector(config, engine):
                logger.info("Using lmcache_s3layer CPULayerwiseConnector (device cpu, layerwise)")
                return create_cpu_layerwise_connector(config, metadata, engine, layout_hints)
            return original(config, metadata, engine, layout_hints=layout_hints)

        create_gpu_connector.__s3layer_original__ = original  # type: ignore[attr-defined]
        for name in compat.CREATE_GPU_CONNECTOR_MODULES:
            if compat.bound_create_gpu_connector(name) is original:
                compat.bind_create_gpu_connector(name, create_gpu_connector)
                _patched_modules.append(name)
        _original_create = original
        return True


def uninstall_cpu_connector_patch() -> None:
    """Undo :func:`install_cpu_connector_patch` (for tests)."""
    global _original_create
    with _patch_lock:
        if _original_create is None:
            return
        original: Callable[..., Any] = _original_create
        for name in _patched_modules:
            current = compat.bound_create_gpu_connector(name)
            # Leave alone a name someone re-patched after us.
            if getattr(current, "__s3layer_original__", None) is _original_create:
                compat.bind_create_gpu_connector(name, original)
        _patched_modules.clear()
        _original_create = None

