"""SubmitJob is atomic and idempotent: of two servers accepting one dataset name at once exactly
one wins, and a submission retried with its client request id gets the first attempt's job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from job_managers import USE, last_update, manager, sequences

import logitcache
from logitcache.client.client import _Submission
from logitcache.client.errors import AlreadyExists, InvalidArgument
from logitcache.server.jobs import Job, JobSpec, JobState
from logitcache.server.teachers.registry import TeacherRegistry


def test_of_two_servers_submitting_one_name_exactly_one_wins(
    reference_teachers: TeacherRegistry, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")

    async def scenario() -> tuple[list[Job | BaseException], JobState]:
        first, second = manager(url, reference_teachers), manager(url, reference_teachers)
        try:
            outcomes = await asyncio.gather(
                first.submit(JobSpec(use=USE, dataset="once"), sequences(21, 30), []),
                second.submit(JobSpec(use=USE, dataset="once"), sequences(22, 30), []),
                return_exceptions=True,
            )
            (won,) = [o for o in outcomes if isinstance(o, Job)]
            owner = first if won.id in first._jobs else second
            return outcomes, (await last_update(owner, won.id)).state
        finally:
            await first.close()
            await second.close()

    outcomes, state = asyncio.run(scenario())
    assert sum(isinstance(o, Job) for o in outcomes) == 1
    (refused,) = [o for o in outcomes if not isinstance(o, Job)]
    assert isinstance(refused, AlreadyExists), refused
    assert state is JobState.COMPLETED
    assert len(list((tmp_path / "store" / "jobs").iterdir())) == 1  # the loser left nothing
    assert logitcache.open_store(url).dataset("once").complete


def test_a_retried_submission_returns_the_same_job(
    reference_teachers: TeacherRegistry, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")
    inputs = sequences(23, 20)

    def spec() -> JobSpec:
        return JobSpec(use=USE, dataset="retried", client_request_id="request-1")

    async def scenario() -> list[str]:
        jobs = manager(url, reference_teachers)
        try:
            # A retry arriving while the first attempt is still being accepted, one after it
            # was accepted, and one after it ended.
            at_once = await asyncio.gather(
                jobs.submit(spec(), inputs, []), jobs.submit(spec(), inputs, [])
            )
            later = await jobs.submit(spec(), inputs, [])
            await last_update(jobs, later.id)
            ended = await jobs.submit(spec(), inputs, [])
            with pytest.raises(AlreadyExists):  # another request for the name is still refused
                await jobs.submit(JobSpec(use=USE, dataset="retried"), inputs, [])
            with pytest.raises(InvalidArgument, match="client_request_id"):
                await jobs.submit(
                    JobSpec(use=USE, dataset="other", client_request_id="request-1"), inputs, []
                )
            return [j.id for j in (*at_once, later, ended)]
        finally:
            await jobs.close()

    async def after_restart() -> str:
        jobs = manager(url, reference_teachers)  # another server, or this one restarted
        try:
            return (await jobs.submit(spec(), inputs, [])).id
        finally:
            await jobs.close()

    ids = asyncio.run(scenario())
    assert len(set(ids)) == 1
    assert asyncio.run(after_restart()) == ids[0]
    assert [p.name for p in (tmp_path / "store" / "jobs").iterdir()] == ids[:1]


def test_the_client_sends_one_request_id_per_submission_on_every_attempt() -> None:
    def spec_of(submission: _Submission):
        return next(iter(submission.messages())).spec

    one = _Submission("d", texts=["a", "b"], input_ids=None, server_path=None, teacher=None,
                      top_k=None, max_len=None, overflow=None, license=None)  # fmt: skip
    other = _Submission("d", texts=["a", "b"], input_ids=None, server_path=None, teacher=None,
                        top_k=None, max_len=None, overflow=None, license=None)  # fmt: skip
    assert spec_of(one).client_request_id
    assert spec_of(one).client_request_id == spec_of(one).client_request_id  # a retry
    assert spec_of(one).client_request_id != spec_of(other).client_request_id
