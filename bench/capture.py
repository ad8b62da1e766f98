"""``logitcache bench capture``: is the store's pipeline as fast as vLLM itself?

One engine, the same token sequences, alternating rounds of (a) vLLM alone with the capture's
logprob settings (results dropped) and (b) precompute's pipeline end to end (capture, convert,
encode, write, seal) into a fresh store. The best round of each is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import numpy as np

from logitcache.bench.capture_modes import print_mode_figures
from logitcache.bench.synthetic import benchmark_sequences
from logitcache.client.space import CaptureSpace, record_key
from logitcache.demo.assets import demo_teacher_path
from logitcache.server.engine.protocol import EngineOptions
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.precompute import capture_into_store
from logitcache.server.store.store import open_store
from logitcache.server.teachers.identity import resolve_teacher, topk_space


async def _vllm_alone(
    engine: VLLMEngine, sequences: list[np.ndarray], k: int, in_flight: int
) -> float:
    slots = asyncio.Semaphore(in_flight)

    async def one(ids: np.ndarray) -> None:
        async with slots:
            await engine.raw_output(ids, k)

    started = time.perf_counter()
    await asyncio.gather(*(one(s) for s in sequences))
    return time.perf_counter() - started


async def _precompute_pipeline(
    engine: VLLMEngine, space: CaptureSpace, sequences: list[np.ndarray], in_flight: int
) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-") as root:
        store = open_store(root, writable=True)
        store.ensure_space(space)
        todo = [(record_key(space.space_id, s), s) for s in sequences]
        started = time.perf_counter()
        await capture_into_store(engine, store, space, todo, 1 << 16, in_flight, progress=False)
        seconds = time.perf_counter() - started
        return seconds, store.backend.stored_bytes(f"spaces/{space.space_id}/segments")


async def _run(args: argparse.Namespace, options: EngineOptions, teacher: str) -> None:
    info = resolve_teacher(teacher, options.revision, options.download_dir)
    sequences = benchmark_sequences(
        teacher, args.sequences, min(args.seq_len, info.max_model_len - 1)
    )
    positions = sum(len(s) for s in sequences)
    print(
        f"teacher {teacher}: vocab {info.vocab_size}; {len(sequences)} sequences x {len(sequences[0])} tokens = {positions:,} positions, k={args.top_k}"
    )
    engine = VLLMEngine(info, options)
    try:
        space = topk_space(info, engine.dtype, args.top_k)
        in_flight = 256
        await _vllm_alone(engine, sequences[:16], args.top_k, in_flight)  # warm-up
        alone, pipeline, nbytes = [], [], 0
        for r in range(args.rounds):
            alone.append(await _vllm_alone(engine, sequences, args.top_k, in_flight))
            seconds, nbytes = await _precompute_pipeline(engine, space, sequences, in_flight)
            pipeline.append(seconds)
            print(
                f"round {r + 1}: (a) {positions / alone[-1]:,.0f} pos/s  (b) {positions / seconds:,.0f} pos/s"
            )
        await print_mode_figures(engine, info, sequences, args.rounds)  # the capture modes' table
    finally:
        engine.shutdown()
    a, b = positions / min(alone), positions / min(pipeline)
    naive = 8 * args.top_k
    print()
    print(f"{'':40s}{'positions/s':>14s}")
    print(f"{'(a) vLLM alone (same logprob settings)':40s}{a:>14,.0f}")
    print(f"{'(b) precompute end to end':40s}{b:>14,.0f}")
    print(f"ratio (b)/(a): {b / a:.3f}  (target >= 0.9)")
    print(
        f"store bytes/position at k={args.top_k}: {nbytes / positions:.1f}  (naive int32+fp32: {naive}; {naive * positions / nbytes:.1f}x smaller)"
    )


def run_capture_benchmark(args: argparse.Namespace, options: EngineOptions) -> None:
    teacher = args.teacher or str(demo_teacher_path())
    asyncio.run(_run(args, options, teacher))
