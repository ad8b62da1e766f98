"""Job managers on real stores for the in-process job tests (this folder is on ``sys.path``).

Several managers on one store stand for several servers sharing it: each has its own lease
owner, as separate processes do.
"""

from __future__ import annotations

import asyncio

import numpy as np

from logitcache.server.jobs import Job, JobManager
from logitcache.server.metrics import ServerMetrics
from logitcache.server.policy.admission import Admission
from logitcache.server.policy.decision import Purpose, Student, UseRequest
from logitcache.server.store.store import open_store
from logitcache.server.teachers.registry import TeacherRegistry

JOB_S = 120.0  # longest wait for a job (a deadline, not a speed bound)
# The use the core tests declare (every job and read-through declares one; the demo teacher's
# Apache-2.0 licence allows it unconditionally).
USE = UseRequest("", Purpose.RESEARCH, Student("test-student", "test"), "tests")


def sequences(seed: int, count: int, lengths: tuple[int, int] = (3, 40)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 1785, size=int(rng.integers(*lengths))).tolist() for _ in range(count)]


def manager(
    url: str,
    teachers: TeacherRegistry,
    *,
    segment_positions: int = 1 << 16,
    lease_s: float = 30.0,
    admission: Admission | None = None,
) -> JobManager:
    return JobManager(
        open_store(url, writable=True),
        teachers,
        ServerMetrics(),
        max_running=1,
        max_in_flight=4,
        segment_positions=segment_positions,
        lease_s=lease_s,
        admission=admission,
    )


def store_only(url: str, *, lease_s: float = 30.0) -> JobManager:
    """The job manager of a server that runs no teacher (a read replica)."""
    return manager(url, TeacherRegistry([]), lease_s=lease_s)


async def last_update(jobs: JobManager, job_id: str) -> Job:
    """The job as WatchJob last reports it: once it has ended."""
    async with asyncio.timeout(JOB_S):
        updates = [job async for job in jobs.watch(job_id)]
    return updates[-1]


async def until(condition, what: str, timeout: float = JOB_S) -> None:
    """Wait (polling) until ``condition()`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)
