"""Format v2: names, manifest and pointer round trips, and strict parsing of hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_s3layer.errors import FormatError, NamespaceMismatch
from lmcache_s3layer.format.objects import (
    MAX_POINTER_BYTES,
    Manifest,
    Names,
    Namespace,
    Pointer,
    hash_hex,
    model_slug,
    normalize_hash,
    parse_segment_dir,
)

NS = Namespace("meta-llama/Llama-3.1-8B", 1, 0, "bfloat16")
SID = "0123456789abcdef0123456789abcdef"

hashes64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def make_manifest(n_chunks=3, n_layers=4, tokens=None, ns=NS, sid=SID) -> Manifest:
    tokens = tokens or [256] * (n_chunks - 1) + [100]
    return Manifest(sid, ns, n_layers, (2, 1024), tuple(range(-5, -5 + n_chunks)), tuple(tokens),
                    tuple(tuple((l * 31 + c) & 0xFFFFFFFF for c in range(n_chunks)) for l in range(n_layers)),
                    1700000000.5)


def test_names_are_layer_major_and_inside_prefix():
    names = Names("team/kv", NS)
    assert names.layer_object(SID, 3) == f"{names.root}/seg/01/{SID}/L0003"
    assert names.manifest_object(SID).endswith(f"/seg/01/{SID}/manifest.json")
    assert names.root.startswith("team/kv/v2/")
    assert "meta-llama/" not in names.root  # the model's '/' does not create directories
    assert parse_segment_dir(names.layer_object(SID, 0)) == SID
    p = names.pointer_object(-0x41257AF1DD85C366)
    assert p.startswith(f"{names.root}/ptr/") and p.endswith(hash_hex(-0x41257AF1DD85C366))


@given(st.text(min_size=1, max_size=200))
def test_model_slug_is_one_safe_component(model):
    slug = model_slug(model)
    assert "/" not in slug and "\\" not in slug
    assert slug not in (".", "..") and not slug.startswith(".")
    assert all(c.isalnum() or c in "._-" for c in slug)


def test_model_slug_keeps_distinct_names_apart():
    assert model_slug("a/b") != model_slug("a_b")
    assert model_slug("../../etc") != model_slug("etc")


@given(st.text(min_size=1, max_size=100), st.integers(1, 8), hashes64)
def test_object_names_never_escape_prefix(model, world, h):
    ns = Namespace(model, world, world - 1, "half")
    names = Names("safe/prefix", ns)
    for key in (names.layer_object(SID, 7), names.manifest_object(SID), names.pointer_object(h)):
        assert key.startswith("safe/prefix/v2/")
        assert ".." not in key.split("/")
        assert "//" not in key


@settings(max_examples=60)
@given(n_chunks=st.integers(1, 40), n_layers=st.integers(1, 80), data=st.data())
def test_manifest_round_trip(n_chunks, n_layers, data):
    hashes = data.draw(st.lists(hashes64, min_size=n_chunks, max_size=n_chunks, unique=True))
    tokens = data.draw(st.lists(st.integers(1, 512), min_size=n_chunks, max_size=n_chunks))
    sums = data.draw(st.lists(st.lists(st.integers(0, 2**32 - 1), min_size=n_chunks, max_size=n_chunks),
                              min_size=n_layers, max_size=n_layers))
    ns = Namespace(data.draw(st.text(min_size=1, max_size=50)), 2, 1, "float16",
                   tuple(sorted(data.draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5),
                                                          max_size=3)).items())))
    m = Manifest(SID, ns, n_layers, (2, 64), tuple(hashes), tuple(tokens), tuple(tuple(r) for r in sums), 12.0)
    back = Manifest.decode(m.encode(), expect=ns, expect_segment=SID)
    assert back == m
    # offsets are consistent: every chunk's byte range is inside the layer object
    for j in range(n_chunks):
        lo, hi = back.chunk_byte_range(j, j)
        assert hi - lo == tokens[j] * back.bytes_per_token
        assert 0 <= lo < hi <= back.layer_bytes


@given(hashes64, st.integers(1, 4096))
def test_pointer_round_trip(h, chunks):
    p = Pointer(h, SID, chunks)
    assert Pointer.decode(p.encode(), expect_hash=h) == p


def test_pointer_names_the_first_chunk_of_its_manifest():
    m = make_manifest()
    p = Pointer.of(m)
    assert (p.chunk_hash, p.segment_id, p.chunks) == (m.chunk_hashes[0], SID, 3)


def _pointer_doc(**changes):
    d = json.loads(Pointer(7, SID, 3).encode())
    d.update(changes)
    return json.dumps({k: v for k, v in d.items() if v is not _DROP}).encode()


_DROP = object()


@pytest.mark.parametrize("data", [
    # a format v1 pointer (a position and a token count, no chunk count): never read as v2
    json.dumps({"format": "lmcache-s3layer/pointer", "version": 1, "chunk_hash": f"{7:016x}",
                "segment_id": SID, "index": 0, "tokens": 256}).encode(),
    _pointer_doc(version=1), _pointer_doc(version=2.0), _pointer_doc(version=True), _pointer_doc(version=_DROP),
    _pointer_doc(chunks=0), _pointer_doc(chunks=4097), _pointer_doc(chunks=2.0), _pointer_doc(chunks=True),
    _pointer_doc(chunks=_DROP), _pointer_doc(index=0), _pointer_doc(format="other"),
    _pointer_doc(segment_id="../x"), _pointer_doc(chunk_hash="7"),
])
def test_malformed_pointers_are_typed_errors(data):
    with pytest.raises(FormatError):
        Pointer.decode(data)


def test_version_roots():
    from lmcache_s3layer.format.objects import FORMAT_VERSION, LEGACY_VERSIONS, version_root
    assert FORMAT_VERSION == 2 and LEGACY_VERSIONS == (1,)
    assert version_root("a/b/") == "a/b/v2/" and version_root("") == "v2/"
    assert version_root("a", 1) == "a/v1/"
    with pytest.raises(FormatError):
        version_root("a", 3)


def test_hash_normalisation_matches_storage():
    for h in (0, 1, -1, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1):
        assert normalize_hash(h) == normalize_hash(int(hash_hex(h), 16))


def test_manifest_from_other_namespace_is_rejected():
    m = make_manifest()
    with pytest.raises(NamespaceMismatch):
        Manifest.decode(m.encode(), expect=Namespace("other-model", 1, 0, "bfloat16"))
    with pytest.raises(NamespaceMismatch):
        Manifest.decode(m.encode(), expect=Namespace(NS.model, 1, 0, "half"))
    with pytest.raises(NamespaceMismatch):
        Manifest.decode(m.encode(), expect_segment="f" * 32)


def _mutate(doc, **changes):
    d = json.loads(make_manifest().encode())
    d.update(changes)
    return json.dumps(d).encode()


@pytest.mark.parametrize("data", [
    b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100000 + b"]" * 100000,
    _mutate(None, version=1), _mutate(None, version=2.0), _mutate(None, version=True), _mutate(None, format="other"),
    _mutate(None, num_layers=0), _mutate(None, num_layers=10**9), _mutate(None, num_layers=4.0),
    _mutate(None, chunk_tokens=[256, 256, -1]), _mutate(None, chunk_tokens=[256, 256]),
    _mutate(None, chunk_offsets=[0, 1, 2]), _mutate(None, layer_bytes=1 << 50),
    _mutate(None, token_shape=[2, 1 << 40]), _mutate(None, token_shape=[]),
    _mutate(None, chunk_hashes=["zz"] * 3), _mutate(None, chunk_hashes=["0" * 16] * 3),
    _mutate(None, segment_id="../../../etc/passwd"), _mutate(None, checksums=["00"] * 4),
    _mutate(None, element_size=4), _mutate(None, unexpected=1), _mutate(None, created_at="x"),
    _mutate(None, namespace={"model": "m"}), _mutate(None, checksum="md5"),
    b'{"format": NaN}', b'{"a": 1, "a": 2}',
])
def test_malformed_manifests_are_typed_errors(data):
    with pytest.raises(FormatError):
        Manifest.decode(data)


def test_oversized_documents_are_rejected_before_parsing():
    with pytest.raises(FormatError, match="limit"):
        Pointer.decode(b" " * (MAX_POINTER_BYTES + 1))


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_fuzz_parsers_never_raise_untyped(data):
    for parse in (Manifest.decode, Pointer.decode):
        try:
            parse(data)
        except FormatError:
            pass


@settings(max_examples=200)
@given(st.data())
def test_fuzz_mutated_valid_manifest(data):
    raw = bytearray(make_manifest().encode())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        m = Manifest.decode(bytes(raw))
    except FormatError:
        return
    # A mutation that still parses must still describe a self-consistent segment.
    assert m.layer_bytes == sum(m.chunk_tokens) * m.bytes_per_token


# ---- fp8 and other one-byte dtypes ----------------------------------------------------------

FP8_NAMES = ("fp8_e4m3fn", "fp8_e4m3fnuz", "fp8_e5m2", "fp8_e5m2fnuz")  # as LMCache 0.5.6 writes them


def test_fp8_dtype_names_are_namespaces_of_their_own():
    spaces = [Namespace(NS.model, 1, 0, name) for name in FP8_NAMES + ("int8", "uint8")]
    roots = {Names("p", ns).root for ns in spaces}
    assert len(roots) == len(spaces)  # one-byte dtypes are never folded into one directory
    for ns in spaces:
        assert Names("p", ns).root.endswith("/" + ns.dtype)


@pytest.mark.parametrize("dtype", FP8_NAMES)
def test_fp8_manifest_round_trip_with_one_byte_elements(dtype):
    ns = Namespace(NS.model, 1, 0, dtype)
    m = make_manifest(ns=ns)
    assert m.element_size == 1
    assert m.bytes_per_token == 2 * 1024
    assert m.layer_bytes == sum(m.chunk_tokens) * 2 * 1024
    back = Manifest.decode(m.encode(), expect=ns, expect_segment=SID)
    assert back == m and back.chunk_offsets == m.chunk_offsets
    # another one-byte dtype has the same sizes and offsets, and is still another namespace
    other = "fp8_e5m2" if dtype != "fp8_e5m2" else "fp8_e4m3fn"
    with pytest.raises(NamespaceMismatch):
        Manifest.decode(m.encode(), expect=Namespace(NS.model, 1, 0, other))


@pytest.mark.parametrize("field,bad", [
    ("element_size", lambda v: True), ("element_size", float), ("element_size", lambda v: 2),
    ("layer_bytes", float),
])
def test_fp8_manifest_numbers_must_be_exact_integers(field, bad):
    # JSON true and 1.0 equal 1 in Python: with one-byte elements they must not pass for it.
    d = json.loads(make_manifest(ns=Namespace(NS.model, 1, 0, "fp8_e4m3fn")).encode())
    d[field] = bad(d[field])
    with pytest.raises(FormatError):
        Manifest.decode(json.dumps(d).encode())


def test_chunk_offsets_must_be_integers():
    d = json.loads(make_manifest().encode())
    d["chunk_offsets"] = [float(o) for o in d["chunk_offsets"]]
    with pytest.raises(FormatError, match="chunk_offsets"):
        Manifest.decode(json.dumps(d).encode())


def test_unknown_dtype_is_still_refused():
    with pytest.raises(FormatError, match="unsupported dtype"):
        Namespace(NS.model, 1, 0, "fp4_e2m1")


# ---- runs of new chunks into segments --------------------------------------------------------


@pytest.mark.parametrize("positions,max_chunks,want", [
    ([], 4, []),
    ([0, 1, 2, 3, 4], 2, [(0, 2), (2, 4), (4, 5)]),
    ([2, 3, 6, 7], 64, [(2, 4), (6, 8)]),  # a committed chunk in between splits the run
    ([0, 1, 3, 4, 5, 7, 8, 9], 2, [(0, 2), (3, 5), (5, 6), (7, 9), (9, 10)]),
    ([5], 1, [(5, 6)]),
])
def test_split_runs_into_segments(positions, max_chunks, want):
    from lmcache_s3layer.store.ranges import split_runs_into_segments
    assert split_runs_into_segments(positions, max_chunks) == want


@given(st.sets(st.integers(0, 200), max_size=60), st.integers(1, 9))
def test_split_runs_cover_exactly_the_positions(positions, max_chunks):
    from lmcache_s3layer.store.ranges import split_runs_into_segments
    ranges = split_runs_into_segments(sorted(positions), max_chunks)
    covered = [p for a, b in ranges for p in range(a, b)]
    assert covered == sorted(positions)
    assert all(1 <= b - a <= max_chunks for a, b in ranges)
