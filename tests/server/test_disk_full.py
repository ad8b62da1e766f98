"""A full disk, on a real 16 MiB tmpfs: typed errors, no silent loss, readiness, clean restarts.

In process, on the reference engine: a read-through cache on a full disk answers, holds what it
answered within its memory bound, and seals it once space returns; a durable request waits for
the seal, or gets the store's error. As real processes: a server's /readyz follows the store,
SubmitJob says RESOURCE_EXHAUSTED, ``logitcache precompute`` prints one line and exits 2, and a
restart removes what dead writers left half-written, and nothing a live writer still writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from counting_engine import REFERENCE_K, CountingEngine
from declared_use import MESSAGE
from declared_use import USE as DECLARED
from job_managers import USE
from reference_server import ReferenceServer
from small_disk import SmallDisk, mounted_small_disk

from logitcache.client import Client
from logitcache.client.errors import ResourceExhausted, Unavailable
from logitcache.client.space import record_key
from logitcache.server.metrics import ServerMetrics
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.liveness import writer_identity
from logitcache.server.store.segments import unsealed_dir
from logitcache.server.store.store import Store, open_store
from logitcache.server.teachers.registry import Teacher, TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

K = REFERENCE_K
WAIT_S = 60.0  # deadline of every wait below (retries back off up to 10 s)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    yield from mounted_small_disk(tmp_path / "disk")


@pytest.fixture
def teacher(reference_teachers: TeacherRegistry) -> Teacher:
    teacher = reference_teachers.get("demo")
    assert isinstance(teacher.engine, CountingEngine)
    return teacher


def sequences(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 1785, size=int(rng.integers(5, 30))) for _ in range(count)]


def cache_on(store: Store, *, max_unsealed_bytes: int = 1 << 28) -> ReadThroughCache:
    return ReadThroughCache(
        store,
        ServerMetrics(),
        segment_positions=1 << 20,
        flush_seconds=0.2,
        loaded=SegmentCache(1 << 26),
        max_unsealed_bytes=max_unsealed_bytes,
    )


def keys_of(teacher: Teacher, seqs: list[np.ndarray]) -> list[bytes]:
    space_id = teacher.space(K).space_id
    return [record_key(space_id, s) for s in seqs]


def sealed(url: str, keys: list[bytes]) -> int:
    """How many of ``keys`` a fresh handle on the store can read."""
    store = open_store(url)
    return sum(store.contains(k) for k in keys)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


def staging_folders(store: Store) -> list[str]:
    return [f for s in store.spaces() for f in store.backend.list_dir(unsealed_dir(s.space_id))]


def test_read_through_on_a_full_disk_answers_and_seals_once_space_returns(
    teacher: Teacher, disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(str(disk.root / "store"), writable=True)
    first, second = sequences(1, 12), sequences(2, 12)
    caplog.set_level(logging.INFO, logger="logitcache.server.store.backend")

    async def scenario() -> None:
        cache = cache_on(store)
        cache.start()
        disk.fill()
        batch, computed = await cache.get(teacher, K, first, use=USE)
        assert computed == len(first) and len(batch.keys) == len(first)  # answered
        await until(lambda: store.backend.health.error is not None, "a seal failed")
        assert isinstance(store.backend.health.error, ResourceExhausted)
        assert "out of space" in str(store.backend.health.error)
        _, computed = await cache.get(teacher, K, second, use=USE)  # still answering
        assert computed == len(second)
        await asyncio.sleep(2.0)  # several retries, all refused
        assert sealed(store.url, keys_of(teacher, first + second)) == 0
        assert staging_folders(store) == []  # failed writes keep no partial folders
        assert cache.unsealed_bytes > 0
        disk.free()
        keys = keys_of(teacher, first + second)
        await until(lambda: sealed(store.url, keys) == len(keys), "everything was sealed")
        # The writer tells the cache on the loop just after a seal becomes visible on disk.
        await until(lambda: cache.unsealed_bytes == 0, "the cache let go of the sealed records")
        await cache.close()

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot be written" in m for m in messages) == 1, messages  # once per episode
    assert sum("accepts writes again" in m for m in messages) == 1, messages


def test_past_the_unsealed_bound_computations_are_unavailable_and_hits_still_answer(
    teacher: Teacher, disk: SmallDisk
) -> None:
    store = open_store(str(disk.root / "store"), writable=True)
    held = sequences(3, 6)

    async def scenario() -> None:
        cache = cache_on(store, max_unsealed_bytes=1)
        cache.start()
        disk.fill()
        await cache.get(teacher, K, held, use=USE)
        # The seal runs behind the answer: the refusal names the store's error once it failed.
        await until(lambda: store.backend.health.error is not None, "the seal failed")
        with pytest.raises(Unavailable, match="waiting to be sealed.*out of space"):
            await cache.get(teacher, K, sequences(4, 3), use=USE)
        before = cache.unsealed_bytes
        _, computed = await cache.get(teacher, K, held, use=USE)  # answered from memory
        assert computed == 0 and cache.unsealed_bytes == before
        disk.free()
        await until(lambda: cache.unsealed_bytes == 0, "the held records were sealed")
        _, computed = await cache.get(teacher, K, sequences(4, 3), use=USE)  # room again
        assert computed == 3
        await cache.close()

    asyncio.run(scenario())


def test_a_durable_request_is_answered_once_sealed_or_gets_the_stores_error(
    teacher: Teacher, disk: SmallDisk
) -> None:
    store = open_store(str(disk.root / "store"), writable=True)
    ok, refused = sequences(5, 5), sequences(6, 5)

    async def scenario() -> None:
        cache = ReadThroughCache(
            store, ServerMetrics(), segment_positions=1 << 20, flush_seconds=3600.0,
            loaded=SegmentCache(1 << 26), max_unsealed_bytes=1 << 28,
        )  # fmt: skip
        cache.start()
        await cache.get(teacher, K, ok, durable=True, use=USE)
        assert sealed(store.url, keys_of(teacher, ok)) == len(ok)  # not an hour later
        disk.fill()
        with pytest.raises(ResourceExhausted, match="out of space"):
            await cache.get(teacher, K, refused, durable=True, use=USE)
        disk.free()
        _, computed = await cache.get(
            teacher, K, refused, durable=True, use=USE
        )  # the same request
        assert computed == 0  # held, not computed again
        assert sealed(store.url, keys_of(teacher, refused)) == len(refused)
        await cache.close()

    asyncio.run(scenario())


def ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http_url}/readyz", timeout=10) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        assert e.code == 503
        return False


def wait_ready(http_url: str, want: bool) -> None:
    deadline = time.monotonic() + WAIT_S
    while ready(http_url) != want:
        assert time.monotonic() < deadline, f"/readyz did not turn {want}"
        time.sleep(0.1)


def test_server_on_a_full_disk_answers_turns_unready_and_recovers(
    demo_teacher: Path, disk: SmallDisk, tmp_path: Path
) -> None:
    store_dir = disk.root / "store"
    seqs = [list(map(int, s)) for s in sequences(7, 8)]
    log_path = tmp_path / "serve.log"  # not on the disk that fills
    # Nor is the policy state with its audit log: a server refuses calls it cannot audit.
    state = ("--state-dir", str(tmp_path / "state"))
    with ReferenceServer(
        demo_teacher, store_dir, "--flush-seconds", "0.2", *state, log_path=log_path
    ) as server:
        wait_ready(server.http_url, True)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LogitCacheStub(channel)
            disk.fill()
            request = pb.DistributionsRequest(
                use=MESSAGE, sequences=[pb.Sequence(input_ids=s) for s in seqs]
            )
            (answer,) = list(stub.GetDistributions(iter([request]), timeout=60))
            assert answer.computed == len(seqs)
            wait_ready(server.http_url, False)
            job = iter([pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset="full")),
                        pb.SubmitJobRequest(text="a text to compute later")])  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                stub.SubmitJob(job, timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, server.log_tail()
            assert "out of space" in refused.value.details()
            disk.free()
            wait_ready(server.http_url, True)
        keys = [record_key(answer.records.space_id, np.asarray(s)) for s in seqs]
        deadline = time.monotonic() + WAIT_S
        while sealed(str(store_dir), keys) < len(keys):
            assert time.monotonic() < deadline, "answered records were never sealed"
            time.sleep(0.1)
        log = server.log_tail(200_000)
    assert log.count("cannot be written") == 1, log
    assert "Traceback" not in log, log


def test_precompute_on_a_full_disk_prints_one_line_and_exits_2(
    demo_teacher: Path, disk: SmallDisk, tmp_path: Path
) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": "a short text"}) + "\n")
    disk.fill()
    done = subprocess.run(
        [sys.executable, "-P", "-m", "logitcache.cli", "precompute", "--teacher",
         str(demo_teacher), "--data", str(data), "--out", str(disk.root / "store"),
         "--dataset", "full", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "out of space" in lines[0], done.stderr


def test_start_up_removes_only_what_provably_dead_writers_left(
    demo_teacher: Path, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    open_store(str(store_dir), writable=True)
    staging = store_dir / "spaces" / "s0" / "unsealed"  # a space being created: no space.json

    def folder(name: str, identity: dict | None, age_s: float = 0.0) -> None:
        path = staging / name
        path.mkdir(parents=True)
        if identity is not None:
            (path / "writer.json").write_text(json.dumps(identity))
        then = time.time() - age_s
        os.utime(path, (then, then))

    dead = subprocess.run(
        [sys.executable, "-P", "-c", "import json; from logitcache.server.store.liveness "
         "import writer_identity; print(json.dumps(writer_identity()))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    folder("dead-writer", json.loads(dead.stdout))
    folder("live-writer", writer_identity())
    folder("reused-pid", {**writer_identity(), "process_start": "1"})
    folder("unnamed-old", None, age_s=7200)
    folder("unnamed-new", None)
    folder("other-host", {**writer_identity(), "host": "elsewhere"})
    server = ReferenceServer(demo_teacher, store_dir)
    server.stop()
    assert sorted(p.name for p in staging.iterdir()) == ["live-writer", "other-host", "unnamed-new"]


def test_the_clients_durable_option_answers_once_the_records_are_sealed(
    demo_teacher: Path, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    seqs = [list(map(int, s)) for s in sequences(8, 6)]
    with ReferenceServer(demo_teacher, store_dir, "--flush-seconds", "3600") as server:
        with Client(server.target, use=DECLARED) as client:
            records = client.get_distributions(seqs, durable=True)
        space_id = open_store(str(store_dir)).spaces()[0].space_id
        keys = [record_key(space_id, np.asarray(s)) for s in seqs]
        assert len(records) == len(seqs)
        assert sealed(str(store_dir), keys) == len(keys)  # an hour before the flush
