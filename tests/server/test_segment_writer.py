"""The segment writer: seals by size and by age, seals the rest at close, and pushes back.

A gated backend (a real local backend whose ``publish`` waits for the test) stands for storage
that is slower than the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest
from test_store import SPACE, assert_matches, synthetic_record

import logitcache
from logitcache.server.store.backend import LocalBackend
from logitcache.server.store.segments import array_names
from logitcache.server.store.store import Store, open_store
from logitcache.server.store.writer import CapturedRecord, SegmentWriter

LENGTH = 5
GUARD_S = 30  # a guard against hanging, never a timing assertion


class GatedBackend(LocalBackend):
    """Publishes only while ``gate`` is open; counts the publishes waiting at it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = 0
        self.failure: Exception | None = None

    def publish(self, staging: str, final: str) -> bool:
        self.waiting += 1
        self.gate.wait(GUARD_S)
        self.waiting -= 1
        if self.failure is not None:
            raise self.failure
        return super().publish(staging, final)


@pytest.fixture
def backend(tmp_path: Path) -> GatedBackend:
    open_store(str(tmp_path / "store"), writable=True)
    return GatedBackend((tmp_path / "store").resolve())


@pytest.fixture
def store(backend: GatedBackend) -> Store:
    return Store(backend, read_only=False)


def records(n: int, start: int = 0) -> list[CapturedRecord]:
    return [synthetic_record(seed, LENGTH) for seed in range(start, start + n)]


def sealed_groups(store: Store) -> list[list[bytes]]:
    """The keys of each segment, in seal order, as a fresh handle sees them."""
    fresh = logitcache.open_store(store.url)
    return [
        [bytes(k) for k in s.keys] for s in sorted(fresh.segments(), key=lambda s: s.segment_id)
    ]


def test_seals_when_a_segment_is_full_and_the_rest_at_close(store: Store) -> None:
    batch = records(7)
    sealed: list[list[bytes]] = []

    async def scenario() -> list[list[bytes]]:
        writer = SegmentWriter(store, segment_positions=3 * LENGTH,
                               on_sealed=lambda rs: sealed.append([r.key for r in rs]))  # fmt: skip
        for r in batch:
            await writer.add(SPACE, r)
        await writer.flush()
        before_close = sealed_groups(store)
        await writer.add(SPACE, synthetic_record(99, LENGTH))
        await writer.close()
        assert writer.segments_written == 4
        return before_close

    before_close = asyncio.run(scenario())
    keys = [r.key for r in batch]
    assert before_close[:2] == [keys[:3], keys[3:6]]  # full segments, in order
    assert before_close[2] == [keys[6]]  # flush() sealed the partial one
    assert sealed_groups(store) == [*before_close, [synthetic_record(99, LENGTH).key]]
    assert sealed == sealed_groups(store)  # on_sealed saw each segment once
    for r in batch:
        assert_matches(logitcache.open_store(store.url).get(r.key), r)


def test_a_full_segment_is_sealed_without_waiting_for_close(store: Store) -> None:
    async def scenario() -> None:
        writer = SegmentWriter(store, segment_positions=2 * LENGTH)
        done = asyncio.Event()
        writer.on_sealed = lambda _: done.set()
        for r in records(3):
            await writer.add(SPACE, r)
        await asyncio.wait_for(done.wait(), GUARD_S)
        assert [len(g) for g in sealed_groups(store)] == [2]
        assert writer.unsealed_positions == LENGTH
        await writer.close()

    asyncio.run(scenario())
    assert [len(g) for g in sealed_groups(store)] == [2, 1]


def test_seals_when_the_oldest_record_is_flush_seconds_old(store: Store) -> None:
    async def scenario() -> None:
        writer = SegmentWriter(store, segment_positions=1 << 20, flush_seconds=0.3)
        done = asyncio.Event()
        writer.on_sealed = lambda _: done.set()
        first = records(2)
        for r in first:
            await writer.add(SPACE, r)
        assert sealed_groups(store) == []  # not full, not old yet
        await asyncio.wait_for(done.wait(), GUARD_S)
        assert sealed_groups(store) == [[r.key for r in first]]
        done.clear()
        await writer.add(SPACE, synthetic_record(50, LENGTH))  # a new segment, a new clock
        await asyncio.wait_for(done.wait(), GUARD_S)
        assert len(sealed_groups(store)) == 2
        await writer.close()

    asyncio.run(scenario())


def test_one_segment_per_capture_space(store: Store) -> None:
    other = dataclasses.replace(SPACE, k=4)  # another space, same codec

    async def scenario() -> None:
        writer = SegmentWriter(store, segment_positions=1 << 20)
        for r in records(2):
            await writer.add(SPACE, r)
        moved = [CapturedRecord(r.key[::-1], r.input_ids, {n: a[:, :4] if a.ndim == 2 else a
                  for n, a in r.arrays.items()}) for r in records(2, start=10)]  # fmt: skip
        for r in moved:
            await writer.add(other, r)
        await writer.close()

    asyncio.run(scenario())
    fresh = logitcache.open_store(store.url)
    assert sorted(s.space.k for s in fresh.segments()) == [4, SPACE.k]
    assert all(len(s) == 2 for s in fresh.segments())


def test_add_waits_while_two_seals_are_pending(store: Store, backend: GatedBackend) -> None:
    backend.gate.clear()  # storage stalls

    async def scenario() -> None:
        writer = SegmentWriter(store, segment_positions=LENGTH)  # every record fills a segment
        await writer.add(SPACE, synthetic_record(0, LENGTH))  # being written (blocked)
        await writer.add(SPACE, synthetic_record(1, LENGTH))  # waiting for the writer
        third = asyncio.ensure_future(writer.add(SPACE, synthetic_record(2, LENGTH)))
        await asyncio.sleep(0.3)
        assert not third.done()  # back-pressure: the caller waits
        assert backend.waiting == 1 and sealed_groups(store) == []
        backend.gate.set()
        await asyncio.wait_for(third, GUARD_S)
        await writer.close()

    asyncio.run(scenario())
    assert [len(g) for g in sealed_groups(store)] == [1, 1, 1]


def test_a_failed_seal_is_raised_once(store: Store, backend: GatedBackend) -> None:
    backend.failure = OSError("disk full")

    async def scenario() -> None:
        writer = SegmentWriter(store, segment_positions=LENGTH)
        await writer.add(SPACE, synthetic_record(0, LENGTH))
        with pytest.raises(OSError, match="disk full"):
            await writer.flush()
        backend.failure = None
        await writer.add(SPACE, synthetic_record(1, LENGTH))
        await writer.close()

    asyncio.run(scenario())
    assert sealed_groups(store) == [[synthetic_record(1, LENGTH).key]]


def test_a_segment_records_its_stored_bytes(store: Store, backend: GatedBackend) -> None:
    segment_id = store.write_segment(SPACE, records(3))
    (reader,) = logitcache.open_store(store.url).segments()
    assert reader.segment_id == segment_id and reader.stored_bytes_known
    measured = sum(backend.stored_bytes(f"{reader.rel}/{name}") for name in array_names(SPACE))
    assert reader.stored_bytes == measured
    assert store.totals().stored_bytes == measured
    assert store.totals() == logitcache.open_store(store.url).totals()
