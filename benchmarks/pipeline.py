#!/usr/bin/env python
"""TTFT of a cached prefix streamed from S3, layer by layer, through LMCache's real
``retrieve_layer``: ours vs depth 1 (LMCache's stock one-layer lookahead) vs LMCache's own
``s3://`` connector vs the physical bound. Same as ``lmcache-s3layer bench``.

    benchmarks/pipeline.py --quick --json          # one latency (50 ms), under a minute
    benchmarks/pipeline.py                         # 0, 20, 50, 100 ms -> benchmarks/results/

The code lives in ``lmcache_s3layer.testing.bench`` so the installed CLI can run it too.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmcache_s3layer.testing.bench import pipeline_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pipeline_main())
