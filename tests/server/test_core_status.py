"""Errors at the gRPC boundary: typed errors keep their code and message; anything else is
INTERNAL with a generic message and an error id, under which the traceback is logged.

The service runs in process (grpc.aio on loopback) over a real store-only core; the unexpected
error is a real one, a damaged dataset manifest.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from logitcache.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LogitCacheError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from logitcache.server.config import ServerConfig
from logitcache.server.grpc.servicer import LogitCacheService
from logitcache.server.grpc.status import status_of
from logitcache.server.jobs import JobManager
from logitcache.server.metrics import ServerMetrics
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import open_store
from logitcache.server.streaming import DatasetStreamer
from logitcache.server.teachers.registry import TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

Code = grpc.StatusCode


@asynccontextmanager
async def store_only_service(store_dir: Path) -> AsyncIterator[pb_grpc.LogitCacheStub]:
    """The real servicer over a store-only core, served on a free loopback port."""
    config = ServerConfig(store=str(store_dir))
    store = open_store(config.store, writable=True)
    metrics = ServerMetrics()
    teachers = TeacherRegistry([])
    loaded = SegmentCache(1 << 26)
    readthrough = ReadThroughCache(store, metrics, segment_positions=1 << 16, flush_seconds=1.0,
                                   loaded=loaded, max_unsealed_bytes=1 << 26)  # fmt: skip
    streamer = DatasetStreamer(store, loaded, prefetch=2)
    jobs = JobManager(store, teachers, metrics, max_running=1, max_in_flight=1,
                      segment_positions=1 << 16)  # fmt: skip
    server = grpc.aio.server()
    service = LogitCacheService(config, store, teachers, readthrough, streamer, jobs, metrics)
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.LogitCacheStub(channel)
    finally:
        await server.stop(None)
        await jobs.close()
        await readthrough.close()
        streamer.close()


async def status(call: Callable[[], Awaitable[Any]]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call()
    return info.value.code(), info.value.details() or ""


def test_each_typed_error_has_its_code_and_anything_else_is_internal():
    expected = {
        InvalidArgument: Code.INVALID_ARGUMENT,
        NotFound: Code.NOT_FOUND,
        AlreadyExists: Code.ALREADY_EXISTS,
        PermissionDenied: Code.PERMISSION_DENIED,
        Unauthenticated: Code.UNAUTHENTICATED,
        ResourceExhausted: Code.RESOURCE_EXHAUSTED,
        FailedPrecondition: Code.FAILED_PRECONDITION,
        Unavailable: Code.UNAVAILABLE,
    }
    for error_type, code in expected.items():
        assert status_of(error_type("x")) is code
    assert status_of(LogitCacheError("x")) is Code.INTERNAL
    assert status_of(KeyError("x")) is Code.INTERNAL
    assert status_of(ValueError("x")) is Code.INTERNAL


def test_an_unexpected_error_is_internal_with_an_id_logged_with_its_traceback(tmp_path, caplog):
    store_dir = tmp_path / "store"
    secret = "private detail of the server"

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        async with store_only_service(store_dir) as stub:
            # A damaged manifest: reading it raises an error no code path expects.
            damaged = store_dir / "datasets" / "damaged"
            damaged.mkdir(parents=True)
            (damaged / "dataset.json").write_text("{" + secret)
            describe = pb.DescribeDatasetRequest(dataset="damaged")
            missing = pb.DescribeDatasetRequest(dataset="missing")
            return [
                await status(lambda: stub.DescribeDataset(describe, timeout=30)),
                await status(lambda: stub.DescribeDataset(missing, timeout=30)),
                await status(lambda: stub.GetJob(pb.GetJobRequest(id="nope"), timeout=30)),
                (Code.OK, str(await stub.ListJobs(pb.ListJobsRequest(), timeout=30))),
            ]

    with caplog.at_level(logging.ERROR, logger="logitcache.server.grpc.status"):
        (internal, message), not_found, no_job, still_ok = asyncio.run(scenario())

    assert internal is Code.INTERNAL
    match = re.fullmatch(r"internal error \(error id ([0-9a-f]{12})\); .*", message)
    assert match, message
    assert secret not in message and "JSON" not in message
    error_id = match.group(1)
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert "DescribeDataset" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert getattr(record, "error_id", None) == error_id
    # Typed errors keep their code and their own message; the server goes on serving.
    assert not_found[0] is Code.NOT_FOUND and "missing" in not_found[1]
    assert no_job[0] is Code.NOT_FOUND and "nope" in no_job[1]
    assert still_ok[0] is Code.OK
