"""The object store: the typed S3 client (pool, ranged GETs, retries), segment I/O, and range
planning (``ranges``: chunk runs and ranged-GET parts, for readers, the writer and the tools)."""
