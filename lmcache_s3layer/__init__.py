"""lmcache-s3layer: S3-compatible object storage as a layer-major KV-cache tier for LMCache.

Importing this package never imports lmcache or vllm: vLLM workers break when lmcache is
imported before they initialise (docs/troubleshooting.md), so only ``integration``
touches LMCache and vLLM types, and only when imported explicitly.

Layers, each importing only those before it: ``format`` (object names and formats, pure),
``store`` (S3 I/O), ``cache`` (index, writer, prefetch), ``integration`` (LMCache, vLLM),
``admin`` (CLI, plan, inspect, gc); ``testing`` holds development tools only.
"""

__version__ = "0.1.0"
