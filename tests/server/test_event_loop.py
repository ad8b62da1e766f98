"""The event loop keeps answering while an engine starts and while a large job is accepted.

A thread polls ``/healthz`` every ~20 ms from outside the loop, so a blocked loop shows as a
slow answer. The engine start is serve()'s own, through the default (vLLM) factory, which loads
for tens of seconds in the executor; the transformers reference engine loads in a fraction of a
second, too short to show anything. The job is 100k sequences accepted by
``JobManager.submit`` (serialised, written, read back and checked) on the reference engine.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from job_managers import USE

from logitcache.server.app import freeze_startup_heap, serve
from logitcache.server.config import ServerConfig, TeacherConfig
from logitcache.server.engine.reference import ReferenceEngine
from logitcache.server.http import make_http_app, start_http_side
from logitcache.server.jobs import JobManager, JobSpec
from logitcache.server.metrics import ServerMetrics
from logitcache.server.store.store import open_store
from logitcache.server.teachers.registry import TeacherRegistry

BOUND_S = 0.1  # every /healthz answer within 100 ms
POLL_S = 0.02


class HealthPoller:
    """Polls a /healthz URL from its own thread; records each answer's latency while told to."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._answered = threading.Event()
        self._recording = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    ok = r.status == 200
            except OSError as e:  # not listening yet, or an answer that never came
                ok = False
                if self._recording.is_set():
                    self.failures.append(repr(e))
            if ok:
                self._answered.set()
                if self._recording.is_set():
                    self.latencies.append(time.perf_counter() - started)
            time.sleep(POLL_S)

    async def answering(self) -> None:
        """Return once the URL has answered (the HTTP side is up)."""
        async with asyncio.timeout(60):
            while not self._answered.is_set():
                await asyncio.sleep(0.005)

    @contextmanager
    def recording(self) -> Iterator[None]:
        self._recording.set()
        try:
            yield
        finally:
            self._recording.clear()

    def assert_prompt(self, at_least: int) -> None:
        """No failed poll, enough polls to mean something, and every answer within the bound."""
        assert not self.failures, self.failures
        assert len(self.latencies) >= at_least, f"only {len(self.latencies)} polls"
        slowest = max(self.latencies)
        assert slowest < BOUND_S, f"a /healthz answer took {slowest * 1e3:.0f} ms"

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_healthz_answers_while_the_engine_starts(demo_teacher: Path, tmp_path: Path) -> None:
    """serve() with the production factory: vLLM loads for tens of seconds in the executor."""
    http_port = free_port()
    config = ServerConfig(
        store=str(tmp_path / "store"),
        teachers=[TeacherConfig("demo", str(demo_teacher), max_top_k=8, default_top_k=8)],
        port=0,
        http_port=http_port,
        allow_anonymous=True,
    )

    async def scenario(poller: HealthPoller) -> tuple[int, int]:
        stop, ready = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(serve(config, stop=stop, on_ready=lambda *_: ready.set()))
        readyz = f"http://127.0.0.1:{http_port}/readyz"
        try:
            await poller.answering()  # the HTTP side is up; the teacher is being started
            with poller.recording():
                starting = await asyncio.to_thread(http_status, readyz)
                async with asyncio.timeout(600):
                    await ready.wait()
            return starting, await asyncio.to_thread(http_status, readyz)
        finally:
            stop.set()
            await server

    with HealthPoller(f"http://127.0.0.1:{http_port}/healthz") as poller:
        while_starting, once_ready = asyncio.run(scenario(poller))
    assert (while_starting, once_ready) == (503, 200)
    poller.assert_prompt(at_least=50)  # an engine start lasts seconds: many polls


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_healthz_answers_while_a_large_job_is_accepted(demo_teacher: Path, tmp_path: Path):
    sequences = np.random.default_rng(0).integers(4, 1785, size=(100_000, 8)).tolist()

    async def scenario() -> tuple[int, HealthPoller]:
        config = TeacherConfig("demo", str(demo_teacher))
        teachers = await TeacherRegistry.start([config], ReferenceEngine)
        metrics = ServerMetrics()
        http = await start_http_side(make_http_app(metrics, all_ready), "127.0.0.1", 0)
        store = open_store(str(tmp_path / "store"), writable=True)
        jobs = JobManager(store, teachers, metrics, max_running=1, max_in_flight=4,
                          segment_positions=1 << 16)  # fmt: skip
        freeze_startup_heap()  # as serve() does once it has started
        try:
            with HealthPoller(f"http://127.0.0.1:{http.port}/healthz") as poller:
                await poller.answering()
                with poller.recording():
                    job = await jobs.submit(JobSpec(use=USE, dataset="large"), sequences, [])
            jobs.cancel(job.id)  # accepted is all this test needs; its task has not run yet
            return job.sequences_total, poller
        finally:
            gc.unfreeze()
            await jobs.close()
            await http.close()
            teachers.shutdown()

    accepted, poller = asyncio.run(scenario())
    assert accepted == len(sequences)
    poller.assert_prompt(at_least=10)


async def all_ready() -> dict[str, bool]:
    return {"engine": True, "store": True}
