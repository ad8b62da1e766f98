"""Precompute jobs run by the server: submitted, watched, cancelled, and resumed after a restart.

A job is a precompute run with the server's own engine and store. Its spec and its input (the
sequences or texts a client streamed) are written to the store before the job is accepted, so a
server killed at any point finds every unfinished job on restart and runs it again; the
precompute's own resume logic then skips what was already sealed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from logitcache.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from logitcache.server.inputs import OVERFLOW_POLICIES
from logitcache.server.metrics import ServerMetrics
from logitcache.server.precompute import PrecomputeRequest, precompute, prepare_inputs
from logitcache.server.store.store import Store, validate_dataset_name
from logitcache.server.teachers.registry import TeacherRegistry

JOB_PRIORITY = 1  # after interactive requests (0) in the engine's queue
ACTIVE = ("queued", "running")
_RATE_WINDOW_S = 10.0


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
class JobState:
    id: str
    spec: JobSpec
    state: str = "queued"
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
    def from_json(cls, obj: dict) -> JobState:
        return cls(**{**obj, "spec": JobSpec(**obj["spec"])})


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
        self._jobs: dict[str, JobState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._slots = asyncio.Semaphore(max_running)
        self._rate: dict[str, list[tuple[float, int]]] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def resume(self) -> int:
        """Load all jobs from the store and restart the unfinished ones; returns how many."""
        restarted = 0
        for job_id in self.store.storage.list_dir("jobs"):
            rel = f"jobs/{job_id}/job.json"
            if not self.store.storage.exists(rel):
                continue
            job = JobState.from_json(self.store.storage.read_json(rel))
            self._jobs[job.id] = job
            self._changed[job.id] = asyncio.Event()
            if job.state in ACTIVE:
                job.state = "queued"
                self._launch(job)
                restarted += 1
        self._publish_counts()
        return restarted

    async def close(self) -> None:
        """Stop running jobs without marking them ended: they resume on the next start."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # -- requests -------------------------------------------------------------------------------

    async def submit(
        self, spec: JobSpec, sequences: Iterable[list[int]], texts: Iterable[str]
    ) -> JobState:
        """Check the spec and input completely, persist both, then queue the job."""
        validate_dataset_name(spec.dataset)
        teacher = self.teachers.get(spec.teacher)
        spec.teacher = teacher.name
        spec.top_k = teacher.resolve_k(spec.top_k)
        if spec.overflow not in OVERFLOW_POLICIES:
            raise InvalidArgument(
                f"overflow must be one of {OVERFLOW_POLICIES}, not {spec.overflow!r}"
            )
        if spec.dataset in self.store.datasets() or any(
            j.spec.dataset == spec.dataset and j.state in ACTIVE for j in self._jobs.values()
        ):
            raise AlreadyExists(
                f"dataset {spec.dataset!r} already exists or is being built; choose another name"
            )
        job = JobState(id=uuid.uuid4().hex[:16], spec=spec)
        input_rel = f"jobs/{job.id}/input.jsonl"
        rows = [json.dumps({"input_ids": list(s)}) for s in sequences]
        rows += [json.dumps({"text": t}) for t in texts]
        if spec.server_path and rows:
            raise InvalidArgument("give either server_path or streamed sequences/texts, not both")
        if not spec.server_path and not rows:
            raise InvalidArgument("a job needs sequences, texts or a server_path")
        self.store.storage.make_dirs(f"jobs/{job.id}")
        if rows:
            self.store.storage.path(input_rel).write_text("\n".join(rows) + "\n")
        req = self._request(job)
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(None, prepare_inputs, req, teacher.info)
        except BaseException:  # bad input, or the client went away: leave nothing behind
            self.store.storage.remove_tree(f"jobs/{job.id}")
            raise
        job.sequences_total = len(report.sequences)
        job.positions_total = sum(len(s.input_ids) for s in report.sequences)
        self._jobs[job.id] = job
        self._changed[job.id] = asyncio.Event()
        self._save(job)
        self._launch(job)
        return job

    def get(self, job_id: str) -> JobState:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"job {job_id!r} does not exist") from None

    def list(self) -> list[JobState]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> JobState:
        job = self.get(job_id)
        if job.state not in ACTIVE:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state})")
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
        self._finish(job, "cancelled")
        return job

    async def watch(self, job_id: str) -> AsyncIterator[JobState]:
        """The job now, then after every change, until it ends."""
        job = self.get(job_id)
        event = self._changed[job_id]
        while True:
            event.clear()
            yield job
            if job.state not in ACTIVE:
                return
            await event.wait()

    # -- running --------------------------------------------------------------------------------

    def _request(self, job: JobState) -> PrecomputeRequest:
        spec = job.spec
        data = spec.server_path or str(self.store.storage.path(f"jobs/{job.id}/input.jsonl"))
        if spec.server_path and not Path(spec.server_path).is_file():
            raise InvalidArgument(f"server_path {spec.server_path!r} is not a file on the server")
        return PrecomputeRequest(
            teacher=spec.teacher,
            data=Path(data),
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

    def _launch(self, job: JobState) -> None:
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job))
        self._publish_counts()

    async def _run(self, job: JobState) -> None:
        try:
            async with self._slots:
                if job.state != "queued":
                    return
                teacher = self.teachers.get(job.spec.teacher)
                job.state, job.started_at = "running", time.time()
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
                self._finish(job, "completed")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the job fails; the server goes on
            job.error = str(e) or type(e).__name__
            self._finish(job, "failed")
        finally:
            self._tasks.pop(job.id, None)

    def _progress(self, job: JobState, sequences_done: int, positions_done: int) -> None:
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

    def _finish(self, job: JobState, state: str) -> None:
        job.state, job.finished_at = state, time.time()
        if state == "completed":
            job.eta_seconds = 0.0
        self.metrics.remove_job(job.id)
        self._changed_now(job)
        self._publish_counts()

    def _changed_now(self, job: JobState, *, save: bool = True) -> None:
        if save:
            self._save(job)
        self._changed[job.id].set()

    def _save(self, job: JobState) -> None:
        self.store.storage.write_json(f"jobs/{job.id}/job.json", asdict(job))

    def _publish_counts(self) -> None:
        counts: dict[str, int] = {}
        for j in self._jobs.values():
            counts[j.state] = counts.get(j.state, 0) + 1
        self.metrics.set_job_counts(counts)
