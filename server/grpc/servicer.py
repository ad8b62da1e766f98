"""The gRPC service: a thin adapter from the wire contract to the server's core.

Each method converts messages, calls the core, and converts back. Typed core errors become gRPC
status codes here and nowhere else; anything unexpected is INTERNAL with the error's text, and
never takes the server down.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import grpc
import numpy as np

from logitcache.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from logitcache.client.space import CaptureSpace
from logitcache.client.wire import encode_batch
from logitcache.server.config import ServerConfig
from logitcache.server.jobs import JobManager, JobSpec, JobState
from logitcache.server.metrics import ServerMetrics
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.store.segments import concat_arrays
from logitcache.server.store.store import Store
from logitcache.server.store.summary import store_summary
from logitcache.server.streaming import DatasetStreamer, StreamRequest
from logitcache.server.teachers.registry import TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STATUS_OF = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _status_of(error: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_OF.items():
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def rpc(method: Callable) -> Callable:
    """Map core errors to status codes and count every call by method and code."""
    name = method.__name__

    async def fail(self, context, error: BaseException, started: float) -> None:
        code = _status_of(error)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", name, exc_info=error)
        self.metrics.record_request(name, code.name, time.perf_counter() - started)
        await context.abort(code, str(error) or type(error).__name__)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            started = time.perf_counter()
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as e:
                await fail(self, context, e, started)
            else:
                self.metrics.record_request(name, "OK", time.perf_counter() - started)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        started = time.perf_counter()
        try:
            result = await method(self, request, context)
        except Exception as e:
            await fail(self, context, e, started)
            raise  # abort() raises; this line only makes the control flow explicit
        self.metrics.record_request(name, "OK", time.perf_counter() - started)
        return result

    return unary_wrapper


class LogitCacheService(pb_grpc.LogitCacheServicer):
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        teachers: TeacherRegistry,
        readthrough: ReadThroughCache,
        streamer: DatasetStreamer,
        jobs: JobManager,
        metrics: ServerMetrics,
    ) -> None:
        self.config = config
        self.store = store
        self.teachers = teachers
        self.readthrough = readthrough
        self.streamer = streamer
        self.jobs = jobs
        self.metrics = metrics

    # -- teachers and datasets ------------------------------------------------------------------

    @rpc
    async def ListTeachers(self, request, context):
        return pb.ListTeachersResponse(
            teachers=[
                pb.TeacherInfo(
                    name=t.name,
                    source=t.config.source,
                    architecture=t.info.architecture,
                    vocab_size=t.info.vocab_size,
                    max_sequence_len=t.engine.max_sequence_len,
                    max_top_k=t.config.max_top_k,
                    default_top_k=t.config.default_top_k,
                    engine_dtype=t.engine.dtype,
                    teacher_fingerprint=t.info.teacher_fingerprint,
                    tokenizer_fingerprint=t.info.tokenizer_fingerprint,
                    license=t.license or "",
                )
                for t in self.teachers
            ],
            default_teacher=self.teachers.default,
        )

    @rpc
    async def ListDatasets(self, request, context):
        summary = store_summary(self.store)
        return pb.ListDatasetsResponse(datasets=[_dataset_info(d) for d in summary["datasets"]])

    @rpc
    async def DescribeDataset(self, request, context):
        (info,) = store_summary(self.store, request.dataset)["datasets"]
        return _dataset_info(info)

    # -- read-through ---------------------------------------------------------------------------

    @rpc
    async def GetDistributions(self, request_iterator, context) -> AsyncIterator:
        async for request in request_iterator:
            teacher = self.teachers.get(request.teacher)
            k = teacher.resolve_k(request.top_k)
            n = len(request.sequences)
            if n > self.config.max_sequences_per_request:
                raise ResourceExhausted(
                    f"{n} sequences in one request; the limit is "
                    f"{self.config.max_sequences_per_request} (split the request)"
                )
            sequences = [np.asarray(s.input_ids, dtype=np.int64) for s in request.sequences]
            tokens = sum(s.size for s in sequences)
            if tokens > self.config.max_tokens_per_request:
                raise ResourceExhausted(
                    f"{tokens} tokens in one request; the limit is "
                    f"{self.config.max_tokens_per_request} (split the request)"
                )
            records, computed = await self.readthrough.get(teacher, k, sequences)
            space = teacher.space(k)
            yield pb.DistributionsResponse(records=_batch(space, records), computed=computed)

    # -- streaming ------------------------------------------------------------------------------

    @rpc
    async def StreamDataset(self, request, context) -> AsyncIterator:
        req = StreamRequest(
            dataset=request.dataset,
            rank=request.rank,
            world_size=request.world_size or 1,
            seed=request.seed,
            epoch=request.epoch,
            start_cursor=request.start_cursor,
            batch_records=request.batch_records or self.config.stream_batch_records,
            allow_partial=request.allow_partial,
            shuffle=not request.no_shuffle,
        )
        positions = 0
        try:
            async for batch in self.streamer.stream(req):
                positions += sum(batch.lengths)
                yield batch
        finally:
            self.metrics.add_served("stream", positions)

    # -- jobs -----------------------------------------------------------------------------------

    @rpc
    async def SubmitJob(self, request_iterator, context):
        spec: JobSpec | None = None
        sequences: list[list[int]] = []
        texts: list[str] = []
        tokens = 0
        async for item in request_iterator:
            kind = item.WhichOneof("item")
            if spec is None:
                if kind != "spec":
                    raise InvalidArgument("the first SubmitJob message must carry the job spec")
                s = item.spec
                spec = JobSpec(
                    dataset=s.dataset,
                    teacher=s.teacher,
                    top_k=s.top_k,
                    server_path=s.server_path,
                    max_len=s.max_len,
                    overflow=s.overflow or "error",
                    license=s.license,
                )
            elif kind == "sequence":
                sequences.append(list(item.sequence.input_ids))
                tokens += len(item.sequence.input_ids)
            elif kind == "text":
                texts.append(item.text)
                tokens += len(item.text) // 4
            else:
                raise InvalidArgument("only the first SubmitJob message may carry a spec")
            if tokens > 64 * self.config.max_tokens_per_request:
                raise ResourceExhausted(
                    "job input too large to stream; write it to a file the server can read and "
                    "submit it with server_path"
                )
        if spec is None:
            raise InvalidArgument("empty SubmitJob stream: send the job spec first")
        if context.cancelled():  # a cut-off stream is not the whole input
            raise Unavailable("the client cancelled the submission")
        return _job(await self.jobs.submit(spec, sequences, texts))

    @rpc
    async def GetJob(self, request, context):
        return _job(self.jobs.get(request.id))

    @rpc
    async def ListJobs(self, request, context):
        return pb.ListJobsResponse(jobs=[_job(j) for j in self.jobs.list()])

    @rpc
    async def CancelJob(self, request, context):
        return _job(self.jobs.cancel(request.id))

    @rpc
    async def WatchJob(self, request, context) -> AsyncIterator:
        async for job in self.jobs.watch(request.id):
            yield _job(job)


def _batch(space: CaptureSpace, records: list) -> pb.RecordBatch:
    if not records:
        return pb.RecordBatch(
            space_id=space.space_id, codec=space.codec, k=space.k, vocab_size=space.vocab_size
        )
    return encode_batch(
        space,
        [r.key for r in records],
        np.concatenate([r.input_ids for r in records]),
        np.asarray([len(r) for r in records]),
        concat_arrays(space, [r.arrays for r in records]),
    )


def _job(job: JobState) -> pb.Job:
    fields = asdict(job)
    fields["spec"] = pb.JobSpec(**fields["spec"])
    return pb.Job(**fields)


def _dataset_info(d: dict) -> pb.DatasetInfo:
    space = {k: v for k, v in d["space"].items() if k in pb.CaptureSpace.DESCRIPTOR.fields_by_name}
    return pb.DatasetInfo(
        name=d["name"],
        state=d["state"],
        space=pb.CaptureSpace(**space),
        sequences=d["sequences"],
        positions=d["positions"],
        sealed_sequences=d["sealed_sequences"],
        provenance_json=json.dumps(d["provenance"], sort_keys=True),
        created_at=d["created_at"],
        completed_at=d["completed_at"] or 0.0,
    )
