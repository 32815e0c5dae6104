"""The store-side fence: on a GPU, LMCache fills the buffers it hands ``batched_submit_put_task``
with an asynchronous device-to-host copy, so the writer must wait for that copy (the fence)
on its upload thread before it reads them, and never on the forward thread that submits."""

from __future__ import annotations

import threading

import pytest
from test_writer_gaps import (
    BPT,
    HIDDEN,
    LAYERS,
    NS,
    PREFIX,
    TOK,
    Instance,
    chunk_bytes,
    hashes_of,
    manifests,
    prefix_hits,
)

from lmcache_s3layer.cache.writer import SegmentWriter

POISON = 0xA5


class AsyncCopy:
    """Stands in for LMCache's device-to-host copy: the buffers hold poison until the fence
    "synchronises", which lands the real bytes of every layer submitted so far."""

    def __init__(self, hashes, fail_on_call: int | None = None):
        self.hashes = hashes
        self.buffers: dict[int, list[bytearray]] = {}
        self.events: list[tuple[str, object, str]] = []
        self.lock = threading.Lock()
        self.calls = 0
        self.fail_on_call = fail_on_call

    def buffers_for(self, layer: int) -> list[bytearray]:
        bufs = [bytearray([POISON]) * (TOK * BPT) for _ in self.hashes]
        self.buffers[layer] = bufs
        return bufs

    def fence(self) -> None:
        with self.lock:
            self.calls += 1
            self.events.append(("fence", self.calls, threading.current_thread().name))
            if self.fail_on_call is not None and self.calls == self.fail_on_call:
                raise RuntimeError("device copy failed")
            for layer, bufs in self.buffers.items():
                for h, b in zip(self.hashes, bufs):
                    b[:] = chunk_bytes(h, layer)

    def release_for(self, layer: int):
        def release() -> None:
            with self.lock:
                self.events.append(("release", layer, threading.current_thread().name))
        return release


def fenced_instance(ep, bucket, fence, **cfg) -> Instance:
    inst = Instance(ep, bucket, **cfg)
    inst.writer.close()
    inst.writer = SegmentWriter(inst.cfg, inst.store, inst.index, before_read=fence)
    return inst


def submit_all(inst: Instance, copy: AsyncCopy) -> None:
    for layer in range(LAYERS):
        assert inst.writer.submit_layer(NS, layer, LAYERS, copy.hashes, [TOK] * len(copy.hashes), (2, HIDDEN),
                                        copy.buffers_for(layer), copy.release_for(layer))
    assert inst.writer.flush(30)


def test_fence_runs_on_the_upload_thread_before_the_buffers_are_read(s3_endpoint, bucket):
    h = hashes_of("fence", 3)
    copy = AsyncCopy(h)
    inst = fenced_instance(s3_endpoint, bucket, copy.fence)
    try:
        submit_all(inst, copy)
        # what was uploaded is what the fence landed, not the poison the buffers held before
        assert prefix_hits(inst, h) == 3
        fences = [e for e in copy.events if e[0] == "fence"]
        assert len(fences) == LAYERS  # once per layer upload
        me = threading.current_thread().name
        assert all(name != me and name.startswith("s3layer-put") for _, _, name in copy.events)
        # every layer's buffers go back only after a fence ran for it
        n_fences = 0
        for kind, _, _ in copy.events:
            n_fences += kind == "fence"
            if kind == "release":
                assert n_fences >= 1
        releases = [e for e in copy.events if e[0] == "release"]
        assert sorted(layer for _, layer, _ in releases) == list(range(LAYERS))
        assert all(copy.events.index(r) > copy.events.index(fences[0]) for r in releases)
    finally:
        inst.close()


def test_without_the_fence_the_poison_would_have_been_stored(s3_endpoint, bucket):
    """The control: the same buffers, no fence: the writer reads what is there."""
    h = hashes_of("no-fence", 2)
    copy = AsyncCopy(h)
    inst = Instance(s3_endpoint, bucket)
    try:
        submit_all(inst, copy)
        m, = manifests(inst)
        assert bytes(inst.store.read_layer(m, 0, 0, 0)) == bytes([POISON]) * (TOK * BPT)
    finally:
        inst.close()


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_a_failing_fence_fails_the_store_cleanly(s3_endpoint, bucket, fail_on_call):
    h = hashes_of(f"fence-fails-{fail_on_call}", 3)
    copy = AsyncCopy(h, fail_on_call=fail_on_call)
    # one upload thread: layers before the failing one are on S3 when it fails
    inst = fenced_instance(s3_endpoint, bucket, copy.fence, put_workers=1)
    try:
        submit_all(inst, copy)
        assert sorted(e[1] for e in copy.events if e[0] == "release") == list(range(LAYERS))
        stats = inst.writer.stats
        assert stats.segments_committed == 0 and stats.stores_failed == 1
        assert stats.layers_uploaded == fail_on_call - 1
        assert manifests(inst) == []
        assert list(inst.client.list(PREFIX + "/")) == []  # partial layer objects cleaned up
        assert not any(inst.writer.is_pending(NS, x) for x in h)
        assert prefix_hits(inst, h) == 0
    finally:
        inst.close()

