"""Format v1: object names, namespaces, the segment manifest, chunk pointers and checksums.

Pure (no I/O, no LMCache): the only place that knows the key scheme.
"""
