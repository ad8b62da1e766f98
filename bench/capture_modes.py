"""``bench capture``'s capture modes: positions/s and bytes/position of top-64, top-p 0.95,
sampled U=12 and top-64 with three temperatures, beside vLLM's prefill-only limit, one engine.

Rounds alternate between the modes and the baselines, so that machine load falls on all of them
alike; the best round of each is reported. Every mode runs precompute's pipeline end to end into
a fresh store (capture, convert, encode, write, seal), and its bytes are the store's: top-64 with
temperatures stores each position's log tail mass at T = 1, 2, 4 beside the top-64 arrays
(``client.codecs.tempered``), from the engine's log-normalisers.

Two more rows say what any capture of every position must pay on top of the prefill: vLLM's own
``prompt_logprobs=1`` (the output layer and a log-softmax at every prompt position, results
dropped), and the output layer's matmul alone ([T, H] x [H, V] in torch, in this process while
the engine is idle), with the ceiling it leaves a capture (prefill and that matmul, nothing
else). vLLM's CPU build runs its output layer through oneDNN on prepacked weights, which can be
faster than torch's matmul here, so these two rows are indicative, not bounds. Prefill-only
computes the output layer at one position per sequence, so where the output layer outweighs the
model (a large vocabulary on a small model) no capture comes near it.
"""

from __future__ import annotations

import asyncio
import json
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
PREFILL = "prefill only (no logprobs)"
PROMPT_LOGPROBS = "vLLM prompt_logprobs=1"
MATMUL_ROWS = 2048  # rows of one output-layer matmul (vLLM's default tokens per step on CPUs)


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


def output_layer_rate(info: TeacherInfo, positions: int) -> float:
    """Positions/s of the teacher's output layer alone: ``positions`` rows through a float32
    [H] x [H, V] matmul in torch, MATMUL_ROWS at a time (the best of three passes)."""
    import torch

    hidden = json.loads((info.path / "config.json").read_text())["hidden_size"]
    weight = torch.randn(info.vocab_size, hidden)
    rows = torch.randn(MATMUL_ROWS, hidden)
    calls = max(1, positions // MATMUL_ROWS)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(calls):
            torch.nn.functional.linear(rows, weight)
        best = min(best, time.perf_counter() - started)
    return calls * MATMUL_ROWS / best


async def print_mode_figures(engine: VLLMEngine, info: TeacherInfo,
                             sequences: list[np.ndarray], rounds: int) -> None:  # fmt: skip
    """Run the rounds and print the table (positions/s, ratios, bytes/position)."""
    positions = sum(len(s) for s in sequences)
    in_flight = 256
    spaces = {name: capture_space(info, engine.dtype, c) for name, c in MODES.items()}
    best: dict[str, float] = {}
    nbytes: dict[str, float] = {}

    async def prompt_logprobs(ids: np.ndarray) -> None:
        await engine.raw_output(ids, 1)

    await timed_gather(sequences[:16], in_flight, engine.prefill_only)  # warm-up (and self-check)
    await engine.capture(sequences[0], 64)
    for r in range(rounds):
        seconds = {PREFILL: await timed_gather(sequences, in_flight, engine.prefill_only),
                   PROMPT_LOGPROBS: await timed_gather(sequences, in_flight, prompt_logprobs)}  # fmt: skip
        for name, space in spaces.items():
            seconds[name], stored = await capture_pipeline(engine, space, sequences, in_flight)
            nbytes[name] = stored / positions
        for name, s in seconds.items():
            best[name] = max(best.get(name, 0.0), positions / s)
        print(f"modes round {r + 1}: " + "  ".join(f"{n}: {positions / s:,.0f}"
                                                   for n, s in seconds.items()))  # fmt: skip
    matmul = await asyncio.get_running_loop().run_in_executor(
        None, output_layer_rate, info, positions
    )
    prefill, top, floor = best[PREFILL], best["top-64"], best[PROMPT_LOGPROBS]
    print()
    print(f"{'capture mode (engine-side)':28s}{'positions/s':>13s}{'x prefill':>11s}"
          f"{'x top-64':>10s}{'bytes/pos':>11s}")  # fmt: skip
    for name, rate in best.items():
        size = f"{nbytes[name]:.1f}" if name in nbytes else "-"
        print(f"{name:28s}{rate:>13,.0f}{rate / prefill:>11.2f}{rate / top:>10.2f}{size:>11s}")
    # A capture's ceiling: the prefill plus the output layer at every position, nothing else.
    ceiling = 1 / (1 / prefill + 1 / matmul)
    for name, rate in (
        ("output layer matmul alone", matmul),
        ("prefill + that (ceiling)", ceiling),
    ):
        print(f"{name:28s}{rate:>13,.0f}{rate / prefill:>11.2f}{rate / top:>10.2f}{'-':>11s}")
    print(f"targets: top-64 >= 0.8x prefill ({top / prefill:.2f}; {top / floor:.2f}x vLLM's "
          f"prompt_logprobs=1); sampled >= 0.5x top-64 ({best['sampled U=12'] / top:.2f}); "
          f"temperatures >= 0.9x top-64 ({best[TEMPERED] / top:.2f})")  # fmt: skip
