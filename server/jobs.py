"""Precompute jobs run by the server: submitted, watched, cancelled, and resumed after a restart.

A job is a precompute run with the server's own engine and store. Its spec and its input (the
sequences or texts a client streamed) are written to the store, and its dataset is published
(state building, create-only: of two submissions of one name exactly one wins), before the job
is accepted; so a server killed at any point finds every unfinished job on restart and runs it
again, and the precompute's own resume logic then skips what was already sealed. A job captures
in any mode (``JobSpec.mode``: top-k, top-p, sampled), exactly as the offline precompute does.

Ownership: the server that runs a job holds its dataset's lease (``leases``) from acceptance to
the job's end, and renews it. Several servers may share a store: each one takes an unfinished job
only when that lease is free (released by a clean stop, expired, or left by a dead process of the
same host) and when it runs the job's teacher. A server that runs no teacher (a store-only read
replica) never takes, fails or changes a job; every server reads the other jobs' documents
afresh every third of the lease time, so its listings follow them.

A retried submission (the same ``client_request_id``) returns the job of the first one, also from
another server or after a restart: the id is kept in the job and in its dataset's provenance.

Everything that grows with a job's input (serialising, writing, tokenising, checking) and every
job document write runs in an executor: the event loop keeps serving while a large job is
accepted.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from logitcache.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LogitCacheError,
    NotFound,
)
from logitcache.server.engine.capture import parse_mode
from logitcache.server.inputs import OVERFLOW_POLICIES, InputReport, input_shards, input_source
from logitcache.server.inputs_hf import PACKAGED_BUILDERS, HFDataset
from logitcache.server.leases import (
    DEFAULT_LEASE_S,
    LeaseKeeper,
    LeaseStore,
    busy,
    dataset_lease,
    leases_for,
)
from logitcache.server.metrics import ServerMetrics
from logitcache.server.names import shown
from logitcache.server.policy.admission import Admission, Admitted, parse_action
from logitcache.server.policy.decision import UseRequest
from logitcache.server.precompute import (
    PrecomputeRequest,
    admitted_inputs,
    create_dataset,
    precompute,
)
from logitcache.server.spool import adopt_upload
from logitcache.server.store.backend import StoredObject
from logitcache.server.store.store import Store, validate_dataset_name
from logitcache.server.teachers.identity import capture_space
from logitcache.server.teachers.registry import Teacher, TeacherRegistry

log = logging.getLogger(__name__)

JOB_PRIORITY = 1  # after interactive requests (0) in the engine's queue
_RATE_WINDOW_S = 10.0
MAX_REQUEST_ID_CHARS = 128


class JobState(StrEnum):
    """Where a job is in its life; the value is the string on disk and on the wire."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        """Not ended yet: a restart runs it again."""
        return self in (JobState.QUEUED, JobState.RUNNING)


@dataclass
class JobSpec:
    dataset: str
    teacher: str = ""
    top_k: int = 0  # k, the most entries (top_p) or the draws (sampled); 0: the default
    mode: str = ""  # as a capture space spells it ("topk", "top_p:0.95", "sampled"; "": topk)
    temperatures: list[float] = field(default_factory=list)  # tails stored at these too
    server_path: str = ""
    max_len: int = 0
    overflow: str = "error"
    license: str = ""
    client_request_id: str = ""  # the same on a client's retries of one submission
    use: UseRequest | None = None  # what the distributions are for (the licence policy decides)
    sensitive_data: str = ""  # the dataset's filter action: reject, redact, allow ("": default)
    messages_field: str = ""  # chat rows' field, rendered with the teacher's template (server.chat)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> JobSpec:
        use = obj.get("use")
        return cls(**{**obj, "use": UseRequest.from_json(use) if use else None})


@dataclass
class Job:
    id: str
    spec: JobSpec
    state: JobState = JobState.QUEUED
    error: str = ""
    sequences_total: int = 0
    sequences_done: int = 0
    positions_total: int = 0
    positions_done: int = 0
    positions_per_second: float = 0.0
    eta_seconds: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    user: str | None = None  # who submitted it, as authenticated (None: anonymous)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Job:
        return cls(
            **{**obj, "spec": JobSpec.from_json(obj["spec"]), "state": JobState(obj["state"])}
        )

    @property
    def lease(self) -> str:
        return dataset_lease(self.spec.dataset)


def load_jobs(store: Store) -> list[Job]:
    """Every job document in the store (a job being accepted has none yet)."""
    jobs = []
    for job_id in store.backend.list_dir("jobs"):
        rel = f"jobs/{job_id}/job.json"
        try:
            jobs.append(Job.from_json(store.backend.read_json(rel)))
        except (NotFound, FileNotFoundError):
            continue  # being discarded
    return jobs


def save_job(store: Store, job: Job) -> None:
    store.backend.write_json(f"jobs/{job.id}/job.json", asdict(job))


def end_jobs(store: Store, dataset: str, reason: str) -> list[Job]:
    """Mark the unfinished jobs of ``dataset`` cancelled with ``reason``, so no server resumes
    them; the caller holds the dataset's lease. Returns them."""
    ended = []
    for job in load_jobs(store):
        if job.spec.dataset == dataset and job.state.active:
            job.state, job.error, job.finished_at = JobState.CANCELLED, reason, time.time()
            save_job(store, job)
            ended.append(job)
    return ended


class JobManager:
    def __init__(
        self,
        store: Store,
        teachers: TeacherRegistry,
        metrics: ServerMetrics,
        *,
        max_running: int,
        max_in_flight: int,
        segment_positions: int,
        lease_s: float = DEFAULT_LEASE_S,
        leases: LeaseStore | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.store = store
        # The licence policy, the sensitive-data filters and the server_path roots.
        self.admission = admission or Admission()
        self.teachers = teachers
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.segment_positions = segment_positions
        self.lease_s = lease_s
        self._keeper = LeaseKeeper(leases or leases_for(store), lease_s, on_lost=self._lost)
        self._jobs: dict[str, Job] = {}
        self._owned: set[str] = set()  # ids of the jobs this manager runs (it holds their lease)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._accepting: set[str] = set()  # dataset names of submissions being checked
        self._requests: dict[str, asyncio.Future[Job | None]] = {}  # client request ids, same
        self._slots = asyncio.Semaphore(max_running)
        self._rate: dict[str, list[tuple[float, int]]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._refreshing = asyncio.Lock()  # one look at a time: a job is taken over once
        # One thread writes job documents, in the order the loop hands them over.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-writer")

    # -- lifecycle ------------------------------------------------------------------------------

    async def resume(self) -> int:
        """Load all jobs from the store, run the unfinished ones this server may take, and keep
        watching the store; returns how many jobs were started."""
        started = await self.refresh()
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_store())
        return started

    async def refresh(self) -> int:
        """Read every job document: fresh views of the jobs other servers run, and each
        unfinished job whose lease is free and whose teacher runs here is taken over. Returns
        how many were taken."""
        loop = asyncio.get_running_loop()
        taken = 0
        async with self._refreshing:
            for stored in await loop.run_in_executor(None, load_jobs, self.store):
                if stored.id in self._owned or stored.id in self._tasks:
                    continue  # ours (or still winding down): memory is the truth
                job = self._view(stored)
                if job.state.active and self._runs_teacher_of(job) and await self._take(job):
                    taken += 1
        self._publish_counts()
        return taken

    async def close(self) -> None:
        """Stop running jobs without marking them ended, and release their leases: they resume
        on the next start, or on another server at once."""
        if self._watcher is not None:
            self._watcher.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(
            *self._tasks.values(), *([self._watcher] if self._watcher else []),
            return_exceptions=True,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, _nothing)  # the last documents are written
        await self._keeper.close()
        await loop.run_in_executor(None, self._writer.shutdown)

    # -- requests -------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, sequences: Sequence[Sequence[int]],
                     texts: Sequence[str], *, upload: StoredObject | None = None,
                     user: str | None = None) -> Job:  # fmt: skip
        """Check the spec and input completely, persist both with the dataset, then queue the
        job. A submission repeated with the same ``client_request_id`` returns the same job.

        The input is ``sequences`` and ``texts``, or an ``upload`` spooled to the store as it
        arrived (``spool.JobUpload``), which the accepted job adopts. The licence policy decides
        on ``spec.use`` before anything is read; ``user`` (the authenticated caller) is recorded
        with the job and in its dataset's provenance."""
        validate_dataset_name(spec.dataset)
        request_id = spec.client_request_id
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(
                f"client_request_id has {len(request_id)} characters; at most "
                f"{MAX_REQUEST_ID_CHARS}",
                fields=["client_request_id"],
            )
        if not request_id:
            return await self._submit(spec, sequences, texts, upload, user)
        while (pending := self._requests.get(request_id)) is not None:
            earlier = await asyncio.shield(pending)  # an attempt being accepted here
            if earlier is not None:
                return earlier
        self._requests[request_id] = asyncio.get_running_loop().create_future()
        job: Job | None = None
        try:
            job = await self._submitted(spec) or await self._submit(
                spec, sequences, texts, upload, user
            )
            return job
        finally:
            self._requests.pop(request_id).set_result(job)

    async def _submitted(self, spec: JobSpec) -> Job | None:
        """The job of an earlier submission with this request id: accepted here, or (after a
        restart, or on another server) named by its dataset."""
        request_id = spec.client_request_id
        known = [j for j in self._jobs.values() if j.spec.client_request_id == request_id]
        if not known:
            loop = asyncio.get_running_loop()
            stored = await loop.run_in_executor(None, self._job_of_request, spec)
            known = [self._view(stored)] if stored is not None else []
        if known and known[0].spec.dataset != spec.dataset:
            raise InvalidArgument(
                f"client_request_id {shown(request_id)} was used for job {known[0].id} of "
                f"dataset {known[0].spec.dataset!r}; use a new id for a new submission",
                fields=["client_request_id"],
            )
        return known[0] if known else None

    def _job_of_request(self, spec: JobSpec) -> Job | None:
        """The job that published ``spec.dataset`` for this request id, if one did."""
        rel = f"datasets/{spec.dataset}/dataset.json"
        if not self.store.backend.exists(rel):
            return None
        made_by = self.store.backend.read_json(rel)["provenance"].get("job") or {}
        if made_by.get("client_request_id") != spec.client_request_id:
            return None
        doc = f"jobs/{made_by['id']}/job.json"
        return (
            Job.from_json(self.store.backend.read_json(doc))
            if self.store.backend.exists(doc)
            else None
        )

    async def _submit(self, spec: JobSpec, sequences: Sequence[Sequence[int]],
                      texts: Sequence[str], upload: StoredObject | None,
                      user: str | None) -> Job:  # fmt: skip
        teacher = self.teachers.get(spec.teacher)
        spec.teacher = teacher.name
        capture = teacher.capture(spec.mode, spec.top_k, spec.temperatures)
        spec.mode, spec.top_k = capture.space_mode, capture.k
        spec.temperatures = list(capture.temperatures)
        if spec.overflow not in OVERFLOW_POLICIES:
            raise InvalidArgument(
                f"overflow must be one of {OVERFLOW_POLICIES}, not {spec.overflow!r}",
                fields=["overflow"],
            )
        streamed = bool(sequences) or bool(texts) or upload is not None
        if spec.server_path and streamed:
            raise InvalidArgument(
                "give either server_path or streamed sequences/texts, not both",
                fields=["server_path"],
            )
        if not spec.server_path and not streamed:
            raise InvalidArgument(
                "a job needs sequences, texts or a server_path", fields=["server_path"]
            )
        admitted = self._admit(teacher, spec, user)  # before the input is read
        parse_action(spec.sensitive_data)
        if spec.server_path:
            self._confined_input(spec.server_path)  # before anything looks at the path
        if spec.dataset in self._accepting or any(
            j.spec.dataset == spec.dataset and j.state.active for j in self._jobs.values()
        ):
            raise AlreadyExists(f"dataset {spec.dataset!r} is being built; choose another name")
        job = Job(id=uuid.uuid4().hex[:16], spec=spec, user=user)
        loop = asyncio.get_running_loop()
        self._accepting.add(spec.dataset)
        try:
            if not await self._keeper.acquire(job.lease, self._note(job)):
                holder = await loop.run_in_executor(None, self._keeper.leases.holder, job.lease)
                raise AlreadyExists(
                    busy(f"dataset {spec.dataset!r}", holder, "choose another name")
                )
            accepting = loop.run_in_executor(
                None, self._accept, job, teacher, admitted, sequences, texts, upload
            )
            try:
                await asyncio.shield(accepting)
            except asyncio.CancelledError:
                # The client went away: once the thread is done with the input, remove it.
                loop.create_task(self._abandon(job, accepting))
                raise
            except BaseException:
                await self._keeper.release(job.lease)
                raise
        finally:
            self._accepting.discard(spec.dataset)
        self._jobs[job.id] = job
        self._changed[job.id] = asyncio.Event()
        self._owned.add(job.id)
        self._launch(job)
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"job {shown(job_id)} does not exist") from None

    def newest_first(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.state.active:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state})")
        if job_id not in self._owned:
            raise FailedPrecondition(
                f"job {job_id} is not run by this server: cancel it on the server that runs "
                f"it, or, if none does, finish or delete its dataset {job.spec.dataset!r}"
            )
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
        self._finish(job, JobState.CANCELLED)
        return job

    async def resume_dataset(self, name: str) -> Job:
        """Run the newest job of a dataset that is not complete again (a cancelled, failed or
        stuck job, or one finished as partial); the job is returned once queued."""
        validate_dataset_name(name)
        await self.refresh()
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(None, self._dataset_state, name)
        if state == "complete":
            raise FailedPrecondition(f"dataset {name!r} is complete: there is nothing to resume")
        built = sorted(
            (j for j in self._jobs.values() if j.spec.dataset == name),
            key=lambda j: j.created_at,
        )
        if not built:
            raise FailedPrecondition(
                f"dataset {name!r} was not built by a server's job: rerun its `logitcache "
                "precompute` command with the same input and flags, which continues from what "
                "is sealed"
            )
        job = built[-1]
        if job.id in self._owned:
            return job  # running here already
        self.teachers.get(job.spec.teacher)  # this server must run the job's teacher
        if not await self._keeper.acquire(job.lease, self._note(job)):
            holder = await loop.run_in_executor(None, self._keeper.leases.holder, job.lease)
            raise FailedPrecondition(
                busy(f"dataset {name!r}", holder, "it is being built; wait for it to finish")
            )
        if job.id in self._owned:
            return job  # taken meanwhile, by a look at the store or another resume
        if state == "partial":
            await loop.run_in_executor(None, self.store.mark_state, name, "building")
        job.error, job.finished_at = "", 0.0
        self._own(job)
        return job

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then after every change, until it ends; its end is told once the job
        has let go of its dataset (a caller may then finish, delete or resume it at once)."""
        job = self.get(job_id)
        event = self._changed[job_id]
        while True:
            event.clear()
            task = self._tasks.get(job_id)
            if not job.state.active and task is not None and task is not asyncio.current_task():
                await asyncio.wait({task})  # winding down: the lease goes last
            yield job
            if not job.state.active:
                return
            await event.wait()

    # -- ownership ------------------------------------------------------------------------------

    def admit(self, spec: JobSpec, user: str | None) -> Admitted:
        """The licence policy's decision on a submission, which ``submit`` makes again: a front
        end asks first to refuse a job before its input is uploaded."""
        validate_dataset_name(spec.dataset)
        return self._admit(self.teachers.get(spec.teacher), spec, user)

    def _admit(self, teacher: Teacher, spec: JobSpec, user: str | None) -> Admitted:
        """The licence policy's decision on the job's declared use (FAILED_PRECONDITION citing
        the clause when refused). The teacher's licence is the server's to declare: a spec that
        names another one is refused."""
        declared = self.admission.licence_of(
            teacher.name, teacher.config.license, teacher.info.license
        )
        admitted = self.admission.admit(teacher.name, declared, spec.use, user)
        named = self.admission.licences.catalogue.get(spec.license) if spec.license else None
        if spec.license and (named is None or named != declared.licence):
            raise InvalidArgument(
                f"license {shown(spec.license)} is not teacher {teacher.name!r}'s declared "
                f"licence ({declared.name}); the server declares a teacher's licence: leave "
                "license empty",
                fields=["license"],
            )
        return admitted

    def _runs_teacher_of(self, job: Job) -> bool:
        return any(t.name == job.spec.teacher for t in self.teachers)

    def _note(self, job: Job) -> str:
        return f"job {job.id} of logitcache serve"

    def _view(self, stored: Job) -> Job:
        """The job as stored, in the one object that watchers and listings hold."""
        job = self._jobs.get(stored.id)
        if job is None:
            job = self._jobs[stored.id] = stored
            self._changed[stored.id] = asyncio.Event()
        elif job != stored:
            vars(job).update(vars(stored))
        self._changed[job.id].set()
        return job

    async def _take(self, job: Job) -> bool:
        """Take over an unfinished job whose lease is free; False if another owner has it."""
        if not await self._keeper.acquire(job.lease, self._note(job)):
            return False
        loop = asyncio.get_running_loop()
        stored = await loop.run_in_executor(None, self.store.backend.read_json,
                                            f"jobs/{job.id}/job.json")  # fmt: skip
        if job.id in self._owned:
            return False  # resumed here meanwhile (ResumeDataset)
        self._view(Job.from_json(stored))  # it may have ended or moved on before the lease was ours
        if not job.state.active:
            await self._keeper.release(job.lease)
            return False
        log.info("running job %s (dataset %s)", job.id, job.spec.dataset)
        self._own(job)
        return True

    def _own(self, job: Job) -> None:
        job.state = JobState.QUEUED
        self._owned.add(job.id)
        self._changed_now(job)
        self._launch(job)

    def _lost(self, lease: str) -> None:
        """Another server took over a lease of ours (we stalled past its expiry): stop that
        job here without writing anything more; its new owner runs it."""
        for job_id in [j for j in self._owned if self._jobs[j].lease == lease]:
            self._owned.discard(job_id)
            task = self._tasks.get(job_id)
            if task is not None:
                task.cancel()

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.refresh()
            except Exception:  # a store hiccup: the next look may succeed
                log.exception("reading the store's jobs failed")

    # -- accepting (worker threads) -------------------------------------------------------------

    def _accept(self, job: Job, teacher: Teacher, admitted: Admitted,
                sequences: Sequence[Sequence[int]], texts: Sequence[str],
                upload: StoredObject | None) -> None:  # fmt: skip
        """Check the input as the job will read it, then write it, publish the dataset and save
        the job; on any error leave nothing behind."""
        spec = job.spec
        if spec.dataset in self.store.datasets():
            raise AlreadyExists(f"dataset {spec.dataset!r} already exists; choose another name")
        if spec.server_path:
            self._check_server_path(spec.server_path)
        request = self._request(job)
        data = _input_bytes(sequences, texts)
        checked = request
        if upload is not None:
            checked = replace(request, data=upload)  # read back from the store as it spooled
        elif data:
            # Checked from memory, before anything is written: the bytes are the ones written
            # next, and nothing is read back from the store.
            stream = io.BytesIO(data)
            stream.name = "job input"  # messages name rows as "job input:LINE"
            checked = replace(request, data=stream)
        try:
            checked, report = admitted_inputs(checked, teacher.info, self.admission, admitted)
        except LogitCacheError as error:
            raise _without_content(error) if spec.server_path else error from None
        request = replace(request, provenance=checked.provenance)
        job.sequences_total = len(report.sequences)
        job.positions_total = _positions(report)
        space = capture_space(teacher.info, teacher.engine.dtype, request.capture)
        made_by = {"id": job.id, "client_request_id": spec.client_request_id}
        try:
            if upload is not None:
                adopt_upload(upload, f"jobs/{job.id}")
            elif data:
                self.store.backend.write_bytes(f"jobs/{job.id}/input.jsonl", data)
            # Create-only: of two servers accepting one name, one publishes, the other is refused.
            create_dataset(self.store, request, teacher.info, report, space, job=made_by)
            save_job(self.store, job)
        except BaseException:
            self._discard(job)
            raise

    async def _abandon(self, job: Job, accepting: asyncio.Future[None]) -> None:
        """After a submission whose client went away: undo it once its thread is done."""
        try:
            await accepting
        except Exception:
            pass  # refused: nothing was left behind
        else:
            await asyncio.get_running_loop().run_in_executor(None, self._discard, job)
        await self._keeper.release(job.lease)

    def _discard(self, job: Job) -> None:
        """Remove a submission's files, and its dataset if this submission published it."""
        self.store.backend.remove_tree(f"jobs/{job.id}")
        rel = f"datasets/{job.spec.dataset}/dataset.json"
        if self.store.backend.exists(rel):
            made_by = self.store.backend.read_json(rel)["provenance"].get("job") or {}
            if made_by.get("id") == job.id:
                self.store.delete_dataset(job.spec.dataset)

    def _confined_input(self, server_path: str) -> Path | HFDataset:
        """``server_path`` as an input (``inputs.input_source``), confined to the allowed roots:
        a path resolved inside them, or an ``hf://`` dataset of local files (its data_files and
        data_dir patterns, and each file they match) inside them. A hub dataset, or remote data
        files, is FAILED_PRECONDITION: the server would download it with its own credentials."""
        source = input_source(server_path)
        if not isinstance(source, HFDataset):
            return self.admission.confine(server_path)
        patterns = [*source.data_files, *([source.data_dir] if source.data_dir else [])]
        if source.name not in PACKAGED_BUILDERS or any("://" in p for p in patterns):
            raise FailedPrecondition(
                "server_path names a Hugging Face hub dataset or remote files, which a job "
                "would download with the server's credentials: jobs read local inputs only "
                "(hf://json?data_files=..., a save_to_disk directory, or files under the "
                "allowed roots)",
                fields=["server_path"],
            )
        for path in [*patterns, *map(str, source.local_files())]:
            self.admission.confine(path)
        return source

    def _check_server_path(self, server_path: str) -> None:
        """Every shard of ``server_path`` is a file inside the allowed roots (a link in a root
        that leads out of it is refused like a path outside)."""
        source = self._confined_input(server_path)
        if isinstance(source, HFDataset):
            return  # its local files were each confined
        shards = input_shards(source)
        if not all(isinstance(shard, Path) and shard.is_file() for shard in shards):
            raise InvalidArgument(
                f"server_path {shown(server_path)!r} is not a file, a directory of shards or a "
                "glob of files on the server",
                fields=["server_path"],
            )
        for shard in shards:
            self.admission.confine(str(shard))

    def _dataset_state(self, name: str) -> str:
        return str(self.store.dataset(name).manifest["state"])

    # -- running --------------------------------------------------------------------------------

    def _request(self, job: Job) -> PrecomputeRequest:
        spec = job.spec
        data = (
            self._confined_input(spec.server_path)
            if spec.server_path
            else StoredObject(self.store.backend, f"jobs/{job.id}/input.jsonl")
        )
        mode, top_p = parse_mode(spec.mode)
        return PrecomputeRequest(
            teacher=spec.teacher,
            data=data,
            out=self.store.url,
            dataset=spec.dataset,
            top_k=spec.top_k,
            mode=mode,
            top_p=top_p,
            temperatures=tuple(spec.temperatures),
            max_len=spec.max_len or None,
            overflow=spec.overflow,
            segment_positions=self.segment_positions,
            max_in_flight=self.max_in_flight,
            license=spec.license or None,
            progress=False,
            use=spec.use,
            sensitive_data=spec.sensitive_data,
            user=job.user,
            messages_field=spec.messages_field,
        )

    def _launch(self, job: Job) -> None:
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job))
        self._publish_counts()

    async def _run(self, job: Job) -> None:
        try:
            async with self._slots:
                if job.state is not JobState.QUEUED:
                    return
                teacher = self.teachers.get(job.spec.teacher)
                admitted = self._admit(teacher, job.spec, job.user)  # the licence may have changed
                job.state, job.started_at = JobState.RUNNING, time.time()
                self._rate[job.id] = [(time.monotonic(), job.positions_done)]
                self._changed_now(job)
                result = await precompute(
                    self._request(job),
                    teacher.engine,
                    store=self.store,
                    info=teacher.info,
                    priority=JOB_PRIORITY,
                    on_progress=lambda s, p: self._progress(job, s, p),
                    lease_held=True,
                    admission=self.admission,
                    admitted=admitted,
                )
                job.sequences_done, job.positions_done = job.sequences_total, job.positions_total
                self.metrics.add_computed(teacher.name, result.computed_positions)
                self._finish(job, JobState.COMPLETED)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the job fails; the server goes on
            job.error = str(e) or type(e).__name__
            self._finish(job, JobState.FAILED)
        finally:
            await self._ended(job)

    async def _ended(self, job: Job) -> None:
        """The job's task is over: once its last document is written, an ended job's lease
        goes (a job stopped by close() keeps it until close() releases every lease)."""
        if not job.state.active and job.id in self._owned:
            await asyncio.get_running_loop().run_in_executor(self._writer, _nothing)
            self._owned.discard(job.id)
            await self._keeper.release(job.lease)
        self._tasks.pop(job.id, None)

    def _progress(self, job: Job, sequences_done: int, positions_done: int) -> None:
        job.sequences_done, job.positions_done = sequences_done, positions_done
        now = time.monotonic()
        window = self._rate.setdefault(job.id, [(now, positions_done)])
        window.append((now, positions_done))
        while len(window) > 2 and now - window[0][0] > _RATE_WINDOW_S:
            window.pop(0)
        span = now - window[0][0]
        job.positions_per_second = (positions_done - window[0][1]) / span if span > 0 else 0.0
        left = job.positions_total - positions_done
        job.eta_seconds = left / job.positions_per_second if job.positions_per_second > 0 else 0.0
        self.metrics.set_job_progress(job.id, positions_done, job.positions_total)
        self._changed_now(job, save=False)

    def _finish(self, job: Job, state: JobState) -> None:
        job.state, job.finished_at = state, time.time()
        if state is JobState.COMPLETED:
            job.eta_seconds = 0.0
        self._rate.pop(job.id, None)
        self.metrics.remove_job(job.id)
        self._changed_now(job)
        self._publish_counts()

    def _changed_now(self, job: Job, *, save: bool = True) -> None:
        if save and job.id in self._owned:  # only the owner writes a job's document
            # A snapshot taken now, written in order by the writer thread.
            self._writer.submit(save_job, self.store, replace(job, spec=replace(job.spec)))
        self._changed[job.id].set()

    def _publish_counts(self) -> None:
        counts: dict[str, int] = {}
        for j in self._jobs.values():
            counts[j.state] = counts.get(j.state, 0) + 1
        self.metrics.set_job_counts(counts)


def _nothing() -> None:
    """A no-op for the job writer: when it has run, every document handed over before is written."""


# What an input error about a server file may say: its fixed reasons, never the row's content
# (its keys, its values), which the caller did not send.
_INPUT_REASONS = (
    "malformed JSON", "JSON object", "missing field", "empty text", "must be a string",
    "non-empty list", "list of integers", "outside the teacher's vocabulary", "exceeds the maximum",
    "not a readable Parquet file", "no usable sequences", "sensitive data", "does not exist",
)  # fmt: skip


def _without_content(error: LogitCacheError) -> LogitCacheError:
    """An error about a server_path input that names the row and the kind of problem, with
    nothing of the file's content."""
    message = str(error)
    place, _, _ = message.partition(": ")
    if "sensitive data" in message or "does not exist" in message:
        return error  # these name the row and the detector, or the path sent
    reason = next((r for r in _INPUT_REASONS if r in message), "not a usable input row")
    return type(error)(f"{place}: {reason}", fields=error.fields)


def _input_bytes(sequences: Sequence[Sequence[int]], texts: Sequence[str]) -> bytes:
    """A streamed job input as the JSONL file the job reads (empty: none was streamed)."""
    rows = [json.dumps({"input_ids": list(s)}) for s in sequences]
    rows += [json.dumps({"text": t}) for t in texts]
    return ("\n".join(rows) + "\n").encode("utf-8") if rows else b""


def _positions(report: InputReport) -> int:
    return sum(len(s.input_ids) for s in report.sequences)
