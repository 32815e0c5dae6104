"""LMCache 0.5.6 integration: the storage plugin (``backend``), its start-up guards, the
hand-off of buffers to LMCache, and a CPU layerwise connector."""
