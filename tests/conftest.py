"""Session-wide fixtures: the demo teacher (built once, cached) and one vLLM engine per session."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LOGITCACHE_CACHE", str(REPO / ".cache"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ENGINE_TOP_K = 64


class LoopThread:
    """An asyncio loop on its own thread, so synchronous tests can drive the async engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def demo_teacher() -> Path:
    from logitcache.server.demo_assets import demo_teacher_path

    return demo_teacher_path(seed=0)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def engine(demo_teacher: Path, loop_thread: LoopThread):
    """The demo teacher under vLLM (CPU build here), started once for the whole session."""
    from logitcache.server.engine import VLLMEngine, VLLMOptions
    from logitcache.server.teacher import resolve_teacher

    async def start() -> VLLMEngine:
        return VLLMEngine(resolve_teacher(str(demo_teacher)), VLLMOptions(max_top_k=ENGINE_TOP_K))

    eng = loop_thread.run(start())
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def reference(demo_teacher: Path):
    from logitcache.server.reference_engine import TransformersReference

    return TransformersReference(demo_teacher)


@pytest.fixture(scope="session")
def demo_sequences(demo_teacher: Path) -> list:
    """Held-out demo-language token sequences of several lengths, including 1 and 2 tokens."""
    import numpy as np
    from transformers import AutoTokenizer

    from logitcache.server.demo_language import generate_documents

    tokenizer = AutoTokenizer.from_pretrained(str(demo_teacher))
    docs = tokenizer(generate_documents(12, seed=4242))["input_ids"]
    seqs = [np.asarray(ids, dtype=np.int32) for ids in docs]
    long = np.concatenate(seqs)[:700]
    return [seqs[0][:1], seqs[1][:2], *seqs, long]


class ServerProcess:
    """A real `logitcache serve` process on loopback (ports picked by the OS)."""

    def __init__(self, teacher: Path, store: Path, *extra: str, log_path: Path | None = None):
        import re
        import subprocess
        import sys
        import time

        self.store = store
        self.log_path = log_path or store.parent / f"{store.name}-serve.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logitcache.cli", "serve", "--teacher", f"demo={teacher}",
             "--store", str(store), "--port", "0", "--http-port", "0", "--max-top-k", "64",
             "--default-top-k", "16", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        pattern = re.compile(rb"serving gRPC on [^:]+:(\d+), HTTP on [^:]+:(\d+)")
        while time.monotonic() < deadline:
            match = pattern.search(self.log_path.read_bytes())
            if match:
                self.port, self.http_port = int(match.group(1)), int(match.group(2))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        else:
            self.kill()
            raise RuntimeError(f"server did not start:\n{self.log_path.read_text()[-3000:]}")
        self.target = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    def kill(self) -> None:
        """kill -9 of the server and its engine processes."""
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as an orchestrator would."""
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server(demo_teacher: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server for the session's client and service tests; its store starts empty."""
    proc = ServerProcess(demo_teacher, tmp_path_factory.mktemp("server") / "store")
    yield proc
    proc.stop()
