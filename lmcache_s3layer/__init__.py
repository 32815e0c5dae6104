"""lmcache-s3layer: S3-compatible object storage as a layer-major KV-cache tier for LMCache.

Importing this package never imports lmcache or vllm: vLLM workers break when lmcache is
imported before they initialise (see README, "CPU notes"), so only ``backend`` and
``cpu_connector`` touch LMCache types, and only when they are imported explicitly.
"""

__version__ = "0.1.0"
