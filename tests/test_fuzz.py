"""Hostile input beyond tests/test_layout.py: structured field mutations of valid manifests and
pointers, fuzzed bodies fed through the index's remote look-up (the path a lookup takes), and
object names from hostile model names and tags."""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_s3layer.cache.index import ChunkIndex
from lmcache_s3layer.errors import FormatError, ObjectNotFound
from lmcache_s3layer.format.objects import Manifest, Names, Namespace, Pointer, is_manifest_key
from lmcache_s3layer.store.segments import SegmentStore

pytestmark = pytest.mark.faults

NS = Namespace("org/fuzz-model", 1, 0, "bfloat16")
SID = "0123456789abcdef0123456789abcdef"
H = 0x1234

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)


def valid_manifest() -> Manifest:
    return Manifest(SID, NS, 3, (2, 64), (H, H + 1), (16, 16), ((1, 2), (3, 4), (5, 6)), 1.0)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(json.loads(valid_manifest().encode()))), value=json_values)
def test_manifest_field_replaced_by_any_json_is_rejected_or_consistent(field, value):
    doc = json.loads(valid_manifest().encode())
    doc[field] = value
    try:
        m = Manifest.decode(json.dumps(doc).encode(), expect=NS, expect_segment=SID)
    except FormatError:
        return
    # Whatever still parses describes a segment we can read safely.
    assert m.namespace == NS and m.segment_id == SID
    assert m.layer_bytes == sum(m.chunk_tokens) * m.bytes_per_token
    assert len(m.checksums) == m.num_layers and all(len(r) == m.num_chunks for r in m.checksums)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(json.loads(Pointer(H, SID, 2).encode()))), value=json_values)
def test_pointer_field_replaced_by_any_json_is_rejected_or_names_the_chunk(field, value):
    doc = json.loads(Pointer(H, SID, 2).encode())
    doc[field] = value
    try:
        p = Pointer.decode(json.dumps(doc).encode(), expect_hash=H)
    except FormatError:
        return
    assert p.chunk_hash == H and len(p.segment_id) == 32


class _FuzzClient:
    """Serves fuzzed bytes for every pointer and manifest GET."""

    def __init__(self, pointer: bytes, manifest: bytes):
        self.bodies = {"ptr": pointer, "manifest": manifest}
        from lmcache_s3layer.config import S3LayerConfig
        self.cfg = S3LayerConfig(bucket="fuzz-bucket")

    def get_bytes(self, key: str, max_bytes: int) -> bytes:
        body = self.bodies["manifest" if is_manifest_key(key) else "ptr"]
        if body is None:
            raise ObjectNotFound(f"{key}: not found", key=key, code="NoSuchKey")
        return body[:max_bytes + 1]


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


def _mutated(raw: bytes, data) -> bytes:
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 6))):
        if not b:
            break
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    return bytes(b)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_lookup_over_fuzzed_objects_is_a_hit_on_the_real_segment_or_a_clean_miss(pool, data):
    m = valid_manifest()
    ptr = _mutated(Pointer(H, SID, 2).encode(), data)
    man = _mutated(m.encode(), data) if data.draw(st.booleans()) else data.draw(st.binary(max_size=400))
    if data.draw(st.integers(0, 9)) == 0:
        man = None  # pointer without manifest
    index = ChunkIndex(SegmentStore(_FuzzClient(ptr, man), "fuzz"), pool=pool, negative_ttl_s=0)
    # H starts the segment, H + 1 continues it (its own pointer GET is served the same
    # fuzzed body, which can only name a segment starting at H + 1: never a valid start).
    locs = index.resolve(NS, [H, H + 1])  # never raises on the lookup path
    for h, loc in zip((H, H + 1), locs):
        if loc is not None:
            assert loc.manifest.namespace == NS and loc.manifest.chunk_hashes[loc.index] == h
            assert 0 <= loc.index < loc.manifest.num_chunks
    assert locs[1] is None or locs[0] is not None  # a continuation only through its start


_prefixes = st.lists(st.text(alphabet="abcXYZ019_-.!*'()", min_size=1, max_size=8), min_size=1, max_size=3) \
    .map("/".join).filter(lambda p: ".." not in p.split("/"))


@settings(max_examples=300, deadline=None)
@given(prefix=_prefixes, model=st.text(min_size=1, max_size=120),
       tags=st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3),
       layer=st.integers(0, 1023), h=st.integers(-(1 << 63), (1 << 63) - 1))
def test_object_names_from_hostile_models_and_tags_stay_under_the_prefix(prefix, model, tags, layer, h):
    ns = Namespace(model, 8, 7, "bfloat16", tuple(sorted(tags.items())))
    names = Names(prefix, ns)
    root = prefix.strip("/") + "/"
    for key in (names.layer_object(SID, layer), names.manifest_object(SID), names.pointer_object(h)):
        assert key.startswith(root)
        rest = key[len(root):]  # the part built from model names, tags and hashes
        assert posixpath.normpath(rest) == rest  # no '.', '..' or '//' that a store might collapse
        assert "\\" not in key and "\x00" not in key
