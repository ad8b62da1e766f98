"""The gRPC service: a thin adapter from the wire contract to the server's core.

Each method converts messages (``convert``), calls the core, and converts back; errors become
status codes in ``status`` and nowhere else. Work that grows with a request (summaries of the
store, encoding a large answer) runs off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from grpc.aio import ServicerContext as Context

from logitcache.client.errors import Unavailable
from logitcache.server.config import ServerConfig
from logitcache.server.dataset_lifecycle import delete_dataset, finish_dataset
from logitcache.server.grpc import convert
from logitcache.server.grpc.status import rpc
from logitcache.server.jobs import JobManager
from logitcache.server.metrics import ServerMetrics
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.spool import JobUpload, teacher_tokenize
from logitcache.server.store.store import Store
from logitcache.server.store.summary import StoreSummaries
from logitcache.server.streaming import DatasetStreamer
from logitcache.server.teachers.registry import TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

# Answers up to this many positions are encoded on the loop (well under a millisecond); larger
# ones in a thread, so one big request does not stall every other call.
INLINE_ENCODE_POSITIONS = 1 << 15
_Batch = TypeVar("_Batch")


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
        summaries: StoreSummaries | None = None,
    ) -> None:
        self.config = config
        # Listings and descriptions, kept up to date off the loop (see StoreSummaries).
        self.summaries = summaries or StoreSummaries(store)
        self.store = store
        self.teachers = teachers
        self.readthrough = readthrough
        self.streamer = streamer
        self.jobs = jobs
        self.metrics = metrics

    # -- teachers and datasets ------------------------------------------------------------------

    @rpc
    async def ListTeachers(self, request: pb.ListTeachersRequest, context: Context) -> Any:
        return pb.ListTeachersResponse(
            teachers=[convert.teacher_info(t) for t in self.teachers],
            default_teacher=self.teachers.default,
        )

    @rpc
    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: Context) -> Any:
        datasets = await self.summaries.datasets()
        return pb.ListDatasetsResponse(datasets=[convert.dataset_info(d) for d in datasets])

    @rpc
    async def DescribeDataset(self, request: pb.DescribeDatasetRequest, context: Context) -> Any:
        return convert.dataset_info(await self.summaries.dataset(request.dataset))

    @rpc
    async def FinishDataset(self, request: pb.FinishDatasetRequest, context: Context) -> Any:
        await asyncio.to_thread(finish_dataset, self.store, request.dataset)
        await self.jobs.refresh()  # the jobs it cancelled
        return convert.dataset_info(await self.summaries.dataset(request.dataset))

    @rpc
    async def ResumeDataset(self, request: pb.ResumeDatasetRequest, context: Context) -> Any:
        return convert.job_message(await self.jobs.resume_dataset(request.dataset))

    @rpc
    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context: Context) -> Any:
        end = await asyncio.to_thread(delete_dataset, self.store, request.dataset)
        await self.jobs.refresh()
        return convert.dataset_deleted(end)

    # -- read-through ---------------------------------------------------------------------------

    @rpc
    async def GetDistributions(
        self, requests: AsyncIterator[pb.DistributionsRequest], context: Context
    ) -> AsyncIterator[pb.DistributionsResponse]:
        async for request in requests:
            teacher = self.teachers.get(request.teacher)
            k = teacher.resolve_k(request.top_k)
            sequences = convert.sequences(request, self.config)
            records, computed = await self.readthrough.get(
                teacher, k, sequences, durable=request.durable
            )
            batch = await _encoded(convert.record_batch, records, records.positions)
            yield pb.DistributionsResponse(records=batch, computed=computed)

    # -- streaming ------------------------------------------------------------------------------

    @rpc
    async def StreamDataset(
        self, request: pb.StreamDatasetRequest, context: Context
    ) -> AsyncIterator[pb.RecordBatch]:
        positions = 0
        try:
            async for batch in self.streamer.stream(convert.stream_request(request, self.config)):
                positions += batch.positions
                yield await _encoded(convert.stream_batch, batch, batch.positions)
        finally:
            self.metrics.add_served("stream", positions)

    # -- jobs -----------------------------------------------------------------------------------

    @rpc
    async def SubmitJob(
        self, requests: AsyncIterator[pb.SubmitJobRequest], context: Context
    ) -> Any:
        spec, items = await convert.job_submission(requests)
        tokenize = teacher_tokenize(self.teachers.get(spec.teacher).info)
        limit = self.config.max_job_upload_tokens
        async with JobUpload(self.store.backend, max_tokens=limit, tokenize=tokenize) as upload:
            async for item in items:  # spooled to the store as it arrives, limits checked
                await upload.add(item)
            if context.cancelled():  # a cut-off stream is not the whole input
                raise Unavailable("the client cancelled the submission")
            streamed = await upload.finish()
            return convert.job_message(await self.jobs.submit(spec, [], [], upload=streamed))

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> Any:
        return convert.job_message(self.jobs.get(request.id))

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> Any:
        return pb.ListJobsResponse(jobs=[convert.job_message(j) for j in self.jobs.newest_first()])

    @rpc
    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> Any:
        return convert.job_message(self.jobs.cancel(request.id))

    @rpc
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.Job]:
        async for job in self.jobs.watch(request.id):
            yield convert.job_message(job)


async def _encoded(
    encode: Callable[[_Batch], pb.RecordBatch], batch: _Batch, positions: int
) -> pb.RecordBatch:
    """A batch as its RecordBatch: on the loop when small (a thread hop costs more than the
    encoding), in a thread above ``INLINE_ENCODE_POSITIONS`` so the loop never stalls."""
    if positions <= INLINE_ENCODE_POSITIONS:
        return encode(batch)
    return await asyncio.to_thread(encode, batch)
