"""Public path of the LMCache storage plugin, as LMCache configs name it
(``storage_plugin.s3layer.module_path: lmcache_s3layer.backend``)."""

from lmcache_s3layer.integration.lmcache.backend import S3LayerBackend

__all__ = ["S3LayerBackend"]
