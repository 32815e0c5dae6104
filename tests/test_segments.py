"""Segment store against the real S3 server: round trips, ranged reads, corruption, commit."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmcache_s3layer.cache.index import ChunkIndex
from lmcache_s3layer.config import S3LayerConfig
from lmcache_s3layer.errors import CorruptObject, ObjectNotFound, PreconditionFailed
from lmcache_s3layer.format.objects import Namespace, is_pointer_key
from lmcache_s3layer.store.client import S3Client
from lmcache_s3layer.store.segments import SegmentStore

NS = Namespace("meta-llama/Llama-3.1-8B", 1, 0, "bfloat16")
HIDDEN = 64  # small KV width keeps the test fast; the format does not care


def cfg_for(ep, bucket, **kw) -> S3LayerConfig:
    return S3LayerConfig(bucket=bucket, endpoint_url=ep.endpoint_url, access_key_id=ep.access_key,
                         secret_access_key=ep.secret_key, region=ep.region, prefix="test",
                         retry_base_s=0.01, **kw)


def make_layers(n_layers, tokens, seed=0):
    rng = random.Random(seed)
    bpt = 2 * HIDDEN * 2
    return [rng.randbytes(sum(tokens) * bpt) for _ in range(n_layers)]


@pytest.fixture
def store(s3_endpoint, bucket):
    client = S3Client(cfg_for(s3_endpoint, bucket, part_size_bytes=64 * 1024))
    yield SegmentStore(client, "test")
    client.close()


def test_round_trip_32_layers_and_every_subrange(store):
    tokens = [256, 256, 256, 77]
    hashes = [11, -22, 33, -44]
    layers = make_layers(32, tokens)
    m = store.write_segment(NS, hashes, tokens, (2, HIDDEN), layers)
    m2 = store.read_manifest(NS, m.segment_id)
    assert m2 == m
    bpt = m.bytes_per_token
    with ThreadPoolExecutor(4) as pool:
        for layer in (0, 1, 17, 31):
            for first in range(4):
                for last in range(first, 4):
                    got = store.read_layer(m2, layer, first, last, pool=pool)
                    lo = sum(tokens[:first]) * bpt
                    hi = sum(tokens[:last + 1]) * bpt
                    assert bytes(got) == layers[layer][lo:hi]
    # a range bigger than part_size is split into several GETs
    assert len(store.plan_layer_read(m2, 0, 0, 3).parts) > 1


def test_pointers_resolve(store):
    tokens = [16, 16]
    m = store.write_segment(NS, [101, 102], tokens, (2, HIDDEN), make_layers(2, tokens))
    p = store.read_pointer(NS, 101)
    assert p.segment_id == m.segment_id and p.chunks == 2
    assert store.read_pointer(NS, 102) is None  # format v2: only the segment's first chunk has one
    assert store.read_pointer(NS, 999) is None
    with ThreadPoolExecutor(4) as pool:
        idx = ChunkIndex(store, pool=pool)
        locs = idx.resolve(NS, [101, 102, 103])
    assert [l.index if l else None for l in locs] == [0, 1, None]
    assert locs[0].manifest.segment_id == m.segment_id


def test_flipped_byte_is_corrupt_and_returns_nothing(store, s3_boto_client, bucket):
    tokens = [32, 32]
    layers = make_layers(3, tokens)
    m = store.write_segment(NS, [1, 2], tokens, (2, HIDDEN), layers)
    key = store.names(NS).layer_object(m.segment_id, 1)
    data = bytearray(layers[1])
    data[len(data) // 2 + 3] ^= 0x01
    s3_boto_client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    out = bytearray(m.layer_bytes)
    with pytest.raises(CorruptObject, match="layer 1 chunk 1"):
        store.read_layer(m, 1, 0, 1, out=out)
    # chunk 0 of that layer is intact and still readable on its own
    assert bytes(store.read_layer(m, 1, 0, 0)) == layers[1][: m.chunk_tokens[0] * m.bytes_per_token]


def test_uncommitted_segment_is_invisible(store):
    tokens = [16]
    sid = "ab" * 16
    for layer, buf in enumerate(make_layers(2, tokens)):
        store.put_layer(NS, sid, layer, buf)  # layers landed, manifest never written
    assert store.read_pointer(NS, 5) is None
    with pytest.raises(ObjectNotFound):
        store.read_manifest(NS, sid)
    assert list(store.iter_manifest_keys()) == []


def test_commit_race_leaves_one_segment(store):
    tokens = [16, 16]
    a = store.write_segment(NS, [7, 8], tokens, (2, HIDDEN), make_layers(2, tokens, 1))
    with pytest.raises(PreconditionFailed):
        store.write_segment(NS, [7, 8], tokens, (2, HIDDEN), make_layers(2, tokens, 2))
    keys = list(store.iter_manifest_keys())
    assert len(keys) == 1 and a.segment_id in keys[0][0]
    assert store.read_pointer(NS, 7).segment_id == a.segment_id
    # the loser removed its layer objects too
    all_keys = [o.key for o in store.client.list("test/")]
    assert all(a.segment_id in k or is_pointer_key(k) for k in all_keys)


def test_delete_segment_order_and_completeness(store):
    tokens = [16, 16]
    m = store.write_segment(NS, [41, 42], tokens, (2, HIDDEN), make_layers(4, tokens))
    n = store.delete_segment(m)
    assert n == 1 + 1 + 4  # the start pointer, the manifest, the layers
    assert list(store.client.list("test/")) == []


def test_wrong_credentials_are_access_denied(s3_endpoint, bucket):
    from lmcache_s3layer.errors import AccessDenied
    secret = "definitely-wrong-secret-value"
    bad = S3Client(S3LayerConfig(bucket=bucket, endpoint_url=s3_endpoint.endpoint_url,
                                 access_key_id=s3_endpoint.access_key, secret_access_key=secret,
                                 max_attempts=2, retry_base_s=0.0))
    with pytest.raises(AccessDenied) as ei:
        bad.check_bucket()
    assert secret not in str(ei.value)


def test_unreachable_endpoint_is_unavailable_quickly():
    from lmcache_s3layer.errors import Unavailable
    c = S3Client(S3LayerConfig(bucket="x-bucket", endpoint_url="http://127.0.0.1:9", access_key_id="a" * 8,
                               secret_access_key="b" * 16, max_attempts=2, retry_base_s=0.0,
                               connect_timeout_s=0.5))
    with pytest.raises(Unavailable):
        c.check_bucket()


# ---- one-byte dtypes, and dtypes of equal size ---------------------------------------------

def ns_of(dtype: str) -> Namespace:
    return Namespace("meta-llama/Llama-3.1-8B", 1, 0, dtype)


def test_fp8_segment_round_trip_with_one_byte_elements(store):
    e4m3, e5m2 = ns_of("fp8_e4m3fn"), ns_of("fp8_e5m2")
    tokens = [32, 17]
    layers = [random.Random(l).randbytes(sum(tokens) * 2 * HIDDEN) for l in range(3)]  # 1 byte each
    m = store.write_segment(e4m3, [5, 6], tokens, (2, HIDDEN), layers)
    assert m.bytes_per_token == 2 * HIDDEN and m.layer_bytes == len(layers[0])
    back = store.read_manifest(e4m3, m.segment_id)
    for layer in range(3):
        assert bytes(store.read_layer(back, layer, 0, 1)) == layers[layer]
        assert bytes(store.read_layer(back, layer, 1, 1)) == layers[layer][32 * 2 * HIDDEN:]
    assert store.read_pointer(e5m2, 5) is None  # same hash, other fp8 format: another namespace


@pytest.mark.parametrize("dtypes", [("fp8_e4m3fn", "fp8_e5m2"), ("bfloat16", "half")])
def test_a_pointer_naming_another_dtypes_segment_is_a_miss_even_when_its_manifest_is_cached(store, dtypes):
    """The index caches manifests by segment id. A pointer under fp8_e5m2 that names an
    fp8_e4m3fn segment (objects copied between namespaces, or a hostile pointer) must not
    borrow the cached e4m3fn manifest: sizes and hashes agree, so the bytes would be served
    as e5m2 and nothing would notice. (bfloat16/half: the same trap with two-byte dtypes.)"""
    from lmcache_s3layer.format.objects import DTYPE_SIZES
    a, b = ns_of(dtypes[0]), ns_of(dtypes[1])
    layer = bytes(16 * 2 * HIDDEN * DTYPE_SIZES[a.dtype])
    m = store.write_segment(a, [77], [16], (2, HIDDEN), [layer, layer])
    names_a, names_b = store.names(a), store.names(b)
    store.client.put_bytes(names_b.pointer_object(77), store.client.get_bytes(names_a.pointer_object(77), 4096))
    with ThreadPoolExecutor(2) as pool:
        idx = ChunkIndex(store, pool=pool, negative_ttl_s=0)
        loc_a, = idx.resolve(a, [77])
        assert loc_a is not None and loc_a.manifest.namespace == a  # now cached
        assert idx.resolve(b, [77]) == [None]
        assert idx.get(b, 77) is None and idx.get(a, 77) is not None
    # a copy of the manifest itself in b's directory says whose it is: still a miss
    store.client.put_bytes(names_b.manifest_object(m.segment_id),
                           store.client.get_bytes(names_a.manifest_object(m.segment_id), 1 << 20))
    with ThreadPoolExecutor(2) as pool:
        idx = ChunkIndex(store, pool=pool, negative_ttl_s=0)
        assert idx.resolve(a, [77])[0] is not None
        assert idx.resolve(b, [77]) == [None]


def test_a_pointer_whose_manifest_is_gone_is_replaced_by_the_next_commit(store):
    """A pointer without a manifest is garbage (commits write the manifest first, deletions
    remove the pointer first): a writer meeting one replaces it instead of losing its commit
    to it until gc runs."""
    tokens = [16, 16]
    old = store.write_segment(NS, [51, 52], tokens, (2, HIDDEN), make_layers(2, tokens, 1))
    store.client.delete(store.names(NS).manifest_object(old.segment_id))  # e.g. a lifecycle rule
    new = store.write_segment(NS, [51, 52], tokens, (2, HIDDEN), make_layers(2, tokens, 2))
    assert store.read_pointer(NS, 51).segment_id == new.segment_id
    assert store.read_manifest(NS, new.segment_id) == new


def test_delete_segment_leaves_a_start_pointer_naming_another_segment(store):
    tokens = [16]
    a = store.write_segment(NS, [61], tokens, (2, HIDDEN), make_layers(2, tokens, 1))
    # b starts at the same chunk: only possible by hand (commit would lose), so forge the
    # manifest and layers without a pointer
    b = store.write_segment(NS, [62], tokens, (2, HIDDEN), make_layers(2, tokens, 2))
    from dataclasses import replace
    b61 = replace(b, chunk_hashes=(61,), segment_id="cd" * 16)
    for layer in range(2):
        store.put_layer(NS, b61.segment_id, layer, make_layers(2, tokens, 2)[layer])
    store.client.put_bytes(store.names(NS).manifest_object(b61.segment_id), b61.encode())
    assert store.delete_segment(b61) == 1 + 2  # no pointer names it: manifest and layers only
    assert store.read_pointer(NS, 61).segment_id == a.segment_id
