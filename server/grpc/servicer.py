"""The gRPC service: a thin adapter from the wire contract to the server's core.

Each method converts messages (``convert``), calls the core, and converts back; errors become
status codes in ``status`` and nowhere else. Work that grows with a request (summaries of the
store, encoding a large answer) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from grpc.aio import ServicerContext as Context

from logitcache.client.errors import FailedPrecondition, Unavailable
from logitcache.server.config import ServerConfig
from logitcache.server.dataset_lifecycle import delete_dataset, finish_dataset
from logitcache.server.grpc import auth, convert
from logitcache.server.grpc.status import rpc, service_handler
from logitcache.server.jobs import JobManager
from logitcache.server.leases import LeaseStore, leases_for
from logitcache.server.metrics import ServerMetrics
from logitcache.server.policy.access import Action
from logitcache.server.policy.decision import Verdict
from logitcache.server.policy.gate import Call, PolicyGate
from logitcache.server.policy.licensing import DeclaredLicence
from logitcache.server.policy.state import DatasetAccess
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.scoring import IdScorer
from logitcache.server.spool import JobUpload, teacher_tokenize
from logitcache.server.store.store import Store
from logitcache.server.store.summary import StoreSummaries
from logitcache.server.streaming import DatasetStreamer
from logitcache.server.teachers.registry import Teacher, TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

# Answers up to this many positions are encoded on the loop (well under a millisecond); larger
# ones in a thread, so one big request does not stall every other call.
INLINE_ENCODE_POSITIONS = 1 << 15
_Batch = TypeVar("_Batch")


SERVICE = pb.DESCRIPTOR.services_by_name["LogitCache"]


class LogitCacheService(pb_grpc.LogitCacheServicer):
    """Each method declares the role it needs (``@rpc(Action...)``) and receives its admitted
    :class:`Call`; access lists, ownership and quotas are checked through ``gate`` with it.
    Without a ``gate`` the service is single-user (anonymous callers have every right)."""

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
        gate: PolicyGate | None = None,
    ) -> None:
        self.config = config
        # Listings and descriptions, kept up to date off the loop (see StoreSummaries).
        self.summaries = summaries or StoreSummaries(store)
        self.store = store
        self.teachers = teachers
        self.readthrough = readthrough
        self.scorer = IdScorer(readthrough, config.max_ids_per_position)
        self.streamer = streamer
        self.jobs = jobs
        self.metrics = metrics
        self.gate = gate or PolicyGate.single_user()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve every RPC of the LogitCache service on ``server``, through
        :func:`~logitcache.server.grpc.status.service_handler` (its request deserializers never
        raise, unlike the generated ``add_LogitCacheServicer_to_server``'s)."""
        server.add_generic_rpc_handlers((service_handler(self, SERVICE),))

    # -- teachers and datasets ------------------------------------------------------------------

    @rpc(Action.READ)
    async def ListTeachers(self, request: pb.ListTeachersRequest, context: Context,
                           call: Call) -> Any:  # fmt: skip
        return pb.ListTeachersResponse(
            teachers=[convert.teacher_info(t, self._licence_of(t)) for t in self.teachers],
            default_teacher=self.teachers.default,
        )

    @rpc(Action.ADMINISTER)
    async def SetTeacherLicence(self, request: pb.SetTeacherLicenceRequest, context: Context,
                                call: Call) -> Any:  # fmt: skip
        teacher = self.teachers.get(request.teacher)
        call.target = teacher.name
        await asyncio.to_thread(
            self.jobs.admission.licences.declare,
            teacher.name,
            teacher.config.license,
            request.licence,
            request.custom_json,
            call.user,
        )
        return convert.teacher_info(teacher, self._licence_of(teacher))

    def _leases(self) -> LeaseStore:
        """A lease store of its own for finishing or deleting a dataset (one that a job of this
        server holds must refuse them): files, or the replicas' shared state."""
        return leases_for(self.store, state_url=self.config.state_url)

    def _licence_of(self, teacher: Teacher) -> DeclaredLicence:
        return self.jobs.admission.licence_of(
            teacher.name, teacher.config.license, teacher.info.license
        )

    @rpc(Action.READ)
    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: Context,
                           call: Call) -> Any:  # fmt: skip
        datasets = await self.summaries.datasets()
        readable = await self.gate.readable(call, [d["name"] for d in datasets])
        return pb.ListDatasetsResponse(
            datasets=[self._info(d, readable[d["name"]]) for d in datasets if d["name"] in readable]
        )

    @rpc(Action.READ)
    async def DescribeDataset(self, request: pb.DescribeDatasetRequest, context: Context,
                              call: Call) -> Any:  # fmt: skip
        call.target = request.dataset
        access = await self.gate.require_read(call, request.dataset)
        return self._info(await self.summaries.dataset(request.dataset), access)

    @rpc(Action.READ)
    async def FinishDataset(self, request: pb.FinishDatasetRequest, context: Context,
                            call: Call) -> Any:  # fmt: skip
        call.target = request.dataset
        await self.gate.require_owner(call, request.dataset)
        await asyncio.to_thread(finish_dataset, self.store, request.dataset, self._leases())
        await self.jobs.refresh()  # the jobs it cancelled
        return await self._described(request.dataset)

    @rpc(Action.PRODUCE)
    async def ResumeDataset(self, request: pb.ResumeDatasetRequest, context: Context,
                            call: Call) -> Any:  # fmt: skip
        call.target = request.dataset
        await self.gate.require_owner(call, request.dataset)
        return convert.job_message(await self.jobs.resume_dataset(request.dataset))

    @rpc(Action.READ)
    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context: Context,
                            call: Call) -> Any:  # fmt: skip
        call.target = request.dataset
        await self.gate.require_owner(call, request.dataset)
        end = await asyncio.to_thread(delete_dataset, self.store, request.dataset, self._leases())
        await self.gate.deleted(request.dataset)
        await self.jobs.refresh()
        return convert.dataset_deleted(end)

    async def _described(self, dataset: str) -> pb.DatasetInfo:
        access = await self.gate.access(dataset)
        return self._info(await self.summaries.dataset(dataset), access)

    @staticmethod
    def _info(entry: dict[str, Any], access: DatasetAccess | None) -> pb.DatasetInfo:
        info = convert.dataset_info(entry)
        info.access.CopyFrom(auth.access_message(access))
        return info

    # -- read-through ---------------------------------------------------------------------------

    @rpc(Action.PRODUCE)
    async def GetDistributions(
        self, requests: AsyncIterator[pb.DistributionsRequest], context: Context, call: Call
    ) -> AsyncIterator[pb.DistributionsResponse]:
        first = True
        async with self.gate.stream(call):
            async for request in requests:
                if not first:
                    await self.gate.admit_message(call)
                first = False
                teacher = self.teachers.get(request.teacher)
                call.target = teacher.name
                capture = teacher.capture(request.mode, request.top_k, request.temperatures)
                sequences = convert.sequences(request, self.config)
                await self.gate.may_compute(call)
                computing: list[int] = []
                records, computed = await self.readthrough.get(
                    teacher, capture, sequences, durable=request.durable,
                    on_computed=computing.append, use=convert.use_request(request), user=call.user,
                )  # fmt: skip
                await self.gate.computed(call, sum(computing))
                await self.gate.serve(call, records.positions)
                batch = await _encoded(convert.record_batch, records, records.positions)
                yield pb.DistributionsResponse(records=batch, computed=computed)

    # -- scoring ids ----------------------------------------------------------------------------

    @rpc(Action.PRODUCE)
    async def ScoreIds(
        self, requests: AsyncIterator[pb.ScoreIdsRequest], context: Context, call: Call
    ) -> AsyncIterator[pb.ScoreIdsResponse]:
        first = True
        async with self.gate.stream(call):
            async for request in requests:
                if not first:
                    await self.gate.admit_message(call)
                first = False
                teacher = self.teachers.get(request.teacher)
                call.target = teacher.name
                sequences = convert.sequences(request, self.config)
                await self.gate.may_compute(call)
                scored, computed = await self.scorer.score(
                    teacher, sequences, convert.id_sets(request, self.config),
                    use=convert.use_request(request), user=call.user,
                )  # fmt: skip
                await self.gate.computed(call, computed)
                await self.gate.serve(
                    call, sum(len(s) for s in sequences) + scored.stored.positions
                )
                yield convert.scores_response(scored)

    # -- streaming ------------------------------------------------------------------------------

    @rpc(Action.READ)
    async def StreamDataset(
        self, request: pb.StreamDatasetRequest, context: Context, call: Call
    ) -> AsyncIterator[pb.RecordBatch]:
        call.target = request.dataset
        await self.gate.require_read(call, request.dataset)
        positions = 0
        try:
            async with self.gate.stream(call):
                stream = convert.stream_request(request, self.config)
                async for batch in self.streamer.stream(stream):
                    await self.gate.serve(call, batch.positions)
                    positions += batch.positions
                    yield await _encoded(convert.stream_batch, batch, batch.positions)
        finally:
            self.metrics.add_served("stream", positions)

    # -- jobs -----------------------------------------------------------------------------------

    @rpc(Action.PRODUCE)
    async def SubmitJob(
        self, requests: AsyncIterator[pb.SubmitJobRequest], context: Context, call: Call
    ) -> Any:
        spec, items = await convert.job_submission(requests)
        call.target = spec.dataset
        try:
            admitted = self.jobs.admit(spec, call.user)  # a refused use uploads nothing
        except FailedPrecondition:
            call.decision = Verdict.REFUSE.value
            raise
        call.decision = admitted.decision.verdict.value if admitted.decision else None
        await self.gate.may_compute(call)
        submitted = time.time()
        tokenize = teacher_tokenize(self.teachers.get(spec.teacher).info)
        limit = self.config.max_job_upload_tokens
        async with JobUpload(self.store.backend, max_tokens=limit, tokenize=tokenize) as upload:
            async for item in items:  # spooled to the store as it arrives, limits checked
                await upload.add(item)
            if context.cancelled():  # a cut-off stream is not the whole input
                raise Unavailable("the client cancelled the submission")
            streamed = await upload.finish()
            job = await self.jobs.submit(spec, [], [], upload=streamed, user=call.user)
        await self.gate.created(call, job.spec.dataset)
        if job.created_at >= submitted:  # not a retry answered with an earlier (charged) job
            await self.gate.computed(call, job.positions_total, novel=False)
        call.detail["job"] = job.id
        return convert.job_message(job)

    @rpc(Action.PRODUCE)
    async def GetJob(self, request: pb.GetJobRequest, context: Context, call: Call) -> Any:
        job = self.jobs.get(request.id)
        call.target = job.spec.dataset
        await self.gate.require_owner(call, job.spec.dataset)
        return convert.job_message(job)

    @rpc(Action.PRODUCE)
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context, call: Call) -> Any:
        jobs = self.jobs.newest_first()
        mine = await self.gate.owned(call, {j.spec.dataset for j in jobs})
        return pb.ListJobsResponse(
            jobs=[convert.job_message(j) for j in jobs if j.spec.dataset in mine]
        )

    @rpc(Action.PRODUCE)
    async def CancelJob(self, request: pb.CancelJobRequest, context: Context, call: Call) -> Any:
        job = self.jobs.get(request.id)
        call.target = job.spec.dataset
        await self.gate.require_owner(call, job.spec.dataset)
        return convert.job_message(self.jobs.cancel(request.id))

    @rpc(Action.PRODUCE)
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context, call: Call
    ) -> AsyncIterator[pb.Job]:
        job = self.jobs.get(request.id)
        call.target = job.spec.dataset
        await self.gate.require_owner(call, job.spec.dataset)
        async for job in self.jobs.watch(request.id):
            yield convert.job_message(job)

    # -- governance -----------------------------------------------------------------------------

    @rpc(Action.ADMINISTER)
    async def CreateToken(self, request: pb.CreateTokenRequest, context: Context,
                          call: Call) -> Any:  # fmt: skip
        call.target = request.user
        token, status = await self.gate.governed(
            lambda g: g.create_token(request.user, request.role, request.groups)
        )
        call.detail.update(token_id=status.record.id, role=status.record.role.value)
        return pb.CreateTokenResponse(info=auth.token_info(status), token=token)

    @rpc(Action.ADMINISTER)
    async def ListTokens(self, request: pb.ListTokensRequest, context: Context,
                         call: Call) -> Any:  # fmt: skip
        statuses = await self.gate.governed(lambda g: g.tokens())
        return pb.ListTokensResponse(tokens=[auth.token_info(s) for s in statuses])

    @rpc(Action.ADMINISTER)
    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: Context,
                          call: Call) -> Any:  # fmt: skip
        call.target = request.id
        return auth.token_info(await self.gate.governed(lambda g: g.revoke(request.id)))

    @rpc(Action.ADMINISTER)
    async def SetLimits(self, request: pb.SetLimitsRequest, context: Context,
                        call: Call) -> Any:  # fmt: skip
        call.target = request.id
        limits = auth.limits_of(request.limits)
        return auth.token_info(await self.gate.governed(lambda g: g.set_limits(request.id, limits)))

    @rpc(Action.ADMINISTER)
    async def ClearFlag(self, request: pb.ClearFlagRequest, context: Context,
                        call: Call) -> Any:  # fmt: skip
        call.target = request.id
        return auth.token_info(await self.gate.governed(lambda g: g.clear_flag(request.id)))

    @rpc(Action.READ)
    async def ShareDataset(self, request: pb.ShareDatasetRequest, context: Context,
                           call: Call) -> Any:  # fmt: skip
        call.target = request.dataset
        await self.gate.require_owner(call, request.dataset)
        await self.summaries.dataset(request.dataset)  # NOT_FOUND for no such dataset
        access = await self.gate.governed(
            lambda g: g.share(
                request.dataset,
                add_users=request.add_users,
                add_groups=request.add_groups,
                remove_users=request.remove_users,
                remove_groups=request.remove_groups,
            )
        )
        return auth.access_message(access)


async def _encoded(
    encode: Callable[[_Batch], pb.RecordBatch], batch: _Batch, positions: int
) -> pb.RecordBatch:
    """A batch as its RecordBatch: on the loop when small (a thread hop costs more than the
    encoding), in a thread above ``INLINE_ENCODE_POSITIONS`` so the loop never stalls."""
    if positions <= INLINE_ENCODE_POSITIONS:
        return encode(batch)
    return await asyncio.to_thread(encode, batch)
