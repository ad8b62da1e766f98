"""Names from requests: a small printable charset with no whitespace, never echoed at length.

A dataset name with a trailing newline looks like the real one in a listing, so it is refused;
a megabyte-long name in any request is refused (or not found) with a message that quotes only a
short prefix of it. Checked in process and against a real server process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from declared_use import MESSAGE
from reference_server import ReferenceServer

from logitcache.client.errors import InvalidArgument
from logitcache.server.names import SHOWN_CHARS, shown
from logitcache.server.store.store import validate_dataset_name
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

HUGE = "n" * (1 << 20)
MESSAGE_CHARS = 400  # a refusal quotes at most a short prefix of the name, plus its own words


@pytest.mark.parametrize(
    "name", ["data\n", " data", "data ", "da ta", "data\t", "da\x00ta", "dáta", "", "-data", HUGE]
)
def test_names_outside_the_charset_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_dataset_name(name)
    assert len(str(refused.value)) < MESSAGE_CHARS


def test_a_name_is_shown_by_a_short_printable_prefix() -> None:
    assert shown("data\n") == "'data\\n'"
    long = shown(HUGE)
    assert long.startswith(repr("n" * SHOWN_CHARS)) and f"{len(HUGE)} characters" in long


@pytest.fixture(scope="module")
def stub(
    demo_teacher: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pb_grpc.LogitCacheStub]:
    store = tmp_path_factory.mktemp("names") / "store"
    with ReferenceServer(demo_teacher, store) as server:
        with grpc.insecure_channel(server.target) as channel:
            yield pb_grpc.LogitCacheStub(channel)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


def test_a_trailing_newline_is_refused_at_submission(stub: pb_grpc.LogitCacheStub) -> None:
    items = [pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset="data\n")),
             pb.SubmitJobRequest(sequence=pb.Sequence(input_ids=[5, 6, 7]))]  # fmt: skip
    error = refusal(lambda: stub.SubmitJob(iter(items), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'data\\n'" in error.details()


def test_a_huge_name_is_never_echoed(stub: pb_grpc.LogitCacheStub) -> None:
    calls = {
        "DescribeDataset": lambda: stub.DescribeDataset(
            pb.DescribeDatasetRequest(dataset=HUGE), timeout=60
        ),
        "GetJob": lambda: stub.GetJob(pb.GetJobRequest(id=HUGE), timeout=60),
        "StreamDataset": lambda: list(
            stub.StreamDataset(pb.StreamDatasetRequest(dataset=HUGE), timeout=60)
        ),
        "GetDistributions": lambda: list(
            stub.GetDistributions(
                iter(
                    [
                        pb.DistributionsRequest(
                            use=MESSAGE, teacher=HUGE, sequences=[pb.Sequence(input_ids=[5])]
                        )
                    ]
                ),
                timeout=60,
            )
        ),
        "SubmitJob": lambda: stub.SubmitJob(
            iter([pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset=HUGE))]), timeout=60
        ),
    }
    for method, call in calls.items():
        error = refusal(call)
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), method
        assert len(error.details()) < MESSAGE_CHARS, (method, len(error.details()))
