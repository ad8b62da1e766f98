"""One precompute per dataset at a time: a second one is refused, naming the first's pid and host,
before it starts an engine or computes anything; once the first is done, a rerun reuses it all.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest
from counting_engine import CountingEngine
from job_managers import USE, manager, sequences

from logitcache.client.errors import AlreadyExists, FailedPrecondition
from logitcache.server.jobs import JobSpec
from logitcache.server.precompute import PrecomputeRequest, PrecomputeResult, precompute
from logitcache.server.teachers.registry import TeacherRegistry


def test_a_second_precompute_of_a_dataset_being_built_is_refused(
    demo_teacher: Path, reference_teachers: TeacherRegistry, tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    rows = sequences(seed=51, count=150, lengths=(20, 60))
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in rows))
    url = str(tmp_path / "store")
    req = PrecomputeRequest(
        teacher=str(demo_teacher), data=data, out=url, dataset="once", top_k=8,
        segment_positions=600, progress=False,
    )  # fmt: skip
    engines: list[CountingEngine] = []

    def factory(info, options) -> CountingEngine:
        engines.append(CountingEngine(info, options))
        return engines[-1]

    async def scenario() -> tuple[PrecomputeResult, PrecomputeResult]:
        progress: list[int] = []
        first = asyncio.create_task(
            precompute(req, engine_factory=factory, on_progress=lambda s, p: progress.append(s))
        )
        async with asyncio.timeout(120):
            while not progress:
                await asyncio.sleep(0.02)
        with pytest.raises(FailedPrecondition) as refused:
            await precompute(req, engine_factory=factory)
        message = str(refused.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "logitcache precompute" in message and "rerun this command" in message
        jobs = manager(url, reference_teachers)
        try:  # a server job for the same name is refused too
            with pytest.raises(AlreadyExists, match="logitcache precompute"):
                await jobs.submit(JobSpec(use=USE, dataset="once"), rows, [])
        finally:
            await jobs.close()
        done = await first
        return done, await precompute(req, engine_factory=factory)

    done, rerun = asyncio.run(scenario())
    assert len(engines) == 1  # the refused run started none
    assert sum(engines[0].computed.values()) == len(rows)  # each sequence computed once
    assert done.computed_sequences == len(rows)
    assert rerun.computed_sequences == 0
