"""The cache core: chunk index, segment writer, layer prefetch pipeline, metrics.

Speaks namespaces, chunk hashes and byte buffers; no LMCache or vLLM types.
"""
