"""Public path of the vLLM KV connector, as ``--kv-transfer-config`` names it
(``"kv_connector_module_path": "lmcache_s3layer.vllm_connector"``)."""

from lmcache_s3layer.integration.vllm.connector import S3LayerConnectorV1

__all__ = ["S3LayerConnectorV1"]
