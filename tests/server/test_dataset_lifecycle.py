"""A dataset whose job was cancelled or is stuck can be finished as partial, resumed, or deleted:
in the core (job managers on the reference engine, real stores) and with the offline commands.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
from counting_engine import CountingEngine
from job_managers import USE, last_update, manager, sequences, until

import logitcache
from logitcache.cli import main
from logitcache.client.errors import FailedPrecondition, NotFound
from logitcache.client.space import record_key
from logitcache.server.dataset_lifecycle import delete_dataset, finish_dataset
from logitcache.server.jobs import JobSpec, JobState
from logitcache.server.teachers.registry import TeacherRegistry


@pytest.fixture
def engine(reference_teachers: TeacherRegistry) -> CountingEngine:
    engine = reference_teachers.get("demo").engine
    assert isinstance(engine, CountingEngine)
    engine.computed.clear()
    return engine


def test_a_cancelled_jobs_dataset_is_finished_resumed_and_deleted(
    reference_teachers: TeacherRegistry, engine: CountingEngine, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")
    inputs = sequences(seed=41, count=150, lengths=(20, 60))

    async def scenario() -> None:
        jobs = manager(url, reference_teachers, segment_positions=600)
        try:
            job = await jobs.submit(JobSpec(use=USE, dataset="stuck"), inputs, [])
            await until(lambda: jobs.get(job.id).sequences_done > 0, "a sealed segment")
            with pytest.raises(FailedPrecondition, match=f"job {job.id}.*pid {os.getpid()}"):
                finish_dataset(jobs.store, "stuck")  # its job holds it
            with pytest.raises(FailedPrecondition, match="cancel its job"):
                delete_dataset(jobs.store, "stuck")
            jobs.cancel(job.id)
            await until(lambda: job.id not in jobs._owned, "the cancelled job to let go")

            end = await asyncio.to_thread(finish_dataset, jobs.store, "stuck")
            ds = logitcache.open_store(url).dataset("stuck")
            assert (end.state, end.ended_jobs) == ("partial", [])
            assert ds.manifest["state"] == "partial" and not ds.complete
            sealed = ds.sealed_count()
            assert 0 < sealed < len(inputs)
            with pytest.raises(FailedPrecondition, match="partial already"):
                finish_dataset(jobs.store, "stuck")
            engine.computed.clear()

            resumed = await jobs.resume_dataset("stuck")
            assert resumed.id == job.id and resumed.state is JobState.QUEUED
            done = await last_update(jobs, job.id)
            assert done.state is JobState.COMPLETED, done.error
            assert done.sequences_done == len(inputs)
            assert logitcache.open_store(url).dataset("stuck").complete
            assert engine.computed.total() <= len(inputs) - sealed  # sealed work is kept
            with pytest.raises(FailedPrecondition, match="complete"):
                await jobs.resume_dataset("stuck")

            end = await asyncio.to_thread(delete_dataset, jobs.store, "stuck")
            assert end.state == "deleted"
            with pytest.raises(NotFound):
                await jobs.resume_dataset("stuck")
            # The name is free again; the records stay for gc.
            again = await jobs.submit(JobSpec(use=USE, dataset="stuck"), inputs[:3], [])
            assert (await last_update(jobs, again.id)).state is JobState.COMPLETED
        finally:
            await jobs.close()

    asyncio.run(scenario())
    store = logitcache.open_store(url)
    space = reference_teachers.get("demo").space(8)
    assert all(store.contains(record_key(space.space_id, np.asarray(s))) for s in inputs)
    assert len(store.dataset("stuck")) == 3


def test_the_offline_commands_end_a_stuck_dataset(
    reference_teachers: TeacherRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(tmp_path / "store")
    inputs = sequences(seed=42, count=150, lengths=(20, 60))

    async def crash_midway() -> str:
        """A server that stops without a word (its lease expires at once: lease_s 0.3)."""
        jobs = manager(url, reference_teachers, segment_positions=600, lease_s=0.3)
        job = await jobs.submit(JobSpec(use=USE, dataset="orphan"), inputs, [])
        await until(lambda: jobs.get(job.id).sequences_done > 0, "a sealed segment")
        return job.id

    job_id = asyncio.run(crash_midway())
    asyncio.run(asyncio.sleep(0.4))
    document = tmp_path / "store" / "jobs" / job_id / "job.json"
    assert json.loads(document.read_text())["state"] == "running"

    assert main(["datasets", "finish", "orphan", "--store", url]) == 0
    assert capsys.readouterr().out == f"dataset orphan: partial (cancelled job {job_id})\n"
    saved = json.loads(document.read_text())
    assert saved["state"] == "cancelled" and "finished as partial" in saved["error"]

    assert main(["datasets", "resume", "orphan", "--store", url]) == 2
    assert "rerun the `logitcache precompute` command" in capsys.readouterr().err
    assert main(["datasets", "delete", "orphan", "--store", url]) == 0
    assert capsys.readouterr().out == "dataset orphan: deleted\n"
    assert logitcache.open_store(url).datasets() == []
    assert main(["datasets", "delete", "orphan", "--store", url]) == 2
    assert "not in store" in capsys.readouterr().err
