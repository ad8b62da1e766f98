"""Read-through retention: unreferenced records under a size and an age budget, least recently
used evicted first, never a referenced record; passes run off the event loop and are counted in
the server's metrics. Real Zarr stores in temporary directories."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from declared_use import USE as DECLARED
from job_managers import USE
from reference_server import ReferenceServer
from test_core_readthrough import K, cache_on, sequences
from test_gc import SPACE, create_dataset, readable, records

from logitcache.client import Client
from logitcache.client.space import record_key
from logitcache.server.app import read_through_retention
from logitcache.server.config import ServerConfig, TeacherConfig
from logitcache.server.metrics import ServerMetrics
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.store import gc
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.retention import (
    ACCESS_TIMES,
    ReadThroughRetention,
    RetentionBudget,
    RetentionPass,
)
from logitcache.server.store.store import Store, open_store
from logitcache.server.teachers.registry import Teacher, TeacherRegistry


@pytest.fixture
def teacher(reference_teachers: TeacherRegistry) -> Teacher:
    return reference_teachers.get("demo")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(path: Path) -> Store:
    return open_store(str(path), writable=True)


def seal_cached(store: Store, count: int) -> list[str]:
    """``count`` unreferenced one-record segments (read-through results), oldest first."""
    return [store.write_segment(SPACE, records(1000 + i)) for i in range(count)]


def on_disk(path: Path) -> set[str]:
    return set(os.listdir(path / "spaces" / SPACE.space_id / "segments"))


def sizes(store: Store) -> dict[str, int]:
    return {s.segment_id: s.stored_bytes for s in store.segments()}


def retention(
    store: Store, *, grace_s: float = 0.0, max_bytes: int = 0, max_age_s: float = 0.0
) -> ReadThroughRetention:
    budget = RetentionBudget(max_bytes=max_bytes, max_age_s=max_age_s, min_idle_s=0.0)
    return ReadThroughRetention(store, budget, grace_s=grace_s)


def unreferenced_bytes(url: str) -> int:
    return sum(u.segment.stored_bytes for u in gc.segment_uses(open_store(url)) if u.unreferenced)


def test_size_budget_evicts_least_recently_used_first(path: Path, store: Store) -> None:
    ids = seal_cached(store, 6)
    used = records(1, 2)
    store.write_segment(SPACE, used)
    create_dataset(store, "ds", used)
    size = sizes(store)
    now = time.time()
    # Least recently used: 1, 3, 5, then 0, 2, 4 (hits, not seal order, decide)
    recency = [ids[1], ids[3], ids[5], ids[0], ids[2], ids[4]]
    keep = retention(store, max_bytes=sum(size[s] for s in recency[3:]) + 1)
    for age, segment_id in zip(range(60, 0, -10), recency, strict=True):
        keep.access.touch([segment_id], now - age)

    result = keep.run_once()

    assert result is not None
    assert on_disk(path) & set(ids) == set(recency[3:])
    assert unreferenced_bytes(str(path)) <= keep.budget.max_bytes
    assert result.retained_bytes == unreferenced_bytes(str(path))
    assert (result.evicted_segments, result.evicted_bytes) == (3, sum(size[s] for s in recency[:3]))
    assert readable(str(path), "ds")


def test_records_a_dataset_references_are_never_evicted(path: Path, store: Store) -> None:
    used = records(1, 2)
    store.write_segment(SPACE, used)
    create_dataset(store, "ds", used)
    ids = seal_cached(store, 2)

    result = retention(store, max_bytes=1).run_once()

    assert result is not None and result.evicted_segments == 2
    assert on_disk(path).isdisjoint(ids) and len(on_disk(path)) == 1
    assert readable(str(path), "ds")


def test_age_budget_evicts_what_was_not_hit_for_that_long(path: Path, store: Store) -> None:
    stale, fresh = seal_cached(store, 2)
    keep = retention(store, max_age_s=100.0)
    keep.access.touch([stale], time.time() - 1000)  # a hit long ago; ``fresh`` was just sealed
    keep.run_once()
    assert on_disk(path) == {fresh}


def test_recently_used_segments_are_kept_past_the_budget(path: Path, store: Store) -> None:
    """In-flight reads of a just-sealed or just-hit segment must not find it gone."""
    ids = seal_cached(store, 2)
    budget = RetentionBudget(max_bytes=1, min_idle_s=3600.0)
    ReadThroughRetention(store, budget, grace_s=0.0).run_once()
    assert on_disk(path) == set(ids)


def test_evicted_segments_are_deleted_one_grace_period_later(path: Path, store: Store) -> None:
    old, new = seal_cached(store, 2)
    other_server = open_store(str(path))  # another server reading the same store
    keep = retention(store, grace_s=0.5, max_bytes=sizes(store)[new])
    keep.access.touch([old], time.time() - 60)

    first = keep.run_once()
    assert first is not None and (first.condemned_segments, first.evicted_segments) == (1, 0)
    assert on_disk(path) == {old, new}  # condemned, still on disk for readers that lag
    assert store.find(records(1000)[0].key) is None  # this server stopped using it at once
    other_server.refresh()
    assert other_server.find(records(1000)[0].key) is None  # the other one at its refresh

    time.sleep(0.6)
    second = keep.run_once()
    assert second is not None and second.evicted_segments == 1
    assert on_disk(path) == {new}


def test_access_times_survive_a_restart(path: Path, store: Store) -> None:
    ids = seal_cached(store, 3)
    first = retention(store, max_bytes=1 << 40)
    now = time.time()
    for segment_id, age in ((ids[1], 30), (ids[2], 20), (ids[0], 10)):  # the oldest hit last
        first.access.touch([segment_id], now - age)
    first.run_once()
    assert (path / ACCESS_TIMES).exists()

    restarted = open_store(str(path), writable=True)
    size = sizes(restarted)
    second = retention(restarted, max_bytes=size[ids[0]] + 1)
    second.run_once()
    assert on_disk(path) == {ids[0]}


def test_metrics_report_each_pass(path: Path, store: Store) -> None:
    ids = seal_cached(store, 3)
    metrics = ServerMetrics()
    size = sizes(store)

    def report(p: RetentionPass) -> None:
        metrics.record_retention(p.retained_bytes, p.evicted_segments, p.evicted_bytes)

    keep = ReadThroughRetention(
        store, RetentionBudget(max_bytes=size[ids[2]], min_idle_s=0.0), grace_s=0.0, on_pass=report
    )
    keep.run_once()
    text = metrics.render()[0].decode()
    assert f"logitcache_readthrough_retained_bytes {float(size[ids[2]])}" in text
    assert "logitcache_readthrough_evicted_segments_total 2.0" in text
    assert (
        f"logitcache_readthrough_evicted_bytes_total {float(size[ids[0]] + size[ids[1]])}" in text
    )


def test_periodic_passes_run_off_the_event_loop(path: Path, store: Store) -> None:
    seal_cached(store, 3)
    threads: list[threading.Thread] = []
    keep = ReadThroughRetention(
        store,
        RetentionBudget(max_bytes=1, min_idle_s=0.0),
        grace_s=0.0,
        on_pass=lambda p: threads.append(threading.current_thread()),
    )

    async def scenario() -> threading.Thread:
        task = asyncio.get_running_loop().create_task(keep.run_periodically(0.05))
        deadline = time.monotonic() + 30
        while on_disk(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        return threading.current_thread()

    loop_thread = asyncio.run(scenario())
    assert on_disk(path) == set()
    assert threads and loop_thread not in threads


def test_read_through_hits_count_as_use(teacher: Teacher, path: Path, store: Store) -> None:
    """A sequence clients keep asking for outlives one computed after it and never asked again."""
    popular, later = sequences(seed=5, count=1), sequences(seed=6, count=1)
    keep = retention(store)

    async def scenario() -> None:
        for batch in (popular, later):  # two segments, ``popular`` sealed first
            cache = cache_on(store)
            await cache.get(teacher, K, batch, use=USE)
            await cache.close()
        hits = ReadThroughCache(
            store,
            ServerMetrics(),
            segment_positions=1 << 20,
            flush_seconds=3600.0,
            loaded=SegmentCache(1 << 28),
            max_unsealed_bytes=1 << 28,
            on_hits=keep.touch,
        )
        _, computed = await hits.get(teacher, K, popular, use=USE)
        assert computed == 0
        await hits.close()

    asyncio.run(scenario())
    space = teacher.space(K)
    popular_key, later_key = (record_key(space.space_id, s[0]) for s in (popular, later))
    held = store.find(popular_key)
    assert held is not None
    keep.budget = RetentionBudget(max_bytes=held.segment.stored_bytes, min_idle_s=0.0)
    keep.run_once()
    fresh = open_store(str(path))
    assert fresh.contains(popular_key) and not fresh.contains(later_key)


def test_hits_are_recorded_by_the_hook(path: Path, store: Store) -> None:
    ids = seal_cached(store, 2)
    keep = retention(store, max_bytes=1)
    before = time.time()
    keep.touch([records(1001)[0].key, bytes(16)])  # a hit, and a key the store lacks
    used = {u.segment.segment_id: keep.access.last_used(u) for u in gc.segment_uses(store)}
    assert used[ids[1]] >= before > used[ids[0]]


def test_the_server_retains_only_when_it_computes_and_a_budget_is_set(path: Path) -> None:
    store = open_store(str(path), writable=True)
    teacher = [TeacherConfig("t", "somewhere")]
    metrics = ServerMetrics()
    bounded = ServerConfig(store=str(path), teachers=teacher, readthrough_retention_bytes=1 << 30)
    assert read_through_retention(store, bounded, metrics) is not None
    replica = ServerConfig(store=str(path), readthrough_retention_bytes=1 << 30)
    assert read_through_retention(store, replica, metrics) is None
    unbounded = ServerConfig(store=str(path), teachers=teacher)
    assert read_through_retention(store, unbounded, metrics) is None


def test_a_pass_waits_for_a_running_gc(path: Path, store: Store) -> None:
    seal_cached(store, 1)
    with gc.collector_lock(store.backend):
        assert retention(store, max_bytes=1).run_once() is None
    assert len(on_disk(path)) == 1


EVICTED = "logitcache_readthrough_evicted_segments_total"


def test_a_server_keeps_its_read_through_results_under_the_budget(
    demo_teacher: Path, tmp_path: Path
) -> None:
    """``logitcache serve`` in its own process: results it computed and sealed are evicted by
    its periodic passes, the figures reach /metrics, and what it keeps fits the budget."""
    path = tmp_path / "store"
    flags = ("--flush-seconds", "0.1", "--readthrough-retention-bytes", "1",
             "--readthrough-retention-interval", "0.3")  # fmt: skip
    with (
        ReferenceServer(demo_teacher, path, *flags) as server,
        Client(server.target, use=DECLARED) as client,
    ):
        for seed in range(3):  # three segments, sealed by time
            client.get_distributions([s.tolist() for s in sequences(seed=seed, count=2)])
            time.sleep(0.3)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10).read().decode()
            figures = {
                name: float(value)
                for name, _, value in (line.partition(" ") for line in text.splitlines())
                if name.startswith("logitcache_readthrough_")
            }
            if not list(path.glob("spaces/*/segments/*")) and figures[EVICTED] > 0:
                break
            time.sleep(0.2)
    assert list(path.glob("spaces/*/segments/*")) == [], server.log_tail()
    assert figures[EVICTED] >= 3  # each request's results were sealed apart
    assert figures["logitcache_readthrough_evicted_bytes_total"] > 0
    assert figures["logitcache_readthrough_retained_bytes"] == 0
