"""Requests that do not decode are INVALID_ARGUMENT, logged in one line, on a real server.

Corrupt protobuf and invalid UTF-8 in a string field used to reach the caller as UNKNOWN or
INTERNAL with a traceback in the log; the server's deserializers now hand them to the status map.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from declared_use import MESSAGE
from reference_server import ReferenceServer

from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding two bytes that are not UTF-8
CORRUPT = b"\x1a\xff\xff\xff"  # a length that runs past the end of the message


@pytest.fixture(scope="module")
def server(
    demo_teacher: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReferenceServer]:
    store = tmp_path_factory.mktemp("undecodable") / "store"
    with ReferenceServer(demo_teacher, store) as proc:
        yield proc


def raw(channel: grpc.Channel, method: str, kind: str):
    make = getattr(channel, kind)
    return make(f"/logitcache.v1.LogitCache/{method}", request_serializer=None,
                response_deserializer=None)  # fmt: skip


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert "decoded" in refused.value.details()
    return refused.value.code()


def test_undecodable_requests_are_invalid_argument_without_a_traceback(
    server: ReferenceServer,
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        describe = raw(channel, "DescribeDataset", "unary_unary")
        stream = raw(channel, "StreamDataset", "unary_stream")
        distributions = raw(channel, "GetDistributions", "stream_stream")
        submit = raw(channel, "SubmitJob", "stream_unary")
        spec = pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset="d")).SerializeToString()
        calls = [
            lambda: describe(BAD_UTF8, timeout=30),
            lambda: describe(CORRUPT, timeout=30),
            lambda: list(stream(BAD_UTF8, timeout=30)),
            lambda: list(distributions(iter([CORRUPT]), timeout=30)),
            lambda: submit(iter([spec, b"\x1a\x02\xff\xfe"]), timeout=30),  # a bad text
        ]
        for call in calls:
            assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
        stub = pb_grpc.LogitCacheStub(channel)  # still serving
        assert stub.ListTeachers(pb.ListTeachersRequest(), timeout=30).default_teacher == "demo"
    log = server.log_tail(200_000)
    assert "Traceback" not in log, log
    assert log.count("could not be decoded") == len(calls), log
