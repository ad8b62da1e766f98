"""``logitcache bench storage``: bytes per position and fidelity of every encoding, same positions.

The teacher runs once under vLLM with full-vocabulary log-probs, so every encoding below is made
from the same exact distributions:

    naive           int32 ids + float32 log-probs, k per position (the uncompressed baseline)
    distillkit      our re-implementation of DistillKit's compressed format (bench/distillkit.py)
    topk-q64-delta-v1   the first logitcache codec (fixed k, no stored tail)
    topk-v2         the default codec
    top_p:P         adaptive k with topk-v2 (the shortest prefix of the top k reaching P)
    sampled-v1      U draws per position from the full distribution

Bytes for logitcache encodings are what a sealed segment of all positions takes on disk (zarr
files, compression, metadata). Encode and decode rates are the codec's numpy work on one thread
("read + decode" adds reading the sealed segment back, including decompression). Fidelity is
measured against the engine's exact top-k (see logitcache.client.fidelity). The sampled mode
is also encoded over a large synthetic vocabulary: the same distributions with token ids mapped
injectively into ``--synthetic-vocab`` ids, since the byte target is about large vocabularies.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logitcache.bench.distillkit import DistillKitStyleCodec
from logitcache.bench.synthetic import benchmark_sequences
from logitcache.client.codecs import (
    QuantizedTopKCodec,
    SampledCodec,
    TopKCodec,
    TopKRows,
    concat_rows,
)
from logitcache.client.fidelity import fidelity
from logitcache.client.space import CaptureSpace, record_key
from logitcache.demo.assets import demo_teacher_path
from logitcache.server.engine.capture import FULL_VOCAB, CaptureConfig, top_p_rows
from logitcache.server.engine.protocol import EngineOptions
from logitcache.server.engine.sampling import rng_for_key, sample_rows
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.store.backend import LocalBackend
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.writer import CapturedRecord, write_segment
from logitcache.server.teachers.identity import capture_space, resolve_teacher


@dataclass
class Captured:
    """The bench's positions: exact top-k rows, and sampled rows, over the teacher's vocabulary
    and over the synthetic one (ids mapped)."""

    exact: TopKRows
    sampled: TopKRows
    exact_big: TopKRows
    sampled_big: TopKRows
    lengths: list[int]
    mean_entropy: float


async def _capture(args, teacher: str) -> Captured:
    info = resolve_teacher(teacher)
    sequences = benchmark_sequences(
        teacher, args.sequences, min(args.seq_len, info.max_model_len - 1), seed=args.seed
    )
    engine = VLLMEngine(info, EngineOptions(max_top_k=1, full_vocab=True))
    try:
        vocab = engine.vocab_size
        sampled_space = capture_space(info, engine.dtype, CaptureConfig("sampled", args.samples))
        mapping = np.random.default_rng(args.seed).choice(
            args.synthetic_vocab, size=vocab, replace=False
        )
        slots = asyncio.Semaphore(32)
        entropy: list[float] = []

        async def one(ids: np.ndarray) -> tuple[TopKRows, ...]:
            async with slots:
                full = await engine.capture(ids, FULL_VOCAB)
            key = record_key(sampled_space.space_id, ids)
            lp = full.logprobs.astype(np.float64)
            entropy.append(float(-(np.exp(lp) * lp).sum(axis=1).mean()))
            exact = TopKRows(
                full.token_ids[:, : args.top_k].copy(),
                full.logprobs[:, : args.top_k].copy(),
                full.target_logprobs,
            )
            big_full = TopKRows(mapping[full.token_ids], full.logprobs, full.target_logprobs)
            big_exact = TopKRows(
                mapping[exact.token_ids].astype(np.int32), exact.logprobs, exact.target_logprobs
            )
            return (
                exact,
                sample_rows(full, args.samples, rng_for_key(key)),
                big_exact,
                sample_rows(big_full, args.samples, rng_for_key(key)),
            )

        started = time.perf_counter()
        out = await asyncio.gather(*(one(s) for s in sequences))
        seconds = time.perf_counter() - started
    finally:
        engine.shutdown()
    positions = sum(len(s) for s in sequences)
    print(
        f"captured {positions:,} positions with full-vocabulary log-probs in {seconds:.1f} s "
        f"({positions / seconds:,.0f} positions/s)",
        flush=True,
    )
    return Captured(
        exact=concat_rows([o[0] for o in out]),
        sampled=concat_rows([o[1] for o in out]),
        exact_big=concat_rows([o[2] for o in out]),
        sampled_big=concat_rows([o[3] for o in out]),
        lengths=[len(s) for s in sequences],
        mean_entropy=float(np.mean(entropy)),
    )


def _best_rate(fn: Callable[[], object], positions: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return positions / best


@dataclass
class Row:
    name: str
    vocab: int
    bytes_per_position: float
    encode_rate: float
    decode_rate: float
    read_rate: float | None
    fid: dict[str, float] | None
    note: str = ""


def _store_encoding(
    root: str, name: str, codec, rows: TopKRows, lengths: list[int], vocab: int, repeats: int
) -> tuple[float, float, float, float, TopKRows]:
    """(bytes/pos on disk, encode rate, decode rate, read+decode rate, decoded rows)."""
    positions = len(rows)
    encode_rate = _best_rate(lambda: codec.encode(rows), positions, repeats)
    arrays = codec.encode(rows)
    decode_rate = _best_rate(lambda: codec.decode(arrays), positions, repeats)
    decoded = codec.decode(arrays)
    space = CaptureSpace("bench", "bench", vocab, name, 0, "float32", codec.name)
    backend = LocalBackend(Path(root) / f"{re.sub(r'[^A-Za-z0-9.-]', '_', name)}-{vocab}")
    # One record per sequence, the arrays sliced back apart by the codec's own row counts.
    single = _split_arrays(codec, arrays, lengths)
    records = [
        CapturedRecord(i.to_bytes(16, "little"), np.zeros(lengths[i], dtype=np.int32), part)
        for i, part in enumerate(single)
    ]
    segment_id = write_segment(backend, space, records)
    nbytes = backend.stored_bytes(f"spaces/{space.space_id}/segments")

    def read_and_decode() -> TopKRows:
        return codec.decode(SegmentReader(backend, space, segment_id).load())

    read_rate = _best_rate(read_and_decode, positions, repeats)
    return nbytes / positions, encode_rate, decode_rate, read_rate, decoded


def _split_arrays(codec, arrays: dict[str, np.ndarray], lengths: list[int]) -> list[dict]:
    bounds = np.cumsum(lengths)[:-1]
    per_entry = [f.name for f in codec.fields if f.per == "entry"]
    if per_entry:
        entries = np.add.reduceat(arrays["n"].astype(np.int64), np.r_[0, bounds])
        entry_bounds = np.cumsum(entries)[:-1]
    parts: list[dict] = [{} for _ in lengths]
    for f in codec.fields:
        pieces = np.split(arrays[f.name], entry_bounds if f.per == "entry" else bounds)
        for part, piece in zip(parts, pieces, strict=True):
            part[f.name] = piece
    return parts


def _fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}M"


def _print_table(rows: list[Row], reference: dict[int, float]) -> None:
    head = (
        f"{'encoding':<22}{'vocab':>8}{'B/pos':>8}{'vs DK':>7}{'enc/s':>8}{'dec/s':>8}"
        f"{'read+dec/s':>11}{'KL mean':>10}{'|err| mean':>11}{'|err| max':>10}"
        f"{'tail err':>10}{'err p>=1e-3':>12}{'dp p<1e-3':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        f = r.fid
        fid = (
            f"{f['kl_mean']:>10.2e}{f['abs_err_mean']:>11.4f}{f['abs_err_max']:>10.3f}"
            f"{f['tail_err_mean']:>10.2e}{f['max_err_p_ge_0.001']:>12.4f}"
            f"{f['max_prob_err_p_lt_0.001']:>11.1e}"
            if f is not None
            else f"{'':>10}{'':>11}{'':>10}{'':>10}{'':>12}{'':>11}"
        )
        print(
            f"{r.name:<22}{r.vocab:>8}{r.bytes_per_position:>8.1f}"
            f"{r.bytes_per_position / reference[r.vocab]:>7.2f}{_fmt_rate(r.encode_rate):>8}"
            f"{_fmt_rate(r.decode_rate):>8}{_fmt_rate(r.read_rate):>11}{fid}"
            + (f"  {r.note}" if r.note else "")
        )


def _sampled_entry_error(exact: TopKRows, decoded: TopKRows) -> tuple[float, float]:
    valid = exact.counts > 0
    err = np.abs(decoded.logprobs[valid].astype(np.float64) - exact.logprobs[valid])
    return float(err.mean()), float(err.max())


def run_storage_benchmark(args: argparse.Namespace) -> None:
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    teacher = args.teacher or str(demo_teacher_path())
    if args.top_k < 17:
        raise SystemExit("bench storage: --top-k must be at least 17 (DistillKit keeps 16 exact)")
    cap = asyncio.run(_capture(args, teacher))
    exact, k, vocab, big = cap.exact, args.top_k, int(cap.exact.token_ids.max()) + 1, None
    vocab = resolve_teacher(teacher).vocab_size
    big = args.synthetic_vocab
    positions, repeats = len(exact), args.repeats
    print(
        f"teacher {teacher}: vocab {vocab}, {positions:,} positions "
        f"({len(cap.lengths)} sequences), mean entropy {cap.mean_entropy:.2f} nats, k={k}; "
        f"synthetic vocabulary {big:,} (same distributions, ids mapped)\n",
        flush=True,
    )
    table: list[Row] = []

    naive = 8 * k
    ids32, lp32 = exact.token_ids.astype(np.int32), exact.logprobs.astype(np.float32)
    enc = _best_rate(lambda: (ids32.tobytes(), lp32.tobytes()), positions, repeats)
    blob_i, blob_l = ids32.tobytes(), lp32.tobytes()
    dec = _best_rate(
        lambda: (np.frombuffer(blob_i, np.int32).reshape(positions, k).copy(),
                 np.frombuffer(blob_l, np.float32).reshape(positions, k).copy()),
        positions, repeats,
    )  # fmt: skip
    table.append(
        Row(
            "naive int32+fp32",
            vocab,
            naive,
            enc,
            dec,
            None,
            fidelity(exact, exact, vocab).summary(),
        )
    )

    def distillkit(rows: TopKRows, v: int) -> Row:
        codec = DistillKitStyleCodec(v, k)
        buf = codec.encode(rows)
        enc = _best_rate(lambda: codec.encode(rows), positions, repeats)
        dec = _best_rate(lambda: codec.decode(buf), positions, repeats)
        fid = fidelity(rows, codec.decode(buf), v).summary()
        return Row("distillkit-style", v, codec.bytes_per_position, enc, dec, None, fid)

    dk = distillkit(exact, vocab)
    table.append(dk)
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-storage-") as root:

        def stored(name: str, codec, rows: TopKRows, v: int, ref: TopKRows, note="") -> Row:
            b, enc, dec, read, decoded = _store_encoding(
                root, name, codec, rows, cap.lengths, v, repeats
            )
            fid = fidelity(ref, decoded, v).summary() if rows.counts is None else None
            if fid is None:
                mean_err, max_err = _sampled_entry_error(rows, decoded)
                note = f"{note}; stored log-prob |err| mean {mean_err:.4f} max {max_err:.4f}"
            return Row(name, v, b, enc, dec, read, fid, note.strip("; "))

        table.append(stored("topk-q64-delta-v1", QuantizedTopKCodec(vocab), exact, vocab, exact))
        table.append(stored("topk-v2", TopKCodec(vocab), exact, vocab, exact))
        for top_p in args.top_p:
            adaptive = top_p_rows(exact, top_p)
            mean_n = float((adaptive.logprobs > -np.inf).sum(axis=1).mean())
            note = f"{mean_n:.1f} entries/position"
            table.append(
                stored(f"top_p:{top_p:g} (v2)", TopKCodec(vocab), adaptive, vocab, exact, note)
            )
        distinct = float((cap.sampled.counts > 0).sum(axis=1).mean())
        table.append(
            stored(
                f"sampled U={args.samples}",
                SampledCodec(vocab),
                cap.sampled,
                vocab,
                exact,
                f"{distinct:.1f} distinct ids/position",
            )  # fmt: skip
        )
        dk_big = distillkit(cap.exact_big, big)
        table.append(dk_big)
        table.append(stored("topk-v2", TopKCodec(big), cap.exact_big, big, cap.exact_big))
        table.append(
            stored(
                f"sampled U={args.samples}", SampledCodec(big), cap.sampled_big, big, cap.exact_big
            )  # fmt: skip
        )
    _print_table(table, {vocab: dk.bytes_per_position, big: dk_big.bytes_per_position})
    v2, v2_big, sampled_big = table[3], table[-2], table[-1]
    print(
        "\nvs DK: bytes/position over the DistillKit-style reference's at the same vocabulary "
        "size.\n"
        "KL mean: KL(exact top-k with tail || decoded top-k with tail) per position; "
        "err p>=1e-3: largest log-prob error over entries with p >= 1e-3 (nats); "
        "dp p<1e-3: largest probability error below that.\n"
    )
    checks = [
        (f"topk-v2 bytes/position <= 0.5 x DistillKit-style (vocab {vocab})",
         f"{v2.bytes_per_position:.1f} vs {dk.bytes_per_position:.1f} "
         f"= {v2.bytes_per_position / dk.bytes_per_position:.2f}x",
         v2.bytes_per_position <= 0.5 * dk.bytes_per_position),
        (f"topk-v2 bytes/position <= 0.5 x DistillKit-style (vocab {big:,})",
         f"{v2_big.bytes_per_position:.1f} vs {dk_big.bytes_per_position:.1f} "
         f"= {v2_big.bytes_per_position / dk_big.bytes_per_position:.2f}x",
         v2_big.bytes_per_position <= 0.5 * dk_big.bytes_per_position),
        ("topk-v2 mean KL <= DistillKit-style mean KL",
         f"{v2.fid['kl_mean']:.2e} vs {dk.fid['kl_mean']:.2e}",
         v2.fid["kl_mean"] <= dk.fid["kl_mean"]),
        ("topk-v2 every entry with p >= 1e-3 within 0.01 nats",
         f"max {v2.fid['max_err_p_ge_0.001']:.4f}", v2.fid["max_err_p_ge_0.001"] <= 0.01),
        ("topk-v2 every entry with p < 1e-3 within 1e-4 in probability",
         f"max {v2.fid['max_prob_err_p_lt_0.001']:.1e}",
         v2.fid["max_prob_err_p_lt_0.001"] <= 1e-4),
        (f"sampled U={args.samples} <= 40 bytes/position (vocab {big:,})",
         f"{sampled_big.bytes_per_position:.1f}", sampled_big.bytes_per_position <= 40),
        ("topk-v2 decode >= 2M positions/s on one core",
         f"{v2.decode_rate / 1e6:.2f}M (read + decode {v2.read_rate / 1e6:.2f}M)",
         v2.decode_rate >= 2e6),
    ]  # fmt: skip
    print("targets:")
    for what, value, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {what}: {value}")
