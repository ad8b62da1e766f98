"""A job's progress counts sealed work only: what a crash at that moment would keep."""

from __future__ import annotations

import asyncio
from pathlib import Path

from job_managers import JOB_S, USE, manager, sequences

from logitcache.server.jobs import JobSpec, JobState
from logitcache.server.teachers.registry import TeacherRegistry


def test_sequences_done_never_runs_ahead_of_what_is_sealed(
    reference_teachers: TeacherRegistry, tmp_path: Path
) -> None:
    inputs = sequences(seed=31, count=120, lengths=(20, 60))

    async def scenario() -> list[tuple[int, int]]:
        jobs = manager(str(tmp_path / "store"), reference_teachers, segment_positions=600)
        seen = []
        try:
            job = await jobs.submit(JobSpec(use=USE, dataset="progress"), inputs, [])
            async with asyncio.timeout(JOB_S):
                async for update in jobs.watch(job.id):
                    if update.state is JobState.RUNNING and update.sequences_done:
                        sealed = jobs.store.dataset("progress").sealed_count()
                        seen.append((update.sequences_done, sealed))
            assert jobs.get(job.id).state is JobState.COMPLETED
        finally:
            await jobs.close()
        return seen

    seen = asyncio.run(scenario())
    assert len(seen) >= 2  # several segments were sealed while it ran
    assert all(done <= sealed for done, sealed in seen), seen
