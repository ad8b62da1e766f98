"""Precompute jobs in process, on the transformers reference engine and real Zarr stores.

A job builds its dataset with the right keys in input order; a cancelled job stops and says so;
a manager abandoned mid-job (as a crash leaves it) is resumed by the next one on the same store,
which finishes the dataset without recomputing what was sealed; a refused submission leaves
nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from counting_engine import REFERENCE_K, CountingEngine
from job_managers import JOB_S, USE, last_update, manager, sequences

import logitcache
from logitcache.client.errors import AlreadyExists, InvalidArgument
from logitcache.client.space import record_key
from logitcache.server.jobs import Job, JobSpec, JobState
from logitcache.server.policy.admission import Admission
from logitcache.server.teachers.registry import TeacherRegistry

K = REFERENCE_K


@pytest.fixture
def teachers(reference_teachers: TeacherRegistry) -> TeacherRegistry:
    return reference_teachers


@pytest.fixture
def engine(teachers: TeacherRegistry) -> CountingEngine:
    engine = teachers.get("demo").engine
    assert isinstance(engine, CountingEngine)
    engine.computed.clear()
    return engine


def expected_keys(teachers: TeacherRegistry, inputs: list[list[int]]) -> list[str]:
    space = teachers.get("demo").space(K)
    return [record_key(space.space_id, np.asarray(s)).hex() for s in inputs]


def test_a_job_builds_its_dataset_in_input_order(teachers, engine, tmp_path):
    url = str(tmp_path / "store")
    inputs = sequences(seed=1, count=20)
    inputs.append(inputs[3])  # a repeated sequence is one record, computed once

    async def scenario() -> tuple[Job, Job]:
        jobs = manager(url, teachers)
        try:
            accepted = await jobs.submit(JobSpec(use=USE, dataset="built"), inputs, [])
            return accepted, await last_update(jobs, accepted.id)
        finally:
            await jobs.close()

    accepted, done = asyncio.run(scenario())
    assert accepted.spec.teacher == "demo" and accepted.spec.top_k == K
    assert accepted.sequences_total == len(inputs)
    assert accepted.positions_total == sum(len(s) for s in inputs)
    assert done.state is JobState.COMPLETED, done.error
    assert done.positions_done == done.positions_total and done.eta_seconds == 0
    ds = logitcache.open_store(url).dataset("built")
    assert ds.complete and ds.keys == expected_keys(teachers, inputs)
    for i, ids in enumerate(inputs):
        np.testing.assert_array_equal(ds[i].input_ids, ids)
    assert sorted(engine.computed.values()) == [1] * (len(inputs) - 1)
    saved = json.loads((tmp_path / "store" / "jobs" / done.id / "job.json").read_text())
    assert saved["state"] == "completed" and saved["spec"]["dataset"] == "built"


def test_a_job_reads_a_directory_of_shards_from_the_server(teachers, engine, tmp_path):
    url = str(tmp_path / "store")
    inputs = sequences(seed=5, count=9)
    shards = tmp_path / "shards"
    shards.mkdir()
    for n, part in enumerate((inputs[:4], inputs[4:])):  # read in name order: part-0, part-1
        rows = "".join(json.dumps({"input_ids": ids}) + "\n" for ids in part)
        (shards / f"part-{n}.jsonl").write_text(rows)

    async def scenario() -> Job:
        jobs = manager(url, teachers, admission=Admission(input_roots=(shards,)))
        try:
            accepted = await jobs.submit(
                JobSpec(use=USE, dataset="sharded", server_path=str(shards)), [], []
            )
            return await last_update(jobs, accepted.id)
        finally:
            await jobs.close()

    done = asyncio.run(scenario())
    assert done.state is JobState.COMPLETED, done.error
    assert logitcache.open_store(url).dataset("sharded").keys == expected_keys(teachers, inputs)


def test_a_cancelled_job_stops_and_stays_cancelled(teachers, engine, tmp_path):
    url = str(tmp_path / "store")
    inputs = sequences(seed=2, count=400, lengths=(100, 200))

    async def scenario() -> tuple[Job, int, int]:
        # Small segments: progress counts sealed work, so the first update comes with a seal.
        jobs = manager(url, teachers, segment_positions=2000)
        try:
            job = await jobs.submit(JobSpec(use=USE, dataset="cancelled"), inputs, [])
            async with asyncio.timeout(JOB_S):
                async for update in jobs.watch(job.id):
                    if update.sequences_done > 0:
                        break
            cancelled = jobs.cancel(job.id)
            at_cancel = engine.computed.total()
            await asyncio.sleep(0.5)  # a job still running would go on computing meanwhile
            return cancelled, at_cancel, engine.computed.total()
        finally:
            await jobs.close()

    job, at_cancel, later = asyncio.run(scenario())
    assert job.state is JobState.CANCELLED and job.finished_at >= job.started_at > 0
    assert later <= at_cancel + 4  # at most the sequences already in the engine finish
    assert later < len(inputs)
    assert not logitcache.open_store(url).dataset("cancelled").complete
    saved = json.loads((tmp_path / "store" / "jobs" / job.id / "job.json").read_text())
    assert saved["state"] == "cancelled"


def test_an_abandoned_job_resumes_in_the_next_manager(teachers, engine, tmp_path):
    url = str(tmp_path / "store")
    inputs = sequences(seed=3, count=200, lengths=(20, 60))

    async def crash_midway() -> str:
        """Submit, wait for two sealed segments, then return without closing the manager:
        leaving asyncio.run stops its task as a crash would, with nothing marked ended. Its
        lease is short: a dead process's lease is free at once, but this process lives on."""
        jobs = manager(url, teachers, segment_positions=400, lease_s=0.5)
        job = await jobs.submit(JobSpec(use=USE, dataset="resumed"), inputs, [])
        deadline = time.monotonic() + JOB_S
        while len(logitcache.open_store(url).segments()) < 2:
            assert time.monotonic() < deadline, "no two sealed segments in time"
            await asyncio.sleep(0.02)
        assert jobs.get(job.id).state is JobState.RUNNING, "the job ended before the crash"
        return job.id

    job_id = asyncio.run(crash_midway())
    time.sleep(0.6)  # the crashed manager's lease expires
    saved = json.loads((tmp_path / "store" / "jobs" / job_id / "job.json").read_text())
    assert saved["state"] == "running"
    partial = logitcache.open_store(url).dataset("resumed")
    sealed_before = partial.sealed_count()
    assert not partial.complete and 0 < sealed_before < len(inputs)
    computed_before = engine.computed.total()
    engine.computed.clear()

    async def restart() -> tuple[int, Job]:
        jobs = manager(url, teachers, segment_positions=400)
        try:
            resumed = await jobs.resume()
            return resumed, await last_update(jobs, job_id)
        finally:
            await jobs.close()

    resumed, done = asyncio.run(restart())
    assert resumed == 1
    assert done.state is JobState.COMPLETED, done.error
    assert done.sequences_done == done.sequences_total == len(inputs)
    ds = logitcache.open_store(url).dataset("resumed")
    assert ds.complete and ds.keys == expected_keys(teachers, inputs)
    assert ds.sealed_count() == len(inputs)
    # What was sealed before the crash is not computed again.
    assert engine.computed.total() <= len(inputs) - sealed_before
    assert computed_before + engine.computed.total() >= len(inputs)


def test_a_refused_submission_leaves_nothing_behind(teachers, engine, tmp_path):
    url = str(tmp_path / "store")
    store_dir = tmp_path / "store"

    async def scenario() -> str:
        jobs = manager(url, teachers)
        try:
            with pytest.raises(InvalidArgument, match="outside the teacher's vocabulary"):
                await jobs.submit(JobSpec(use=USE, dataset="bad"), [[5, 6, 7], [5, 1785]], [])
            with pytest.raises(InvalidArgument, match="overflow"):
                await jobs.submit(JobSpec(use=USE, dataset="bad", overflow="wrap"), [[5, 6]], [])
            with pytest.raises(InvalidArgument, match="server_path"):
                await jobs.submit(JobSpec(use=USE, dataset="bad"), [], [])
            # Two submissions of one name at once: the second is refused while the first is
            # still being checked.
            first, second = await asyncio.gather(
                jobs.submit(JobSpec(use=USE, dataset="twice"), [[5, 6, 7]], []),
                jobs.submit(JobSpec(use=USE, dataset="twice"), [[8, 9]], []),
                return_exceptions=True,
            )
            assert isinstance(first, Job) and isinstance(second, AlreadyExists), (first, second)
            assert (await last_update(jobs, first.id)).state is JobState.COMPLETED
            return first.id
        finally:
            await jobs.close()

    job_id = asyncio.run(scenario())
    assert [p.name for p in (store_dir / "jobs").iterdir()] == [job_id]
    assert logitcache.open_store(url).datasets() == ["twice"]
    assert engine.computed.total() == 1
