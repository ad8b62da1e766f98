"""Every request is bounded in memory before it is held, on a real server process.

A 95 MiB GetDistributions message is refused by the server's gRPC receive limit (set from its
request limits) without the server's memory growing by more than a generous bound, measured
from /proc of the server process. A SubmitJob upload is spooled to the store and refused
mid-stream once it has more tokens than allowed, counted from the actual token ids of its texts
(a two-character text is not zero tokens), leaving no partial upload behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from declared_use import MESSAGE
from reference_server import ReferenceServer

from logitcache.server.spool import UPLOADS
from logitcache.server.store.store import open_store
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

UPLOAD_TOKENS = 500
MEMORY_BOUND_KIB = 100 << 10  # what the server may grow by while it refuses the request
BIG = 256 << 20


@pytest.fixture(scope="module")
def server(
    demo_teacher: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReferenceServer]:
    store = tmp_path_factory.mktemp("limits") / "store"
    with ReferenceServer(
        demo_teacher, store, "--max-job-upload-tokens", str(UPLOAD_TOKENS)
    ) as proc:
        yield proc


@pytest.fixture
def channel(server: ReferenceServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)]
    with grpc.insecure_channel(server.target, options=options) as ch:
        yield ch


def test_an_oversized_request_is_refused_before_the_server_holds_it(
    server: ReferenceServer, channel: grpc.Channel
) -> None:
    one = pb.DistributionsRequest(
        use=MESSAGE, sequences=[pb.Sequence(input_ids=[(1 << 21) + 1] * 1_000_000)]
    )
    message = one.SerializeToString() * 25  # 25 sequences of 4-byte ids: about 95 MiB
    assert len(message) > 95 << 20
    call = channel.stream_stream(
        "/logitcache.v1.LogitCache/GetDistributions",
        request_serializer=None,
        response_deserializer=pb.DistributionsResponse.FromString,
    )
    peak_before = server.memory_kib("VmHWM")
    with pytest.raises(grpc.RpcError) as refused:
        list(call(iter([message]), timeout=120))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    grown = server.memory_kib("VmHWM") - peak_before
    assert grown < MEMORY_BOUND_KIB, f"server peak memory grew by {grown >> 10} MiB"
    stub = pb_grpc.LogitCacheStub(channel)  # and the server goes on serving
    small = pb.DistributionsRequest(use=MESSAGE, sequences=[pb.Sequence(input_ids=[5, 6, 7])])
    (answer,) = list(stub.GetDistributions(iter([small]), timeout=60))
    assert len(answer.records.lengths) == 1


def test_a_job_upload_is_refused_mid_stream_counting_actual_tokens(
    server: ReferenceServer, channel: grpc.Channel
) -> None:
    offered = 100_000
    pulled = 0

    def upload() -> Iterator[pb.SubmitJobRequest]:
        nonlocal pulled
        yield pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset="short-texts"))
        for _ in range(offered):
            pulled += 1
            yield pb.SubmitJobRequest(text="ab")  # under 4 characters, still tokens

    stub = pb_grpc.LogitCacheStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitJob(upload(), timeout=120)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"more than {UPLOAD_TOKENS} tokens" in refused.value.details()
    assert "server_path" in refused.value.details()
    assert pulled < offered  # refused while the client was still sending
    store = open_store(str(server.store))
    assert store.backend.list_dir(UPLOADS) == []  # the partial upload is gone
    assert "short-texts" not in store.datasets()


def test_a_job_upload_within_the_limit_is_accepted_from_its_spool(
    server: ReferenceServer, channel: grpc.Channel
) -> None:
    stub = pb_grpc.LogitCacheStub(channel)
    items = [pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset="spooled"))]
    items += [pb.SubmitJobRequest(text=f"text number {i}") for i in range(5)]
    items += [pb.SubmitJobRequest(sequence=pb.Sequence(input_ids=[5, 6, 7, 8]))]
    job = stub.SubmitJob(iter(items), timeout=120)
    assert job.sequences_total == 6
    store = open_store(str(server.store))
    assert store.backend.list_dir(UPLOADS) == []  # adopted by the job
    assert store.backend.exists(f"jobs/{job.id}/input.jsonl")
