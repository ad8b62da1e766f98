"""Leases on both stores, real files and a real PostgreSQL server: between owners of one
process and between real processes.

One owner at a time; renewal keeps it; another owner takes it only once it expired, or at once
when its holder's process on this host is gone (a holder on another host only by expiry); of
many processes acquiring at once exactly one wins. A job whose server was lost is resumed by
another server once the lease in shared state expired.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from logitcache.client.errors import FailedPrecondition
from logitcache.server.leases import (
    FileLeaseStore,
    LeaseStore,
    PostgresLeaseStore,
    busy,
    claimed,
    leases_for,
)

if TYPE_CHECKING:
    from logitcache.server.jobs import JobManager
    from logitcache.server.teachers.registry import TeacherRegistry

SCOPE = "file:///stores/one"  # the store whose leases a PostgreSQL lease store keeps


def open_leases(where: str) -> LeaseStore:
    """The lease store at ``where``: a PostgreSQL URL, or a directory of lease files."""
    if where.startswith("postgresql://"):
        return PostgresLeaseStore(where, SCOPE)
    return FileLeaseStore(Path(where))


@pytest.fixture(params=["files", "postgresql"])
def where(request, tmp_path: Path) -> str:
    return str(tmp_path) if request.param == "files" else request.getfixturevalue("postgres_url")


@pytest.fixture
def leases(where: str) -> Callable[[], LeaseStore]:
    """Makes lease stores (each its own owner) on one place."""
    return lambda: open_leases(where)


def test_one_owner_until_the_lease_expires(leases: Callable[[], LeaseStore]) -> None:
    a, b = leases(), leases()
    assert a.owner != b.owner
    held = a.acquire("datasets/d", 0.6, "job 1")
    assert held is not None and held.note == "job 1" and held.pid == os.getpid()
    assert b.acquire("datasets/d", 0.6, "job 2") is None
    assert b.holder("datasets/d") == held
    assert a.acquire("datasets/d", 0.6, "job 1") is not None  # its own owner again: fine
    time.sleep(0.4)
    assert a.renew("datasets/d", 0.6) is not None  # renewed: still a's after the first expiry
    time.sleep(0.4)
    assert b.acquire("datasets/d", 0.6, "job 2") is None
    time.sleep(0.7)  # no renewal: expired
    assert b.holder("datasets/d") is None
    taken = b.acquire("datasets/d", 0.6, "job 2")
    assert taken is not None and taken.owner == b.owner
    assert a.renew("datasets/d", 0.6) is None  # a learns it lost the lease
    a.release("datasets/d")  # not a's: nothing happens
    assert b.holder("datasets/d") == taken
    b.release("datasets/d")
    assert a.holder("datasets/d") is None


def test_busy_names_the_holder_and_what_to_do(leases: Callable[[], LeaseStore]) -> None:
    a, b = leases(), leases()
    with claimed(a, "datasets/d", "logitcache precompute", what="dataset 'd'", todo="wait"):
        with pytest.raises(FailedPrecondition) as refused:
            with claimed(b, "datasets/d", "other", what="dataset 'd'", todo="wait"):
                pass
    message = str(refused.value)
    assert "logitcache precompute" in message and f"pid {os.getpid()}" in message
    assert message.endswith("; wait")
    assert b.acquire("datasets/d", 5.0, "other") is not None  # released on leaving
    assert "try again" in busy("dataset 'd'", None, "wait")


HOLD = """
import sys, time
from pathlib import Path
from logitcache.server.leases import FileLeaseStore, PostgresLeaseStore
where, scope = sys.argv[1:]
if where.startswith("postgresql://"):
    leases = PostgresLeaseStore(where, scope)
else:
    leases = FileLeaseStore(Path(where))
lease = leases.acquire("datasets/d", 3600.0, "holder")
print("held" if lease else "refused", flush=True)
time.sleep(3600)
"""


def test_a_killed_holder_on_this_host_is_replaced_at_once(where: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", HOLD, where, SCOPE],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        mine = open_leases(where)
        holder = mine.holder("datasets/d")
        assert holder is not None and holder.pid == proc.pid
        assert mine.acquire("datasets/d", 5.0, "me") is None  # an hour left, and it runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert mine.acquire("datasets/d", 5.0, "me") is not None  # its process is gone


def _race(where: str, start: float, queue) -> None:
    leases = open_leases(where)
    while time.time() < start:
        time.sleep(0.001)
    lease = leases.acquire("datasets/d", 60.0, f"racer {os.getpid()}")
    queue.put(lease is not None)
    time.sleep(1.0)  # stay alive: a dead holder's lease would be free again


def test_of_processes_acquiring_at_once_exactly_one_wins(where: str) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start = time.time() + 3.0  # after every racer has started
    racers = [context.Process(target=_race, args=(where, start, queue)) for _ in range(6)]
    for p in racers:
        p.start()
    won = [queue.get(timeout=60) for _ in racers]
    for p in racers:
        p.join(timeout=60)
    assert sum(won) == 1


def test_a_holder_on_another_host_is_freed_only_by_expiry(postgres_url: str) -> None:
    """Its process id means nothing here: a dead-looking pid does not free it early."""
    import psycopg

    a, b = open_leases(postgres_url), open_leases(postgres_url)
    assert a.acquire("datasets/d", 1.5, "elsewhere") is not None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE logitcache.leases SET host = 'another-host', pid = %s", (int(dead),))
    held = b.holder("datasets/d")
    assert held is not None and held.host == "another-host"
    assert b.acquire("datasets/d", 5.0, "me") is None
    time.sleep(1.6)
    assert b.holder("datasets/d") is None
    assert b.acquire("datasets/d", 5.0, "me") is not None


def test_leases_of_two_stores_in_one_database_are_apart(postgres_url: str) -> None:
    one, other = (
        PostgresLeaseStore(postgres_url, "s3://a"),
        PostgresLeaseStore(postgres_url, "s3://b"),
    )
    assert one.acquire("datasets/d", 5.0, "x") is not None
    assert other.acquire("datasets/d", 5.0, "y") is not None
    assert one.holder("datasets/d").note == "x" and other.holder("datasets/d").note == "y"


def test_leases_follow_the_state_url(tmp_path: Path, postgres_url: str) -> None:
    from logitcache.server.store.store import open_store

    store = open_store(str(tmp_path / "store"), writable=True)
    assert isinstance(leases_for(store), FileLeaseStore)
    shared = leases_for(store, state_url=postgres_url)
    assert isinstance(shared, PostgresLeaseStore) and shared.scope == store.url


def test_a_lost_servers_job_is_resumed_by_another_once_its_lease_expired(
    reference_teachers: TeacherRegistry, tmp_path: Path, postgres_url: str
) -> None:
    """Two job managers (servers) on one store, their leases in PostgreSQL. The first stalls
    for good after its first sealed segment, as a server on a lost machine does; the other
    takes its job over only once the lease expired, and the job completes once.

    (The store and job modules are imported here: the racing processes import this module.)"""
    from job_managers import USE, last_update, sequences, until

    from logitcache.server.jobs import JobManager, JobSpec, JobState
    from logitcache.server.metrics import ServerMetrics
    from logitcache.server.store.store import open_store

    url, lease_s = str(tmp_path / "store"), 3.0
    inputs = sequences(seed=21, count=60, lengths=(20, 40))

    def server(owner: str) -> JobManager:
        store = open_store(url, writable=True)
        return JobManager(
            store, reference_teachers, ServerMetrics(), max_running=1, max_in_flight=4,
            segment_positions=200, lease_s=lease_s,
            leases=PostgresLeaseStore(postgres_url, store.url, owner),
        )  # fmt: skip

    async def lost() -> str:
        first = server("replica-a")
        job = await first.submit(JobSpec(use=USE, dataset="moved"), inputs, [])
        await until(lambda: first.get(job.id).sequences_done > 0, "first sealed segment")
        return job.id  # its loop ends here: no renewal, no release, as a lost machine

    job_id = asyncio.run(lost())
    left = open_leases(postgres_url)
    left.scope = open_store(url).url
    held = left.holder("datasets/moved")
    assert held is not None and held.owner == "replica-a"
    lost_at = time.time()

    async def survivor() -> tuple[int, float, JobState]:
        other = server("replica-b")
        try:
            at_start = await other.resume()
            await until(lambda: job_id in other._owned, "the takeover")
            return at_start, time.time(), (await last_update(other, job_id)).state
        finally:
            await other.close()

    at_start, taken_at, state = asyncio.run(survivor())
    assert at_start == 0  # the lost server's lease was still live
    assert taken_at >= held.expires_at > lost_at
    assert state is JobState.COMPLETED
    ds = open_store(url).dataset("moved")
    assert ds.complete and ds.sealed_count() == len(inputs)
