"""Precompute jobs run by the server: submitted, watched, cancelled, and resumed after a restart.

A job is a precompute run with the server's own engine and store. Its spec and its input (the
sequences or texts a client streamed) are written to the store before the job is accepted, so a
server killed at any point finds every unfinished job on restart and runs it again; the
precompute's own resume logic then skips what was already sealed.

Everything that grows with a job's input (serialising, writing, tokenising, checking) and every
job document write runs in an executor: the event loop keeps serving while a large job is
accepted.
"""

from __future__ import annotations

import asyncio
import io
import json
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
    NotFound,
)
from logitcache.server.inputs import OVERFLOW_POLICIES, InputReport
from logitcache.server.metrics import ServerMetrics
from logitcache.server.precompute import PrecomputeRequest, precompute, prepare_inputs
from logitcache.server.store.backend import StoredObject
from logitcache.server.store.store import Store, validate_dataset_name
from logitcache.server.teachers.identity import TeacherInfo
from logitcache.server.teachers.registry import TeacherRegistry

JOB_PRIORITY = 1  # after interactive requests (0) in the engine's queue
_RATE_WINDOW_S = 10.0


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
    top_k: int = 0
    server_path: str = ""
    max_len: int = 0
    overflow: str = "error"
    license: str = ""


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

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Job:
        return cls(**{**obj, "spec": JobSpec(**obj["spec"]), "state": JobState(obj["state"])})


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
    ) -> None:
        self.store = store
        self.teachers = teachers
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.segment_positions = segment_positions
        self._jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._accepting: set[str] = set()  # dataset names of submissions being checked
        self._slots = asyncio.Semaphore(max_running)
        self._rate: dict[str, list[tuple[float, int]]] = {}
        # One thread writes job documents, in the order the loop hands them over.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-writer")

    # -- lifecycle ------------------------------------------------------------------------------

    async def resume(self) -> int:
        """Load all jobs from the store and restart the unfinished ones; returns how many."""
        loop = asyncio.get_running_loop()
        restarted = 0
        for job in await loop.run_in_executor(None, self._load_jobs):
            self._jobs[job.id] = job
            self._changed[job.id] = asyncio.Event()
            if job.state.active:
                job.state = JobState.QUEUED
                self._launch(job)
                restarted += 1
        self._publish_counts()
        return restarted

    async def close(self) -> None:
        """Stop running jobs without marking them ended: they resume on the next start."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.shutdown)

    # -- requests -------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, sequences: Sequence[Sequence[int]],
                     texts: Sequence[str]) -> Job:  # fmt: skip
        """Check the spec and input completely, persist both, then queue the job."""
        validate_dataset_name(spec.dataset)
        teacher = self.teachers.get(spec.teacher)
        spec.teacher = teacher.name
        spec.top_k = teacher.resolve_k(spec.top_k)
        if spec.overflow not in OVERFLOW_POLICIES:
            raise InvalidArgument(
                f"overflow must be one of {OVERFLOW_POLICIES}, not {spec.overflow!r}",
                fields=["overflow"],
            )
        streamed = bool(sequences) or bool(texts)
        if spec.server_path and streamed:
            raise InvalidArgument(
                "give either server_path or streamed sequences/texts, not both",
                fields=["server_path"],
            )
        if not spec.server_path and not streamed:
            raise InvalidArgument(
                "a job needs sequences, texts or a server_path", fields=["server_path"]
            )
        if spec.dataset in self._accepting or any(
            j.spec.dataset == spec.dataset and j.state.active for j in self._jobs.values()
        ):
            raise AlreadyExists(f"dataset {spec.dataset!r} is being built; choose another name")
        job = Job(id=uuid.uuid4().hex[:16], spec=spec)
        loop = asyncio.get_running_loop()
        self._accepting.add(spec.dataset)
        accepting = loop.run_in_executor(None, self._accept, job, teacher.info, sequences, texts)
        try:
            await asyncio.shield(accepting)
        except asyncio.CancelledError:
            # The client went away: once the thread is done with the input, remove it.
            accepting.add_done_callback(
                lambda _: loop.run_in_executor(None, self._discard_files, job.id)
            )
            raise
        finally:
            self._accepting.discard(spec.dataset)
        self._jobs[job.id] = job
        self._changed[job.id] = asyncio.Event()
        self._launch(job)
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"job {job_id!r} does not exist") from None

    def newest_first(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.state.active:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state})")
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
        self._finish(job, JobState.CANCELLED)
        return job

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then after every change, until it ends."""
        job = self.get(job_id)
        event = self._changed[job_id]
        while True:
            event.clear()
            yield job
            if not job.state.active:
                return
            await event.wait()

    # -- accepting (worker threads) -------------------------------------------------------------

    def _accept(self, job: Job, info: TeacherInfo, sequences: Sequence[Sequence[int]],
                texts: Sequence[str]) -> None:  # fmt: skip
        """Check the input as the job will read it, then write it and save the job; on any
        error leave nothing behind."""
        spec = job.spec
        if spec.dataset in self.store.datasets():
            raise AlreadyExists(f"dataset {spec.dataset!r} already exists; choose another name")
        if spec.server_path and not Path(spec.server_path).is_file():
            raise InvalidArgument(
                f"server_path {spec.server_path!r} is not a file on the server",
                fields=["server_path"],
            )
        request = self._request(job)
        data = _input_bytes(sequences, texts)
        if data:
            # Checked from memory, before anything is written: the bytes are the ones written
            # next, and nothing is read back from the store.
            stream = io.BytesIO(data)
            stream.name = "job input"  # messages name rows as "job input:LINE"
            request = replace(request, data=stream)
        report = prepare_inputs(request, info)
        job.sequences_total = len(report.sequences)
        job.positions_total = _positions(report)
        try:
            if data:
                self.store.backend.write_bytes(f"jobs/{job.id}/input.jsonl", data)
            self._save_now(asdict(job))
        except BaseException:
            self._discard_files(job.id)
            raise

    def _discard_files(self, job_id: str) -> None:
        self.store.backend.remove_tree(f"jobs/{job_id}")

    def _load_jobs(self) -> list[Job]:
        jobs = []
        for job_id in self.store.backend.list_dir("jobs"):
            rel = f"jobs/{job_id}/job.json"
            if self.store.backend.exists(rel):
                jobs.append(Job.from_json(self.store.backend.read_json(rel)))
        return jobs

    def _save_now(self, document: dict[str, Any]) -> None:
        self.store.backend.write_json(f"jobs/{document['id']}/job.json", document)

    # -- running --------------------------------------------------------------------------------

    def _request(self, job: Job) -> PrecomputeRequest:
        spec = job.spec
        data = (
            Path(spec.server_path)
            if spec.server_path
            else StoredObject(self.store.backend, f"jobs/{job.id}/input.jsonl")
        )
        return PrecomputeRequest(
            teacher=spec.teacher,
            data=data,
            out=self.store.url,
            dataset=spec.dataset,
            top_k=spec.top_k,
            max_len=spec.max_len or None,
            overflow=spec.overflow,
            segment_positions=self.segment_positions,
            max_in_flight=self.max_in_flight,
            license=spec.license or None,
            progress=False,
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
        if save:
            # A snapshot taken now, written in order by the writer thread.
            self._writer.submit(self._save_now, asdict(job))
        self._changed[job.id].set()

    def _publish_counts(self) -> None:
        counts: dict[str, int] = {}
        for j in self._jobs.values():
            counts[j.state] = counts.get(j.state, 0) + 1
        self.metrics.set_job_counts(counts)


def _input_bytes(sequences: Sequence[Sequence[int]], texts: Sequence[str]) -> bytes:
    """A streamed job input as the JSONL file the job reads (empty: none was streamed)."""
    rows = [json.dumps({"input_ids": list(s)}) for s in sequences]
    rows += [json.dumps({"text": t}) for t in texts]
    return ("\n".join(rows) + "\n").encode("utf-8") if rows else b""


def _positions(report: InputReport) -> int:
    return sum(len(s.input_ids) for s in report.sequences)
