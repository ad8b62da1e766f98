"""``logitcache bench capture``: is the store's pipeline as fast as vLLM itself?

One engine, the same token sequences, alternating rounds of (a) vLLM alone with the capture's
logprob settings (results dropped) and (b) precompute's pipeline end to end (capture, convert,
encode, write, seal) into a fresh store. The best round of each is reported.

With ``--data`` (an input as precompute takes it) or ``--data-tokens N`` (a sharded JSONL input
of about N tokens of the demo language, written to a temporary directory), it compares input
readers instead: the streamed reader (``server.inputs.load_sequences``) and, as the baseline, the
whole-file reader precompute had before inputs were streamed, reimplemented here
(``whole_file_sequences``). Each reads the whole input in a process of its own, which reports its
time and peak RSS; then each feeds a capture of the leading shards holding ``--capture-positions``
positions (a whole input may take hours on a small machine), reporting positions/s end to end,
the best of ``--rounds`` alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.bench.capture_modes import capture_pipeline, print_mode_figures, timed_gather
from logitcache.bench.synthetic import benchmark_sequences
from logitcache.demo.assets import demo_teacher_path
from logitcache.demo.language import generate_documents
from logitcache.demo.large_vocab import large_vocab_teacher_path
from logitcache.server.engine.protocol import EngineOptions
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.inputs import InputSource, input_shards, input_source, load_sequences
from logitcache.server.spool import teacher_tokenize
from logitcache.server.teachers.identity import TeacherInfo, resolve_teacher, topk_space

READERS = ("streamed", "whole-file")
READER_LABELS = {
    "streamed": "streamed (inputs.load_sequences)",
    "whole-file": "baseline: whole-file reader (the old one, reimplemented here)",
}
SHARDS = 100  # of a generated input: 100k tokens each at the 10M
MIB = 1 << 20


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
        raw = functools.partial(engine.raw_output, k=args.top_k)  # vLLM alone, results dropped
        await timed_gather(sequences[:16], in_flight, raw)  # warm-up
        alone, pipeline, nbytes = [], [], 0
        for r in range(args.rounds):
            alone.append(await timed_gather(sequences, in_flight, raw))
            seconds, nbytes = await capture_pipeline(engine, space, sequences, in_flight)
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
    if teacher == "large":
        teacher = str(large_vocab_teacher_path())
    if args.data is None and args.data_tokens is None:
        asyncio.run(_run(args, options, teacher))
        return
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-input-") as scratch:
        data: InputSource
        if args.data is not None:
            data = input_source(args.data)
        else:
            data = write_demo_shards(Path(scratch), args.data_tokens, teacher)
        asyncio.run(_run_readers(args, options, teacher, data))


# -- readers ------------------------------------------------------------------------------------


def write_demo_shards(directory: Path, tokens: int, teacher: str, shards: int = SHARDS) -> Path:
    """About ``tokens`` tokens of the demo language as ``shards`` JSONL files of ``{"text"}``
    rows; the length in tokens is estimated from a tokenised sample's characters per token."""
    info = resolve_teacher(teacher)
    sample = generate_documents(1000, seed=0)
    chars_per_token = sum(map(len, sample)) / sum(map(len, teacher_tokenize(info)(sample)))
    per_shard = tokens * chars_per_token / shards
    for shard in range(shards):
        path, written = directory / f"part-{shard:05d}.jsonl", 0
        with open(path, "w", encoding="utf-8") as f:
            block = 0
            while written < per_shard:
                documents = generate_documents(200, seed=1 + shard * 100_000 + block)
                f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
                written += sum(map(len, documents))
                block += 1
    return directory


def whole_file_sequences(
    shards: Sequence[InputSource],
    vocab_size: int,
    max_len: int,
    tokenize: Callable[[list[str]], list[list[int]]],
) -> list[np.ndarray]:
    """Baseline: how precompute read its input before inputs were streamed. Every row of the
    input is parsed and held, all texts are tokenised in one call, and every checked sequence is
    kept as an array of its own (here over the shards in name order, as one file would be)."""
    rows: list[str | list[int]] = []  # a row's text, or its ids
    for shard in shards:
        with open(str(shard), "rb") as f:
            for line in f.read().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows.append(row["input_ids"] if "input_ids" in row else row["text"])
    texts = [r for r in rows if isinstance(r, str)]
    tokenized = iter(tokenize(texts) if texts else [])
    sequences = []
    for row in rows:
        ids = np.asarray(next(tokenized) if isinstance(row, str) else row)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError("a row's ids are outside the teacher's vocabulary")
        sequences += [ids[i : i + max_len].astype(np.int32) for i in range(0, len(ids), max_len)]
    return sequences


def read_input(
    reader: str, data: InputSource, info: TeacherInfo, max_len: int
) -> Sequence[np.ndarray]:
    """The checked token sequences of ``data`` by ``reader`` (one of READERS)."""
    tokenize = teacher_tokenize(info)
    if reader == "whole-file":
        return whole_file_sequences(input_shards(data), info.vocab_size, max_len, tokenize)
    report = load_sequences(
        data, vocab_size=info.vocab_size, max_len=max_len, tokenize=tokenize, overflow="split"
    )
    return [s.input_ids for s in report.sequences]


def measure_reader(reader: str, data: InputSource, teacher: str) -> dict[str, Any]:
    """Read the whole input in this (fresh) process: seconds, size, and peak RSS, of the process
    and above what it held before reading (the imports and the tokenizer, loaded first)."""
    info = resolve_teacher(teacher)
    teacher_tokenize(info)(["warm up"])  # the tokenizer is loaded before the measure starts
    before = _peak_rss()
    started = time.perf_counter()
    sequences = read_input(reader, data, info, info.max_model_len - 1)
    seconds = time.perf_counter() - started
    tokens = int(sum(len(s) for s in sequences))
    peak = _peak_rss()
    return {"reader": reader, "seconds": seconds, "sequences": len(sequences), "tokens": tokens,
            "peak_rss": peak, "rss_over_start": peak - before}  # fmt: skip


def _peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _in_fresh_process(reader: str, data: InputSource, teacher: str) -> dict[str, Any]:
    """``measure_reader`` in a process of its own, so one reader's peak never counts for another."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(measure_reader, reader, data, teacher).result()


def _leading_shards(data: InputSource, info: TeacherInfo, positions: int, into: Path) -> Path:
    """A directory of links to the fewest leading shards of ``data`` that hold at least
    ``positions`` tokens (counted by the streamed reader): the capture's input."""
    tokenize, held = teacher_tokenize(info), 0
    for n, shard in enumerate(input_shards(data)):
        (into / f"{n:05d}-{Path(str(shard)).name}").symlink_to(Path(str(shard)).resolve())
        report = load_sequences(shard, vocab_size=info.vocab_size,
                                max_len=info.max_model_len - 1, tokenize=tokenize,
                                overflow="split")  # fmt: skip
        held += sum(len(s.input_ids) for s in report.sequences)
        if held >= positions:
            break
    return into


async def _run_readers(
    args: argparse.Namespace, options: EngineOptions, teacher: str, data: InputSource
) -> None:
    loop = asyncio.get_running_loop()
    shards = input_shards(data)
    size = sum(Path(str(s)).stat().st_size for s in shards if Path(str(s)).is_file())
    print(f"input {data}: {len(shards)} shards, {size / MIB:,.1f} MiB; teacher {teacher}")
    print("\nreading the whole input, each reader in a fresh process:")
    print(f"{'reader':64s}{'seconds':>9s}{'tokens/s':>12s}{'peak RSS':>11s}{'above start':>13s}")
    for reader in READERS:
        r = await loop.run_in_executor(None, _in_fresh_process, reader, data, teacher)
        print(
            f"{READER_LABELS[reader]:64s}{r['seconds']:>9.1f}{r['tokens'] / r['seconds']:>12,.0f}"
            f"{r['peak_rss'] / MIB:>8,.0f} MiB{r['rss_over_start'] / MIB:>9,.0f} MiB"
        )
    print(f"  ({r['tokens']:,} tokens in {r['sequences']:,} sequences)")

    info = resolve_teacher(teacher, options.revision, options.download_dir)
    max_len = info.max_model_len - 1
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-subset-") as links:
        subset = await loop.run_in_executor(
            None, _leading_shards, data, info, args.capture_positions, Path(links)
        )
        engine = VLLMEngine(info, options)
        try:
            space = topk_space(info, engine.dtype, args.top_k)
            print(
                f"\ncapture (k={args.top_k}) of the first {len(input_shards(subset))} shard(s), "
                "each reader feeding precompute's pipeline (read + capture, fresh store each; "
                f"best of {args.rounds} alternating rounds after a warm-up):"
            )
            print(f"{'reader':64s}{'positions':>11s}{'read s':>8s}{'capture s':>11s}"
                  f"{'positions/s':>13s}")  # fmt: skip
            best: dict[str, tuple[int, float, float]] = {}  # reader -> positions, read, capture
            for round_ in range(args.rounds + 1):  # round 0 warms the engine up, unreported
                for reader in READERS:
                    started = time.perf_counter()
                    sequences = await loop.run_in_executor(
                        None, read_input, reader, subset, info, max_len
                    )
                    read_s = time.perf_counter() - started
                    if round_ == 0:
                        warm_up = functools.partial(engine.raw_output, k=args.top_k)
                        await timed_gather(list(sequences[:64]), 256, warm_up)
                        continue
                    capture_s, _ = await capture_pipeline(engine, space, list(sequences), 256)
                    positions = int(sum(len(s) for s in sequences))
                    if reader not in best or read_s + capture_s < sum(best[reader][1:]):
                        best[reader] = (positions, read_s, capture_s)
            for reader, (positions, read_s, capture_s) in best.items():
                print(f"{READER_LABELS[reader]:64s}{positions:>11,}{read_s:>8.1f}"
                      f"{capture_s:>11.1f}{positions / (read_s + capture_s):>13,.0f}")  # fmt: skip
        finally:
            engine.shutdown()
