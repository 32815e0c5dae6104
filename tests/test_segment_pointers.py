"""Format v2 against the real S3 server: one pointer per segment, at its first chunk.

A lookup GETs the pointers of every chunk it does not know in ONE parallel round, then walks
with no I/O: a chunk resolves when memory knows it, when its own pointer names a segment it
starts, or when a manifest resolved by the same lookup lists it. These tests pin down that this
finds everything a pointer per chunk found (shared prefixes, divergent continuations, gaps,
deleted segments, cold processes, single-chunk questions), that it costs one round of GETs,
that it never remembers a chunk in the middle of a segment as missing, and that format v1
objects are never read.
"""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmcache_s3layer.cache.core import S3LayerCore
from lmcache_s3layer.cache.index import ChunkIndex
from lmcache_s3layer.cache.metrics import Metrics
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.format.objects import Manifest, Namespace, hash_hex, is_pointer_key, version_root

NS = Namespace("org/pointer-model", 1, 0, "bfloat16")
LAYERS, TOK, HIDDEN = 3, 16, 32
BPT = 2 * HIDDEN * 2
PREFIX = "ptrs"


def chunk_bytes(h: int, layer: int) -> bytes:
    """A chunk's KV for one layer: a function of its hash, as KV is of its prefix."""
    return random.Random(f"{h}:{layer}").randbytes(TOK * BPT)


def hashes_of(name: str, n: int) -> list[int]:
    r = random.Random(name)
    return [r.getrandbits(63) - (1 << 62) for _ in range(n)]


class Proc:
    """One engine process's storage core (its own client, memory index and writer)."""

    def __init__(self, ep, bucket, **cfg):
        base = dict(bucket=bucket, endpoint_url=ep.endpoint_url, access_key_id=ep.access_key,
                    secret_access_key=ep.secret_key, region=ep.region, prefix=PREFIX, retry_base_s=0.01,
                    put_workers=2, prefetch_on_lookup=False, negative_cache_ttl_s=0.0)
        base.update(cfg)
        self.core = S3LayerCore(S3LayerConfig(**base), metrics=Metrics())
        self.store, self.index, self.client = self.core.store, self.core.index, self.core.client

    def put(self, hashes) -> None:
        """A whole layerwise store of these chunks (as LMCache hands them); waits for the commit."""
        for layer in range(LAYERS):
            self.core.put_layer(NS, layer, LAYERS, hashes, [TOK] * len(hashes), (2, HIDDEN),
                                [bytearray(chunk_bytes(h, layer)) for h in hashes], lambda: None)
        assert self.core.flush(30)

    def put_missing(self, hashes) -> None:
        """What LMCache's store_layer hands after a lookup: the chunks ``contains()`` misses."""
        self.put([h for h in hashes if not self.core.contains(NS, h)])

    def look(self, hashes) -> int:
        return self.core.lookup(NS, list(hashes), pin=False, num_layers=LAYERS, token_shape=(2, HIDDEN))

    def seed(self, hashes) -> Manifest:
        """A segment committed directly (by "another instance"), bypassing this process's memory."""
        layers = [b"".join(chunk_bytes(h, l) for h in hashes) for l in range(LAYERS)]
        return self.store.write_segment(NS, hashes, [TOK] * len(hashes), (2, HIDDEN), layers)

    def close(self) -> None:
        self.core.close()


@pytest.fixture
def procs(s3_endpoint, bucket):
    made: list[Proc] = []

    def make(**cfg) -> Proc:
        made.append(Proc(s3_endpoint, bucket, **cfg))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(16) as p:
        yield p


def fresh_hits(p: Proc, pool, hashes) -> int:
    """What a new process's lookup sees: leading chunks found, each verified byte for byte."""
    reader = ChunkIndex(p.store, pool=pool, negative_ttl_s=0)
    hits = 0
    for h, loc in zip(hashes, reader.resolve(NS, hashes)):
        if loc is None:
            break
        for layer in range(LAYERS):
            assert bytes(p.store.read_layer(loc.manifest, layer, loc.index, loc.index)) == chunk_bytes(h, layer)
        hits += 1
    return hits


def manifests(p: Proc) -> list[Manifest]:
    return [p.store.read_manifest_key(k) for k, _, _ in p.store.iter_manifest_keys()]


def pointer_keys(p: Proc) -> list[str]:
    return [o.key for o in p.client.list(PREFIX + "/") if is_pointer_key(o.key)]


def record_requests(p: Proc) -> list[tuple[str, str]]:
    """Every request the process sends from now on, (op, key), 404s included (the client's
    own counters count successes)."""
    log: list[tuple[str, str]] = []
    p.client.before_request = lambda op, key: log.append((op, key))
    return log


def assert_each_chunk_stored_once(p: Proc) -> None:
    seen = [h for m in manifests(p) for h in m.chunk_hashes]
    assert len(seen) == len(set(seen)), "a committed chunk was written again"


# ---- the layout --------------------------------------------------------------------------------


def test_a_store_writes_one_pointer_per_segment_at_its_first_chunk(procs):
    p = procs(segment_max_chunks=4)
    h = hashes_of("layout", 10)
    puts0 = p.client.stats.puts
    p.put(h)
    # 3 segments (4 + 4 + 2 chunks): 3 x 3 layer objects + 3 manifests + 3 pointers
    assert p.client.stats.puts - puts0 == 3 * LAYERS + 3 + 3
    names = p.store.names(NS)
    assert sorted(pointer_keys(p)) == sorted(names.pointer_object(h[i]) for i in (0, 4, 8))
    assert sorted(tuple(m.chunk_hashes) for m in manifests(p)) == sorted([tuple(h[0:4]), tuple(h[4:8]),
                                                                          tuple(h[8:10])])


# ---- what a lookup finds -----------------------------------------------------------------------


def test_a_cold_process_finds_every_chunk_through_segment_start_pointers(procs, pool):
    writer = procs(segment_max_chunks=4)
    h = hashes_of("cold", 10)
    writer.put(h)
    reader = ChunkIndex(writer.store, pool=pool, negative_ttl_s=0)
    locs = reader.resolve(NS, h)
    assert [(l.manifest.chunk_hashes[l.index]) for l in locs] == h
    # one round: a pointer GET per chunk (7 of them 404: mid-segment), a manifest per segment
    st = reader.stats
    assert (st.remote_rounds, st.pointer_gets, st.manifest_gets, st.covered) == (1, 10, 3, 7)
    assert (st.remote_hits, st.misses, st.bad_objects) == (10, 0, 0)
    assert fresh_hits(writer, pool, h) == 10
    # warm: memory only
    assert reader.resolve(NS, h) == locs and reader.stats.pointer_gets == 10 and reader.stats.remote_rounds == 1


def test_a_second_prompt_sharing_a_prefix_finds_it_and_writes_only_its_own_chunks(procs, pool):
    first, second = procs(), procs()
    system = hashes_of("system", 5)
    p = system + hashes_of("question-p", 3)
    q = system + hashes_of("question-q", 2)
    first.put(p)
    assert second.look(q) == 5  # a cold process: the shared prefix, through P's start pointer
    second.put_missing(q)
    assert fresh_hits(second, pool, q) == 7 and fresh_hits(second, pool, p) == 8
    assert_each_chunk_stored_once(second)
    assert [len(m.chunk_hashes) for m in manifests(second)] in ([8, 2], [2, 8])


def test_divergent_continuations_each_find_their_full_length(procs, pool):
    a, b = procs(), procs()
    p = hashes_of("P", 10)
    q = p[:5] + hashes_of("Q-tail", 5)  # shares chunks 0..4 of P, continues with 5'..9'
    a.put(p)
    b.put(q)  # b knows nothing: committed() finds 0..4 inside P's segment, writes 5'..9'
    assert b.core.writer.stats.chunks_already_committed == 5
    assert_each_chunk_stored_once(a)
    q_tail = [m for m in manifests(a) if m.chunk_hashes[0] == q[5]]
    assert len(q_tail) == 1 and q_tail[0].chunk_hashes == tuple(q[5:])
    assert fresh_hits(a, pool, p) == 10 and fresh_hits(a, pool, q) == 10
    # one process resolving both: the shared chunks stay in P's segment
    reader = ChunkIndex(a.store, pool=pool, negative_ttl_s=0)
    lp, lq = reader.resolve(NS, p), reader.resolve(NS, q)
    assert all(x is not None for x in lp + lq)
    assert {x.manifest.segment_id for x in lq[:5]} == {lp[0].manifest.segment_id}


def test_a_gap_in_the_middle_is_a_prefix_end_and_a_later_store_refills_it(procs, pool):
    seeder, writer = procs(), procs()
    h = hashes_of("gap", 10)
    seeder.seed(h[0:4])
    after = seeder.seed(h[6:10])
    assert writer.look(h) == 4  # stops at the gap
    # the writer's question is not a prefix one: every chunk after the gap is known committed
    assert writer.index.committed(NS, h) == [True] * 4 + [False] * 2 + [True] * 4
    # the lookup's round of GETs found chunk 6's pointer too, so memory knows 6..9 and
    # contains() hands only 4..5
    assert [writer.core.contains(NS, x) for x in h] == [True] * 4 + [False] * 2 + [True] * 4
    writer.put_missing(h)
    assert fresh_hits(writer, pool, h) == 10
    assert_each_chunk_stored_once(writer)
    assert {m.chunk_hashes for m in manifests(writer)} >= {tuple(h[4:6]), after.chunk_hashes}
    # a process that knows nothing, handed all ten, writes nothing again either
    other = procs()
    other.put(h)
    assert other.core.writer.stats.chunks_already_committed == 10 and len(manifests(other)) == 3


def test_a_deleted_segment_is_a_clean_miss_until_refilled_and_its_follower_is_found_again(procs, pool):
    first = procs(segment_max_chunks=3)
    h = hashes_of("deleted", 9)
    first.put(h)  # segments 0..2, 3..5, 6..8
    middle = next(m for m in manifests(first) if m.chunk_hashes[0] == h[3])
    first.store.delete_segment(middle)  # gc, or an operator
    assert fresh_hits(first, pool, h) == 3
    second = procs()
    assert second.look(h) == 3  # a clean miss from chunk 3 on, no error
    assert second.index.stats.bad_objects == 0
    assert second.index.committed(NS, h) == [True] * 3 + [False] * 3 + [True] * 3
    second.put_missing(h)
    assert fresh_hits(second, pool, h) == 9  # the prefix is back: 6..8 are found again
    assert_each_chunk_stored_once(second)
    refill = [m for m in manifests(second) if m.chunk_hashes[0] == h[3]]
    assert len(refill) == 1 and refill[0].chunk_hashes == tuple(h[3:6])


def test_a_mid_segment_chunk_asked_alone_is_found_once_its_segment_start_was(procs):
    """LMCache's layerwise lookup asks one chunk per call, in order; the forward path's
    contains() answers from memory. A chunk in the middle of a segment has no pointer, so
    asked alone of a cold process it is a miss; asked in order it is a memory hit."""
    writer, cold, ordered = procs(), procs(), procs()
    h = hashes_of("single", 6)
    writer.put(h)
    assert not cold.core.contains(NS, h[3])
    assert cold.look([h[3]]) == 0  # alone, out of order: nothing names its segment
    log = record_requests(ordered)
    assert [ordered.look([x]) for x in h] == [1] * 6
    assert len(log) == 2  # chunk 0's pointer and manifest; the rest: memory
    assert all(ordered.core.contains(NS, x) for x in h)
    # the cold one, once it asks in order, is not held back by its earlier miss
    assert [cold.look([x]) for x in h] == [1] * 6


def test_overlapping_segments_of_two_writers_are_found_or_healed(procs, pool):
    """W1 stores 0..9 while W2 stores 5..14: different first chunks, so both commit. A process
    that already knows 0..9 finds no pointer at chunk 10 (the middle of W2's segment) until a
    store writes 10..14 again, as a segment starting at 10; a cold process finds all 15."""
    w1, w2 = procs(), procs()
    h = hashes_of("overlap", 15)
    w1.put(h[0:10])  # W1 knows its own segment from its commit, nothing else
    w2.seed(h[5:15])
    assert fresh_hits(w1, pool, h) == 15  # a cold lookup GETs chunk 5's pointer too: W2's segment
    assert w1.look(h) == 10  # warm: 0..9 from memory, 10..14 have no pointer
    assert w1.index.committed(NS, h[10:]) == [False] * 5
    w1.put_missing(h)  # hands 10..14: not committed as far as W1 can tell, written again
    assert w1.look(h) == 15
    assert sorted(len(m.chunk_hashes) for m in manifests(w1)) == [5, 10, 10]
    # duplicates of the same bytes: every chunk still reads back right, whichever segment
    assert fresh_hits(w1, pool, h) == 15


def test_a_pointer_whose_manifest_is_gone_is_a_miss_and_the_next_store_replaces_it(procs, pool):
    first, second = procs(), procs()
    h = hashes_of("garbage-pointer", 4)
    old = first.seed(h)
    first.client.delete(first.store.names(NS).manifest_object(old.segment_id))  # e.g. a lifecycle rule
    assert second.look(h) == 0 and second.index.stats.bad_objects == 0
    second.put_missing(h)
    assert second.core.writer.stats.stores_lost_race == 0
    assert fresh_hits(second, pool, h) == 4
    assert second.store.read_pointer(NS, h[0]).segment_id != old.segment_id


# ---- cost: one round of GETs, bounded ----------------------------------------------------------


def test_a_cold_lookup_is_one_parallel_round_of_pointer_gets(procs):
    """Every pointer GET of a lookup is in flight at once: each waits at a barrier for all the
    others, so a lookup that walked segment by segment would time out at the first one and
    miss. Counted, not timed."""
    writer = procs(segment_max_chunks=3)
    h = hashes_of("one-round", 12)
    writer.put(h)  # 4 segments
    reader = procs(max_connections=16, lookup_timeout_s=10.0)
    barrier = threading.Barrier(len(h), timeout=5)
    real = reader.store.read_pointer
    in_flight, peak = [0], [0]
    lock = threading.Lock()

    def read_pointer(ns, chunk_hash):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        barrier.wait()
        try:
            return real(ns, chunk_hash)
        finally:
            with lock:
                in_flight[0] -= 1

    reader.store.read_pointer = read_pointer
    assert reader.look(h) == 12
    assert not barrier.broken and peak[0] == 12
    st = reader.index.stats
    assert (st.remote_rounds, st.pointer_gets, st.manifest_gets) == (1, 12, 4)


def test_a_lookups_get_count_is_bounded_by_chunks_plus_segments(procs):
    writer = procs(segment_max_chunks=4)
    h = hashes_of("bounded", 10)
    writer.put(h)
    reader = procs(negative_cache_ttl_s=60.0)
    log = record_requests(reader)
    tail = hashes_of("never-stored", 5)
    assert reader.look(h + tail) == 10
    # 15 pointer GETs (3 hit) + 3 manifests, no more
    assert [op for op, _ in log] == ["get"] * (len(h + tail) + 3)
    assert sum(is_pointer_key(k) for _, k in log) == 15
    log.clear()
    assert reader.look(h + tail) == 10  # memory, and the concluded misses are remembered
    assert log == []


# ---- the negative cache ------------------------------------------------------------------------


def test_mid_segment_404s_are_never_remembered_as_misses(procs, pool):
    writer = procs()
    h = hashes_of("negative", 6)
    writer.put(h[:4])
    index = ChunkIndex(writer.store, pool=pool, negative_ttl_s=60.0)
    locs = index.resolve(NS, h)
    assert [l is not None for l in locs] == [True] * 4 + [False] * 2
    # chunks 1..3 answered 404 (no pointer), but chunk 0's manifest lists them: not missing
    assert [index.is_known_missing(NS, x) for x in h] == [False] * 4 + [True] * 2
    # Forget the segment (a failed retrieval does this): the next lookup must find it all again
    index.drop_segment(locs[0].manifest.segment_id, force=True)
    assert all(l is not None for l in index.resolve(NS, h[:4]))
    # a chunk concluded missing is found once its segment is committed (add_manifest clears it)
    writer.put(h)
    index2 = ChunkIndex(writer.store, pool=pool, negative_ttl_s=60.0)
    assert all(l is not None for l in index2.resolve(NS, h))


def test_a_chunk_asked_alone_and_missed_does_not_hide_it_from_an_ordered_lookup(procs, pool):
    """Asked alone, a mid-segment chunk looks missing (it is remembered as such); that only
    spares its own pointer GET: the segment's manifest still covers it."""
    writer = procs()
    h = hashes_of("alone", 5)
    writer.put(h)
    index = ChunkIndex(writer.store, pool=pool, negative_ttl_s=60.0)
    assert index.resolve(NS, [h[2]]) == [None] and index.is_known_missing(NS, h[2])
    assert all(l is not None for l in index.resolve(NS, h))
    assert not index.is_known_missing(NS, h[2])


# ---- format v1 objects -------------------------------------------------------------------------


def test_format_v1_objects_are_never_read_by_the_cache(procs, pool, s3_boto_client, bucket):
    """v1 wrote a pointer per chunk under <prefix>/v1/. A v2 process never looks there: a clean
    miss, no bad objects, no error; and a v2 store of the same chunks works."""
    p = procs()
    h = hashes_of("legacy", 3)
    root = version_root(PREFIX, 1) + NS.path()
    sid = "ab" * 16
    seg = f"{root}/seg/{sid[:2]}/{sid}"
    for layer in range(LAYERS):
        s3_boto_client.put_object(Bucket=bucket, Key=f"{seg}/L{layer:04d}",
                                  Body=b"".join(chunk_bytes(x, layer) for x in h))
    s3_boto_client.put_object(Bucket=bucket, Key=f"{seg}/manifest.json", Body=b'{"version": 1}')
    v2_names = p.store.names(NS)
    for i, x in enumerate(h):
        v1_key = v2_names.pointer_object(x).replace(v2_names.root, root)
        s3_boto_client.put_object(Bucket=bucket, Key=v1_key, Body=json.dumps({
            "format": "lmcache-s3layer/pointer", "version": 1, "chunk_hash": hash_hex(x),
            "segment_id": sid, "index": i, "tokens": TOK}).encode())
    assert p.look(h) == 0
    assert p.index.stats.bad_objects == 0 and p.index.stats.manifest_gets == 0
    assert p.index.committed(NS, h) == [False] * 3
    p.put_missing(h)
    assert fresh_hits(p, pool, h) == 3
