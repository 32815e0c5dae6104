"""Operating a cache bucket: list and verify segments (``inspect``), delete old segments and the
garbage crashed writers leave (``gc``). Bytes and keys only; no LMCache imports.

Both start from one listing of ``<prefix>/v2/`` (``scan``) that sorts every key into
committed segments (a manifest is present), orphan segment directories (layer objects with no
manifest: a writer crashed or lost its commit before the manifest), segment-start pointers,
and keys that are not ours (left alone). Manifests and pointers (one per segment) are read in
parallel; layer data only by ``verify``. Objects of older formats (``<prefix>/v1/``, which had a
pointer per chunk) are listed too and reported as legacy: the cache never reads them, and
``gc --legacy`` deletes them.

Ages: a segment's age is time since its commit, not since its last use (S3 records no access
time, and a read path that wrote one would turn every hit into a PUT). Commit time is the
manifest's ``created_at`` (sub-second, the writer's clock) capped by the server's
``Last-Modified`` + 1 s (which S3 truncates to whole seconds), so a writer with a clock in the
future cannot make its segments immortal, and segments committed in the same second still sort
in commit order.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TextIO

from lmcache_s3layer.config import fmt_bytes
from lmcache_s3layer.errors import FormatError, ObjectNotFound, S3LayerError, StorageError
from lmcache_s3layer.format.checksum import crc32c
from lmcache_s3layer.format.objects import (
    LEGACY_VERSIONS,
    MANIFEST_NAME,
    MAX_POINTER_BYTES,
    Manifest,
    Names,
    Pointer,
    hash_hex,
    layer_key_at,
    manifest_key_at,
    parse_key,
    parse_layer_name,
    segment_dir_at,
    version_root,
)
from lmcache_s3layer.store.client import ObjectInfo, S3Client
from lmcache_s3layer.store.segments import SegmentStore

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Scan: one listing, classified
# ---------------------------------------------------------------------------------------------


@dataclass
class SegmentInfo:
    """One segment directory ``<ns root>/seg/xx/<id>/`` as listed (and its manifest, if any)."""

    segment_id: str
    ns_root: str
    objects: dict[str, ObjectInfo] = field(default_factory=dict)  # file name -> info
    manifest: Manifest | None = None
    manifest_error: str | None = None

    @property
    def dir(self) -> str:
        return segment_dir_at(self.ns_root, self.segment_id)

    @property
    def manifest_info(self) -> ObjectInfo | None:
        return self.objects.get(MANIFEST_NAME)

    @property
    def has_manifest(self) -> bool:
        return self.manifest_info is not None

    @property
    def layer_objects(self) -> dict[int, ObjectInfo]:
        layers = ((parse_layer_name(name), o) for name, o in self.objects.items())
        return {layer: o for layer, o in layers if layer is not None}

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects.values())

    @property
    def newest(self) -> float:
        return max((o.last_modified for o in self.objects.values()), default=0.0)

    @property
    def committed_at(self) -> float:
        lm = self.manifest_info.last_modified if self.manifest_info else self.newest
        if self.manifest is not None:
            return min(self.manifest.created_at, lm + 1.0)
        return lm

    def problems(self, prefix: str) -> list["Problem"]:
        """Structural damage visible without reading layer data."""
        if not self.has_manifest:
            return []
        if self.manifest is None:
            return [Problem(self.segment_id, None, None, manifest_key_at(self.dir),
                            f"manifest unreadable: {self.manifest_error}")]
        m = self.manifest
        out = []
        if Names(prefix, m.namespace).root != self.ns_root:
            out.append(Problem(self.segment_id, None, None, manifest_key_at(self.dir),
                               "manifest's model/rank/dtype do not match its location"))
            return out
        layers = self.layer_objects
        for layer in range(m.num_layers):
            o = layers.get(layer)
            key = layer_key_at(self.dir, layer)
            if o is None:
                out.append(Problem(self.segment_id, layer, None, key, "layer object missing"))
            elif o.size != m.layer_bytes:
                out.append(Problem(self.segment_id, layer, None, key,
                                   f"layer object is {o.size} bytes, manifest says {m.layer_bytes}"))
        return out

    def describe(self, now: float) -> dict[str, Any]:
        m = self.manifest
        d: dict[str, Any] = {
            "segment_id": self.segment_id, "dir": self.dir, "bytes": self.size,
            "committed_at": self.committed_at, "age_s": max(0.0, now - self.committed_at),
        }
        if m is not None:
            d.update(model=m.namespace.model, world_size=m.namespace.world_size,
                     worker_id=m.namespace.worker_id, dtype=m.namespace.dtype,
                     tags=[list(t) for t in m.namespace.tags], chunks=m.num_chunks,
                     tokens=m.total_tokens, layers=m.num_layers, layer_bytes=m.layer_bytes)
        else:
            d["manifest_error"] = self.manifest_error
        return d


@dataclass
class PointerInfo:
    """A segment-start pointer as listed and, when scanned with its contents, what it names."""

    key: str
    ns_root: str
    hash_hex: str
    info: ObjectInfo
    segment_id: str | None = None  # None: not read, unreadable or gone (``error`` says which)
    error: str | None = None
    malformed: bool = False  # read, and not a valid pointer of this format (garbage for sure)


@dataclass
class LegacyObjects:
    """Everything under an older format's version root (``<prefix>/v1/``): never read by the
    cache, reported by ``inspect``, deleted by ``gc --legacy``."""

    version: int
    root: str
    objects: list[ObjectInfo] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def count(self, kind: str) -> int:
        """Objects of a kind: "manifest", "layer", "pointer" or "other" (not an object name
        of that format: left alone by gc)."""
        return sum(1 for o in self.objects if _legacy_kind(o.key) == kind)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "root": self.root, "objects": len(self.objects), "bytes": self.bytes,
                "segments": self.count("manifest"), "layer_objects": self.count("layer"),
                "pointers": self.count("pointer"), "other": self.count("other")}


def _legacy_kind(key: str) -> str:
    c = parse_key(key)
    if c is None:
        return "other"
    if c.kind == "pointer":
        return "pointer"
    return "manifest" if c.is_manifest else "layer"


@dataclass
class Problem:
    """Something that makes (part of) a segment unreadable: names segment, layer and chunk."""

    segment_id: str
    layer: int | None
    chunk: int | None
    key: str
    reason: str

    def __str__(self) -> str:
        where = f"segment {self.segment_id}"
        if self.layer is not None:
            where += f" layer {self.layer}"
        if self.chunk is not None:
            where += f" chunk {self.chunk}"
        return f"{where}: {self.reason} ({self.key})"

    def to_json(self) -> dict[str, Any]:
        return {"segment_id": self.segment_id, "layer": self.layer, "chunk": self.chunk,
                "key": self.key, "reason": self.reason}


@dataclass
class Scan:
    prefix: str
    listed_at: float
    segments: list[SegmentInfo]  # committed: a manifest object exists (readable or not)
    orphan_dirs: list[SegmentInfo]  # layer objects without a manifest
    pointers: list[PointerInfo]
    foreign: list[ObjectInfo]  # under the prefix but not format v2's names
    legacy: list[LegacyObjects] = field(default_factory=list)  # older formats' roots, non-empty ones

    def start_pointer(self, s: SegmentInfo) -> PointerInfo | None:
        """The listed pointer at the segment's first chunk (whichever segment it names)."""
        if s.manifest is None:
            return None
        want = (s.ns_root, hash_hex(s.manifest.chunk_hashes[0]))
        return self._pointers_by_start().get(want)

    def _pointers_by_start(self) -> dict[tuple[str, str], PointerInfo]:
        return {(p.ns_root, p.hash_hex): p for p in self.pointers}

    def unreferenced(self) -> list[SegmentInfo]:
        """Readable segments no pointer names: no other instance can find them. A writer
        between its manifest and its pointer looks like this (gc waits out the grace); past
        it, a loser of a commit race whose clean-up failed, or a segment whose pointer PUT
        failed. A listed pointer deleted before it could be read counts as naming it: only
        proof makes garbage."""
        by_start = self._pointers_by_start()
        out = []
        for s in self.segments:
            if s.manifest is None:
                continue
            p = by_start.get((s.ns_root, hash_hex(s.manifest.chunk_hashes[0])))
            if p is None or p.malformed or (p.segment_id is not None and p.segment_id != s.segment_id):
                out.append(s)
        return out

    def orphan_pointers(self) -> list[PointerInfo]:
        """Pointers naming no committed segment of their namespace (its manifest deleted by
        hand or by a lifecycle rule), and malformed ones. A pointer naming a segment gc is
        about to delete is not one: it goes with its segment (``delete_segment``). Pointers
        whose contents were not read are never orphans here."""
        committed = {(s.ns_root, s.segment_id) for s in self.segments}
        return [p for p in self.pointers
                if p.malformed or (p.segment_id is not None and (p.ns_root, p.segment_id) not in committed)]


def scan(store: SegmentStore, *, jobs: int = 8, read_manifests: bool = True) -> Scan:
    """``read_manifests``: read every manifest and pointer (one per segment) too; without
    them segments are only their listed objects, and no pointer is known orphan."""
    listed_at = time.time()
    segs: dict[str, SegmentInfo] = {}
    pointers: list[PointerInfo] = []
    foreign: list[ObjectInfo] = []
    for info in store.client.list(version_root(store.prefix)):
        c = parse_key(info.key)
        if c is None:
            foreign.append(info)
        elif c.kind == "segment":
            s = segs.get(f"{c.ns_root}/{c.ident}")
            if s is None:
                s = segs[f"{c.ns_root}/{c.ident}"] = SegmentInfo(c.ident, c.ns_root)
            s.objects[c.name] = info
        else:
            pointers.append(PointerInfo(info.key, c.ns_root, c.ident, info))
    legacy = []
    for version in LEGACY_VERSIONS:
        root = version_root(store.prefix, version)
        objects = list(store.client.list(root))
        if objects:
            legacy.append(LegacyObjects(version, root, objects))
    committed = [s for s in segs.values() if s.has_manifest]
    orphans = [s for s in segs.values() if not s.has_manifest]
    if read_manifests and (committed or pointers):
        def load(s: SegmentInfo) -> None:
            info = s.manifest_info
            assert info is not None  # only committed segments are loaded
            try:
                s.manifest = store.read_manifest_key(info.key)
            except FormatError as exc:
                s.manifest_error = str(exc)
            except ObjectNotFound:
                s.manifest_error = "manifest deleted while listing (concurrent gc?)"

        def load_pointer(p: PointerInfo) -> None:
            try:
                ptr = Pointer.decode(store.client.get_bytes(p.key, MAX_POINTER_BYTES))
                if ptr.chunk_hash & ((1 << 64) - 1) != int(p.hash_hex, 16):
                    raise FormatError("pointer names another chunk than its object name")
                p.segment_id = ptr.segment_id
            except FormatError as exc:
                p.error, p.malformed = str(exc), True
            except ObjectNotFound:
                p.error = "deleted while listing (concurrent gc?)"

        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="s3layer-scan") as pool:
            list(pool.map(load, committed))
            list(pool.map(load_pointer, pointers))
    committed.sort(key=lambda s: (s.committed_at, s.segment_id))
    orphans.sort(key=lambda s: (s.newest, s.segment_id))
    return Scan(store.prefix, listed_at, committed, orphans, pointers, foreign, legacy)


def find_segment(sc: Scan, wanted: str) -> SegmentInfo:
    """The committed segment whose id is ``wanted`` or starts with it (unambiguously)."""
    if not wanted:
        raise LookupError("an empty segment id matches every segment")
    hits = [s for s in sc.segments if s.segment_id.startswith(wanted.lower())]
    if len(hits) != 1:
        raise LookupError(f"{'no' if not hits else len(hits)} committed segments match {wanted!r}")
    return hits[0]


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------


class Progress:
    """A plain stderr progress bar: a redrawn line on a terminal, a line every few seconds
    otherwise (so a log or CI output stays readable). Thread-safe; no dependencies."""

    def __init__(self, total_bytes: int, total_items: int, *, label: str = "verifying",
                 stream: TextIO | None = None, enabled: bool | None = None, min_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else enabled
        self.total_bytes, self.total_items = total_bytes, total_items
        self.label = label
        self.bytes = self.items = 0
        self._clock = clock
        self._start = clock()
        self._last = -1e9
        self._interval = min_interval if self.tty else max(min_interval, 5.0)
        self._lock = threading.Lock()

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.items += items
            now = self._clock()
            if self.enabled and now - self._last >= self._interval:
                self._last = now
                self._draw(now, final=False)

    def close(self) -> None:
        with self._lock:
            if self.enabled:
                self._draw(self._clock(), final=True)

    def _draw(self, now: float, final: bool) -> None:
        frac = self.bytes / self.total_bytes if self.total_bytes else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.bytes / max(now - self._start, 1e-9)
        line = (f"{self.label} [{bar}] {frac:4.0%}  {self.items}/{self.total_items} segments  "
                f"{fmt_bytes(self.bytes)}/{fmt_bytes(self.total_bytes)}  {fmt_bytes(rate)}/s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@dataclass
class VerifyReport:
    segments: int = 0
    layers: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"segments": self.segments, "layers": self.layers, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "ok": self.ok,
                "problems": [p.to_json() for p in self.problems]}


def verify_layer(store: SegmentStore, s: SegmentInfo, layer: int) -> tuple[list[Problem], int]:
    """Read one whole layer object and check every chunk's CRC32C; every bad chunk is named,
    not just the first."""
    m = s.manifest
    assert m is not None
    read = store.plan_layer_read(m, layer, 0, m.num_chunks - 1)
    key = read.parts[0].key
    buf = memoryview(bytearray(read.nbytes))
    try:
        for p in read.parts:
            store.fetch_part(p, buf)
    except StorageError as exc:
        return [Problem(s.segment_id, layer, None, key, f"could not read: {exc}")], 0
    bad = []
    for j, (off, tokens) in enumerate(zip(m.chunk_offsets, m.chunk_tokens)):
        if crc32c(buf[off:off + tokens * m.bytes_per_token]) != m.checksums[layer][j]:
            bad.append(Problem(s.segment_id, layer, j, key, "checksum mismatch"))
    return bad, read.nbytes


def verify(store: SegmentStore, segments: list[SegmentInfo], *, jobs: int = 8,
           progress: Progress | None = None) -> VerifyReport:
    """Structure first (missing or mis-sized layers, unreadable manifests), then every byte of
    every readable layer against the manifest's per-(layer, chunk) checksums."""
    rep = VerifyReport(segments=len(segments))
    t0 = time.perf_counter()
    tasks: list[tuple[SegmentInfo, int]] = []
    remaining: dict[str, int] = {}
    lock = threading.Lock()
    for s in segments:
        structural = s.problems(store.prefix)
        rep.problems.extend(structural)
        if s.manifest is None or any(p.layer is None for p in structural):
            if progress:
                progress.advance(items=1)
            continue
        broken = {p.layer for p in structural}
        layers = [l for l in range(s.manifest.num_layers) if l not in broken]
        remaining[s.dir] = len(layers)
        tasks += [(s, l) for l in layers]
        if not layers and progress:
            progress.advance(items=1)

    def run(task: tuple[SegmentInfo, int]) -> None:
        s, layer = task
        problems, n = verify_layer(store, s, layer)
        with lock:
            rep.problems.extend(problems)
            rep.layers += 1
            rep.bytes += n
            remaining[s.dir] -= 1
            done = remaining[s.dir] == 0
        if progress:
            progress.advance(n, items=1 if done else 0)

    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="s3layer-verify") as pool:
        list(pool.map(run, tasks))
    if progress:
        progress.close()
    rep.problems.sort(key=lambda p: (p.segment_id, p.layer if p.layer is not None else -1,
                                     p.chunk if p.chunk is not None else -1))
    rep.seconds = time.perf_counter() - t0
    return rep


# ---------------------------------------------------------------------------------------------
# gc
# ---------------------------------------------------------------------------------------------
#
# Why deleting in the order start pointer -> manifest -> layer objects is safe for a
# concurrent reader (another engine looking up and retrieving the same chunks while gc runs):
#
# * A reader finds a segment through the pointer at its first chunk, then the manifest. With
#   the pointer gone, the look-up is a miss (the chunks after it are found only through that
#   manifest). With the pointer still there but the manifest gone, the manifest GET is
#   NoSuchKey and ``ChunkIndex`` answers a clean miss too. The manifest is the commit point in
#   both directions: nothing can be found without it, so once it is deleted the layer objects
#   are unreachable garbage, and deleting them last cannot expose anything.
# * A reader that resolved the manifest *before* gc deleted it may still ask for layers that
#   are now gone: the GET is NoSuchKey, a typed error, and the read path fails that retrieval
#   loudly (``RetrievalFailed``) and marks the segment bad, so the engine recomputes. It never
#   gets part of a layer: a layer is handed out only whole and checksum-verified.
# * The reverse order (layers first) would leave, for a while, a manifest that promises layers
#   that no longer exist; every reader that looked the chunks up in that window would turn a
#   hit into a failed retrieval. Manifest-before-pointer would do the same to pointer readers,
#   only as clean misses, so the pointer goes first to keep even that window empty.
#
# Orphans: layer objects without a manifest are what a writer leaves between its first layer
# PUT and its manifest PUT, so they are garbage only once older than a grace period far beyond
# a writer's longest store (``SegmentWriter`` abandons a store after 5 idle minutes; the
# default grace is an hour). A pointer is an orphan when the segment it names has no manifest
# (or it is malformed); it is re-read and its manifest checked just before deletion, so a
# commit that raced the listing survives. A segment is *unreferenced* when no pointer names it
# (its start pointer is missing or names another segment): a writer between its manifest and
# its pointer PUT looks like that for milliseconds, so only past the grace is it garbage (a
# race loser whose clean-up failed, or a commit whose pointer PUT failed).
#
# Legacy formats (``<prefix>/v1/``: a pointer per chunk) are never read by this version, and
# deleted only with ``legacy=True`` (``gc --legacy``): during a rolling upgrade engines of the
# old version still read and write them, and only the operator knows when the last one is
# gone. Their objects are deleted pointers first, then manifests, then layer objects, the
# same order as above, for the old readers' sake.


@dataclass
class GcAction:
    kind: str  # segment | orphan_layers | orphan_pointer | legacy
    reason: str
    key: str  # segment dir, pointer key, or a legacy version root
    bytes: int
    objects: int
    age_s: float
    segment: SegmentInfo | None = None
    legacy: LegacyObjects | None = None
    done: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "reason": self.reason, "key": self.key, "bytes": self.bytes,
                             "objects": self.objects, "age_s": round(self.age_s, 1), "done": self.done}
        if self.segment is not None:
            d["segment_id"] = self.segment.segment_id
            m = self.segment.manifest
            if m is not None:
                d.update(model=m.namespace.model, tokens=m.total_tokens, layers=m.num_layers)
        if self.legacy is not None:
            d["format_version"] = self.legacy.version
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class GcReport:
    dry_run: bool
    actions: list[GcAction]
    kept_segments: int
    kept_bytes: int
    legacy_kept: list[LegacyObjects] = field(default_factory=list)  # found, not deleted (no --legacy)

    @property
    def errors(self) -> list[GcAction]:
        return [a for a in self.actions if a.error]

    def to_json(self) -> dict[str, Any]:
        segs = [a for a in self.actions if a.kind == "segment"]
        legacy = [a for a in self.actions if a.kind == "legacy"]
        return {
            "dry_run": self.dry_run,
            "actions": [a.to_json() for a in self.actions],
            "summary": {
                "segments": len(segs), "segment_bytes": sum(a.bytes for a in segs),
                "orphan_layer_objects": sum(a.objects for a in self.actions if a.kind == "orphan_layers"),
                "orphan_pointers": sum(1 for a in self.actions if a.kind == "orphan_pointer"),
                "legacy_objects": sum(a.objects for a in legacy), "legacy_bytes": sum(a.bytes for a in legacy),
                "legacy_kept_objects": sum(len(g.objects) for g in self.legacy_kept),
                "legacy_kept_bytes": sum(g.bytes for g in self.legacy_kept),
                "kept_segments": self.kept_segments, "kept_bytes": self.kept_bytes,
                "errors": len(self.errors),
            },
        }


def plan_gc(sc: Scan, *, older_than_s: float | None = None, max_bytes: int | None = None,
            orphan_grace_s: float = 3600.0, now: float | None = None,
            segment_ids: Iterable[str] = (), legacy: bool = False) -> tuple[list[GcAction], list[SegmentInfo]]:
    """What gc would delete, oldest first, and the segments it keeps. Pure (no I/O).
    ``segment_ids``: full ids to delete regardless of age (e.g. ones ``inspect --verify``
    found corrupt: gc itself reads no layer data). ``legacy``: also every object of an older
    format (see above)."""
    named = set(segment_ids)
    now = time.time() if now is None else now
    actions: list[GcAction] = []
    kept: list[SegmentInfo] = []
    unreferenced = {id(s) for s in sc.unreferenced()}

    def seg_action(s: SegmentInfo, reason: str) -> None:
        actions.append(GcAction("segment", reason, s.dir, s.size, len(s.objects), now - s.committed_at, s))

    for s in sc.segments:  # oldest first (scan sorted them)
        age = now - s.committed_at
        # Includes an unreadable manifest: readers already treat its chunks as misses, so past
        # the grace it is garbage like any other damage.
        damage = s.problems(sc.prefix)
        if s.segment_id in named:
            seg_action(s, "named (--segment)")
        elif older_than_s is not None and age > older_than_s:
            seg_action(s, f"older than {fmt_age(older_than_s)}")
        elif damage and age > orphan_grace_s:
            # A manifest is written only after all its layers, so a missing or short layer is
            # damage, not a write in progress: every hit on it would be a failed retrieval.
            seg_action(s, f"damaged: {damage[0].reason}")
        elif id(s) in unreferenced and age > orphan_grace_s:
            seg_action(s, "unreferenced: no pointer names it (a lost commit race, or a failed pointer write)")
        else:
            kept.append(s)
    if max_bytes is not None:
        total = sum(s.size for s in kept)
        survivors = []
        for s in kept:
            if total > max_bytes:
                seg_action(s, f"over the {fmt_bytes(max_bytes)} budget")
                total -= s.size
            else:
                survivors.append(s)
        kept = survivors
    for d in sc.orphan_dirs:
        age = now - d.newest
        if age > orphan_grace_s:
            actions.append(GcAction("orphan_layers", "layer objects without a manifest", d.dir, d.size,
                                    len(d.objects), age, d))
    for p in sc.orphan_pointers():
        age = now - p.info.last_modified
        if age > orphan_grace_s:
            reason = "malformed pointer" if p.malformed else "the segment it names has no manifest"
            actions.append(GcAction("orphan_pointer", reason, p.key, p.info.size, 1, age))
    # A segment deleted above with an unreadable manifest: ``delete_segment`` cannot tell its
    # first chunk, so its pointer is removed here (after the segments, see ``run_gc``).
    blind = {(a.segment.ns_root, a.segment.segment_id) for a in actions
             if a.kind == "segment" and a.segment is not None and a.segment.manifest is None}
    for p in sc.pointers:
        if p.segment_id is not None and (p.ns_root, p.segment_id) in blind:
            actions.append(GcAction("orphan_pointer", "names a segment deleted above (unreadable manifest)",
                                    p.key, p.info.size, 1, now - p.info.last_modified))
    if legacy:
        for g in sc.legacy:
            n = len(g.objects) - g.count("other")
            if n:
                age = now - min(o.last_modified for o in g.objects)
                actions.append(GcAction("legacy", f"legacy format v{g.version} (never read by this version)",
                                        g.root, sum(o.size for o in g.objects if _legacy_kind(o.key) != "other"),
                                        n, age, legacy=g))
    return actions, kept


def run_gc(store: SegmentStore, sc: Scan, actions: list[GcAction], kept: list[SegmentInfo], *,
           dry_run: bool = False, jobs: int = 8,
           on_action: Callable[[GcAction], None] | None = None) -> GcReport:
    """Carry out ``plan_gc``'s actions: segments (each start pointer -> manifest -> layers,
    see the comment above), then orphan layer objects, orphan pointers and legacy objects.
    Failures are recorded on the action and gc goes on; the caller decides the exit status."""
    legacy_planned = {id(a.legacy) for a in actions if a.legacy is not None}
    rep = GcReport(dry_run, actions, len(kept), sum(s.size for s in kept),
                   [g for g in sc.legacy if id(g) not in legacy_planned])
    notify = on_action or (lambda a: None)
    if dry_run:
        for a in actions:
            notify(a)
        return rep
    lock = threading.Lock()
    live_dirs = {f"{s.ns_root}/{s.segment_id}" for s in kept}

    def do(a: GcAction) -> None:
        try:
            if a.kind == "segment":
                assert a.segment is not None  # plan_gc attaches the segment to these kinds
                _delete_segment(store, a.segment)
            elif a.kind == "orphan_layers":
                assert a.segment is not None
                store.client.delete_many(sorted(o.key for o in a.segment.objects.values()))
            elif a.kind == "legacy":
                assert a.legacy is not None
                for kind in ("pointer", "manifest", "layer"):  # the order of ``delete_segment``
                    store.client.delete_many(sorted(o.key for o in a.legacy.objects if _legacy_kind(o.key) == kind))
            else:
                deleted, note = _delete_orphan_pointer(store, a.key, live_dirs)
                if note:
                    a.reason = note
                if not deleted:
                    with lock:
                        notify(a)
                    return
            a.done = True
        except S3LayerError as exc:
            a.error = str(exc)
        with lock:
            notify(a)

    segs = [a for a in actions if a.kind == "segment"]
    rest = [a for a in actions if a.kind != "segment"]
    # Segments in parallel (each one's own deletions stay in order); oldest are submitted first.
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="s3layer-gc") as pool:
        list(pool.map(do, segs))
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="s3layer-gc") as pool:
        list(pool.map(do, rest))
    return rep


def _delete_segment(store: SegmentStore, s: SegmentInfo) -> None:
    m = s.manifest
    expected: set[str] = set()
    if m is not None and Names(store.prefix, m.namespace).root == s.ns_root:
        store.delete_segment(m)  # its start pointer if that names it, manifest, layers: that order
        names = store.names(m.namespace)
        expected = {names.manifest_object(m.segment_id)} | {
            names.layer_object(m.segment_id, l) for l in range(m.num_layers)}
    elif s.manifest_info is not None:
        # Unreadable (or misplaced) manifest: its first chunk is unknown, so a pointer naming
        # it is left to the orphan-pointer pass; readers already treat it as a miss.
        store.client.delete(s.manifest_info.key)
        expected = {s.manifest_info.key}
    leftovers = sorted(o.key for o in s.objects.values() if o.key not in expected)
    if leftovers:
        store.client.delete_many(leftovers)


def _delete_orphan_pointer(store: SegmentStore, key: str, live_dirs: set[str]) -> tuple[bool, str | None]:
    """Delete the pointer unless, read again now, it names a segment that is still committed.
    Returns (deleted, a note replacing the planned reason or None)."""
    try:
        data = store.client.get_bytes(key, MAX_POINTER_BYTES)
    except ObjectNotFound:
        return False, "already gone"
    try:
        p = Pointer.decode(data)
    except FormatError as exc:
        store.client.delete(key)
        return True, f"malformed pointer ({exc})"
    parsed = parse_key(key)
    assert parsed is not None  # the key was parsed as a pointer key when scanned
    ns_root = parsed.ns_root
    sid = p.segment_id
    if f"{ns_root}/{sid}" in live_dirs:
        return False, "kept: names a surviving segment"
    try:
        store.client.head(manifest_key_at(segment_dir_at(ns_root, sid)))
        return False, "kept: its manifest exists (committed after the listing)"
    except ObjectNotFound:
        pass
    store.client.delete(key)
    return True, None


def gc(store: SegmentStore, *, older_than_s: float | None = None, max_bytes: int | None = None,
       orphan_grace_s: float = 3600.0, dry_run: bool = False, jobs: int = 8, now: float | None = None,
       on_action: Callable[[GcAction], None] | None = None, segments: Iterable[str] = (),
       legacy: bool = False) -> GcReport:
    """``segments``: ids or unique id prefixes of committed segments to delete as well
    (LookupError when one matches none or several). ``legacy``: delete older formats' objects."""
    sc = scan(store, jobs=jobs)
    named = [find_segment(sc, wanted).segment_id for wanted in segments]
    actions, kept = plan_gc(sc, older_than_s=older_than_s, max_bytes=max_bytes,
                            orphan_grace_s=orphan_grace_s, now=now, segment_ids=named, legacy=legacy)
    return run_gc(store, sc, actions, kept, dry_run=dry_run, jobs=jobs, on_action=on_action)


# ---------------------------------------------------------------------------------------------
# Parsing and formatting helpers shared with the CLI
# ---------------------------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``7d``, ``36h``, ``90m``, ``45s``, ``1w``, ``1d12h`` or plain seconds."""
    t = text.strip().lower()
    if not t:
        raise ValueError("empty duration")
    try:
        v = float(t)
    except ValueError:
        pass
    else:
        if v < 0:
            raise ValueError(f"negative duration {text!r}")
        return v
    total, num = 0.0, ""
    for ch in t:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in _DURATION_UNITS and num:
            total += float(num) * _DURATION_UNITS[ch]
            num = ""
        else:
            raise ValueError(f"bad duration {text!r}: use e.g. 7d, 36h, 90m, 45s")
    if num:
        raise ValueError(f"bad duration {text!r}: a number needs a unit (s, m, h, d, w)")
    return total


def fmt_age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def connect(cfg) -> SegmentStore:
    return SegmentStore(S3Client(cfg), cfg.prefix)
