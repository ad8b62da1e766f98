"""FinishDataset, ResumeDataset, DeleteDataset and SubmitJob's client request id over gRPC, with
the client and the `logitcache datasets` commands, against a real server process on the
reference engine.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from declared_use import MESSAGE, USE
from job_managers import sequences
from reference_server import ReferenceServer

from logitcache.cli import main
from logitcache.client.client import Client
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

RPC_S = 60.0


def until_allowed(call, timeout: float = 60.0):
    """``call()``, retried while it is FAILED_PRECONDITION because the lease is still held (a
    cancelled job lets go of it once its last segment is sealed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            held = e.code() == grpc.StatusCode.FAILED_PRECONDITION and "held by" in e.details()
            if not held or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_cancelled_dataset_is_finished_resumed_and_deleted_over_grpc(
    demo_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = sequences(seed=61, count=300, lengths=(20, 60))
    with ReferenceServer(demo_teacher, tmp_path / "store", "--segment-positions", "600") as server:
        with Client(server.target, timeout=RPC_S, use=USE) as client:
            job_id = client.precompute("rpc", input_ids=inputs)
            deadline = time.monotonic() + RPC_S
            while client.get_job(job_id).sequences_done == 0:
                assert time.monotonic() < deadline, "nothing sealed in time"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as refused:
                client.finish_dataset("rpc")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"job {job_id} of logitcache serve" in refused.value.details()
            assert client.cancel_job(job_id).state == "cancelled"

            finished = until_allowed(lambda: client.finish_dataset("rpc"))
            assert finished.state == "partial" and 0 < finished.sealed_sequences < len(inputs)
            assert client.describe_dataset("rpc").state == "partial"

            resumed = client.resume_dataset("rpc")
            assert resumed.id == job_id and resumed.state in ("queued", "running")
            done = client.wait(job_id, progress=False)
            assert done.state == "completed" and done.sequences_done == len(inputs)
            assert client.describe_dataset("rpc").state == "complete"

            assert main(["datasets", "delete", "rpc", "--server", server.target]) == 0
            assert capsys.readouterr().out == "dataset rpc: deleted\n"
            assert [d.name for d in client.list_datasets()] == []
            with pytest.raises(grpc.RpcError) as missing:
                client.resume_dataset("rpc")
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_submission_sent_twice_with_one_request_id_is_one_job(
    demo_teacher: Path, tmp_path: Path
) -> None:
    def submission(request_id: str):
        yield pb.SubmitJobRequest(
            spec=pb.JobSpec(use=MESSAGE, dataset="twice", client_request_id=request_id)
        )
        for ids in sequences(seed=62, count=5):
            yield pb.SubmitJobRequest(sequence=pb.Sequence(input_ids=ids))

    with ReferenceServer(demo_teacher, tmp_path / "store") as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LogitCacheStub(channel)
            first = stub.SubmitJob(submission("r-1"), timeout=RPC_S)
            retry = stub.SubmitJob(submission("r-1"), timeout=RPC_S)  # its reply was lost
            with pytest.raises(grpc.RpcError) as other:
                stub.SubmitJob(submission("r-2"), timeout=RPC_S)
    assert retry.id == first.id and retry.spec.client_request_id == "r-1"
    assert other.value.code() == grpc.StatusCode.ALREADY_EXISTS
