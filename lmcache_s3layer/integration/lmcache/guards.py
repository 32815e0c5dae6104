"""Start-up guard rails: configurations that would run but never work, refused with a reason.

Each check turns a silent failure mode into one clear sentence at start-up:
- no PYTHONHASHSEED with a non-cryptographic prefix hash: vLLM/LMCache seed the hash chain
  randomly per process, so a cache meant to outlive the process would never hit again;
- layerwise retrieval with another backend able to serve chunks (LocalCPU, local disk, a
  remote URL): LMCache's ``retrieve_layer`` asserts that all chunks come from one location
  and crashes the worker when LocalCPU has chunk 0 and the plugin chunk 1.
"""

from __future__ import annotations

import os
from typing import Any

from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import ConfigError

# vLLM's cryptographic hashes derive NONE_HASH from a fixed default seed (kv_cache_utils.
# resolve_none_hash_seed); everything else depends on PYTHONHASHSEED.
_STABLE_HASHES = {"sha256", "sha256_cbor"}


class StartupError(BaseException):
    """The plugin cannot work as configured. A BaseException so that LMCache's plugin
    launcher, which catches Exception and only logs it, cannot swallow it."""


def plugin_name_of(config: Any, cls: type) -> str:
    """The name this class is registered under in ``storage_plugins`` (default s3layer)."""
    extra = getattr(config, "extra_config", None) or {}
    for name in getattr(config, "storage_plugins", None) or []:
        if extra.get(f"storage_plugin.{name}.class_name") == cls.__name__:
            return name
    return "s3layer"


def check_hash_seed(config: Any, cfg: S3LayerConfig, environ=os.environ) -> None:
    algo = str(getattr(config, "pre_caching_hash_algorithm", "builtin") or "builtin")
    if cfg.require_hash_seed and algo not in _STABLE_HASHES and environ.get("PYTHONHASHSEED") in (None, "", "random"):
        raise ConfigError(
            f"PYTHONHASHSEED is not set and pre_caching_hash_algorithm is {algo!r}: the prefix hash "
            "chain is seeded randomly per process, so KV stored in S3 would never be found again "
            "after a restart or by another instance. Set PYTHONHASHSEED=0 (the same value on every "
            "instance) in the environment of vLLM, or use pre_caching_hash_algorithm: sha256_cbor, "
            "or set s3layer.require_hash_seed: false for a cache that lives only as long as this process")


def check_single_location(config: Any, name: str) -> None:
    if not getattr(config, "use_layerwise", False):
        return
    retrieve = getattr(config, "retrieve_locations", None)
    if retrieve:
        if list(retrieve) != [name]:
            raise ConfigError(
                f"retrieve_locations is {list(retrieve)!r}: with use_layerwise LMCache must retrieve every "
                f"chunk of a request from one backend; set retrieve_locations: [{name}]")
        return
    others = []
    if getattr(config, "local_cpu", False):
        others.append("local_cpu: true")
    if getattr(config, "local_disk", None):
        others.append("local_disk")
    if getattr(config, "remote_url", None):
        others.append("remote_url")
    if getattr(config, "remote_storage_plugins", None):
        others.append("remote_storage_plugins")
    if len([p for p in getattr(config, "storage_plugins", None) or [] if p != name]):
        others.append("another storage plugin")
    if others:
        raise ConfigError(
            f"use_layerwise with {', '.join(others)} lets that backend serve some chunks of a request "
            f"and {name} the rest, and LMCache 0.5.6 then asserts 'All retrieved keys should be from "
            f"the same location' and stops the worker. Set local_cpu: false (LocalCPU stays as the "
            f"staging allocator) and no other backend, or set retrieve_locations: [{name}]")


def check_supported_mode(config: Any, metadata: Any = None) -> None:
    """Modes whose objects or call pattern the plugin does not serve: refused here, instead of
    failing inside LMCache's forward path later."""
    if getattr(config, "enable_pd", False):
        raise ConfigError("enable_pd (disaggregated prefill) moves KV between instances through LMCache's "
                          "PD backend, which bypasses storage plugins; lmcache-s3layer cannot serve it. "
                          "Turn enable_pd off, or do not list the plugin in storage_plugins")
    if getattr(config, "enable_blending", False):
        raise ConfigError("enable_blending (CacheBlend) uses the KV_2TD per-layer format and its own "
                          "connector; lmcache-s3layer stores KV_T2D / MLA layers only. Turn enable_blending off")
    if metadata is not None and getattr(metadata, "use_mla", False) and not getattr(config, "use_layerwise", False):
        raise ConfigError("an MLA model without use_layerwise: LMCache would hand the plugin whole "
                          "KV_MLA_FMT chunks, which it does not store; set use_layerwise: true")


def check_engine_config(config: Any, cfg: S3LayerConfig, name: str, environ=os.environ,
                        metadata: Any = None) -> None:
    check_supported_mode(config, metadata)
    check_hash_seed(config, cfg, environ)
    check_single_location(config, name)
    size = float(getattr(config, "max_local_cpu_size", 0) or 0)
    if size <= 0:
        raise ConfigError("max_local_cpu_size must be > 0: the plugin allocates its staging buffers "
                          "from LMCache's CPU pool (even with local_cpu: false)")
