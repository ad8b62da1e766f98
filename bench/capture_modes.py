"""``bench capture``'s capture modes: positions/s and bytes/position of top-64, top-p 0.95,
sampled U=12 and top-64 with three temperatures, beside vLLM's prefill-only limit, one engine.

Rounds alternate between the modes and the prefill-only run, so that machine load falls on all
of them alike; the best round of each is reported. Every mode runs precompute's pipeline end to
end into a fresh store (capture, convert, encode, write, seal), and its bytes are the store's:
top-64 with temperatures stores each position's log tail mass at T = 1, 2, 4 beside the top-64
arrays (``client.codecs.tempered``), from the engine's log-normalisers.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable

import numpy as np

from logitcache.client.space import CaptureMode, CaptureSpace, record_key
from logitcache.server.engine.capture import CaptureConfig
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.precompute import capture_into_store
from logitcache.server.store.store import open_store
from logitcache.server.teachers.identity import TeacherInfo, capture_space

TEMPERATURES = (1.0, 2.0, 4.0)
MODES = {
    "top-64": CaptureConfig(CaptureMode.TOPK, 64),
    "top-p 0.95 (max 64)": CaptureConfig(CaptureMode.TOP_P, 64, 0.95),
    "sampled U=12": CaptureConfig(CaptureMode.SAMPLED, 12),
    "top-64 + T=1,2,4": CaptureConfig(CaptureMode.TOPK, 64, temperatures=TEMPERATURES),
}
TEMPERED = "top-64 + T=1,2,4"


async def timed_gather(
    sequences: list[np.ndarray], in_flight: int, one: Callable[[np.ndarray], Awaitable[object]]
) -> float:
    """Seconds to run ``one`` on every sequence, at most ``in_flight`` at a time."""
    slots = asyncio.Semaphore(in_flight)

    async def bounded(ids: np.ndarray) -> None:
        async with slots:
            await one(ids)

    started = time.perf_counter()
    await asyncio.gather(*(bounded(s) for s in sequences))
    return time.perf_counter() - started


async def capture_pipeline(engine: VLLMEngine, space: CaptureSpace, sequences: list[np.ndarray],
                           in_flight: int) -> tuple[float, int]:  # fmt: skip
    """Seconds to capture ``sequences`` into a fresh store the way precompute does, and the
    bytes its sealed segments take."""
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-") as root:
        store = open_store(root, writable=True)
        store.ensure_space(space)
        todo = [(record_key(space.space_id, s), s) for s in sequences]
        started = time.perf_counter()
        await capture_into_store(engine, store, space, todo, 1 << 16, in_flight, progress=False)
        seconds = time.perf_counter() - started
        return seconds, store.backend.stored_bytes(f"spaces/{space.space_id}/segments")


async def print_mode_figures(engine: VLLMEngine, info: TeacherInfo,
                             sequences: list[np.ndarray], rounds: int) -> None:  # fmt: skip
    """Run the rounds and print the table (positions/s, ratios, bytes/position)."""
    positions = sum(len(s) for s in sequences)
    in_flight = 256
    spaces = {name: capture_space(info, engine.dtype, c) for name, c in MODES.items()}
    best: dict[str, float] = {}
    nbytes: dict[str, float] = {}
    await timed_gather(sequences[:16], in_flight, engine.prefill_only)  # warm-up (and self-check)
    await engine.capture(sequences[0], 64)
    for r in range(rounds):
        seconds = {"prefill only (no logprobs)": await timed_gather(sequences, in_flight,
                                                               engine.prefill_only)}  # fmt: skip
        for name, space in spaces.items():
            seconds[name], stored = await capture_pipeline(engine, space, sequences, in_flight)
            nbytes[name] = stored / positions
        for name, s in seconds.items():
            best[name] = max(best.get(name, 0.0), positions / s)
        print(f"modes round {r + 1}: " + "  ".join(f"{n}: {positions / s:,.0f}"
                                                   for n, s in seconds.items()))  # fmt: skip
    prefill, top = best["prefill only (no logprobs)"], best["top-64"]
    print()
    print(f"{'capture mode (engine-side)':28s}{'positions/s':>13s}{'x prefill':>11s}"
          f"{'x top-64':>10s}{'bytes/pos':>11s}")  # fmt: skip
    for name, rate in best.items():
        size = f"{nbytes[name]:.1f}" if name in nbytes else "-"
        print(f"{name:28s}{rate:>13,.0f}{rate / prefill:>11.2f}{rate / top:>10.2f}{size:>11s}")
    print(f"targets: top-64 >= 0.8x prefill ({top / prefill:.2f}); sampled >= 0.5x top-64 "
          f"({best['sampled U=12'] / top:.2f}); temperatures >= 0.9x top-64 "
          f"({best[TEMPERED] / top:.2f})")  # fmt: skip
