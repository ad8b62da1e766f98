"""Dataset streaming in process, over datasets built by jobs on the transformers reference engine.

A rank's stream is exactly the order arithmetic of ``logitcache.client.order`` (partition by
rank, per-epoch shuffle), for every world size and batch size; a cursor resumes right after its
batch; a dataset still building streams only with allow_partial, and then only its sealed part.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from job_managers import USE

import logitcache
from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.client.order import EpochPermutation, rank_length, rank_positions
from logitcache.server.config import TeacherConfig
from logitcache.server.engine.reference import ReferenceEngine
from logitcache.server.jobs import JobManager, JobSpec, JobState
from logitcache.server.metrics import ServerMetrics
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import open_store
from logitcache.server.streaming import DatasetStreamer, StreamBatch, StreamRequest
from logitcache.server.teachers.registry import TeacherRegistry

K = 8
N = 37  # not a multiple of any world size or batch size below
JOB_S = 120.0  # longest wait for a job (a deadline, not a speed bound)


def sequences(seed: int, count: int, lengths: tuple[int, int] = (3, 30)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 1785, size=int(rng.integers(*lengths))).tolist() for _ in range(count)]


def job_manager(url: str, teachers: TeacherRegistry, segment_positions: int) -> JobManager:
    return JobManager(
        open_store(url, writable=True),
        teachers,
        ServerMetrics(),
        max_running=1,
        max_in_flight=4,
        segment_positions=segment_positions,
    )


def sealed(url: str, dataset: str) -> int:
    """Records of ``dataset`` a fresh store handle can read (0 before it is published)."""
    store = logitcache.open_store(url)
    return store.dataset(dataset).sealed_count() if dataset in store.datasets() else 0


@pytest.fixture(scope="module")
def store_url(demo_teacher: Path, tmp_path_factory) -> Iterator[str]:
    """One store with ``complete`` (N records) and ``partial`` (a job abandoned midway)."""
    url = str(tmp_path_factory.mktemp("streaming") / "store")
    config = TeacherConfig("demo", str(demo_teacher), max_top_k=K, default_top_k=K)

    async def build(teachers: TeacherRegistry) -> None:
        jobs = job_manager(url, teachers, segment_positions=1 << 16)
        job = await jobs.submit(JobSpec(use=USE, dataset="complete"), sequences(1, N), [])
        async with asyncio.timeout(JOB_S):
            updates = [update async for update in jobs.watch(job.id)]
        assert updates[-1].state is JobState.COMPLETED, updates[-1].error
        await jobs.close()
        # Abandoned once some segments are sealed (leaving asyncio.run stops the job as a crash
        # would): the dataset stays "building".
        crashed = job_manager(url, teachers, segment_positions=200)
        await crashed.submit(JobSpec(use=USE, dataset="partial"), sequences(2, 150, (20, 40)), [])
        deadline = time.monotonic() + JOB_S
        while sealed(url, "partial") < 20:
            assert time.monotonic() < deadline, "the partial dataset sealed too little"
            await asyncio.sleep(0.02)

    teachers = asyncio.run(TeacherRegistry.start([config], ReferenceEngine))
    try:
        asyncio.run(build(teachers))
    finally:
        teachers.shutdown()
    yield url


def stream(url: str, dataset: str, **fields: Any) -> list[StreamBatch]:
    """Every batch of one StreamRequest, from a streamer on a fresh store handle."""

    async def read() -> list[StreamBatch]:
        streamer = DatasetStreamer(logitcache.open_store(url), SegmentCache(1 << 28), prefetch=2)
        try:
            return [b async for b in streamer.stream(StreamRequest(dataset=dataset, **fields))]
        finally:
            streamer.close()

    return asyncio.run(read())


def indices_of(batches: list[StreamBatch]) -> list[int]:
    return [int(i) for b in batches for i in b.indices]


def expected_order(n: int, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """The dataset indices rank ``rank`` reads, by ``logitcache.client.order`` alone."""
    positions = rank_positions(n, rank, world, start=0, count=rank_length(n, rank, world))
    return [int(i) for i in EpochPermutation(n, seed, epoch)(positions)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("batch_records", [1, 4, 64])
def test_each_rank_streams_its_share_in_the_order_of_the_order_module(
    store_url, world, batch_records
):
    ds = logitcache.open_store(store_url).dataset("complete")
    seen: list[int] = []
    for rank in range(world):
        batches = stream(store_url, "complete", rank=rank, world_size=world, seed=7, epoch=3,
                         batch_records=batch_records)  # fmt: skip
        order = indices_of(batches)
        assert order == expected_order(N, rank, world, seed=7, epoch=3)
        total = rank_length(N, rank, world)
        assert [b.cursor for b in batches] == [
            min(batch_records * (i + 1), total) for i in range(len(batches))
        ]
        for batch in batches:  # each record is the one at its dataset index
            assert batch.keys == [ds.raw_key(i) for i in batch.indices]
        seen += order
    assert sorted(seen) == list(range(N))


def test_epochs_seeds_and_no_shuffle(store_url):
    base = indices_of(stream(store_url, "complete", seed=7, epoch=0))
    assert sorted(base) == list(range(N)) and base != list(range(N))
    for seed, epoch in ((7, 1), (8, 0)):
        other = indices_of(stream(store_url, "complete", seed=seed, epoch=epoch))
        assert other == expected_order(N, 0, 1, seed, epoch) and other != base
    unshuffled = indices_of(stream(store_url, "complete", shuffle=False, batch_records=5))
    assert unshuffled == list(range(N))


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (3, 2)])
def test_a_cursor_resumes_right_after_its_batch(store_url, world, rank):
    fields = dict(rank=rank, world_size=world, seed=11, epoch=2, batch_records=3)
    full = stream(store_url, "complete", **fields)
    for cut in (0, 1, len(full) - 1):
        rest = stream(store_url, "complete", start_cursor=full[cut].cursor, **fields)
        assert indices_of(rest) == indices_of(full[cut + 1 :])
        assert [b.cursor for b in rest] == [b.cursor for b in full[cut + 1 :]]
    with pytest.raises(InvalidArgument, match="start_cursor"):
        stream(store_url, "complete", start_cursor=rank_length(N, rank, world) + 1, **fields)


def test_a_building_dataset_streams_its_sealed_part_only_with_allow_partial(store_url):
    store = logitcache.open_store(store_url)
    ds = store.dataset("partial")
    assert not ds.complete
    with pytest.raises(FailedPrecondition, match="allow_partial"):
        stream(store_url, "partial")
    sealed = [i for i in range(len(ds)) if store.contains(ds.raw_key(i))]
    assert 0 < len(sealed) < len(ds)
    for world, rank in ((1, 0), (2, 1)):
        got = indices_of(
            stream(store_url, "partial", rank=rank, world_size=world, seed=5, allow_partial=True)
        )
        want = [i for i in expected_order(len(ds), rank, world, seed=5, epoch=0) if i in sealed]
        assert got == want
