"""Client for ``examples/serve_vllm.sh``: send one long prompt, report TTFT and hit tokens.

    python examples/vllm_client.py --prompt-tokens 2100              # token-id prompt (any model)
    python examples/vllm_client.py --text "$(cat long_document.txt)" # text (needs a tokenizer)

Each request streams, so TTFT is the time to the first generated token as the client sees it.
Hit tokens come from the server's ``usage.prompt_tokens_details.cached_tokens`` (the server
must run with ``--enable-prompt-tokens-details``; the launcher sets it). If the plugin's
Prometheus endpoint is reachable (``s3layer.metrics_port`` in the LMCache YAML; 9400 in
``configs/vllm-serve-local.yaml``), the client also shows what came from S3 for the request:
chunks hit, layers fetched and how long the forward pass waited for each layer.

Only the standard library and prometheus_client (a dependency of lmcache-s3layer) are used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def server_model(base: str) -> str:
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def stream_completion(base: str, body: dict) -> dict:
    """POST a streaming completion; return TTFT, total time, output and usage."""
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"server answered {resp.status}: {resp.read().decode(errors='replace')[:2000]}")
    ttft = None
    text, token_ids, usage = [], [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        msg = json.loads(data)
        if msg.get("usage"):
            usage = msg["usage"]
        for choice in msg.get("choices", []):
            got = choice.get("text") or choice.get("token_ids")
            if got and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(choice.get("text") or "")
            token_ids.extend(choice.get("token_ids") or [])
    total = time.perf_counter() - t0
    conn.close()
    return {"ttft_s": ttft, "total_s": total, "text": "".join(text), "token_ids": token_ids, "usage": usage}


def scrape(url: str) -> dict | None:
    """The plugin's counters (totals since the worker started), or None if unreachable."""
    try:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(url, timeout=3).read().decode()
    except (OSError, urllib.error.URLError, ImportError):
        return None
    out: dict = {"lookup_hit": 0.0, "fetch_n": 0.0, "fetch_s": 0.0, "fetch_bytes": 0.0, "stall": {},
                 "failed": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "s3layer_lookup_chunks_total" and s.labels.get("result") == "hit":
                out["lookup_hit"] += s.value
            elif s.name == "s3layer_layer_fetch_seconds_count":
                out["fetch_n"] += s.value
            elif s.name == "s3layer_layer_fetch_seconds_sum":
                out["fetch_s"] += s.value
            elif s.name == "s3layer_layer_fetch_bytes_sum":
                out["fetch_bytes"] += s.value
            elif s.name == "s3layer_layer_stall_seconds_sum":
                out["stall"][int(s.labels["layer"])] = s.value
            elif s.name == "s3layer_events_total" and s.labels.get("event") == "retrieval_failed":
                out["failed"] += s.value
    return out


def show_s3(before: dict | None, after: dict | None) -> None:
    if before is None or after is None:
        print("   (plugin metrics not reachable: set s3layer.metrics_port to see per-layer timing)")
        return
    n = after["fetch_n"] - before["fetch_n"]
    print(f"   from S3: {int(after['lookup_hit'] - before['lookup_hit'])} chunk lookups hit, {int(n)} layers fetched, "
          f"{(after['fetch_bytes'] - before['fetch_bytes']) / 2**20:.2f} MiB"
          + (f", mean fetch {(after['fetch_s'] - before['fetch_s']) / n * 1000:.1f} ms/layer" if n else ""))
    stalls = {k: v - before["stall"].get(k, 0.0) for k, v in after["stall"].items()}
    stalls = {k: v for k, v in stalls.items() if v > 0}
    if stalls:
        print("   forward pass waited per layer (ms): "
              + " ".join(f"L{k}:{v * 1000:.2f}" for k, v in sorted(stalls.items())))
    if after["failed"] > before["failed"]:
        print(f"   FAILED loads: {int(after['failed'] - before['failed'])} (recomputed, see the server log)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="vLLM server")
    ap.add_argument("--metrics-url", default="http://127.0.0.1:9400/metrics",
                    help="the plugin's Prometheus endpoint ('' to skip)")
    ap.add_argument("--text", help="a text prompt (the server needs a tokenizer)")
    ap.add_argument("--prompt-tokens", type=int, default=2100, help="length of a random token-id prompt")
    ap.add_argument("--vocab", type=int, default=2000, help="token ids are drawn below this")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="send the prompt this many times")
    # A prefix becomes visible to lookups when its segment commits, after the background
    # upload; a lookup that missed is remembered for s3layer.negative_cache_ttl_s (2 s).
    ap.add_argument("--pause", type=float, default=3.0, help="seconds between requests")
    args = ap.parse_args(argv)

    model = server_model(args.url)
    if args.text is not None:
        prompt = args.text
        n = None
    else:
        rng = random.Random(args.seed)
        prompt = [rng.randrange(5, args.vocab) for _ in range(args.prompt_tokens)]
        n = len(prompt)
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    outputs = []
    for i in range(args.repeat):
        if i:
            time.sleep(args.pause)
        before = scrape(args.metrics_url) if args.metrics_url else None
        r = stream_completion(args.url, body)
        after = scrape(args.metrics_url) if args.metrics_url else None
        usage = r["usage"] or {}
        n = usage.get("prompt_tokens", n)
        hit = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        ttft = f"{r['ttft_s'] * 1000:.0f} ms" if r["ttft_s"] is not None else "n/a"
        print(f"request {i + 1}: prompt {n} tokens, hit tokens {hit if hit is not None else 'n/a'}, "
              f"TTFT {ttft}, total {r['total_s'] * 1000:.0f} ms")
        show_s3(before, after)
        outputs.append(r["token_ids"] or r["text"])
        shown = r["token_ids"][:8] if r["token_ids"] else repr(r["text"][:60])
        print(f"   output: {shown}{'...' if r['token_ids'] else ''}")
    if len(outputs) > 1:
        print(f"outputs identical across requests: {all(o == outputs[0] for o in outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
