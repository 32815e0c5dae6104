"""Range planning, in one place: which runs of chunks a read or a write covers, and which
ranged GETs a byte range becomes. Pure: no I/O.

- ``plan_runs``: a read's chunks (in the order the caller wants them) grouped into runs of
  consecutive chunks of one segment. A run's chunks are contiguous in each of the segment's
  layer objects, so a run costs one coalesced byte range per layer, not one per chunk.
- ``split_runs_into_segments``: a store's new chunk positions cut into segments; the same
  grouping, bounded by ``segment_max_chunks``.
- ``split_range`` / ``count_parts``: a byte range as parts of at most ``part_size`` (parallel
  ranged GETs; AWS advises 8-16 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol, Sequence

from lmcache_s3layer.format.objects import Manifest


class ChunkLocation(Protocol):
    """Where a chunk is: its segment's manifest and its index there (``cache.index.Location``)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def index(self) -> int: ...


@dataclass
class ChunkRun:
    """Consecutive chunks of one segment: one coalesced byte range per layer."""

    manifest: Manifest
    first: int  # chunk index inside the segment
    last: int
    slots: list[int]  # positions in the caller's chunk list


def consecutive_runs(keys: Sequence[tuple[Hashable, int]], max_len: int = 0) -> list[tuple[int, int]]:
    """[start, end) index ranges of ``keys`` ((group, position) pairs) in which every item has
    the group of the one before and the next position; at most ``max_len`` items each (0: no
    limit)."""
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(keys)):
        (group, pos), (prev_group, prev_pos) = keys[i], keys[i - 1]
        if group != prev_group or pos != prev_pos + 1 or (max_len and i - start == max_len):
            out.append((start, i))
            start = i
    if keys:
        out.append((start, len(keys)))
    return out


def plan_runs(locations: Sequence[ChunkLocation]) -> list[ChunkRun]:
    """``locations`` grouped into runs of consecutive chunks of one segment, in order."""
    keys = [(loc.manifest.segment_id, loc.index) for loc in locations]
    return [ChunkRun(locations[a].manifest, locations[a].index, locations[b - 1].index, list(range(a, b)))
            for a, b in consecutive_runs(keys)]


def split_runs_into_segments(positions: Sequence[int], max_chunks: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering exactly ``positions`` (increasing chunk positions of one
    store): each range is a run of consecutive positions of at most ``max_chunks``.

    A store's new chunks need not be contiguous (chunks in between may be committed already,
    by this or another writer); a segment's layer object concatenates its chunks, so each run
    of consecutive new chunks is cut on its own.
    """
    if max_chunks < 1:
        raise ValueError("max_chunks must be at least 1")
    positions = list(positions)
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError("positions must be strictly increasing")
    return [(positions[a], positions[b - 1] + 1)
            for a, b in consecutive_runs([(None, p) for p in positions], max_chunks)]


def split_range(offset: int, length: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) parts of at most ``part_size`` covering [offset, offset + length)."""
    if part_size < 1:
        raise ValueError("part_size must be at least 1")
    end = offset + length
    return [(pos, min(part_size, end - pos)) for pos in range(offset, end, part_size)]


def count_parts(length: int, part_size: int) -> int:
    """How many parts ``split_range`` cuts ``length`` bytes into."""
    return -(-length // part_size)
