"""The writer against the real S3 server: every chunk a store hands us that is not committed
gets written, whatever is committed around it; committed chunks are never written again.

LMCache's store_layer hands the plugin the chunks whose layer-0 ``contains()`` was False, and
our ``contains`` answers from memory, which a layerwise lookup fills only up to its first miss.
So a store may skip chunks, and may contain committed chunks this process does not know about.
Chunk hashes chain from token 0, so a hash names its whole prefix: any subset of a prompt's
chunks may be stored, in any segments.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmcache_s3layer.cache.index import ChunkIndex
from lmcache_s3layer.cache.writer import SegmentWriter
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.format.objects import Manifest, Namespace, segment_dir_of_key
from lmcache_s3layer.store.client import S3Client
from lmcache_s3layer.store.segments import SegmentStore

NS = Namespace("org/gap-model", 1, 0, "bfloat16")
LAYERS, TOK, HIDDEN = 3, 16, 32
BPT = 2 * HIDDEN * 2
PREFIX = "gaps"


def chunk_bytes(h: int, layer: int) -> bytes:
    """A chunk's KV for one layer: a function of its hash, as KV is of its prefix."""
    return random.Random(f"{h}:{layer}").randbytes(TOK * BPT)


def hashes_of(name: str, n: int) -> list[int]:
    r = random.Random(name)
    return [r.getrandbits(63) - (1 << 62) for _ in range(n)]


class Instance:
    """One process's writer stack: client, store, memory index, writer."""

    def __init__(self, ep, bucket, **cfg):
        base = dict(bucket=bucket, endpoint_url=ep.endpoint_url, access_key_id=ep.access_key,
                    secret_access_key=ep.secret_key, region=ep.region, prefix=PREFIX, retry_base_s=0.01,
                    put_workers=2)
        base.update(cfg)
        self.cfg = S3LayerConfig(**base)
        self.client = S3Client(self.cfg)
        self.store = SegmentStore(self.client, PREFIX)
        self.pool = ThreadPoolExecutor(4)
        self.index = ChunkIndex(self.store, pool=self.pool, negative_ttl_s=0)
        self.writer = SegmentWriter(self.cfg, self.store, self.index)

    def submit(self, hashes, layer) -> bool:
        return self.writer.submit_layer(NS, layer, LAYERS, hashes, [TOK] * len(hashes), (2, HIDDEN),
                                        [bytearray(chunk_bytes(h, layer)) for h in hashes], lambda: None)

    def put(self, hashes) -> bool:
        """A whole layerwise store, as LMCache's store_layer makes it; waits for the commit."""
        ok = [self.submit(hashes, layer) for layer in range(LAYERS)]
        assert self.writer.flush(30)
        return all(ok)

    def seed(self, hashes) -> Manifest:
        """A segment committed directly (by "another instance" earlier)."""
        layers = [b"".join(chunk_bytes(h, l) for h in hashes) for l in range(LAYERS)]
        return self.store.write_segment(NS, hashes, [TOK] * len(hashes), (2, HIDDEN), layers)

    def close(self):
        self.writer.close()
        self.pool.shutdown()
        self.client.close()


@pytest.fixture
def instances(s3_endpoint, bucket):
    made = []

    def make(**cfg) -> Instance:
        made.append(Instance(s3_endpoint, bucket, **cfg))
        return made[-1]

    yield make
    for i in made:
        i.close()


def prefix_hits(inst: Instance, hashes) -> int:
    """What a new process's lookup sees: leading chunks found, each verified byte for byte."""
    reader = ChunkIndex(inst.store, pool=inst.pool, negative_ttl_s=0)
    hits = 0
    for h, loc in zip(hashes, reader.resolve(NS, hashes)):
        if loc is None:
            break
        for layer in range(LAYERS):
            got = inst.store.read_layer(loc.manifest, layer, loc.index, loc.index)
            assert bytes(got) == chunk_bytes(h, layer)
        hits += 1
    return hits


def manifests(inst: Instance) -> list[Manifest]:
    return [inst.store.read_manifest_key(k) for k, _, _ in inst.store.iter_manifest_keys()]


def assert_each_chunk_stored_once(inst: Instance) -> None:
    seen: list[int] = [h for m in manifests(inst) for h in m.chunk_hashes]
    assert len(seen) == len(set(seen)), "a committed chunk was written again"


def owners(inst: Instance, hashes) -> dict[int, str]:
    """The segment each chunk resolves to for a new process (format v2 has a pointer only at a
    segment's first chunk, so a chunk is found through the look-up of its whole prefix)."""
    reader = ChunkIndex(inst.store, pool=inst.pool, negative_ttl_s=0)
    return {h: loc.manifest.segment_id for h, loc in zip(hashes, reader.resolve(NS, hashes)) if loc is not None}


def test_gap_in_the_middle_is_refilled(instances):
    seeder, writer = instances(), instances()
    h = hashes_of("middle", 6)
    a, b = seeder.seed(h[0:2]), seeder.seed(h[4:6])
    assert prefix_hits(writer, h) == 2  # the lookup stops at the gap

    assert writer.put(h)  # LMCache would hand all six: this process knows none of them
    assert prefix_hits(writer, h) == 6
    assert_each_chunk_stored_once(writer)
    owner = owners(writer, h)
    assert [owner[x] for x in h[0:2] + h[4:6]] == [a.segment_id] * 2 + [b.segment_id] * 2
    new = [m for m in manifests(writer) if m.segment_id not in (a.segment_id, b.segment_id)]
    assert [m.chunk_hashes for m in new] == [tuple(h[2:4])]
    assert writer.writer.stats.chunks_already_committed == 4
    assert writer.writer.stats.stores_lost_race == 0


def test_a_store_of_non_contiguous_chunks_writes_the_new_ones(instances):
    """After a lookup found chunks 0-1, LMCache hands only 2..5; 4-5 are committed elsewhere."""
    seeder, writer = instances(), instances()
    h = hashes_of("handed", 6)
    seeder.seed(h[0:2])
    seeder.seed(h[4:6])
    assert writer.index.resolve(NS, h[:3])[2] is None  # the lookup: hits 0, 1, stops at 2
    assert writer.put(h[2:6])
    assert prefix_hits(writer, h) == 6
    assert_each_chunk_stored_once(writer)


def test_runs_of_new_chunks_become_segments_of_at_most_max_chunks(instances):
    seeder, writer = instances(), instances(segment_max_chunks=2)
    h = hashes_of("runs", 10)
    seeder.seed([h[2]])
    seeder.seed([h[6]])
    assert writer.put(h)
    assert prefix_hits(writer, h) == 10
    assert_each_chunk_stored_once(writer)
    written = sorted((h.index(m.chunk_hashes[0]), len(m.chunk_hashes)) for m in manifests(writer)
                     if h[2] not in m.chunk_hashes and h[6] not in m.chunk_hashes)
    assert written == [(0, 2), (3, 2), (5, 1), (7, 2), (9, 1)]


def test_divergent_continuations_share_the_stored_prefix(instances):
    seeder, writer = instances(), instances()
    system = hashes_of("system-prompt", 3)
    p = seeder.seed(system)
    user_a = system + hashes_of("user-a", 2)
    user_b = system + hashes_of("user-b", 3)
    assert writer.put(user_a)
    assert writer.put(user_b)
    assert prefix_hits(writer, user_a) == 5 and prefix_hits(writer, user_b) == 6
    assert_each_chunk_stored_once(writer)
    assert all(owners(writer, user_b)[x] == p.segment_id for x in system)


def test_a_deleted_segment_is_refilled_by_another_instance(instances):
    first = instances(segment_max_chunks=2)
    h = hashes_of("deleted", 6)
    assert first.put(h)
    before = owners(first, h)
    middle = first.store.read_manifest(NS, before[h[2]])
    first.store.delete_segment(middle)  # gc, or an operator
    assert prefix_hits(first, h) == 2

    second = instances()  # one 64-chunk segment at most: the store is not pre-split for us
    assert second.put(h)
    assert prefix_hits(second, h) == 6
    assert_each_chunk_stored_once(second)
    after = owners(second, h)
    assert all(after[x] == before[x] for x in h[0:2] + h[4:6])  # neighbours untouched
    assert after[h[2]] == after[h[3]] != before[h[2]]


def test_the_same_process_refills_after_it_learns_a_segment_is_gone(instances):
    """Regression guard: chunks are handed as LMCache would (only those ``contains`` misses)."""
    inst = instances()
    h = hashes_of("same-process", 6)
    assert inst.put(h[:2]) and inst.put(h[2:4]) and inst.put(h[4:])
    gone = inst.store.read_manifest(NS, owners(inst, h)[h[2]])
    inst.store.delete_segment(gone)
    inst.index.drop_segment(gone.segment_id)  # what a failed retrieval does (core._mark_bad)
    assert prefix_hits(inst, h) == 2
    assert [inst.index.get(NS, x) is not None for x in h] == [True, True, False, False, True, True]
    assert inst.put(h[2:4])
    assert prefix_hits(inst, h) == 6
    assert_each_chunk_stored_once(inst)


def test_chunks_another_store_is_writing_are_not_written_twice(instances):
    """Two requests of one batch share a prefix: both stores start before either commits."""
    inst = instances()
    h = hashes_of("in-flight", 6)
    assert inst.submit(h[:4], 0)
    assert inst.submit(h, 0)  # 0-3 are in flight in the first store: this one writes 4-5
    for layer in range(1, LAYERS):
        assert inst.submit(h[:4], layer)
        assert inst.submit(h, layer)
    assert inst.writer.flush(30)
    assert prefix_hits(inst, h) == 6
    assert_each_chunk_stored_once(inst)
    assert inst.writer.stats.chunks_in_flight_elsewhere == 4
    assert not any(inst.writer.is_pending(NS, x) for x in h)


def test_a_store_of_committed_chunks_only_writes_nothing(instances):
    seeder, writer = instances(), instances()
    h = hashes_of("all-there", 3)
    seeder.seed(h)
    released = []
    for layer in range(LAYERS):
        writer.writer.submit_layer(NS, layer, LAYERS, h, [TOK] * 3, (2, HIDDEN),
                                   [bytearray(chunk_bytes(x, layer)) for x in h],
                                   lambda layer=layer: released.append(layer))
    assert writer.writer.flush(30)
    assert sorted(released) == list(range(LAYERS))
    assert len(manifests(writer)) == 1
    assert writer.writer.stats.chunks_already_committed == 3
    assert writer.writer.stats.layers_uploaded == 0 and writer.writer.stats.stores_lost_race == 0
    assert not any(writer.writer.is_pending(NS, x) for x in h)
    all_keys = [o.key for o in writer.client.list(PREFIX + "/")]
    assert len([k for k in all_keys if segment_dir_of_key(k)]) == LAYERS + 1  # the seed's objects only


def test_a_store_dropped_before_it_was_planned_frees_its_chunks(instances):
    """A store abandoned part-way (request aborted) before its first upload task planned it."""
    inst = instances()
    h = hashes_of("dropped", 3)
    gate = threading.Event()
    real = inst.index.committed

    def slow_committed(ns, hashes):
        gate.wait(10)
        return real(ns, hashes)

    inst.index.committed = slow_committed
    assert inst.submit(h, 0)
    with inst.writer._lock:
        inst.writer._drop_store_locked(next(iter(inst.writer._stores.values())))
    gate.set()
    assert inst.writer.flush(30)
    assert not any(inst.writer.is_pending(NS, x) for x in h)
    assert manifests(inst) == [] and list(inst.client.list(PREFIX + "/")) == []
    inst.index.committed = real
    assert inst.put(h)  # the same chunks store fine afterwards
    assert prefix_hits(inst, h) == 3
