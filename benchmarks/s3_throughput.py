#!/usr/bin/env python
"""Read throughput of our S3 layer reads (ranged GETs straight into buffers, every byte
CRC32C-verified) against plain boto3 ranged GETs at the same concurrency, and awscrt.

    benchmarks/s3_throughput.py --quick --json     # local SeaweedFS, under a minute
    benchmarks/s3_throughput.py --endpoint URL --bucket B   # any S3 endpoint

The code lives in ``lmcache_s3layer.testing.bench``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmcache_s3layer.testing.bench import throughput_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(throughput_main())
