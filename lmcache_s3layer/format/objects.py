"""Format v2: object names, the segment manifest and segment-start pointers. Pure: no I/O.

A *segment* is the run of chunks one store wrote. It has one object per layer (that layer's
``KV_T2D`` slices of every chunk, concatenated in chunk order), a manifest (the commit point)
and ONE pointer, named by the hash of the segment's first chunk (written after the manifest),
so any instance finds the segment by that hash; the manifest lists the hashes of every chunk
after it. Layer-major transfer without per-(chunk, layer) "key explosion".

Why one pointer per segment is enough: LMCache's chunk hashes are chained from the first
token (chunk k's hash depends on every token before it), and a lookup is a prefix lookup, so
a hit always begins at a chunk that starts a stored segment or continues one the lookup has
already resolved. Format v1 wrote a pointer per chunk (2/3 of a store's PUTs); it lives under
``<prefix>/v1/``, which v2 readers never look at (``LEGACY_VERSIONS``: ``inspect`` reports it,
``gc`` collects it).

Parsing is strict and bounded: readers fetch at most ``MAX_MANIFEST_BYTES`` /
``MAX_POINTER_BYTES``, every number is range-checked before it sizes anything, and every
failure is a ``FormatError``. Segment ids are validated hex, so a pointer's content can never
steer a read outside the configured prefix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

from lmcache_s3layer.errors import FormatError, NamespaceMismatch

FORMAT_VERSION = 2
# Earlier formats whose objects may still be under a prefix: never read by the cache, reported
# by ``inspect`` and deleted by ``gc`` (their key scheme is v2's, with ``v1`` as the version).
LEGACY_VERSIONS = (1,)
MANIFEST_FORMAT = "lmcache-s3layer/segment"
POINTER_FORMAT = "lmcache-s3layer/pointer"

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_POINTER_BYTES = 4096
MAX_LAYERS = 1024
MAX_CHUNKS = 4096
MAX_CHECKSUM_ENTRIES = 1 << 20  # layers x chunks; bounds the manifest's biggest list
MAX_CHUNK_TOKENS = 1 << 20
MAX_BYTES_PER_TOKEN = 1 << 24
MAX_LAYER_BYTES = 1 << 40
MAX_MODEL_NAME = 512

# Element sizes by dtype name. A name is part of the namespace (and so of every object name and
# manifest), never canonicalised to its size: fp8_e4m3fn and fp8_e5m2 are both one byte, but the
# same bytes mean different numbers, so they must never share (or find) each other's chunks.
#
# Exactly the names LMCache 0.5.6 writes into CacheEngineKey._dtype_str
# (lmcache.utils.TORCH_DTYPE_TO_STR_DTYPE, fp8 variants included); tests/test_fp8_and_gaps.py
# checks this table against LMCache's and against torch's element sizes.
LMCACHE_DTYPE_SIZES = {
    "half": 2, "bfloat16": 2, "float": 4, "double": 8,
    "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
    "fp8_e4m3fn": 1, "fp8_e4m3fnuz": 1, "fp8_e5m2": 1, "fp8_e5m2fnuz": 1,
}
# torch's own attribute names, for callers that name dtypes without LMCache (benchmarks, tools).
# They are namespaces of their own: "float16" data is not found under LMCache's "half".
TORCH_DTYPE_SIZES = {
    "float16": 2, "float32": 4, "float64": 8,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
}
DTYPE_SIZES = {**LMCACHE_DTYPE_SIZES, **TORCH_DTYPE_SIZES}

_SEGMENT_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_SLUG_KEEP = re.compile(r"[^A-Za-z0-9._-]+")
_U64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def model_slug(model: str) -> str:
    """A single, safe path component for a model name or path, unique per original name.

    ``meta-llama/Llama-3.1-8B`` and ``meta-llama_Llama-3.1-8B`` must not share objects, so a
    short digest of the exact name is appended; leading dots are replaced so no component is
    ``.`` or ``..``.
    """
    readable = _SLUG_KEEP.sub("_", model).strip("_")[:80].lstrip(".") or "model"
    digest = hashlib.blake2b(model.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    return f"{readable}-{digest}"


@dataclass(frozen=True)
class Namespace:
    """What a KV chunk's bytes depend on besides its tokens (mirrors CacheEngineKey's fields)."""

    model: str
    world_size: int
    worker_id: int
    dtype: str
    tags: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model or len(self.model) > MAX_MODEL_NAME:
            raise FormatError("namespace: model name must be a non-empty string of at most 512 chars")
        if not (_is_int(self.world_size) and 1 <= self.world_size <= 65536):
            raise FormatError(f"namespace: world_size out of range: {self.world_size!r}")
        if not (_is_int(self.worker_id) and 0 <= self.worker_id < self.world_size):
            raise FormatError(f"namespace: worker_id out of range: {self.worker_id!r}")
        if self.dtype not in DTYPE_SIZES:
            raise FormatError(f"namespace: unsupported dtype {self.dtype!r}")

    def path(self) -> str:
        base = f"{model_slug(self.model)}/{self.world_size}-{self.worker_id}/{self.dtype}"
        if self.tags:
            blob = json.dumps(sorted(self.tags), separators=(",", ":")).encode()
            base += "/t-" + hashlib.blake2b(blob, digest_size=8).hexdigest()
        return base

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "world_size": self.world_size, "worker_id": self.worker_id,
                "dtype": self.dtype, "tags": [list(t) for t in self.tags]}

    @classmethod
    def from_json(cls, d: Any) -> "Namespace":
        d = _expect_obj(d, "namespace", {"model", "world_size", "worker_id", "dtype", "tags"})
        tags_raw = _expect_list(d["tags"], "namespace.tags", 64)
        tags = []
        for t in tags_raw:
            t = _expect_list(t, "namespace.tags[]", 2)
            if len(t) != 2 or not all(isinstance(x, str) and len(x) <= 256 for x in t):
                raise FormatError("namespace.tags: entries must be [name, value] string pairs")
            tags.append((t[0], t[1]))
        return cls(_expect_str(d["model"], "namespace.model", MAX_MODEL_NAME),
                   _expect_int(d["world_size"], "namespace.world_size", 1, 65536),
                   _expect_int(d["worker_id"], "namespace.worker_id", 0, 65535),
                   _expect_str(d["dtype"], "namespace.dtype", 32), tuple(sorted(tags)))


# The key scheme, spelled here and nowhere else:
#
#   <prefix>/v2/<namespace path>/seg/<id[:2]>/<id>/L0000 .. L<n-1>   one object per layer
#   <prefix>/v2/<namespace path>/seg/<id[:2]>/<id>/manifest.json     the commit point
#   <prefix>/v2/<namespace path>/ptr/<spread>/<hash hex>              one pointer per segment,
#                                                                     named by its first chunk
#
# ``<prefix>/v2/<namespace path>`` is a namespace's *root*. Format v1 used the same scheme
# under ``<prefix>/v1/`` with a pointer for every chunk. Writers build names through
# ``Names``; tools that start from a listing (inspect, gc, metrics, benchmarks) parse them with
# ``parse_key`` and rebuild them from a root with the ``*_at`` functions.
SEGMENTS_DIR = "seg"
POINTERS_DIR = "ptr"
MANIFEST_NAME = "manifest.json"
_LAYER_PREFIX = "L"
_HEX = frozenset("0123456789abcdef")


def version_root(prefix: str, version: int = FORMAT_VERSION) -> str:
    """``<prefix>/v2/`` (``v2/`` for an empty prefix): everything format v2 writes is below it.
    ``version``: another format's root (``LEGACY_VERSIONS``), for the tools that clean it up."""
    if not (_is_int(version) and 1 <= version <= FORMAT_VERSION):
        raise FormatError(f"unknown format version {version!r}")
    p = prefix.strip("/")
    return f"{p}/v{version}/" if p else f"v{version}/"


def layer_name(layer: int) -> str:
    """A layer object's name inside its segment directory: ``L0003``."""
    if not (_is_int(layer) and 0 <= layer < MAX_LAYERS):
        raise FormatError(f"layer index out of range: {layer!r}")
    return f"{_LAYER_PREFIX}{layer:04d}"


def parse_layer_name(name: str) -> int | None:
    """The layer index of a layer object's name (``L`` and decimal digits), or None."""
    digits = name[len(_LAYER_PREFIX):]
    if name.startswith(_LAYER_PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def segment_dir_at(ns_root: str, segment_id: str) -> str:
    check_segment_id(segment_id)
    # The id is random hex, so its first two digits spread segments over S3 partitions.
    return f"{ns_root}/{SEGMENTS_DIR}/{segment_id[:2]}/{segment_id}"


def layer_key_at(seg_dir: str, layer: int) -> str:
    return f"{seg_dir}/{layer_name(layer)}"


def manifest_key_at(seg_dir: str) -> str:
    return f"{seg_dir}/{MANIFEST_NAME}"


def pointer_key_at(ns_root: str, chunk_hash: int) -> str:
    h = hash_hex(chunk_hash)
    # vLLM's builtin hashes are already uniform, sha256-derived ones too; the extra digest
    # keeps the spread even for adversarial or sequential hash values.
    spread = hashlib.blake2b(h.encode(), digest_size=1).hexdigest()
    return f"{ns_root}/{POINTERS_DIR}/{spread}/{h}"


class Names:
    """Object names of one namespace under one configured prefix."""

    def __init__(self, prefix: str, namespace: Namespace):
        self.namespace = namespace
        self.root = version_root(prefix) + namespace.path()

    def segment_dir(self, segment_id: str) -> str:
        return segment_dir_at(self.root, segment_id)

    def layer_object(self, segment_id: str, layer: int) -> str:
        return layer_key_at(self.segment_dir(segment_id), layer)

    def manifest_object(self, segment_id: str) -> str:
        return manifest_key_at(self.segment_dir(segment_id))

    def pointer_object(self, chunk_hash: int) -> str:
        """The pointer of the segment whose FIRST chunk has this hash (no other chunk has one)."""
        return pointer_key_at(self.root, chunk_hash)

    def segments_root(self) -> str:
        return f"{self.root}/{SEGMENTS_DIR}/"

    def pointers_root(self) -> str:
        return f"{self.root}/{POINTERS_DIR}/"


class ParsedKey(NamedTuple):
    """What a listed key is: ``kind`` "segment" (``ident`` the segment id, ``name`` the file in
    its directory: ``manifest.json`` or a layer name) or "pointer" (``ident`` the hash hex)."""

    kind: str
    ns_root: str
    ident: str
    name: str

    @property
    def is_manifest(self) -> bool:
        return self.kind == "segment" and self.name == MANIFEST_NAME

    @property
    def layer(self) -> int | None:
        return parse_layer_name(self.name) if self.kind == "segment" else None


def parse_key(key: str) -> ParsedKey | None:
    """Classify a key by its last components; None for a key that is not an object name of
    this key scheme (the same for every format version: the caller knows which root it
    listed)."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[-4] == SEGMENTS_DIR:
        sid, name = parts[-2], parts[-1]
        if not _SEGMENT_ID_RE.match(sid) or parts[-3] != sid[:2]:
            return None
        if name == MANIFEST_NAME or parse_layer_name(name) is not None:
            return ParsedKey("segment", "/".join(parts[:-4]), sid, name)
        return None
    if len(parts) >= 4 and parts[-3] == POINTERS_DIR:
        h = parts[-1]
        if len(h) == 16 and set(h) <= _HEX and len(parts[-2]) == 2 and set(parts[-2]) <= _HEX:
            return ParsedKey("pointer", "/".join(parts[:-3]), h, "")
    return None


def is_manifest_key(key: str) -> bool:
    parsed = parse_key(key)
    return parsed is not None and parsed.is_manifest


def is_pointer_key(key: str) -> bool:
    parsed = parse_key(key)
    return parsed is not None and parsed.kind == "pointer"


def layer_of_key(key: str) -> int | None:
    """The layer index of a layer object's key, or None for any other key."""
    parsed = parse_key(key)
    return None if parsed is None else parsed.layer


def segment_dir_of_key(key: str) -> str | None:
    """The segment directory a segment object's key is in, or None for any other key."""
    parsed = parse_key(key)
    return segment_dir_at(parsed.ns_root, parsed.ident) if parsed is not None and parsed.kind == "segment" else None


def hash_hex(chunk_hash: int) -> str:
    if not (_is_int(chunk_hash) and -(1 << 63) <= chunk_hash <= _U64):
        raise FormatError(f"chunk hash out of 64-bit range: {chunk_hash!r}")
    return f"{chunk_hash & _U64:016x}"


def check_segment_id(segment_id: Any) -> str:
    if not isinstance(segment_id, str) or not _SEGMENT_ID_RE.match(segment_id):
        raise FormatError("segment id must be 32 lowercase hex digits")
    return segment_id


def parse_segment_dir(key: str) -> str | None:
    """The segment id of a segment object's key (``.../seg/xx/<id>/<name>``), or None."""
    parsed = parse_key(key)
    return parsed.ident if parsed is not None and parsed.kind == "segment" else None


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    segment_id: str
    namespace: Namespace
    num_layers: int
    token_shape: tuple[int, ...]  # per-token shape of a KV_T2D slice: (2, kv_heads*head_dim)
    chunk_hashes: tuple[int, ...]
    chunk_tokens: tuple[int, ...]
    checksums: tuple[tuple[int, ...], ...]  # [layer][chunk], CRC32C of that slice's bytes
    created_at: float = 0.0

    def __post_init__(self) -> None:
        check_segment_id(self.segment_id)
        if not (_is_int(self.num_layers) and 1 <= self.num_layers <= MAX_LAYERS):
            raise FormatError(f"manifest: num_layers out of range: {self.num_layers!r}")
        n = len(self.chunk_hashes)
        if not 1 <= n <= MAX_CHUNKS:
            raise FormatError(f"manifest: chunk count out of range: {n}")
        if len(self.chunk_tokens) != n:
            raise FormatError("manifest: chunk_tokens and chunk_hashes differ in length")
        if len(set(self.chunk_hashes)) != n:
            raise FormatError("manifest: duplicate chunk hash")
        for h in self.chunk_hashes:
            hash_hex(h)
        for t in self.chunk_tokens:
            if not (_is_int(t) and 1 <= t <= MAX_CHUNK_TOKENS):
                raise FormatError(f"manifest: chunk token count out of range: {t!r}")
        if not (1 <= len(self.token_shape) <= 4 and all(_is_int(d) and d >= 1 for d in self.token_shape)):
            raise FormatError(f"manifest: bad token_shape {self.token_shape!r}")
        if self.bytes_per_token > MAX_BYTES_PER_TOKEN:
            raise FormatError("manifest: bytes per token out of range")
        if self.layer_bytes > MAX_LAYER_BYTES:
            raise FormatError("manifest: layer object size out of range")
        if len(self.checksums) != self.num_layers or any(len(row) != n for row in self.checksums):
            raise FormatError("manifest: checksum table is not num_layers x num_chunks")

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.namespace.dtype]

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_hashes)

    @property
    def bytes_per_token(self) -> int:
        return math.prod(self.token_shape) * self.element_size

    @property
    def chunk_offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for t in self.chunk_tokens:
            out.append(acc)
            acc += t * self.bytes_per_token
        return tuple(out)

    @property
    def layer_bytes(self) -> int:
        return sum(self.chunk_tokens) * self.bytes_per_token

    @property
    def total_tokens(self) -> int:
        return sum(self.chunk_tokens)

    def chunk_byte_range(self, first: int, last: int) -> tuple[int, int]:
        """Byte range [start, end) of chunks first..last (inclusive) inside a layer object."""
        if not (0 <= first <= last < self.num_chunks):
            raise FormatError(f"chunk range {first}..{last} outside 0..{self.num_chunks - 1}")
        offsets = self.chunk_offsets
        start = offsets[first]
        end = offsets[last] + self.chunk_tokens[last] * self.bytes_per_token
        return start, end

    def index_of(self, chunk_hash: int) -> int:
        try:
            return self.chunk_hashes.index(chunk_hash)
        except ValueError:
            raise NamespaceMismatch(f"chunk {hash_hex(chunk_hash)} is not in segment {self.segment_id}") from None

    def encode(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "version": FORMAT_VERSION,
            "segment_id": self.segment_id,
            "namespace": self.namespace.to_json(),
            "num_layers": self.num_layers,
            "token_shape": list(self.token_shape),
            "element_size": self.element_size,
            "chunk_hashes": [hash_hex(h) for h in self.chunk_hashes],
            "chunk_tokens": list(self.chunk_tokens),
            "chunk_offsets": list(self.chunk_offsets),
            "layer_bytes": self.layer_bytes,
            "checksum": "crc32c",
            "checksums": ["".join(f"{c:08x}" for c in row) for row in self.checksums],
            "created_at": float(self.created_at),
        }
        data = json.dumps(doc, separators=(",", ":")).encode()
        if len(data) > MAX_MANIFEST_BYTES:
            raise FormatError("manifest would exceed MAX_MANIFEST_BYTES; lower segment_max_chunks")
        return data

    @classmethod
    def decode(cls, data: bytes, expect: Namespace | None = None,
               expect_segment: str | None = None) -> "Manifest":
        """Parse and validate; ``expect`` rejects a manifest from another model/rank/dtype."""
        doc = _load_json(data, MAX_MANIFEST_BYTES, "manifest")
        doc = _expect_obj(doc, "manifest", {
            "format", "version", "segment_id", "namespace", "num_layers", "token_shape",
            "element_size", "chunk_hashes", "chunk_tokens", "chunk_offsets", "layer_bytes",
            "checksum", "checksums", "created_at"})
        if doc["format"] != MANIFEST_FORMAT:
            raise FormatError("manifest: not an lmcache-s3layer segment manifest")
        if not _is_int(doc["version"]) or doc["version"] != FORMAT_VERSION:
            raise FormatError(f"manifest: unsupported format version {_short(doc['version'])}")
        if doc["checksum"] != "crc32c":
            raise FormatError(f"manifest: unsupported checksum {doc['checksum']!r}")
        ns = Namespace.from_json(doc["namespace"])
        num_layers = _expect_int(doc["num_layers"], "num_layers", 1, MAX_LAYERS)
        shape = tuple(_expect_int(d, "token_shape[]", 1, MAX_BYTES_PER_TOKEN)
                      for d in _expect_list(doc["token_shape"], "token_shape", 4))
        hashes = tuple(_parse_hash(h) for h in _expect_list(doc["chunk_hashes"], "chunk_hashes", MAX_CHUNKS))
        tokens = tuple(_expect_int(t, "chunk_tokens[]", 1, MAX_CHUNK_TOKENS)
                       for t in _expect_list(doc["chunk_tokens"], "chunk_tokens", MAX_CHUNKS))
        if num_layers * max(len(hashes), 1) > MAX_CHECKSUM_ENTRIES:
            raise FormatError("manifest: too many (layer, chunk) entries")
        rows = _expect_list(doc["checksums"], "checksums", MAX_LAYERS)
        checksums = tuple(_parse_checksum_row(r, len(hashes)) for r in rows)
        created = doc["created_at"]
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
            raise FormatError("manifest: created_at must be a number")
        m = cls(check_segment_id(doc["segment_id"]), ns, num_layers, shape, hashes, tokens,
                checksums, float(created))
        # Redundant fields must agree with the derived ones: a disagreement means a bug or
        # tampering, and either way the byte offsets cannot be trusted.
        # Integers only: JSON's 1.0 and true compare equal to 1 in Python, and with one-byte
        # (fp8, int8) dtypes ``element_size: true`` would otherwise pass as 1.
        if not _is_int(doc["element_size"]) or doc["element_size"] != m.element_size:
            raise FormatError("manifest: element_size disagrees with dtype")
        offsets = doc["chunk_offsets"]
        if (not isinstance(offsets, list) or not all(_is_int(o) for o in offsets)
                or offsets != list(m.chunk_offsets)):
            raise FormatError("manifest: chunk_offsets disagree with chunk_tokens")
        if not _is_int(doc["layer_bytes"]) or doc["layer_bytes"] != m.layer_bytes:
            raise FormatError("manifest: layer_bytes disagrees with chunk_tokens")
        if expect is not None and ns != expect:
            raise NamespaceMismatch("manifest belongs to another model, rank, dtype or tag set")
        if expect_segment is not None and m.segment_id != expect_segment:
            raise NamespaceMismatch("manifest names another segment than its object name")
        return m


# ---------------------------------------------------------------------------------------------
# Pointer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pointer:
    """``<ns root>/ptr/<spread>/<hash of a segment's first chunk>`` -> that segment.

    Only a segment's first chunk has a pointer, so there is no position field: the chunk is
    always the manifest's chunk 0 (a reader checks that). ``chunks``, the segment's chunk
    count, lets tools tell a segment's extent without its manifest; readers trust the
    manifest, never this number.
    """

    chunk_hash: int
    segment_id: str
    chunks: int

    def __post_init__(self) -> None:
        hash_hex(self.chunk_hash)
        check_segment_id(self.segment_id)
        if not (_is_int(self.chunks) and 1 <= self.chunks <= MAX_CHUNKS):
            raise FormatError(f"pointer: chunk count out of range: {self.chunks!r}")

    def encode(self) -> bytes:
        return json.dumps({"format": POINTER_FORMAT, "version": FORMAT_VERSION,
                           "chunk_hash": hash_hex(self.chunk_hash), "segment_id": self.segment_id,
                           "chunks": self.chunks},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, expect_hash: int | None = None) -> "Pointer":
        doc = _load_json(data, MAX_POINTER_BYTES, "pointer")
        if isinstance(doc, dict) and not (_is_int(doc.get("version")) and doc["version"] == FORMAT_VERSION):
            # Before the field check, so a v1 pointer (other fields) says what it is.
            raise FormatError(f"pointer: unsupported format version {_short(doc.get('version'))}")
        doc = _expect_obj(doc, "pointer", {"format", "version", "chunk_hash", "segment_id", "chunks"})
        if doc["format"] != POINTER_FORMAT:
            raise FormatError("pointer: not an lmcache-s3layer segment pointer")
        p = cls(_parse_hash(doc["chunk_hash"]), check_segment_id(doc["segment_id"]),
                _expect_int(doc["chunks"], "pointer.chunks", 1, MAX_CHUNKS))
        if expect_hash is not None and hash_hex(expect_hash) != hash_hex(p.chunk_hash):
            raise NamespaceMismatch("pointer names another chunk than its object name")
        return p

    @classmethod
    def of(cls, manifest: "Manifest") -> "Pointer":
        """The pointer that commits ``manifest``: named by its first chunk."""
        return cls(manifest.chunk_hashes[0], manifest.segment_id, manifest.num_chunks)


# ---------------------------------------------------------------------------------------------
# Strict JSON helpers
# ---------------------------------------------------------------------------------------------


def _load_json(data: bytes, limit: int, what: str) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"{what}: expected bytes")
    if len(data) > limit:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the {limit}-byte limit")
    if len(data) == 0:
        raise FormatError(f"{what}: empty object")

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise FormatError(f"{what}: duplicate key {k!r}")
            out[k] = v
        return out

    def no_constants(name: str) -> Any:
        raise FormatError(f"{what}: {name} is not allowed")

    try:
        return json.loads(bytes(data).decode("utf-8"), object_pairs_hook=no_dupes,
                          parse_constant=no_constants)
    except FormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError) as exc:
        raise FormatError(f"{what}: not valid JSON ({type(exc).__name__})") from None


def _expect_obj(d: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise FormatError(f"{what}: expected an object")
    missing = keys - d.keys()
    if missing:
        raise FormatError(f"{what}: missing field(s) {sorted(missing)}")
    extra = {k for k in d.keys() - keys if not k.startswith("x-")}
    if extra:
        raise FormatError(f"{what}: unknown field(s) {sorted(extra)[:5]}")
    return d


def _expect_list(v: Any, what: str, max_len: int) -> list[Any]:
    if not isinstance(v, list):
        raise FormatError(f"{what}: expected a list")
    if len(v) > max_len:
        raise FormatError(f"{what}: {len(v)} entries exceeds {max_len}")
    return v


def _expect_int(v: Any, what: str, lo: int, hi: int) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        raise FormatError(f"{what}: expected an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def _expect_str(v: Any, what: str, max_len: int) -> str:
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise FormatError(f"{what}: expected a string of 1..{max_len} chars")
    return v


def _parse_hash(v: Any) -> int:
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{16}", v):
        raise FormatError("chunk hash must be 16 lowercase hex digits")
    u = int(v, 16)
    # Stored unsigned; LMCache's builtin hashes are signed, so map back to the signed value.
    return u - (1 << 64) if u >= (1 << 63) else u


def _parse_checksum_row(row: Any, n: int) -> tuple[int, ...]:
    if not isinstance(row, str) or len(row) != 8 * n or not re.fullmatch(r"[0-9a-f]*", row):
        raise FormatError("checksums: each layer row must be 8 hex digits per chunk")
    return tuple(int(row[i:i + 8], 16) for i in range(0, len(row), 8))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def normalize_hash(chunk_hash: int) -> int:
    """The signed 64-bit form used everywhere in memory (matches decode of a stored hash)."""
    u = chunk_hash & _U64
    return u - (1 << 64) if u >= (1 << 63) else u


def chunk_hashes_of(manifests: Iterable[Manifest]) -> set[int]:
    return {h for m in manifests for h in m.chunk_hashes}


def validate_chunk_hashes(hashes: Sequence[int]) -> tuple[int, ...]:
    return tuple(normalize_hash(h) for h in hashes)
