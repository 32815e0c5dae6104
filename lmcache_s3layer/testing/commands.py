"""The development subcommands of ``lmcache-s3layer``: ``server`` (a local SeaweedFS) and
``bench`` (the pipeline benchmark). Registered through the ``lmcache_s3layer.commands``
entry-point group (pyproject.toml), so the runtime CLI never imports the test tools; they
need the ``[local]`` / ``[bench]`` extras."""

from __future__ import annotations

import argparse

from lmcache_s3layer.admin.cli import Command


def _add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("server_args", nargs=argparse.REMAINDER, metavar="[start|stop|status] [OPTIONS]",
                   help="passed to `python -m lmcache_s3layer.testing.server` "
                   "(see `lmcache-s3layer server start --help`)")


def _run_server(args: argparse.Namespace) -> int:
    from lmcache_s3layer.testing import server

    try:
        return server.main(args.server_args)
    except SystemExit as exc:  # its argparse: --help, bad flags
        return exc.code if isinstance(exc.code, int) else 2


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    # light: lmcache and torch load only when the benchmark runs
    from lmcache_s3layer.testing import bench

    bench.add_pipeline_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    from lmcache_s3layer.testing import bench

    return bench.run_pipeline(args)


SERVER = Command(
    "run a local SeaweedFS S3 server on 127.0.0.1 (python -m lmcache_s3layer.testing.server)",
    _add_server_arguments,
    _run_server,
)
BENCH = Command(
    "pipeline benchmark: TTFT of a prefix streamed from S3 through LMCache's retrieve_layer "
    "(ours vs depth 1 vs LMCache's s3:// vs the bound); same as benchmarks/pipeline.py",
    _add_bench_arguments,
    _run_bench,
)
