"""The read-through cache in process, on the transformers reference engine and real Zarr stores.

Many concurrent clients asking for overlapping sequences get one engine computation per
sequence; computed records are sealed by size, by time and at shutdown, and a fresh store handle
then reads exactly what the clients were answered.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from counting_engine import REFERENCE_K, CountingEngine
from job_managers import USE

import logitcache
from logitcache.client.record import Record
from logitcache.client.space import record_key
from logitcache.server.metrics import ServerMetrics
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import Store, open_store
from logitcache.server.teachers.registry import Teacher, TeacherRegistry

K = REFERENCE_K
SEAL_WAIT_S = 30.0  # longest wait for a background seal (a deadline, not a speed bound)


@pytest.fixture
def teachers(reference_teachers: TeacherRegistry) -> TeacherRegistry:
    return reference_teachers


@pytest.fixture
def teacher(teachers: TeacherRegistry) -> Teacher:
    teacher = teachers.get("demo")
    engine = teacher.engine
    assert isinstance(engine, CountingEngine)
    engine.computed.clear()
    return teacher


def sequences(seed: int, count: int, vocab: int = 1785) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=int(rng.integers(3, 40))) for _ in range(count)]


def cache_on(store: Store, **settings: float) -> ReadThroughCache:
    options = {"segment_positions": 1 << 20, "flush_seconds": 3600.0, **settings}
    return ReadThroughCache(
        store,
        ServerMetrics(),
        segment_positions=int(options["segment_positions"]),
        flush_seconds=options["flush_seconds"],
        loaded=SegmentCache(1 << 28),
        max_unsealed_bytes=int(options.get("max_unsealed_bytes", 1 << 28)),
    )


async def answer(
    cache: ReadThroughCache, teacher: Teacher, batch: list[np.ndarray]
) -> tuple[list[Record], int]:
    """One client's request: its records, decoded, and how many it computed."""
    records, computed = await cache.get(teacher, K, batch, use=USE)
    return records.decode(), computed


def assert_same(got: Record, want: Record) -> None:
    """Bit-identical records (decoded from the same encoded arrays)."""
    assert got.key == want.key
    for name in ("input_ids", "token_ids", "logprobs", "target_logprobs", "tail_logprobs",
                 "counts"):  # fmt: skip
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=name)


def sealed_in_fresh_handle(url: str, keys: list[str]) -> int:
    """How many of ``keys`` a newly opened store handle can read."""
    store = logitcache.open_store(url)
    return sum(store.contains(key) for key in keys)


async def wait_sealed(url: str, keys: list[str]) -> None:
    deadline = time.monotonic() + SEAL_WAIT_S
    while sealed_in_fresh_handle(url, keys) < len(keys):
        assert time.monotonic() < deadline, "records were not sealed in time"
        await asyncio.sleep(0.05)


def test_concurrent_clients_share_one_computation_per_sequence(teacher, tmp_path):
    unique = sequences(seed=1, count=12)
    clients = 8
    # Client c asks for 6 of the 12 sequences starting at c: each is asked for by four clients.
    wanted = [[(c + j) % len(unique) for j in range(6)] for c in range(clients)]

    async def scenario() -> tuple[list[tuple[list[Record], int]], tuple[list[Record], int]]:
        cache = cache_on(open_store(str(tmp_path / "store"), writable=True))
        cache.start()
        try:
            first = await asyncio.gather(
                *(answer(cache, teacher, [unique[i] for i in w]) for w in wanted)
            )
            again = await answer(cache, teacher, unique)  # from records not sealed yet
            return list(first), again
        finally:
            await cache.close()

    first, again = asyncio.run(scenario())
    engine = teacher.engine
    assert sorted(engine.computed.values()) == [1] * len(unique)
    assert set(engine.computed) == {s.astype(np.int32).tobytes() for s in unique}
    assert sum(computed for _, computed in first) == len(unique)
    space_id = teacher.space(K).space_id
    by_key: dict[str, Record] = {}
    for w, (records, _) in zip(wanted, first, strict=True):
        assert [r.key for r in records] == [record_key(space_id, unique[i]).hex() for i in w]
        for r in records:
            assert_same(r, by_key.setdefault(r.key, r))  # one computation, one answer
    records, computed = again
    assert computed == 0 and len(records) == len(unique)
    for r in records:
        assert_same(r, by_key[r.key])


def test_records_are_sealed_when_a_segment_is_full(teacher, tmp_path):
    url = str(tmp_path / "store")
    batch = sequences(seed=2, count=10)
    positions = sum(len(s) for s in batch)

    async def scenario() -> tuple[int, int]:
        cache = cache_on(open_store(url, writable=True), segment_positions=positions)
        cache.start()
        try:
            records, _ = await answer(cache, teacher, batch[:-1])  # short of a full segment
            waiting = sealed_in_fresh_handle(url, [r.key for r in records])
            records, _ = await answer(cache, teacher, batch)
            await wait_sealed(url, [r.key for r in records])
            return waiting, len(records)
        finally:
            await cache.close()

    waiting, sealed = asyncio.run(scenario())
    assert waiting == 0 and sealed == len(batch)


def test_records_are_sealed_after_flush_seconds(teacher, tmp_path):
    url = str(tmp_path / "store")
    batch = sequences(seed=3, count=4)

    async def scenario() -> None:
        cache = cache_on(open_store(url, writable=True), flush_seconds=0.2)
        cache.start()
        try:
            records, _ = await answer(cache, teacher, batch)
            await wait_sealed(url, [r.key for r in records])
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_close_seals_everything_computed(teacher, tmp_path):
    url = str(tmp_path / "store")
    batch = sequences(seed=4, count=6)

    async def scenario() -> tuple[list[Record], int]:
        cache = cache_on(open_store(url, writable=True))
        cache.start()
        records, _ = await answer(cache, teacher, batch)
        before = sealed_in_fresh_handle(url, [r.key for r in records])
        await cache.close()
        return records, before

    records, before = asyncio.run(scenario())
    assert before == 0  # neither a full segment nor an old one: only shutdown seals them
    fresh = logitcache.open_store(url)
    for rec, ids in zip(records, batch, strict=True):
        np.testing.assert_array_equal(rec.input_ids, ids)
        assert rec.token_ids.shape == (len(ids), K)
        assert_same(fresh.get(rec.key), rec)
