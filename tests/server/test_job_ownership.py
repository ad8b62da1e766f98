"""Who runs a job when several servers share a store: the holder of its dataset's lease.

A store-only server (a read replica) never resumes, fails or changes a job, and the job's own
server resumes it after a restart; a server takes over another's job only once that server's
lease expired. In process (job managers on the reference engine stand for servers), and once
with real server processes (on the reference engine too: who owns a job is the job manager's and
the lease's business, whichever engine computes it).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from declared_use import MESSAGE
from job_managers import USE, last_update, manager, sequences, store_only, until
from reference_server import ReferenceServer

import logitcache
from logitcache.demo.language import generate_documents
from logitcache.server.jobs import JobSpec, JobState
from logitcache.server.launcher import ServerProcess
from logitcache.server.teachers.registry import TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

RPC_S = 120.0
JOB_S = 300.0


def job_document(store: Path, job_id: str) -> dict:
    return json.loads((store / "jobs" / job_id / "job.json").read_text())


def test_a_store_only_server_leaves_a_running_job_alone(
    reference_teachers: TeacherRegistry, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")
    inputs = sequences(seed=11, count=200, lengths=(20, 60))

    async def scenario() -> tuple[str, int, JobState, dict, int]:
        main = manager(url, reference_teachers, segment_positions=400)
        job = await main.submit(JobSpec(use=USE, dataset="shared"), inputs, [])
        await until(lambda: main.get(job.id).sequences_done > 0, "first sealed segment")
        replica = store_only(url)
        try:
            resumed = await replica.resume()
            await asyncio.sleep(0.5)  # a replica that ran the job would have failed it by now
            seen = replica.get(job.id).state
            during = job_document(tmp_path / "store", job.id)
            with pytest.raises(Exception, match="not run by this server"):
                replica.cancel(job.id)
            assert main.get(job.id).state is JobState.RUNNING, "the job ended too soon"
            await main.close()  # the main server stops (a restart): the job stays unfinished
            restarted = manager(url, reference_teachers, segment_positions=400)
            try:
                taken = await restarted.resume()
                done = await last_update(restarted, job.id)
                assert done.state is JobState.COMPLETED, done.error
            finally:
                await restarted.close()
            await replica.refresh()
            assert replica.get(job.id).state is JobState.COMPLETED  # its view follows the store
        finally:
            await replica.close()
        return job.id, resumed, seen, during, taken

    job_id, resumed, seen, during, taken = asyncio.run(scenario())
    assert resumed == 0 and seen is JobState.RUNNING
    assert during["state"] in ("queued", "running") and during["error"] == ""
    assert taken == 1
    ds = logitcache.open_store(url).dataset("shared")
    assert ds.complete and ds.sealed_count() == len(inputs)


def test_a_server_takes_over_a_job_only_after_its_lease_expired(
    reference_teachers: TeacherRegistry, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")
    inputs = sequences(seed=12, count=200, lengths=(20, 60))
    lease_s = 3.0

    async def stalled_owner() -> str:
        """Submit, wait for a sealed segment, then stop without closing: the manager's tasks
        end as a hung server's do, its lease left on disk with its (live) process id."""
        owner = manager(url, reference_teachers, segment_positions=400, lease_s=lease_s)
        job = await owner.submit(JobSpec(use=USE, dataset="taken"), inputs, [])
        await until(lambda: owner.get(job.id).sequences_done > 0, "first sealed segment")
        return job.id

    job_id = asyncio.run(stalled_owner())
    stopped_at = time.monotonic()

    async def other_server() -> tuple[int, float, JobState]:
        other = manager(url, reference_teachers, segment_positions=400, lease_s=lease_s)
        try:
            at_start = await other.resume()
            await until(lambda: job_id in other._owned, "the takeover")
            taken_after = time.monotonic() - stopped_at
            return at_start, taken_after, (await last_update(other, job_id)).state
        finally:
            await other.close()

    at_start, taken_after, state = asyncio.run(other_server())
    assert at_start == 0  # the lease was live when the other server started
    assert taken_after >= lease_s * 0.9
    assert state is JobState.COMPLETED
    assert logitcache.open_store(url).dataset("taken").complete


def wait_job(stub: pb_grpc.LogitCacheStub, job_id: str) -> pb.Job:
    deadline = time.monotonic() + JOB_S
    while True:
        job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=RPC_S)
        if job.state not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
        time.sleep(0.2)


def test_a_read_replica_never_breaks_the_job_of_the_server_it_replicates(
    demo_teacher: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    args = ("--segment-positions", "2000")
    texts = generate_documents(1500, seed=7711)
    main = ReferenceServer(demo_teacher, store, *args, log_path=tmp_path / "main.log")
    try:
        with grpc.insecure_channel(main.target) as channel:
            stub = pb_grpc.LogitCacheStub(channel)
            items = [pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset="replicated"))]
            items += [pb.SubmitJobRequest(text=t) for t in texts]
            job = stub.SubmitJob(iter(items), timeout=RPC_S)
            with ServerProcess(None, store, log_path=tmp_path / "replica.log") as replica:
                with grpc.insecure_channel(replica.target) as replica_channel:
                    seen = pb_grpc.LogitCacheStub(replica_channel).GetJob(
                        pb.GetJobRequest(id=job.id), timeout=RPC_S
                    )
                time.sleep(1.0)  # a replica that ran the job would have failed it by now
                state = stub.GetJob(pb.GetJobRequest(id=job.id), timeout=RPC_S).state
                assert state in ("queued", "running"), f"the job ended ({state}); make it longer"
                main.kill()  # the main server dies while the replica serves
                during = job_document(store, job.id)
        after = job_document(store, job.id)
    finally:
        main.kill()
    assert seen.state in ("queued", "running") and seen.error == ""
    assert during["state"] in ("queued", "running") and during["error"] == ""
    assert after == during  # the replica's stop changed nothing either

    restarted = ReferenceServer(demo_teacher, store, *args, log_path=tmp_path / "restarted.log")
    try:
        with grpc.insecure_channel(restarted.target) as channel:
            done = wait_job(pb_grpc.LogitCacheStub(channel), job.id)
    finally:
        restarted.stop()
    assert done.state == "completed", done.error
    assert done.sequences_done == done.sequences_total == len(texts)
    assert logitcache.open_store(str(store)).dataset("replicated").complete
