"""``lmcache-s3layer inspect`` / ``gc`` against the real S3 server: listing, verification,
corruption reports, deletion by age and by size, order of deletions, orphans, dry runs, and a
reader racing gc (it must see correct bytes, a miss or a typed error: never wrong bytes)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from lmcache_s3layer.admin import cli, ops
from lmcache_s3layer.cache.core import S3LayerCore
from lmcache_s3layer.cache.metrics import Metrics
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import RetrievalFailed, StorageError
from lmcache_s3layer.format.objects import Manifest, Namespace, version_root
from lmcache_s3layer.store.client import S3Client
from lmcache_s3layer.store.segments import SegmentStore, _chunk_checksums, new_segment_id

NS = Namespace("meta-llama/Llama-3.1-8B", 1, 0, "bfloat16")
NS2 = Namespace("Qwen/Qwen3-0.6B", 2, 1, "bfloat16")
HIDDEN = 64
BPT = 2 * HIDDEN * 2  # bytes per token per layer: (2, HIDDEN) bf16
PREFIX = "ops"
DAY = 86400.0


def cfg_for(ep, bucket, **kw) -> S3LayerConfig:
    return S3LayerConfig(bucket=bucket, endpoint_url=ep.endpoint_url, access_key_id=ep.access_key,
                         secret_access_key=ep.secret_key, region=ep.region, prefix=PREFIX,
                         retry_base_s=0.01, **kw)


@pytest.fixture
def store(s3_endpoint, bucket):
    client = S3Client(cfg_for(s3_endpoint, bucket))
    yield SegmentStore(client, PREFIX)
    client.close()


def layers_for(n_layers, tokens, seed):
    rng = random.Random(seed)
    return [rng.randbytes(sum(tokens) * BPT) for _ in range(n_layers)]


def write(store, hashes, tokens=None, n_layers=4, ns=NS, age_s=0.0, seed=None):
    """A committed segment whose manifest says it was written ``age_s`` ago (S3 cannot backdate
    Last-Modified; gc takes the earlier of the two, see ops' docstring)."""
    tokens = tokens or [32] * len(hashes)
    layers = layers_for(n_layers, tokens, seed if seed is not None else hashes[0])
    sid = new_segment_id()
    sums = tuple(tuple(_chunk_checksums(memoryview(b), (2, HIDDEN), tokens, ns)) for b in layers)
    m = Manifest(sid, ns, n_layers, (2, HIDDEN), tuple(hashes), tuple(tokens), sums, time.time() - age_s)
    for layer, buf in enumerate(layers):
        store.put_layer(ns, sid, layer, buf)
    store.commit(m)
    return m, layers


def keys(store):
    return sorted(o.key for o in store.client.list(PREFIX + "/"))


def conn_args(ep, bucket):
    return ["--endpoint-url", ep.endpoint_url, "--region", ep.region, "--bucket", bucket,
            "--prefix", PREFIX, "--access-key-id", ep.access_key]


@pytest.fixture
def run_cli(s3_endpoint, bucket, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_endpoint.secret_key)

    def run(*argv):
        code = cli.main([argv[0], *conn_args(s3_endpoint, bucket), *argv[1:]])
        out, err = capsys.readouterr()
        assert s3_endpoint.secret_key not in out + err
        return code, out, err

    return run


# ---- inspect ---------------------------------------------------------------------------------


def test_inspect_lists_segments_with_model_tokens_layers_size_age(store, run_cli):
    a, _ = write(store, [1, 2, 3], tokens=[32, 32, 7], n_layers=4, age_s=2 * DAY)
    b, _ = write(store, [10], n_layers=6, ns=NS2)
    code, out, _ = run_cli("inspect")
    assert code == 0, out
    assert "2 segment(s)" in out and "103 tokens" in out
    lines = {l.split()[0]: l.split() for l in out.splitlines()[2:] if l.strip()}
    assert lines[a.segment_id][1:5] == ["meta-llama/Llama-3.1-8B", "1-0", "bfloat16", "3"]
    assert lines[a.segment_id][5:7] == ["71", "4"]
    assert lines[a.segment_id][-1].startswith("2d")
    assert lines[b.segment_id][1:7] == ["Qwen/Qwen3-0.6B", "2-1", "bfloat16", "1", "32", "6"]

    code, out, _ = run_cli("inspect", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["totals"] == {"segments": 2, "bytes": doc["totals"]["bytes"], "tokens": 103}
    by_id = {d["segment_id"]: d for d in doc["segments"]}
    # size = layer objects + manifest, as listed
    manifest_size = store.client.head(store.names(NS).manifest_object(a.segment_id)).size
    assert by_id[a.segment_id]["bytes"] == 4 * a.layer_bytes + manifest_size
    assert [d["segment_id"] for d in doc["segments"]] == [a.segment_id, b.segment_id]  # oldest first
    assert doc["problems"] == [] and doc["verify"] is None


def test_inspect_verify_passes_then_names_a_flipped_byte(store, run_cli, s3_boto_client, bucket):
    m, layers = write(store, [5, 6, 7], n_layers=3)
    other, _ = write(store, [8], n_layers=3)
    code, out, err = run_cli("inspect", "--verify", "--progress")
    assert code == 0, out
    assert "verified 2 segment(s), 6 layer object(s)" in out and "all checksums match" in out
    assert "verifying [" in err and "2/2 segments" in err  # the stderr progress bar

    key = store.names(NS).layer_object(m.segment_id, 2)
    data = bytearray(layers[2])
    data[32 * BPT + 100] ^= 0x40  # chunk 1 of layer 2
    s3_boto_client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    code, out, _ = run_cli("inspect", "--verify")
    assert code == 1
    assert f"CORRUPT segment {m.segment_id} layer 2 chunk 1: checksum mismatch ({key})" in out
    assert other.segment_id not in "".join(l for l in out.splitlines() if l.startswith("CORRUPT"))

    code, out, _ = run_cli("inspect", "--verify", "--json", "--segment", m.segment_id[:8])
    doc = json.loads(out)
    assert code == 1 and [d["segment_id"] for d in doc["segments"]] == [m.segment_id]
    assert doc["verify"]["problems"] == [{"segment_id": m.segment_id, "layer": 2, "chunk": 1, "key": key,
                                          "reason": "checksum mismatch"}]

    # the installed command, in its own process, exits non-zero too
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": store.client.cfg.secret_access_key}
    proc = subprocess.run([sys.executable, "-m", "lmcache_s3layer.admin.cli", "inspect", "--verify",
                           *conn_args_from(store)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and f"segment {m.segment_id} layer 2 chunk 1" in proc.stdout


def conn_args_from(store):
    c = store.client.cfg
    return ["--endpoint-url", c.endpoint_url, "--region", c.region, "--bucket", c.bucket,
            "--prefix", PREFIX, "--access-key-id", c.access_key_id]


def test_inspect_reports_missing_and_short_layers_without_reading_data(store, run_cli, s3_boto_client, bucket):
    m, layers = write(store, [21, 22], n_layers=3)
    names = store.names(NS)
    s3_boto_client.delete_object(Bucket=bucket, Key=names.layer_object(m.segment_id, 0))
    s3_boto_client.put_object(Bucket=bucket, Key=names.layer_object(m.segment_id, 1), Body=layers[1][:-1])
    code, out, _ = run_cli("inspect")
    assert code == 1
    assert f"segment {m.segment_id} layer 0: layer object missing" in out
    assert f"segment {m.segment_id} layer 1: layer object is {m.layer_bytes - 1} bytes" in out


def test_inspect_usage_and_connection_errors(store, run_cli, s3_endpoint, monkeypatch, capsys):
    code, _, err = run_cli("inspect", "--segment", "ffff")
    assert code == 2 and "no committed segments match" in err
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code = cli.main(["inspect", *conn_args(s3_endpoint, "some-bucket")])
    assert code == 2 and "AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_endpoint.secret_key)
    code = cli.main(["inspect", *conn_args(s3_endpoint, "no-such-bucket-s3layer")])
    err = capsys.readouterr().err
    assert code == 3 and "does not exist" in err and s3_endpoint.secret_key not in err


def test_inspect_reads_the_engine_config(store, s3_endpoint, bucket, tmp_path, monkeypatch, capsys):
    m, _ = write(store, [31])
    monkeypatch.setenv("MY_SECRET", s3_endpoint.secret_key)
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(json.dumps({"chunk_size": 256, "extra_config": {
        "storage_plugin.s3layer.module_path": "lmcache_s3layer.backend",
        "s3layer.bucket": bucket, "s3layer.prefix": PREFIX, "s3layer.endpoint_url": s3_endpoint.endpoint_url,
        "s3layer.region": s3_endpoint.region, "s3layer.access_key_id": s3_endpoint.access_key,
        "s3layer.secret_access_key": "env:MY_SECRET", "s3layer.fail_fast": True}}))  # JSON is YAML
    assert cli.main(["inspect", "--lmcache-config", str(cfg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["segment_id"] for d in doc["segments"]] == [m.segment_id]


# ---- gc ----------------------------------------------------------------------------------------


def record_ops(store):
    log = []
    store.client.before_request = lambda op, key: log.append((op, key))
    return log


def test_gc_by_age_deletes_only_old_segments_pointers_then_manifest_then_layers(store, run_cli):
    old, _ = write(store, [1, 2], n_layers=3, age_s=10 * DAY)
    young, _ = write(store, [3, 4], n_layers=3, age_s=1 * DAY)
    new, _ = write(store, [5], n_layers=3)
    before = keys(store)

    code, out, _ = run_cli("gc", "--older-than", "7d", "--dry-run")
    assert code == 0 and keys(store) == before  # dry run deletes nothing
    assert f"would delete segment {old.segment_id}" in out and "older than 7d00h" in out
    assert young.segment_id not in out and new.segment_id not in out

    log = record_ops(store)
    rep = ops.gc(store, older_than_s=7 * DAY)
    assert [a.segment.segment_id for a in rep.actions] == [old.segment_id] and rep.actions[0].done
    names = store.names(NS)
    deletes = [k for op, k in log if op == "delete"]
    # format v2: one pointer per segment, at its first chunk
    assert deletes == [names.pointer_object(1), names.manifest_object(old.segment_id),
                       names.layer_object(old.segment_id, 0)]  # the last is one batch of all layers
    assert not any(old.segment_id in k for k in keys(store))
    assert store.read_pointer(NS, 1) is None
    left = ops.scan(store)
    assert [s.segment_id for s in left.segments] == [young.segment_id, new.segment_id]
    assert left.orphan_dirs == [] and sorted(p.hash_hex for p in left.pointers) == [f"{h:016x}" for h in (3, 5)]
    assert {p.segment_id for p in left.pointers} == {young.segment_id, new.segment_id}


def test_gc_by_capacity_deletes_oldest_first_until_under_budget(store, run_cli):
    segs = [write(store, [100 + i], tokens=[64], n_layers=2, age_s=(5 - i) * 3600)[0] for i in range(5)]
    sc = ops.scan(store)
    sizes = {s.segment_id: s.size for s in sc.segments}
    assert [s.segment_id for s in sc.segments] == [m.segment_id for m in segs]  # oldest first
    budget = sizes[segs[3].segment_id] + sizes[segs[4].segment_id] + 10  # room for the two newest

    code, out, _ = run_cli("gc", "--max-bytes", str(budget), "--json", "--dry-run")
    doc = json.loads(out)
    assert code == 0 and [a["segment_id"] for a in doc["actions"]] == [m.segment_id for m in segs[:3]]
    assert all(not a["done"] for a in doc["actions"]) and len(keys(store)) == 5 * (2 + 1 + 1)

    code, out, _ = run_cli("gc", "--max-bytes", str(budget))
    assert code == 0
    deleted = [l.split()[2] for l in out.splitlines() if l.startswith("deleted segment")]
    assert sorted(deleted) == sorted(m.segment_id for m in segs[:3])
    assert "over the" in out and "kept 2 segment(s)" in out
    assert [s.segment_id for s in ops.scan(store).segments] == [m.segment_id for m in segs[3:]]
    for m in segs[:3]:
        assert store.read_pointer(NS, m.chunk_hashes[0]) is None


def test_gc_collects_orphans_after_the_grace_period(store, run_cli, s3_boto_client, bucket):
    live, _ = write(store, [1, 2], n_layers=2)
    # a crashed writer: layer objects, no manifest
    crashed = new_segment_id()
    for layer, buf in enumerate(layers_for(2, [32], 9)):
        store.put_layer(NS, crashed, layer, buf)
    # a deleted segment whose pointer survived (a crash half-way through an older gc)
    dead, _ = write(store, [7], n_layers=2)
    names = store.names(NS)
    s3_boto_client.delete_object(Bucket=bucket, Key=names.manifest_object(dead.segment_id))
    s3_boto_client.delete_objects(Bucket=bucket, Delete={"Objects": [
        {"Key": names.layer_object(dead.segment_id, l)} for l in range(2)]})
    # a malformed pointer
    s3_boto_client.put_object(Bucket=bucket, Key=names.pointer_object(8), Body=b"{not json")
    # and something that is not ours
    s3_boto_client.put_object(Bucket=bucket, Key=version_root(PREFIX) + "README.txt", Body=b"hello")

    code, out, _ = run_cli("inspect")
    assert code == 0 and "orphans: 1 segment dir(s) without a manifest" in out and "2 pointer(s)" in out

    code, out, _ = run_cli("gc")  # default grace: everything above is seconds old, so kept
    assert code == 0 and "deleted" not in out.replace("deleted 0", "")
    assert names.layer_object(crashed, 0) in keys(store)

    rep = ops.gc(store, now=time.time() + 2 * 3600)  # two hours later
    kinds = sorted((a.kind, a.done) for a in rep.actions)
    assert kinds == [("orphan_layers", True), ("orphan_pointer", True), ("orphan_pointer", True)]
    left = keys(store)
    assert not any(crashed in k for k in left)
    assert names.pointer_object(7) not in left and names.pointer_object(8) not in left
    assert names.pointer_object(1) in left and names.manifest_object(live.segment_id) in left
    assert version_root(PREFIX) + "README.txt" in left  # foreign keys are left alone


def test_gc_keeps_a_pointer_whose_segment_committed_after_the_listing(store):
    sc = ops.scan(store)
    assert sc.pointers == []
    m, _ = write(store, [77], n_layers=1)
    late = ops.scan(store)
    # Plan from a listing that saw the pointer but (pretend) not the manifest: the re-check
    # before deletion must find the manifest and keep the pointer.
    late.segments = []
    actions, kept = ops.plan_gc(late, orphan_grace_s=0, now=time.time() + 10)
    assert [a.kind for a in actions] == ["orphan_pointer"]
    rep = ops.run_gc(store, late, actions, kept)
    assert not rep.actions[0].done and "kept" in rep.actions[0].reason
    assert store.read_pointer(NS, 77).segment_id == m.segment_id


def test_gc_removes_damaged_segments_past_the_grace(store, s3_boto_client, bucket):
    m, _ = write(store, [61, 62], n_layers=3)
    s3_boto_client.delete_object(Bucket=bucket, Key=store.names(NS).layer_object(m.segment_id, 1))
    assert ops.gc(store).actions == []  # fresh: could be mid-deletion by another gc, leave it
    rep = ops.gc(store, now=time.time() + 2 * 3600)
    assert [(a.kind, a.reason) for a in rep.actions] == [("segment", "damaged: layer object missing")]
    assert keys(store) == []


def test_gc_deletes_a_named_segment_that_verify_found_corrupt(store, run_cli, s3_boto_client, bucket):
    bad, layers = write(store, [41, 42], n_layers=3)
    good, _ = write(store, [43], n_layers=3)
    key = store.names(NS).layer_object(bad.segment_id, 0)
    data = bytearray(layers[0])
    data[7] ^= 1
    s3_boto_client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    code, out, _ = run_cli("inspect", "--verify")
    assert code == 1 and f"CORRUPT segment {bad.segment_id} layer 0 chunk 0" in out

    # gc reads no layer data, so it keeps a young, structurally whole segment until named.
    assert run_cli("gc")[0] == 0 and len(ops.scan(store).segments) == 2
    code, out, _ = run_cli("gc", "--segment", bad.segment_id[:6], "--dry-run")
    assert code == 0 and f"would delete segment {bad.segment_id}" in out and "named (--segment)" in out
    assert good.segment_id not in out.split("gc:")[0]
    code, out, _ = run_cli("gc", "--segment", bad.segment_id[:6])
    assert code == 0 and f"deleted segment {bad.segment_id}" in out
    assert [s.segment_id for s in ops.scan(store).segments] == [good.segment_id]
    assert store.read_pointer(NS, 41) is None and store.read_pointer(NS, 43) is not None
    assert run_cli("inspect", "--verify")[0] == 0

    for wanted in ("ffffffff", ""):
        code, _, err = run_cli("gc", "--segment", wanted)
        assert code == 2 and "match" in err
    assert [s.segment_id for s in ops.scan(store).segments] == [good.segment_id]


def test_unreadable_manifest_is_reported_then_collected_after_the_grace(store, run_cli, s3_boto_client, bucket):
    m, _ = write(store, [51], n_layers=2)
    key = store.names(NS).manifest_object(m.segment_id)
    s3_boto_client.put_object(Bucket=bucket, Key=key, Body=b"{not a manifest")
    code, out, _ = run_cli("inspect")
    assert code == 1 and f"segment {m.segment_id}: manifest unreadable" in out
    assert ops.gc(store).actions == []  # within the grace: left alone
    rep = ops.gc(store, now=time.time() + 2 * 3600)
    kinds = sorted((a.kind, a.done) for a in rep.actions)
    # The segment (manifest + layers), then its pointer, which no readable manifest names.
    assert kinds == [("orphan_pointer", True), ("segment", True)]
    assert keys(store) == []


def test_reader_during_gc_sees_correct_bytes_a_miss_or_a_typed_error(s3_endpoint, bucket, store):
    n_layers, tokens = 6, [32, 32]
    written = {}
    for i in range(12):
        hashes = [1000 + 2 * i, 1001 + 2 * i]
        write(store, hashes, tokens=tokens, n_layers=n_layers, age_s=10 * DAY, seed=i)
        written[tuple(hashes)] = layers_for(n_layers, tokens, i)
    cfg = cfg_for(s3_endpoint, bucket, negative_cache_ttl_s=0, retrieval_deadline_s=10, max_connections=8)
    outcomes = {"full": 0, "miss": 0, "typed_error": 0}
    lock = threading.Lock()
    wrong: list[str] = []
    stop = threading.Event()

    def count(what: str) -> None:
        with lock:
            outcomes[what] += 1

    def reader(seed: int, fresh_lookups: bool) -> None:
        # fresh_lookups: resolve pointers and manifests every time (sees gc as a miss); else
        # keep manifests cached like a long-running engine (sees gc as a failed retrieval).
        rng = random.Random(seed)
        core = S3LayerCore(cfg, metrics=Metrics())
        try:
            while not stop.is_set():
                hashes, layers = rng.choice(list(written.items()))
                try:
                    hits = core.lookup(NS, list(hashes), pin=True, num_layers=n_layers)
                    if hits == 0:
                        count("miss")
                        continue
                    for layer in range(n_layers):
                        got = core.get_layer(NS, layer, list(hashes[:hits]), n_layers)
                        if b"".join(bytes(h) for h in got) != layers[layer][:hits * 32 * BPT]:
                            wrong.append(f"layer {layer} of {hashes}")
                    count("full")
                except (RetrievalFailed, StorageError):
                    count("typed_error")
                finally:
                    for h in hashes:
                        core.unpin(NS, h)
                        loc = core.index.get(NS, h)
                        if fresh_lookups and loc is not None:
                            core.index.drop_segment(loc.manifest.segment_id, force=True)
        finally:
            core.close()

    def wait_for(cond, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not cond():
            time.sleep(0.05)

    threads = [threading.Thread(target=reader, args=(s, s != 2)) for s in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: outcomes["full"] >= 12, 30)  # warm: the caching reader holds manifests
    rep = ops.gc(store, older_than_s=7 * DAY, jobs=1)
    wait_for(lambda: outcomes["miss"] >= 5 and outcomes["typed_error"] >= 1, 20)
    stop.set()
    for t in threads:
        t.join(60)
    print("reader outcomes around gc:", outcomes)
    assert not wrong, wrong
    assert len(rep.actions) == 12 and all(a.done for a in rep.actions)
    assert keys(store) == []
    assert outcomes["full"] >= 12 and outcomes["miss"] >= 5 and outcomes["typed_error"] >= 1, outcomes


# ---- helpers and the server wrapper ------------------------------------------------------------


def test_parse_duration():
    assert ops.parse_duration("7d") == 7 * DAY
    assert ops.parse_duration("1d12h") == 1.5 * DAY
    assert ops.parse_duration("90m") == 5400 and ops.parse_duration("45") == 45
    for bad in ("", "7x", "d", "5h3", "-1"):
        with pytest.raises(ValueError):
            ops.parse_duration(bad)


def test_gc_rejects_bad_flags(capsys):
    assert cli.main(["gc", "--bucket", "b-ok", "--older-than", "soon"]) == 2
    assert "bad duration" in capsys.readouterr().err
    assert cli.main(["gc", "--bucket", "b-ok", "--max-bytes", "lots"]) == 2


def test_server_subcommand_wraps_the_launcher(tmp_path, capsys):
    assert cli.main(["server", "status", "--data-dir", str(tmp_path)]) == 3
    assert "stopped" in capsys.readouterr().out
    assert cli.main(["server", "start", "--help"]) == 0
    assert "--detach" in capsys.readouterr().out


# ---- format v2: unreferenced segments, legacy format v1 ---------------------------------------


def test_a_segment_no_pointer_names_is_reported_and_collected_after_the_grace(store, run_cli, s3_boto_client,
                                                                             bucket):
    """A committed segment whose start pointer is missing (a pointer PUT that failed) or names
    another segment (a race loser whose clean-up failed) cannot be found by any other instance."""
    kept, _ = write(store, [1, 2], n_layers=2)
    lost, _ = write(store, [5, 6], n_layers=2)
    s3_boto_client.delete_object(Bucket=bucket, Key=store.names(NS).pointer_object(5))
    code, out, _ = run_cli("inspect")
    assert code == 0 and "1 segment(s) no pointer names" in out
    code, out, _ = run_cli("inspect", "--json")
    assert json.loads(out)["orphans"]["unreferenced_segments"] == [lost.segment_id]
    assert ops.gc(store).actions == []  # within the grace: a commit between manifest and pointer
    rep = ops.gc(store, now=time.time() + 2 * 3600)
    assert [(a.kind, a.segment.segment_id, a.done) for a in rep.actions] == [("segment", lost.segment_id, True)]
    assert "unreferenced" in rep.actions[0].reason
    assert [s.segment_id for s in ops.scan(store).segments] == [kept.segment_id]
    assert store.read_pointer(NS, 1).segment_id == kept.segment_id


def put_legacy_v1(s3_boto_client, bucket, ns=NS):
    """Objects as format v1 laid them out: a segment (layers, manifest) and a pointer per chunk,
    under <prefix>/v1/. Their contents do not matter to inspect and gc."""
    root = version_root(PREFIX, 1) + ns.path()
    sid = "ab" * 16
    seg = f"{root}/seg/{sid[:2]}/{sid}"
    keys_ = [f"{seg}/L0000", f"{seg}/L0001", f"{seg}/manifest.json",
             f"{root}/ptr/3a/{1:016x}", f"{root}/ptr/7f/{2:016x}"]
    for k in keys_:
        body = json.dumps({"format": "lmcache-s3layer/pointer", "version": 1, "chunk_hash": k[-16:],
                           "segment_id": sid, "index": 0, "tokens": 32}).encode() if "/ptr/" in k else b"x" * 100
        s3_boto_client.put_object(Bucket=bucket, Key=k, Body=body)
    foreign = version_root(PREFIX, 1) + "NOTES.txt"
    s3_boto_client.put_object(Bucket=bucket, Key=foreign, Body=b"not ours")
    return keys_, foreign


def test_legacy_v1_objects_are_reported_by_inspect_and_deleted_only_by_gc_legacy(store, run_cli, s3_boto_client,
                                                                                 bucket):
    live, _ = write(store, [1, 2], n_layers=2)
    legacy, foreign = put_legacy_v1(s3_boto_client, bucket)
    code, out, _ = run_cli("inspect")
    assert code == 0 and "1 segment(s)" in out
    assert "legacy format v1: 6 object(s)" in out and "(1 segment(s), 2 pointer(s))" in out
    assert "never read by this version" in out and "gc --legacy" in out
    code, out, _ = run_cli("inspect", "--json")
    doc = json.loads(out)
    v1_bytes = sum(o.size for o in store.client.list(version_root(PREFIX, 1)))
    assert doc["legacy"] == [{"version": 1, "root": version_root(PREFIX, 1), "objects": 6, "bytes": v1_bytes,
                              "segments": 1, "layer_objects": 2, "pointers": 2, "other": 1}]
    assert [d["segment_id"] for d in doc["segments"]] == [live.segment_id]  # v1 is not a v2 segment

    # Without --legacy gc leaves them (an engine of the old version may still use them), and says so.
    code, out, _ = run_cli("gc", "--older-than", "0s", "--dry-run")
    assert code == 0 and "left 6 legacy format v1 object(s)" in out and "gc --legacy" in out
    code, out, _ = run_cli("gc", "--orphan-grace", "0s")
    assert code == 0 and "legacy" in out and all(k in keys(store) for k in legacy)
    code, out, _ = run_cli("gc", "--legacy", "--dry-run")
    assert code == 0 and "would delete 5 legacy format v1 object(s)" in out and all(k in keys(store) for k in legacy)

    log = record_ops(store)
    rep = ops.gc(store, legacy=True)
    summary = rep.to_json()["summary"]
    assert summary["legacy_objects"] == 5 and summary["segments"] == 0 and summary["legacy_kept_objects"] == 0
    assert [(a.kind, a.done) for a in rep.actions] == [("legacy", True)]
    left = keys(store)
    assert not any(k in left for k in legacy) and foreign in left  # not a v1 object name: left alone
    assert store.read_pointer(NS, 1).segment_id == live.segment_id  # v2 untouched
    # pointers, then manifests, then layer objects (each one batch), as old readers expect
    batches = [k for op, k in log if op == "delete"]
    assert ["/ptr/" in batches[0], batches[1].endswith("manifest.json"), "/L000" in batches[2]] == [True] * 3
