"""Never wrong, never stuck: faults injected into every request kind, outcomes counted.

The soak drives LMCache 0.5.6's real engine on CPU (store_layer / lookup / retrieve_layer,
stepped as vLLM steps them) against the session's SeaweedFS, with seeded HTTP faults injected
at botocore's hooks of the plugin's own client (no network round trip for a fault, so
thousands are cheap) and object faults done to the bucket between the steps of a request.
Every retrieved tensor is compared with the ground truth. What the user sees for each fault
is the table in RELIABILITY.md; the per-fault tests below pin each row down.

Counted outcomes:
- wrong KV: a retrieved element that is neither the stored value nor the untouched sentinel,
  or a token the engine reports loaded whose KV is not the stored one;
- crash: any exception other than the policy's loud failure (``RetrievalFailed``) escaping
  an engine call;
- hang: an engine call that did not return within its bound (deadline + slack);
- clean miss: a lookup that reported fewer chunks than were committed.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import multiprocessing as mp
import random
import time
import uuid
from dataclasses import dataclass, field

import conftest
import pytest
import torch
from faultinject import HttpFaults, ObjectFaults

from lmcache_s3layer.format.objects import hash_hex, is_manifest_key, parse_key
from lmcache_s3layer.testing.engine import (
    LAYOUT_FLASH_ATTN,
    KVSpec,
    build_engine,
    destroy_engine,
    fill_paged_kv_cache,
    make_cpu_connector,
    make_paged_kv_cache,
    make_slot_mapping,
    make_tokens,
    plugin_engine_config,
    run_retrieve_layer,
    run_store_layer,
)
from lmcache_s3layer.testing.engine import plugin_backend as backend_of

pytestmark = pytest.mark.faults

SPEC = KVSpec(num_layers=8, num_kv_heads=2, head_size=16, chunk_size=16, dtype=torch.bfloat16,
              model_name="org/faults-model")
BLOCKS, BLOCK = 8, 16
TOKENS = 64  # 4 chunks; segment_max_chunks=2 makes two segments per store
SENTINEL = 7.0  # random bf16 KV never equals it
DEADLINE_S = 4.0
CALL_BOUND_S = DEADLINE_S * 3 + 10  # a call still running past this is a hang


def plugin_config(ep, bucket, **s3layer) -> dict:
    settings = dict(prefix="faults", retry_base_s=0.001, retry_max_backoff_s=0.01, retrieval_deadline_s=DEADLINE_S,
                    lookup_timeout_s=2.0, read_timeout_s=3.0, connect_timeout_s=1.0, segment_max_chunks=2,
                    prefetch_idle_timeout_s=5.0, max_connections=8, put_workers=4)
    return plugin_engine_config(ep, bucket, max_local_cpu_gb=0.05, **{**settings, **s3layer})


def new_engine(ep, bucket, **s3layer):
    return build_engine(plugin_config(ep, bucket, **s3layer), SPEC,
                        connector=make_cpu_connector(SPEC, kv_layout=LAYOUT_FLASH_ATTN))


def snapshot(caches, slots) -> torch.Tensor:
    """[L, T, 2, H, D] of every token's K/V (flash-attn layout: [2, NB, BS, H, D])."""
    blk, off = slots // BLOCK, slots % BLOCK
    return torch.stack([c[:, blk, off].permute(1, 0, 2, 3) for c in caches])


@dataclass
class Prompt:
    tokens: torch.Tensor
    slots: torch.Tensor
    caches: list
    truth: torch.Tensor

    @classmethod
    def make(cls, seed: int) -> "Prompt":
        caches = make_paged_kv_cache(SPEC, BLOCKS, BLOCK, layout=LAYOUT_FLASH_ATTN, seed=seed)
        slots = make_slot_mapping(TOKENS, BLOCKS, BLOCK, seed=seed + 1)
        return cls(make_tokens(TOKENS, seed=seed + 2), slots, caches, snapshot(caches, slots))


class RetrievalFailedType:
    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            from lmcache_s3layer.errors import RetrievalFailed
            cls.cls = RetrievalFailed
        return cls.cls


def check_retrieved(p: Prompt, got: torch.Tensor, ret_mask, failed: bool, looked_up: int) -> list[str]:
    """Problems that count as wrong KV (empty when the outcome is acceptable)."""
    problems = []
    is_truth = got.view(torch.int16) == p.truth.view(torch.int16)
    is_sentinel = got == SENTINEL
    if not bool((is_truth | is_sentinel).all()):
        problems.append("bytes that are neither the stored KV nor untouched")
    if failed:
        return problems
    n = int(ret_mask.sum())
    if n != looked_up:
        # vLLM was promised ``looked_up`` tokens at scheduling time; fewer loaded is a hole.
        problems.append(f"retrieve loaded {n} tokens after a lookup hit of {looked_up}")
    if not bool(ret_mask[:n].all()):
        problems.append("ret_mask is not a prefix")
    if not bool(is_truth[:, :n].all()):
        problems.append("a token reported loaded does not hold the stored KV")
    if not bool(is_sentinel[:, n:].all()):
        problems.append("a token not reported loaded was written")
    return problems


@dataclass
class Tally:
    faults: int = 0
    wrong: int = 0
    crashes: int = 0
    hangs: int = 0
    clean_misses: int = 0
    loud_failures: int = 0
    hits: int = 0
    stores_dropped: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"faults injected: {self.faults}, wrong KV: {self.wrong}, crashes: {self.crashes}, "
                f"hangs: {self.hangs}, clean misses: {self.clean_misses}")


class Bounded:
    """Runs engine calls on a helper thread so a hang is counted instead of stalling the suite."""

    def __init__(self):
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="soak-call")

    def __call__(self, fn, *args, **kwargs):
        fut = self._pool.submit(fn, *args, **kwargs)
        return fut.result(timeout=CALL_BOUND_S)  # cf.TimeoutError: a hang

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


SOAK_OBJECT_KINDS = ("flip_layer", "delete_layer", "delete_manifest", "delete_pointer", "foreign_model",
                     "foreign_dtype", "foreign_shape", "malformed_manifest", "malformed_pointer",
                     "stale_pointer")
WHEN = ("before_lookup", "between_lookup_and_retrieve", "mid_retrieval")


def segment_keys(admin, bucket: str, prefix: str = "faults/") -> dict[str, dict]:
    """segment id -> {'manifest': key, 'layers': [keys]} for every segment under ``prefix``."""
    out: dict[str, dict] = {}
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            parsed = parse_key(o["Key"])
            if parsed is not None and parsed.kind == "segment":
                d = out.setdefault(parsed.ident, {"manifest": None, "layers": []})
                if parsed.is_manifest:
                    d["manifest"] = o["Key"]
                else:
                    d["layers"].append(o["Key"])
    return out


def pointer_key(engine, admin, bucket, tokens, chunk: int) -> str:
    """The pointer that finds chunk ``chunk``. Format v2 has one per segment, at its first
    chunk, so walk back to the nearest chunk with a pointer whose manifest lists ``chunk`` (or
    cannot be read: damaged by an earlier fault, most likely still its segment's); the chunk's
    own pointer key when there is none (a pointer fault on it then has nothing to damage)."""
    import json
    b = backend_of(engine)
    keys = [k for _, _, k in engine.token_database.process_tokens(tokens=tokens)]
    names = b.core.store.names(b._ns(keys[0]))
    want = hash_hex(keys[chunk].chunk_hash)
    for k in range(chunk, -1, -1):
        pkey = names.pointer_object(keys[k].chunk_hash)
        sid = chunk_segment(admin, bucket, pkey)
        if sid is None:
            continue
        try:
            doc = json.loads(admin.get_object(Bucket=bucket, Key=names.manifest_object(sid))["Body"].read())
            listed = want in doc["chunk_hashes"]
        except Exception:  # noqa: BLE001 - deleted/malformed by an earlier fault
            listed = True
        if listed:
            return pkey
    return names.pointer_object(keys[chunk].chunk_hash)


def chunk_segment(admin, bucket, pkey) -> str | None:
    import json
    try:
        return json.loads(admin.get_object(Bucket=bucket, Key=pkey)["Body"].read())["segment_id"]
    except Exception:  # noqa: BLE001 - already deleted/malformed by an earlier fault, or no pointer
        return None


def apply_object_fault(kind: str, obj: ObjectFaults, admin, bucket: str, engine, p: Prompt,
                       rng: random.Random) -> int | None:
    """Damage the objects behind chunk ``c`` of ``p``; returns ``c`` (None when nothing to damage)."""
    c = rng.randrange(TOKENS // SPEC.chunk_size)
    pkey = pointer_key(engine, admin, bucket, p.tokens, c)
    sid = chunk_segment(admin, bucket, pkey)
    seg = segment_keys(admin, bucket).get(sid) if sid else None
    try:
        if not kind.endswith("pointer"):
            if seg is None or (kind.endswith("manifest") or kind.startswith("foreign")) and not seg["manifest"]:
                return None
            if kind.endswith("layer") and not seg["layers"]:
                return None
        layer = rng.choice(seg["layers"]) if kind.endswith("layer") else None
        obj.apply(kind, pointer=pkey, manifest=seg and seg["manifest"], layer=layer, flips=1 + rng.randrange(3))
    except Exception as exc:  # noqa: BLE001 - the object vanished or was mangled by an earlier fault
        # The injector itself cannot rewrite what an earlier round already deleted or made
        # unparseable; that round's fault stands, and this one is not applied (nor counted).
        if "NoSuchKey" in repr(exc) or isinstance(exc, (ValueError, KeyError, TypeError)):
            return None
        raise
    return c


def lookup(engine, tokens, req) -> int:
    return engine.lookup(tokens=tokens, lookup_id=req, pin=True)


def retrieve(engine, p: Prompt, between=None):
    """(ret_mask or None, failed) with the caches reset to the sentinel first."""
    fill_paged_kv_cache(p.caches, SENTINEL)
    try:
        res = run_retrieve_layer(engine, p.tokens, p.caches, p.slots, between_layers=between)
        return res.ret_mask, False
    except RetrievalFailedType.get():
        return None, True


SOAK_SEED = 20240606
SOAK_MIN_FAULTS = 1000
SOAK_MAX_ROUNDS = 400
SOAK_HTTP_RATE = 0.22


@pytest.mark.timeout(300)
def test_soak_faults_never_wrong_never_stuck(s3_endpoint, bucket, s3_boto_client, caplog):
    """>= 1000 seeded faults across stores, lookups and retrievals; 0 wrong KV, crashes, hangs."""
    caplog.set_level(logging.DEBUG, logger="lmcache_s3layer")
    rng = random.Random(SOAK_SEED)
    tally = Tally()
    writer = new_engine(s3_endpoint, bucket)
    reader = new_engine(s3_endpoint, bucket)
    call = Bounded()
    http = HttpFaults(SOAK_SEED, rate=SOAK_HTTP_RATE, delay_s=0.05)
    mix = dict(http.mix, delay=2)
    http.set(mix=mix)
    for e in (writer, reader):
        http.attach(backend_of(e).core.client._client)
    obj = ObjectFaults(s3_boto_client, bucket, seed=SOAK_SEED + 1)
    prompts: list[Prompt] = []
    outcomes = collections.Counter()
    errors_seen: list[str] = []
    try:
        for rnd in range(SOAK_MAX_ROUNDS):
            if http.injected + obj.injected >= SOAK_MIN_FAULTS and rnd >= 60:
                break
            p = Prompt.make(seed=1000 + 7 * rnd)
            prompts.append(p)
            try:
                # ---- store (writer engine) ----------------------------------------------------
                call(run_store_layer, writer, p.tokens, p.caches, p.slots, req_id=f"s{rnd}")
                if not call(backend_of(writer).flush, 30):
                    tally.hangs += 1
                    tally.notes.append(f"round {rnd}: store never finished")
                    break
                # ---- which engine reads, what it reads, and which object fault -----------------
                eng = reader if rnd % 3 else writer  # the writer reads from its own index
                target = p if rng.random() < 0.8 else rng.choice(prompts)
                kind = rng.choice(SOAK_OBJECT_KINDS) if rng.random() < 0.35 else None
                when = rng.choice(WHEN)
                damaged = None
                if kind and when == "before_lookup":
                    damaged = apply_object_fault(kind, obj, s3_boto_client, bucket, writer, target, rng)
                req = f"r{rnd}"
                hits = call(lookup, eng, target.tokens, req)
                if hits % SPEC.chunk_size or hits > TOKENS:
                    tally.wrong += 1
                    tally.notes.append(f"round {rnd}: lookup returned {hits}")
                if hits < TOKENS:
                    tally.clean_misses += 1
                if kind and when == "between_lookup_and_retrieve":
                    damaged = apply_object_fault(kind, obj, s3_boto_client, bucket, writer, target, rng)
                between = None
                if kind and when == "mid_retrieval":
                    def between(layer, _kind=kind, _t=target):
                        if layer == 1:
                            apply_object_fault(_kind, obj, s3_boto_client, bucket, writer, _t, rng)
                if hits:
                    ret_mask, failed = call(retrieve, eng, target, between)
                    eng.lookup_unpin(req)
                    got = snapshot(target.caches, target.slots)
                    problems = check_retrieved(target, got, ret_mask, failed, hits)
                    if problems:
                        tally.wrong += 1
                        tally.notes.append(f"round {rnd} ({kind}/{when}): {problems}")
                    if failed:
                        tally.loud_failures += 1
                    else:
                        tally.hits += 1
                    outcomes[(kind, when, "failed" if failed else "served")] += 1
                else:
                    eng.lookup_unpin(req)
                    outcomes[(kind, when, "miss")] += 1
                if damaged is not None and kind in ("delete_manifest", "foreign_model", "foreign_dtype",
                                                    "foreign_shape", "malformed_manifest") \
                        and when == "before_lookup" and eng is reader and hits > (damaged // 2) * 32 \
                        and target is p:
                    # A damaged manifest is found at lookup by an instance that has not seen
                    # the segment: a clean miss from that segment on, never a hit.
                    tally.wrong += 1
                    tally.notes.append(f"round {rnd}: lookup hit {hits} through a {kind}")
            except cf.TimeoutError:
                tally.hangs += 1
                tally.notes.append(f"round {rnd}: an engine call ran past {CALL_BOUND_S} s")
                break
            except Exception as exc:  # noqa: BLE001 - counted: the claim is that this never happens
                tally.crashes += 1
                errors_seen.append(f"round {rnd}: {type(exc).__name__}: {exc}")
        tally.faults = http.injected + obj.injected
        for e in (writer, reader):
            b = backend_of(e)
            assert b.core.prefetcher.wait_idle(10), "staging memory still held after the soak"
            assert b.core.prefetcher.staging_bytes == 0
            tally.stores_dropped += b.core.writer.stats.stores_failed + b.core.writer.stats.stores_lost_race
        metrics_text = _metrics_text()
    finally:
        http.detach()
        call.close()
        destroy_engine(writer)
        destroy_engine(reader)

    conftest.SUMMARY_LINES.append(tally.line())
    conftest.SUMMARY_LINES.append(
        f"  (soak detail: http {dict(http.by_kind())}, objects {dict(obj.counts)}, served {tally.hits}, "
        f"failed loudly {tally.loud_failures}, stores dropped {tally.stores_dropped})")
    print(tally.line())
    # The secret never shows, whatever failed.
    secret = s3_endpoint.secret_key
    assert secret not in caplog.text
    assert all(secret not in e for e in errors_seen + tally.notes)
    assert secret not in metrics_text
    assert tally.faults >= SOAK_MIN_FAULTS, tally.line()
    assert (tally.wrong, tally.crashes, tally.hangs) == (0, 0, 0), (tally.line(), tally.notes[:10],
                                                                   errors_seen[:10])
    # The soak must exercise every outcome, or it proves less than it claims.
    assert tally.hits > 0 and tally.loud_failures > 0 and tally.clean_misses > 0, outcomes


def _metrics_text() -> str:
    from lmcache_s3layer.cache.metrics import Metrics
    return Metrics.get().text()


# =============================================================================================
# The policy, one fault at a time (storage core: the engine's storage half, no LMCache types)
# =============================================================================================

from lmcache_s3layer.cache.core import S3LayerCore  # noqa: E402
from lmcache_s3layer.config import S3LayerConfig  # noqa: E402
from lmcache_s3layer.errors import RetrievalFailed  # noqa: E402
from lmcache_s3layer.format.objects import Namespace  # noqa: E402

NS = Namespace("org/policy-model", 1, 0, "bfloat16")
P_LAYERS, P_CHUNKS, P_TOK, P_HIDDEN = 4, 3, 16, 32
P_BPT = 2 * P_HIDDEN * 2
P_ATTEMPTS = 3


@pytest.fixture(scope="module")
def pbucket(s3_boto_client):
    """One bucket for the policy tests (a new SeaweedFS bucket costs ~1 s); each test has its
    own prefix instead."""
    name = f"s3layer-faults-{uuid.uuid4().hex[:12]}"
    s3_boto_client.create_bucket(Bucket=name)
    yield name
    conftest.empty_and_delete_bucket(s3_boto_client, name)


@pytest.fixture
def prefix():
    return f"policy-{uuid.uuid4().hex[:8]}"


def core_for(ep, bucket, prefix, **kw) -> S3LayerCore:
    base = dict(bucket=bucket, endpoint_url=ep.endpoint_url, access_key_id=ep.access_key,
                secret_access_key=ep.secret_key, region=ep.region, prefix=prefix, retry_base_s=0.001,
                retry_max_backoff_s=0.005, max_attempts=P_ATTEMPTS, retrieval_deadline_s=3.0,
                lookup_timeout_s=1.0, read_timeout_s=2.0, connect_timeout_s=1.0, max_connections=8,
                put_workers=2, negative_cache_ttl_s=0.0, prefetch_on_lookup=False)
    base.update(kw)
    return S3LayerCore(S3LayerConfig(**base))


def hashes_for(seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.getrandbits(63) - (1 << 62) for _ in range(P_CHUNKS)]


def layer_data(seed: int) -> list[list[bytes]]:
    """[layer][chunk] -> bytes of that chunk's KV_T2D slice."""
    r = random.Random(seed)
    return [[r.randbytes(P_TOK * P_BPT) for _ in range(P_CHUNKS)] for _ in range(P_LAYERS)]


def store(core: S3LayerCore, hashes, data) -> bool:
    """Submit every layer, wait for the writer; True when the segment committed."""
    before = core.writer.stats.segments_committed
    for layer in range(P_LAYERS):
        core.put_layer(NS, layer, P_LAYERS, hashes, [P_TOK] * P_CHUNKS, (2, P_HIDDEN),
                       [bytearray(b) for b in data[layer]], lambda: None)
    assert core.flush(30), "the writer did not finish within its bound"
    return core.writer.stats.segments_committed > before


def look(core: S3LayerCore, hashes, pin: bool = True) -> int:
    """A lookup as the backend makes it (the engine's layer count and per-token shape)."""
    return core.lookup(NS, hashes, pin=pin, num_layers=P_LAYERS, token_shape=(2, P_HIDDEN))


def read_all(core: S3LayerCore, hashes, data) -> int:
    """Layers served, each compared byte for byte; raises RetrievalFailed as the engine would."""
    served = 0
    for layer in range(P_LAYERS):
        handles = core.get_layer(NS, layer, hashes, P_LAYERS)
        assert [bytes(h) for h in handles] == data[layer], f"wrong KV in layer {layer}"
        served += 1
    return served


@pytest.fixture
def seeded(s3_endpoint, pbucket, prefix):
    """One committed segment of 3 chunks x 4 layers, written fault-free."""
    core = core_for(s3_endpoint, pbucket, prefix)
    hashes, data = hashes_for(1), layer_data(2)
    assert store(core, hashes, data)
    core.close()
    return hashes, data


def _faulted_core(ep, bucket, prefix, kind, ops, limit, **kw):
    core = core_for(ep, bucket, prefix, **kw)
    http = HttpFaults(seed=7, rate=1.0, mix={kind: 1}, ops=ops, limit=limit)
    http.attach(core.client._client)
    return core, http


TRANSIENT = ("slowdown", "internal", "unavailable", "reset", "truncate", "timeout")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", TRANSIENT + ("flip",))
def test_transient_faults_are_retried_within_bound(s3_endpoint, pbucket, prefix, seeded, kind):
    """Fewer faults than the retry budget: lookup hits, retrieval serves verified bytes."""
    hashes, data = seeded
    # flip is caught by the checksum, not the client: one whole-layer refetch is allowed.
    limit = 1 if kind == "flip" else P_ATTEMPTS - 1
    # A flipped pointer or manifest is malformed, a clean miss (row "flip" of the table); the
    # lookup is spared so the flip lands on layer data.
    core, http = _faulted_core(s3_endpoint, pbucket, prefix, kind, {"GetObject"}, 0 if kind == "flip" else limit)
    try:
        assert look(core, hashes) == P_CHUNKS
        http.set(limit=http.injected + limit)  # the same number of faults again, on the data path
        assert read_all(core, hashes, data) == P_LAYERS
        assert http.injected >= limit
    finally:
        core.close()


PUT_TRANSIENT = tuple(k for k in TRANSIENT if k != "truncate") + ("lost_response",)  # truncate: GETs only


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", PUT_TRANSIENT)
def test_transient_faults_on_store_are_retried(s3_endpoint, pbucket, prefix, kind):
    core, http = _faulted_core(s3_endpoint, pbucket, prefix, kind, {"PutObject"}, P_ATTEMPTS - 1)
    hashes, data = hashes_for(3), layer_data(4)
    try:
        assert store(core, hashes, data)
        assert http.injected == P_ATTEMPTS - 1
    finally:
        core.close()
    reader = core_for(s3_endpoint, pbucket, prefix)
    try:
        assert look(reader, hashes) == P_CHUNKS
        assert read_all(reader, hashes, data) == P_LAYERS
    finally:
        reader.close()


HARD = TRANSIENT + ("denied", "no_bucket")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", HARD)
def test_persistent_faults_lookup_is_a_clean_miss(s3_endpoint, pbucket, prefix, seeded, kind):
    hashes, _ = seeded
    core, http = _faulted_core(s3_endpoint, pbucket, prefix, kind, None, None)
    try:
        assert look(core, hashes) == 0
        assert core.index.pinned_count() == 0
        # non-retryable kinds are not retried: one try per chunk looked up
        if kind in ("denied", "no_bucket"):
            assert http.injected == P_CHUNKS
    finally:
        core.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", tuple(k for k in HARD if k != "truncate"))
def test_persistent_faults_store_is_dropped_and_cleaned(s3_endpoint, pbucket, prefix, s3_boto_client, kind):
    core, http = _faulted_core(s3_endpoint, pbucket, prefix, kind, {"PutObject"}, None)
    hashes, data = hashes_for(5), layer_data(6)
    try:
        assert not store(core, hashes, data)
        assert core.writer.stats.stores_failed >= 1
        assert not any(core.is_pending(NS, h) for h in hashes)
    finally:
        core.close()
    # Nothing was committed, so another instance misses (nothing partial is findable).
    reader = core_for(s3_endpoint, pbucket, prefix)
    try:
        assert look(reader, hashes) == 0
    finally:
        reader.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", HARD + ("flip",))
def test_persistent_faults_retrieval_fails_loudly_never_partial(s3_endpoint, pbucket, prefix, seeded, kind):
    hashes, data = seeded
    core = core_for(s3_endpoint, pbucket, prefix)
    try:
        assert look(core, hashes) == P_CHUNKS
        http = HttpFaults(seed=9, rate=1.0, mix={kind: 1}, ops={"GetObject"})
        http.attach(core.client._client)
        with pytest.raises(RetrievalFailed):
            read_all(core, hashes, data)
        # nothing staged is left behind, and the broken segment is now a clean miss
        assert core.prefetcher.wait_idle(5) and core.prefetcher.staging_bytes == 0
        for h in hashes:
            core.unpin(NS, h)
        http.detach()
        assert look(core, hashes, pin=False) == 0
    finally:
        core.close()


@pytest.mark.timeout(60)
def test_delay_past_deadlines_is_a_miss_or_a_loud_failure_never_a_hang(s3_endpoint, pbucket, prefix, seeded):
    hashes, data = seeded
    core = core_for(s3_endpoint, pbucket, prefix, retrieval_deadline_s=1.0, lookup_timeout_s=0.5)
    http = HttpFaults(seed=11, rate=1.0, mix={"delay": 1}, ops={"GetObject"}, delay_s=2.0)
    http.attach(core.client._client)
    try:
        # lookup: the pointer GETs outlive lookup_timeout_s -> a miss, not a wait
        assert look(core, hashes) == 0
        http.set(rate=0.0)
        time.sleep(2.1)  # let the abandoned look-ups drain so the next one is fault-free
        assert look(core, hashes) == P_CHUNKS
        http.set(rate=1.0)
        with pytest.raises(RetrievalFailed, match="deadline"):
            read_all(core, hashes, data)
    finally:
        http.detach()
        core.close()


# ---- object faults, by when they happen -------------------------------------------------------

OBJECT_MISS_KINDS = ("delete_manifest", "delete_pointer", "foreign_model", "foreign_dtype", "foreign_shape",
                     "malformed_manifest", "malformed_pointer", "stale_pointer")


def _damage(kind, s3, bucket, core, hashes, chunk=0, layer=2, seed=0):
    obj = ObjectFaults(s3, bucket, seed=seed)
    names = core.store.names(NS)
    pkey = names.pointer_object(hashes[chunk])
    segs = segment_keys(s3, bucket, core.cfg.prefix + "/")
    (sid, seg), = segs.items()
    layer_key = sorted(seg["layers"])[layer] if kind.endswith("layer") else None
    obj.apply(kind, pointer=pkey, manifest=seg["manifest"], layer=layer_key, flips=3)
    return obj


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", OBJECT_MISS_KINDS)
def test_damaged_metadata_before_lookup_is_a_clean_miss(s3_endpoint, pbucket, prefix, s3_boto_client, seeded, kind):
    hashes, _ = seeded
    core = core_for(s3_endpoint, pbucket, prefix)
    try:
        _damage(kind, s3_boto_client, pbucket, core, hashes, chunk=0)
        assert look(core, hashes) == 0
    finally:
        core.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", OBJECT_MISS_KINDS)
def test_damaged_metadata_after_lookup_still_serves_verified_bytes(s3_endpoint, pbucket, prefix, s3_boto_client,
                                                                    seeded, kind):
    """The manifest read at lookup is what the bytes are verified against; the layer objects
    are intact, so the retrieval is served, and correct."""
    hashes, data = seeded
    core = core_for(s3_endpoint, pbucket, prefix)
    try:
        assert look(core, hashes) == P_CHUNKS
        _damage(kind, s3_boto_client, pbucket, core, hashes, chunk=0)
        assert read_all(core, hashes, data) == P_LAYERS
    finally:
        core.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ("flip_layer", "delete_layer"))
@pytest.mark.parametrize("when", ("before_lookup", "between_lookup_and_retrieve", "mid_retrieval"))
def test_damaged_layer_fails_loudly_never_partial(s3_endpoint, pbucket, prefix, s3_boto_client, seeded, kind, when):
    hashes, data = seeded
    # Between lookup and retrieve, a lookup-time prefetch may already hold every layer (then
    # the bytes served were verified before the damage, which is correct); without it the
    # damaged object is what the retrieval meets.
    core = core_for(s3_endpoint, pbucket, prefix, prefetch_on_lookup=(when != "between_lookup_and_retrieve"))
    damaged_layer = 2
    try:
        if when == "before_lookup":
            _damage(kind, s3_boto_client, pbucket, core, hashes, layer=damaged_layer)
        assert look(core, hashes) == P_CHUNKS
        if when == "between_lookup_and_retrieve":
            _damage(kind, s3_boto_client, pbucket, core, hashes, layer=damaged_layer)
        served = 0
        with pytest.raises(RetrievalFailed):
            for layer in range(P_LAYERS):
                handles = core.get_layer(NS, layer, hashes, P_LAYERS)
                assert [bytes(h) for h in handles] == data[layer], f"wrong KV in layer {layer}"
                served += 1
                if when == "mid_retrieval" and layer == 0:
                    core.prefetcher.cancel_chunks(NS, hashes)
                    _damage(kind, s3_boto_client, pbucket, core, hashes, layer=damaged_layer)
                    # drop what was read ahead so the damaged layer is really fetched again
                    for r in list(core.prefetcher._retrievals.values()):
                        core.prefetcher.cancel(r)
        assert served <= damaged_layer
        assert core.prefetcher.wait_idle(5) and core.prefetcher.staging_bytes == 0
        for h in hashes:
            core.unpin(NS, h)
        assert look(core, hashes, pin=False) == 0  # a clean miss from now on
    finally:
        core.close()


# ---- two engines storing the same prefix at the same moment ------------------------------------

def _race_writer(ep_url, ak, sk, region, bucket, seed, hashes_list, go, out):
    import sys as _sys

    from lmcache_s3layer.cache.core import S3LayerCore as _Core
    from lmcache_s3layer.config import S3LayerConfig as _C
    core = _Core(_C(bucket=bucket, endpoint_url=ep_url, access_key_id=ak, secret_access_key=sk, region=region,
                    prefix="race", retry_base_s=0.001, put_workers=4, max_connections=8))
    try:
        committed = []
        for hashes in hashes_list:
            data = [[bytes([seed]) * (P_TOK * P_BPT) for _ in hashes] for _ in range(P_LAYERS)]
            go.wait(30)  # both writers start each prefix together
            before = core.writer.stats.segments_committed
            for layer in range(P_LAYERS):
                core.put_layer(NS, layer, P_LAYERS, hashes, [P_TOK] * len(hashes), (2, P_HIDDEN),
                               [bytearray(b) for b in data[layer]], lambda: None)
            core.flush(30)
            committed.append(core.writer.stats.segments_committed - before)
        out.put((seed, committed, core.writer.stats.stores_lost_race))
    finally:
        core.close()
    _sys.stdout.flush()


@pytest.mark.timeout(120)
def test_two_processes_store_the_same_prefix_exactly_one_segment_is_served(s3_endpoint, bucket, s3_boto_client):
    """Two writer processes (spawned, as two vLLM instances) race on the same prefixes; each
    writes its own byte pattern, so a reader that mixed segments would see two patterns."""
    ctx = mp.get_context("spawn")
    rounds = 6
    hashes_list = [hashes_for(100 + i) for i in range(rounds)]
    go = ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=_race_writer, args=(s3_endpoint.endpoint_url, s3_endpoint.access_key,
                                                    s3_endpoint.secret_key, s3_endpoint.region, bucket, seed,
                                                    hashes_list, go, out), daemon=True)
             for seed in (0xA1, 0xB2)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    go.set()
    results = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    # per prefix: exactly one of the two committed (the loser cleaned up after itself)
    for i in range(rounds):
        assert sum(committed[i] for _, committed, _ in results) == 1, (i, results)
    reader = core_for(s3_endpoint, bucket, "race")
    try:
        for i, hashes in enumerate(hashes_list):
            assert look(reader, hashes) == P_CHUNKS
            seen = set()
            for layer in range(P_LAYERS):
                for h in reader.get_layer(NS, layer, hashes, P_LAYERS):
                    seen |= set(bytes(h))
            assert len(seen) == 1, f"prefix {i}: bytes of both writers served together"
            locs = reader.locations(NS, hashes)
            assert len({loc.manifest.segment_id for loc in locs}) == 1
    finally:
        reader.close()
    manifests = [o["Key"] for o in s3_boto_client.list_objects_v2(Bucket=bucket, Prefix="race/").get("Contents", [])
                 if is_manifest_key(o["Key"])]
    assert len(manifests) == rounds  # one committed segment per prefix, the loser's is gone


# ---- security defaults -----------------------------------------------------------------------

def test_tls_verification_is_on_by_default_and_only_off_when_asked():
    from lmcache_s3layer.store.client import S3Client
    on = S3Client(S3LayerConfig(bucket="tls-bucket", endpoint_url="https://127.0.0.1:1"))
    off = S3Client(S3LayerConfig(bucket="tls-bucket", endpoint_url="https://127.0.0.1:1", verify_tls=False))
    try:
        assert S3LayerConfig(bucket="tls-bucket").verify_tls is True
        assert on._client._endpoint.http_session._verify is True
        assert off._client._endpoint.http_session._verify is False
    finally:
        on.close()
        off.close()


@pytest.mark.timeout(60)
def test_wrong_credentials_mid_run_never_leak_the_secret(s3_endpoint, pbucket, prefix, seeded, caplog):
    hashes, data = seeded
    secret = "wrong-secret-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG, logger="lmcache_s3layer")
    core = core_for(s3_endpoint, pbucket, prefix, secret_access_key=secret, max_attempts=2)
    msgs = []
    try:
        assert look(core, hashes) == 0  # a 403 on every pointer: a clean miss
        assert not store(core, hashes_for(77), layer_data(78))  # the store is dropped
        try:
            core.get_layer(NS, 0, hashes, P_LAYERS)
        except Exception as exc:  # noqa: BLE001 - its text is what we check
            msgs.append(str(exc))
    finally:
        core.close()
    assert msgs
    assert secret not in caplog.text and all(secret not in m for m in msgs)
    assert secret not in _metrics_text()
