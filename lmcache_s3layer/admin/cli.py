"""``lmcache-s3layer`` command line.

Each subcommand is one ``add_arguments`` function and one ``run`` function registered in
``COMMANDS``; adding a subcommand means adding one entry there. ``main`` returns the exit
status: 0 on success, 2 for bad input (argparse's convention), so scripts can tell a typo from
a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from lmcache_s3layer import __version__
from lmcache_s3layer.admin import planner
from lmcache_s3layer.config import fmt_bytes

PROG = "lmcache-s3layer"


class UsageError(Exception):
    """Bad input spotted after parsing; reported like an argparse error (exit 2)."""


# --------------------------------------------------------------------------------------------
# argparse value checks: negative sizes are typos, and saying so beats a nonsense plan.


def _number(kind: type, minimum: float, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum if inclusive else value <= minimum:
            op = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"must be {op} {minimum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


non_negative_int = _number(int, 0, inclusive=True)
positive_int = _number(int, 1, inclusive=True)
non_negative_float = _number(float, 0, inclusive=True)
positive_float = _number(float, 0, inclusive=False)


# --------------------------------------------------------------------------------------------
# plan


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    work = p.add_argument_group("request")
    work.add_argument("--context", type=non_negative_int, required=True, metavar="TOKENS",
                      help="cached prefix length P, in tokens (the KV that is stored and loaded)")
    work.add_argument("--new-tokens", type=positive_int, default=256, metavar="TOKENS",
                      help="new tokens N prefilled on top of the prefix (default 256)")

    model = p.add_argument_group(
        "model (one of --model, --hf-config, or the explicit shape flags)")
    model.add_argument("--model", help=f"built-in model: {', '.join(sorted(planner.MODELS))}")
    model.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json")
    model.add_argument("--layers", type=positive_int)
    model.add_argument("--kv-heads", type=positive_int)
    model.add_argument("--head-dim", type=positive_int)
    model.add_argument("--q-heads", type=positive_int, help="attention (query) heads")
    model.add_argument("--params-per-layer", type=positive_float,
                       help="parameters per layer (or give --hidden-size and --intermediate-size)")
    model.add_argument("--hidden-size", type=positive_int)
    model.add_argument("--intermediate-size", type=positive_int)
    model.add_argument("--dtype", help="model dtype (default: the model's, else bfloat16)")
    model.add_argument("--kv-dtype", help="KV cache dtype if it differs, e.g. fp8")

    gpu = p.add_argument_group("GPU")
    gpu.add_argument("--gpu", default="h100",
                     help=f"preset: {', '.join(sorted(planner.GPUS))} (default h100)")
    gpu.add_argument("--gpus", type=positive_int, default=1,
                     help="tensor-parallel GPUs serving one request (default 1)")
    gpu.add_argument("--gpu-tflops", type=positive_float, help="dense bf16 peak TFLOP/s per GPU")
    gpu.add_argument("--hbm-tbps", type=positive_float, help="HBM bandwidth TB/s per GPU")
    gpu.add_argument("--hbm-gb", type=positive_float, help="HBM capacity GB per GPU")
    gpu.add_argument("--efficiency", type=positive_float, default=0.5,
                     help="fraction of peak FLOP/s reached (default 0.5)")

    link = p.add_argument_group("object store link")
    link.add_argument("--bandwidth-gbps", type=positive_float, default=100.0,
                      help="bandwidth to the object store, Gbit/s (default 100)")
    link.add_argument("--latency-ms", type=non_negative_float, default=20.0,
                      help="first-byte latency, ms (default 20: S3 Standard p90)")
    link.add_argument("--jitter-ms", type=non_negative_float, default=0.0,
                      help="how much later than --latency-ms a slow first byte lands, ms (default 0); "
                           "sizes the staging budget")
    link.add_argument("--stream-mbps", type=positive_float, default=planner.DEFAULT_STREAM_MBPS,
                      help="MB/s one connection sustains after the first byte (default 93)")

    layout = p.add_argument_group("layout")
    layout.add_argument("--chunk-size", type=positive_int, default=256, help="tokens per chunk (default 256)")
    layout.add_argument("--segment-max-chunks", type=positive_int, default=64,
                        help="chunks per segment at most (default 64)")
    layout.add_argument("--part-mib", type=positive_float, default=8.0,
                        help="ranged GET size, MiB (default 8)")
    layout.add_argument("--store-tokens", type=positive_int, metavar="TOKENS",
                        help="tokens written per store (default: the whole prefix in one store)")

    prices = p.add_argument_group("prices (USD; per GB = per 2^30 bytes, as AWS bills)")
    prices.add_argument("--prices", default="s3-standard",
                        choices=[*sorted(planner.PRICES), "custom"])
    prices.add_argument("--put-per-1k", type=non_negative_float)
    prices.add_argument("--get-per-1k", type=non_negative_float)
    prices.add_argument("--storage-per-gb-month", type=non_negative_float)
    prices.add_argument("--upload-per-gb", type=non_negative_float)
    prices.add_argument("--retrieval-per-gb", type=non_negative_float)

    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


_SHAPE_FLAGS = ("layers", "kv_heads", "head_dim", "q_heads", "params_per_layer",
                "hidden_size", "intermediate_size")


def _model_from_args(args: argparse.Namespace) -> planner.ModelShape:
    explicit = [f for f in _SHAPE_FLAGS if getattr(args, f) is not None]
    sources = [s for s, on in (("--model", args.model), ("--hf-config", args.hf_config),
                               ("shape flags", explicit)) if on]
    if len(sources) != 1:
        raise UsageError(
            "give exactly one model: --model NAME, --hf-config PATH, or --layers/--kv-heads/"
            f"--head-dim/--q-heads/--params-per-layer (got {', '.join(sources) or 'none'})"
        )
    if args.model:
        model = planner.get_model(args.model)
    elif args.hf_config:
        model = planner.model_from_hf_config(args.hf_config)
    else:
        missing = ["--" + f.replace("_", "-") for f in ("layers", "kv_heads", "head_dim", "q_heads")
                   if getattr(args, f) is None]
        if missing:
            raise UsageError(f"an explicit shape also needs {', '.join(missing)}")
        model = planner.model_from_dims(
            num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
            num_q_heads=args.q_heads, params_per_layer=args.params_per_layer,
            hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        )
    changes = {}
    if args.dtype:
        changes["dtype"] = args.dtype
    if args.kv_dtype:
        changes["kv_dtype"] = args.kv_dtype
    return replace(model, **changes) if changes else model


def build_plan(args: argparse.Namespace) -> planner.Plan:
    model = _model_from_args(args)
    gpu = planner.get_gpu(args.gpu, tflops=args.gpu_tflops, hbm_tbps=args.hbm_tbps,
                          hbm_gb=args.hbm_gb, efficiency=args.efficiency, count=args.gpus)
    link = planner.LinkSpec(args.bandwidth_gbps, args.latency_ms, args.stream_mbps, args.jitter_ms)
    prices = planner.get_prices(
        args.prices, put_per_1k=args.put_per_1k, get_per_1k=args.get_per_1k,
        storage_per_gb_month=args.storage_per_gb_month, upload_per_gb=args.upload_per_gb,
        retrieval_per_gb=args.retrieval_per_gb,
    )
    part = int(args.part_mib * planner.MIB)
    if part < 1:
        raise UsageError(f"--part-mib {args.part_mib} is under one byte")
    layout = planner.LayoutSpec(args.chunk_size, args.segment_max_chunks, part, args.store_tokens)
    return planner.plan(model, context_tokens=args.context, new_tokens=args.new_tokens,
                        gpu=gpu, link=link, prices=prices, layout=layout)


def _ms(ms: float) -> str:
    return f"{ms / 1e3:,.2f} s" if ms >= 1000 else f"{ms:,.2f} ms"


def _usd(x: float) -> str:
    return f"${x:,.4f}" if x < 10 else f"${x:,.2f}"


def format_plan(pl: planner.Plan) -> str:
    m, g, link = pl.model, pl.gpu, pl.link
    d = pl.to_dict()
    ours = pl.ours
    lines = [
        f"{m.name}: {m.num_layers} layers, {m.num_kv_heads} KV heads x {m.head_dim}, "
        f"{m.effective_kv_dtype} KV | {g.count}x {g.name} at {g.efficiency:.0%} of "
        f"{g.flops / 1e12:g} TFLOP/s | {link.bandwidth_gbps:g} Gbps, {link.latency_ms:g}"
        f"{f' ± {link.jitter_ms:g}' if link.jitter_ms else ''} ms "
        f"first byte | {pl.prices.name}",
        f"prefix {pl.context_tokens:,} tokens cached + {pl.new_tokens:,} new",
        "",
        f"  KV per token per layer   {fmt_bytes(pl.bytes_per_token_per_layer, 2)}",
        f"  KV per layer             {fmt_bytes(pl.bytes_per_layer, 2)}",
        f"  KV, all layers           {fmt_bytes(pl.kv_bytes, 2)} ({pl.kv_bytes / 1e9:,.2f} GB)",
        f"  compute per layer        {_ms(pl.t_layer_ms)}   (all layers {_ms(pl.compute_ms)})",
        f"  fetch per layer          {_ms(pl.fetch_per_layer_ms)}   (whole load {_ms(pl.load_ms)})",
    ]
    if pl.hides:
        hides = "yes"
    else:
        hides = (f"no: needs {d['bandwidth_needed_gbps']:,.0f} Gbps "
                 f"({pl.bandwidth_needed_gbytes_per_s:,.1f} GB/s), "
                 f"or >= {pl.new_tokens_to_hide:,} new tokens")
    lines += [
        f"  hides behind compute     {hides}",
        f"  TTFT floor               {_ms(pl.ttft_floor_ms)}",
        f"  recompute instead        {_ms(pl.recompute_ms)}   "
        f"(loading is {pl.load_vs_recompute:,.1f}x faster)",
        f"  in-flight GETs needed    {pl.concurrency_needed:,}   ({fmt_bytes(ours.mean_get_bytes, 2)} GETs at "
        f"{ours.per_stream_mbytes_per_s:,.0f} MB/s each)",
        f"  staging budget needed    {fmt_bytes(pl.staging_budget_bytes, 2)}   "
        f"(s3layer.staging_budget_bytes per concurrent retrieval: the layers in flight through "
        f"the latency tail at the pipeline's rate)",
        f"  fits in HBM after load   {'yes' if pl.fits_in_hbm else 'NO'}   "
        f"(weights + KV {pl.hbm_needed_bytes / 1e9:,.1f} GB, HBM {g.hbm_bytes * g.count / 1e9:,.0f} GB)",
        "",
    ]
    header = ("layout", "objects", "PUTs", "GETs", "TTFT floor", "GET floor*", "$/store", "$/load", "$/month")
    labels = {"segments": "segments (ours)", "chunk_layer": "per (chunk, layer)",
              "token_major": "token-major (stock)"}
    rows = [header]
    for name, lp in pl.layouts.items():
        rows.append((labels.get(name, name), f"{lp.objects:,}", f"{lp.put_requests:,}",
                     f"{lp.get_requests:,}", _ms(lp.ttft_floor_ms), _ms(lp.get_rate_floor_ms),
                     _usd(lp.usd_per_store), _usd(lp.usd_per_load), _usd(lp.usd_per_month)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(r, widths))))
    lines += [
        "",
        f"  ours: {ours.detail.get('segments', 0):,} segments x {m.num_layers} layer objects + "
        f"{ours.detail.get('manifests', 0):,} manifests + {ours.detail.get('pointers', 0):,} segment-start "
        "pointers; GETs include a cold index's lookup: one parallel round of "
        f"{ours.detail.get('lookup_pointer_gets', 0):,} pointer GETs (one per chunk; only segment starts "
        f"hit) + {ours.detail.get('lookup_manifest_gets', 0):,} manifest GETs",
        f"  * S3 Standard: time one partitioned prefix needs to serve the GETs at "
        f"{planner.S3_GET_PER_S_PER_PREFIX:,}/s; keys spread over k prefixes divide it by k"
        # Express directory buckets are not partitioned per prefix (anchors §5.5: ~200K GET/s
        # per bucket), so the Standard floor would overstate them.
        + ("; S3 Express takes ~200,000 GETs/s per bucket, so it rarely binds there"
           if pl.prices.name.startswith("s3-express") else ""),
    ]
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    pl = build_plan(args)
    if args.json:
        print(json.dumps(pl.to_dict(), indent=2))
    else:
        print(format_plan(pl))
    return 0


# --------------------------------------------------------------------------------------------
# inspect / gc / server: bucket operations (logic in ops.py; imported lazily so ``plan`` starts
# without loading boto3)


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "connection (like the AWS CLI; credentials from the environment, an AWS profile or the "
        "instance role, never from a flag)")
    g.add_argument("--bucket", help="bucket holding the cache (or s3layer.bucket from --lmcache-config)")
    g.add_argument("--prefix", help="key prefix (default: kvcache, as the plugin's s3layer.prefix)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 "
                   "(default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS)")
    g.add_argument("--region", help="region (default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)")
    g.add_argument("--addressing-style", choices=("auto", "path", "virtual"))
    g.add_argument("--profile", help="AWS shared-config profile")
    g.add_argument("--access-key-id", help="access key id; the secret is read from "
                   "$AWS_SECRET_ACCESS_KEY (and $AWS_SESSION_TOKEN), never from the command line")
    tls = g.add_mutually_exclusive_group()
    tls.add_argument("--no-verify-ssl", action="store_true", help="do not verify the endpoint's TLS certificate")
    tls.add_argument("--ca-bundle", metavar="PATH", help="CA bundle to verify the endpoint's certificate with")
    g.add_argument("--lmcache-config", metavar="YAML", help="read s3layer.* settings from the LMCache "
                   "config the engine uses (its extra_config); flags given here override it")
    p.add_argument("--jobs", type=positive_int, default=8, help="parallel requests (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _s3_config_from_args(args: argparse.Namespace):
    import os

    import yaml

    from lmcache_s3layer.config import PREFIX, S3LayerConfig

    values: dict = {}
    if args.lmcache_config:
        try:
            with open(args.lmcache_config) as f:
                doc = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"--lmcache-config: {exc}") from None
        extra = doc.get("extra_config", doc) if isinstance(doc, dict) else None
        if not isinstance(extra, dict):
            raise UsageError("--lmcache-config: expected a mapping with an extra_config section")
        values = {k[len(PREFIX):]: v for k, v in extra.items()
                  if isinstance(k, str) and k.startswith(PREFIX) and k != PREFIX + "fail_fast"}
    env = os.environ
    endpoint = args.endpoint_url or (None if "endpoint_url" in values else
                                     env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"))
    region = args.region or (None if "region" in values else env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
    flags = {"bucket": args.bucket, "prefix": args.prefix, "endpoint_url": endpoint, "region": region,
             "addressing_style": args.addressing_style, "profile": args.profile, "ca_bundle": args.ca_bundle}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.no_verify_ssl:
        values["verify_tls"] = False
    if args.access_key_id:
        secret = env.get("AWS_SECRET_ACCESS_KEY")
        if not secret:
            raise UsageError("--access-key-id needs the secret in $AWS_SECRET_ACCESS_KEY "
                             "(a secret on the command line would land in shell history and ps)")
        values.update(access_key_id=args.access_key_id, secret_access_key=secret,
                      session_token=env.get("AWS_SESSION_TOKEN"))
    # Enough connections for --jobs workers that each keep one request in flight.
    values["max_connections"] = max(args.jobs, 4)
    return S3LayerConfig.from_mapping(values)


def _run_ops(args: argparse.Namespace, body: Callable) -> int:
    """Open the bucket, run ``body(store)``; typed failures become messages and exit codes:
    2 for bad settings (like a usage error), 3 when the store cannot be reached or read."""
    from lmcache_s3layer.admin import ops
    from lmcache_s3layer.errors import ConfigError, S3LayerError

    try:
        store = ops.connect(_s3_config_from_args(args))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        store.client.check_bucket()
        return body(store)
    except S3LayerError as exc:
        print(f"{args._parser.prog}: error: {exc}", file=sys.stderr)
        return 3
    finally:
        store.client.close()


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    add_connection_arguments(p)
    p.add_argument("--segment", metavar="ID", help="only this segment (its id or a unique prefix of it)")
    p.add_argument("--verify", action="store_true",
                   help="read every layer and check each (layer, chunk) checksum against the manifest")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr while verifying (default: when stderr is a terminal)")


def _segment_row(d: dict) -> tuple:
    from lmcache_s3layer.admin.ops import fmt_age

    if "model" not in d:
        return (d["segment_id"], "(unreadable manifest)", "", "", "", "", "", fmt_bytes(d["bytes"]),
                fmt_age(d["age_s"]))
    model = d["model"] if len(d["model"]) <= 40 else d["model"][:37] + "..."
    return (d["segment_id"], model, f"{d['world_size']}-{d['worker_id']}", d["dtype"], f"{d['chunks']:,}",
            f"{d['tokens']:,}", str(d["layers"]), fmt_bytes(d["bytes"]), fmt_age(d["age_s"]))


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def run_inspect(args: argparse.Namespace) -> int:
    import time

    from lmcache_s3layer.admin import ops
    from lmcache_s3layer.format.objects import FORMAT_VERSION, version_root

    def body(store) -> int:
        sc = ops.scan(store, jobs=args.jobs)
        now = time.time()
        segments = sc.segments
        if args.segment:
            try:
                segments = [ops.find_segment(sc, args.segment)]
            except LookupError as exc:
                raise UsageError(str(exc)) from None
        where = f"s3://{store.client.bucket}/{version_root(store.prefix)}"
        problems = [p for s in segments for p in s.problems(store.prefix)]
        report = None
        if args.verify:
            # Verification reads layer objects only, so the bar's total leaves out manifests.
            layer_bytes = sum(o.size for s in segments for o in s.layer_objects.values())
            progress = ops.Progress(layer_bytes, len(segments), enabled=args.progress)
            report = ops.verify(store, segments, jobs=args.jobs, progress=progress)
            problems = report.problems
        orphan_ptrs = sc.orphan_pointers()
        unreferenced = sc.unreferenced()
        descs = [s.describe(now) for s in segments]
        if args.json:
            print(json.dumps({
                "location": where,
                "segments": descs,
                "totals": {"segments": len(descs), "bytes": sum(d["bytes"] for d in descs),
                           "tokens": sum(d.get("tokens", 0) for d in descs)},
                "orphans": {"segment_dirs": [d.dir for d in sc.orphan_dirs],
                            "segment_dir_bytes": sum(d.size for d in sc.orphan_dirs),
                            "pointers": [p.key for p in orphan_ptrs],
                            "unreferenced_segments": [s.segment_id for s in unreferenced]},
                "foreign_objects": len(sc.foreign),
                "legacy": [g.to_json() for g in sc.legacy],
                "problems": [p.to_json() for p in problems],
                "verify": report.to_json() if report else None,
            }, indent=2))
        else:
            print(f"{where}: {len(descs)} segment(s), {fmt_bytes(sum(d['bytes'] for d in descs))}, "
                  f"{sum(d.get('tokens', 0) for d in descs):,} tokens")
            if descs:
                header = ("SEGMENT", "MODEL", "RANK", "DTYPE", "CHUNKS", "TOKENS", "LAYERS", "SIZE", "AGE")
                for line in _table([header] + [_segment_row(d) for d in descs]):
                    print("  " + line)
            if sc.orphan_dirs or orphan_ptrs or unreferenced:
                print(f"orphans: {len(sc.orphan_dirs)} segment dir(s) without a manifest "
                      f"({fmt_bytes(sum(d.size for d in sc.orphan_dirs))}), {len(orphan_ptrs)} "
                      f"pointer(s) naming no segment, {len(unreferenced)} segment(s) no pointer names; "
                      "`gc` collects them after the grace period")
            if sc.foreign:
                print(f"{len(sc.foreign)} object(s) under the prefix are not format v{FORMAT_VERSION} names "
                      "(left alone)")
            for g in sc.legacy:
                print(f"legacy format v{g.version}: {len(g.objects):,} object(s), {fmt_bytes(g.bytes)} under "
                      f"s3://{store.client.bucket}/{g.root} ({g.count('manifest'):,} segment(s), "
                      f"{g.count('pointer'):,} pointer(s)); never read by this version, "
                      "`gc --legacy` deletes them")
            if report is not None:
                rate = report.bytes / report.seconds if report.seconds > 0 else 0.0
                print(f"verified {report.segments} segment(s), {report.layers} layer object(s), "
                      f"{fmt_bytes(report.bytes)} in {report.seconds:.2f} s ({fmt_bytes(rate)}/s)")
            for p in problems:
                print(f"CORRUPT {p}")
            if problems:
                bad = len({p.segment_id for p in problems})
                print(f"{len(problems)} problem(s) in {bad} segment(s)")
            elif report is not None:
                print("all checksums match")
        return 1 if problems else 0

    return _run_ops(args, body)


def add_gc_arguments(p: argparse.ArgumentParser) -> None:
    add_connection_arguments(p)
    p.add_argument("--older-than", metavar="AGE",
                   help="delete segments committed longer ago than AGE (7d, 36h, 90m, 1w2d)")
    p.add_argument("--max-bytes", metavar="SIZE",
                   help="then delete the oldest segments until the rest fit in SIZE (100GiB, 500GB)")
    p.add_argument("--orphan-grace", metavar="AGE", default="1h",
                   help="collect orphans (layer objects without a manifest, pointers naming a "
                   "segment without one, segments no pointer names) and damaged segments only once "
                   "this old (default 1h: a writer's store in progress looks like an orphan until "
                   "its manifest and pointer land)")
    p.add_argument("--segment", action="append", default=[], metavar="ID",
                   help="also delete this segment (its id or a unique prefix of it), e.g. one that "
                   "`inspect --verify` reported corrupt; repeatable")
    p.add_argument("--legacy", action="store_true",
                   help="also delete every object of older formats (legacy format v1, under <prefix>/v1/: "
                   "never read by this version); only once no engine of an older version uses the bucket")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")


def _gc_line(a, dry_run: bool) -> str:
    from lmcache_s3layer.admin.ops import fmt_age

    verb = "would delete" if dry_run else ("deleted" if a.done else "kept" if not a.error else "FAILED")
    if a.kind == "segment":
        m = a.segment.manifest
        what = f"segment {a.segment.segment_id}"
        if m is not None:
            what += (f" ({m.namespace.model} {m.namespace.world_size}-{m.namespace.worker_id} "
                     f"{m.namespace.dtype}, {m.total_tokens:,} tokens, {m.num_layers} layers)")
    elif a.kind == "orphan_layers":
        what = f"{a.objects} orphan object(s) of segment {a.segment.segment_id}"
    elif a.kind == "legacy":
        what = f"{a.objects:,} legacy format v{a.legacy.version} object(s) under {a.key}"
    else:
        what = f"orphan pointer {a.key}"
    line = f"{verb} {what}, {fmt_bytes(a.bytes)}, age {fmt_age(a.age_s)}: {a.reason}"
    return line + (f": {a.error}" if a.error else "")


def run_gc(args: argparse.Namespace) -> int:
    from lmcache_s3layer.admin import ops
    from lmcache_s3layer.config import parse_size
    from lmcache_s3layer.errors import ConfigError

    try:
        older = ops.parse_duration(args.older_than) if args.older_than is not None else None
        grace = ops.parse_duration(args.orphan_grace)
        budget = parse_size(args.max_bytes, "--max-bytes") if args.max_bytes is not None else None
    except (ValueError, ConfigError) as exc:
        raise UsageError(str(exc)) from None
    if budget is not None and budget < 0:
        raise UsageError("--max-bytes must be >= 0")

    def body(store) -> int:
        def show(a) -> None:
            if not args.json:
                print(_gc_line(a, args.dry_run), flush=True)

        try:
            rep = ops.gc(store, older_than_s=older, max_bytes=budget, orphan_grace_s=grace,
                         dry_run=args.dry_run, jobs=args.jobs, on_action=show, segments=args.segment,
                         legacy=args.legacy)
        except LookupError as exc:  # --segment named nothing, or several
            raise UsageError(str(exc)) from None
        if args.json:
            print(json.dumps(rep.to_json(), indent=2))
        else:
            s = rep.to_json()["summary"]
            verb = "would delete" if args.dry_run else "deleted"
            print(f"gc: {verb} {s['segments']} segment(s) ({fmt_bytes(s['segment_bytes'])}), "
                  f"{s['orphan_layer_objects']} orphan layer object(s), {s['orphan_pointers']} orphan "
                  f"pointer(s)"
                  + (f", {s['legacy_objects']:,} legacy format object(s) ({fmt_bytes(s['legacy_bytes'])})"
                     if s["legacy_objects"] else "")
                  + f"; kept {s['kept_segments']} segment(s) ({fmt_bytes(s['kept_bytes'])})"
                  + (f"; {s['errors']} failed" if s["errors"] else ""))
            for g in rep.legacy_kept:
                print(f"gc: left {len(g.objects):,} legacy format v{g.version} object(s) "
                      f"({fmt_bytes(g.bytes)}) under {g.root}; never read by this version, "
                      "`gc --legacy` deletes them")
        return 1 if rep.errors else 0

    return _run_ops(args, body)


# --------------------------------------------------------------------------------------------
# Registry and entry point


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "plan": Command(
        "estimate KV size, request counts, hiding, TTFT and S3 cost for a workload",
        add_plan_arguments,
        run_plan,
    ),
    "inspect": Command(
        "list the cache's segments (model, tokens, layers, size, age); --verify checks every checksum",
        add_inspect_arguments,
        run_inspect,
    ),
    "gc": Command(
        "delete segments past an age or beyond a size budget (oldest first), and crashed writers' orphans",
        add_gc_arguments,
        run_gc,
    ),
}

# Development commands (``server``, ``bench``) live with the test tools in
# ``lmcache_s3layer.testing`` and register here through this entry-point group, so the
# runtime CLI never imports them.
COMMAND_ENTRY_POINTS = "lmcache_s3layer.commands"


def all_commands() -> dict[str, Command]:
    from importlib.metadata import entry_points

    commands = dict(COMMANDS)
    for ep in entry_points(group=COMMAND_ENTRY_POINTS):
        if ep.name not in commands:
            commands[ep.name] = ep.load()
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="S3-compatible object storage as a layer-major KV-cache tier for LMCache.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in all_commands().items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on bad flags; return its status
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args._run(args)
    except (UsageError, planner.PlannerError) as exc:
        print(f"{args._parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
