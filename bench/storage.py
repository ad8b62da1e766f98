"""``logitcache bench storage``: bytes per position and fidelity of every encoding, same positions.

It runs on two teachers by default, because one flatters the codecs: the demo teacher on its
synthetic language (peaked, repeated tails) and the real-text teacher on its held-out texts
(flat; :mod:`logitcache.demo.real_text`). ``--teacher`` and ``--data`` (JSONL texts) pick another
one. Each teacher runs once under vLLM with full-vocabulary log-probs, so every encoding below
is made from the same exact distributions, and each printout starts with the teacher's
statistics (vocabulary, mean entropy, top-k mass) so that a reader can tell a peaked case from a
flat one:

    naive           int32 ids + float32 log-probs, k per position (the uncompressed baseline)
    distillkit      our re-implementation of DistillKit's compressed format (bench/distillkit.py)
    topk-q64-delta-v1   the first logitcache codec (fixed k, no stored tail)
    topk-v2         the default codec before topk-v5
    topk-v3         topk-v2 on the contract grid
    topk-v4         topk-v3 with ids stored by per-segment frequency and input-token tables
    topk-v5         the default: topk-v4's rows, a segment storing each row's id set and
                    each id's value against its mean after the input token (per-segment lists
                    and means)
    topk-v6         topk-v5 with each token's list stored as a set, on coarse mean levels
    top_p:P         adaptive k with the default codec (the shortest prefix of the top k reaching P)
    sampled-v1      U draws per position from the full distribution

Bytes for logitcache encodings are what a sealed segment of all positions takes on disk (zarr
files, compression, metadata). Encode and decode rates are the codec's numpy work on one thread
("read + decode" adds reading the sealed segment back, including decompression). Fidelity is
measured against the engine's exact top-k (see logitcache.client.fidelity). Every encoding is
also made over a large synthetic vocabulary: the same distributions with token ids mapped
injectively into ``--synthetic-vocab`` ids, since real teachers' vocabularies are large.
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
    DEFAULT_CODEC,
    ContractGridTopKCodec,
    FrequencyOrderTopKCodec,
    LevelSetTopKCodec,
    PredictedValueTopKCodec,
    QuantizedTopKCodec,
    SampledCodec,
    TopKCodec,
    TopKRows,
    codec_for,
    concat_rows,
)
from logitcache.client.fidelity import fidelity
from logitcache.client.space import CaptureSpace, record_key
from logitcache.demo.assets import demo_teacher_path
from logitcache.demo.real_text import held_out_path, real_text_teacher_path
from logitcache.server.engine.capture import FULL_VOCAB, CaptureConfig, top_p_rows
from logitcache.server.engine.protocol import EngineOptions
from logitcache.server.engine.sampling import rng_for_key, sample_rows
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.inputs import load_sequences
from logitcache.server.store.backend import LocalBackend
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.writer import CapturedRecord, write_segment
from logitcache.server.teachers.identity import capture_space, resolve_teacher

DISTILLKIT = "distillkit-style"


@dataclass(frozen=True)
class Case:
    """A teacher and the texts it is measured on (None: demo-language sequences)."""

    label: str
    teacher: str
    data: str | None


@dataclass
class Captured:
    """The bench's positions: exact top-k rows, and sampled rows, over the teacher's vocabulary
    and over the synthetic one (ids mapped)."""

    exact: TopKRows
    sampled: TopKRows
    exact_big: TopKRows
    sampled_big: TopKRows
    lengths: list[int]
    inputs: list[np.ndarray]  # each sequence's input tokens (topk-v4's and v5's context)
    mean_entropy: float
    top_k_mass: float


def cases(args: argparse.Namespace) -> list[Case]:
    """``--teacher`` (with ``--data``), else the demo language next to the real-text teacher."""
    if args.teacher:
        return [Case(args.teacher, args.teacher, args.data)]
    real_text = real_text_teacher_path()
    return [
        Case("demo language", str(demo_teacher_path()), None),
        Case("real text", str(real_text), args.data or str(held_out_path(real_text))),
    ]


def data_sequences(teacher: str, data: str, count: int, length: int) -> list[np.ndarray]:
    """Up to ``count`` sequences of ``length`` tokens: the texts of ``data`` (JSONL, as precompute
    reads it), tokenised with the teacher's tokenizer, run together and cut."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    report = load_sequences(
        data,
        vocab_size=len(tokenizer),
        max_len=1 << 30,
        tokenize=lambda texts: tokenizer(texts)["input_ids"],
    )
    stream = np.concatenate([s.input_ids for s in report.sequences]).astype(np.int32)
    usable = min(count, stream.shape[0] // length)
    if usable == 0:
        raise SystemExit(f"bench storage: {data} has fewer than {length} tokens")
    return list(stream[: usable * length].reshape(usable, length))


async def _capture(args, case: Case) -> Captured:
    info = resolve_teacher(case.teacher)
    length = min(args.seq_len, info.max_model_len - 1)
    if case.data is None:
        sequences = benchmark_sequences(case.teacher, args.sequences, length, seed=args.seed)
    else:
        sequences = data_sequences(case.teacher, case.data, args.sequences, length)
    engine = VLLMEngine(info, EngineOptions(max_top_k=1, full_vocab=True))
    try:
        vocab = engine.vocab_size
        sampled_space = capture_space(info, engine.dtype, CaptureConfig("sampled", args.samples))
        mapping = np.random.default_rng(args.seed).choice(
            args.synthetic_vocab, size=vocab, replace=False
        )
        slots = asyncio.Semaphore(32)
        entropy: list[float] = []
        mass: list[float] = []

        async def one(ids: np.ndarray) -> tuple[TopKRows, ...]:
            async with slots:
                full = await engine.capture(ids, FULL_VOCAB)
            key = record_key(sampled_space.space_id, ids)
            lp = full.logprobs.astype(np.float64)
            entropy.append(float(-(np.exp(lp) * lp).sum(axis=1).mean()))
            mass.append(float(np.exp(lp[:, : args.top_k]).sum(axis=1).mean()))
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
        inputs=[np.asarray(s, dtype=np.int32) for s in sequences],
        mean_entropy=float(np.mean(entropy)),
        top_k_mass=float(np.mean(mass)),
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
    root: str, name: str, codec, rows: TopKRows, inputs: list[np.ndarray], vocab: int,
    repeats: int,
) -> tuple[float, float, float, float, TopKRows]:  # fmt: skip
    """(bytes/pos on disk, encode rate, decode rate, read+decode rate, decoded rows); one record
    per sequence, with its input tokens."""
    lengths = [len(i) for i in inputs]
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
        CapturedRecord(i.to_bytes(16, "little"), inputs[i], part) for i, part in enumerate(single)
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


def _naive_row(rows: TopKRows, vocab: int, k: int, repeats: int) -> Row:
    positions = len(rows)
    ids32, lp32 = rows.token_ids.astype(np.int32), rows.logprobs.astype(np.float32)
    enc = _best_rate(lambda: (ids32.tobytes(), lp32.tobytes()), positions, repeats)
    blob_i, blob_l = ids32.tobytes(), lp32.tobytes()
    dec = _best_rate(
        lambda: (np.frombuffer(blob_i, np.int32).reshape(positions, k).copy(),
                 np.frombuffer(blob_l, np.float32).reshape(positions, k).copy()),
        positions, repeats,
    )  # fmt: skip
    fid = fidelity(rows, rows, vocab).summary()
    return Row("naive int32+fp32", vocab, 8 * k, enc, dec, None, fid)


def _distillkit_row(rows: TopKRows, vocab: int, k: int, repeats: int) -> Row:
    codec = DistillKitStyleCodec(vocab, k)
    buf = codec.encode(rows)
    enc = _best_rate(lambda: codec.encode(rows), len(rows), repeats)
    dec = _best_rate(lambda: codec.decode(buf), len(rows), repeats)
    fid = fidelity(rows, codec.decode(buf), vocab).summary()
    return Row(DISTILLKIT, vocab, codec.bytes_per_position, enc, dec, None, fid)


def _stored_row(
    root: str, name: str, codec, rows: TopKRows, ref: TopKRows, cap: Captured, repeats: int,
    note: str = "",
) -> Row:  # fmt: skip
    vocab = codec.vocab_size
    b, enc, dec, read, decoded = _store_encoding(
        root, name, codec, rows, cap.inputs, vocab, repeats
    )
    fid = fidelity(ref, decoded, vocab).summary() if rows.counts is None else None
    if fid is None:
        mean_err, max_err = _sampled_entry_error(rows, decoded)
        note = f"{note}; stored log-prob |err| mean {mean_err:.4f} max {max_err:.4f}"
    return Row(name, vocab, b, enc, dec, read, fid, note.strip("; "))


def _encodings(args, cap: Captured, root: str, big: bool, vocab: int) -> list[Row]:
    """Every encoding of the same positions at one vocabulary (the teacher's, or the synthetic
    one with ids mapped)."""
    exact, sampled = (cap.exact_big, cap.sampled_big) if big else (cap.exact, cap.sampled)
    k, repeats = args.top_k, args.repeats
    table = [_naive_row(exact, vocab, k, repeats), _distillkit_row(exact, vocab, k, repeats)]
    topk = (TopKCodec, ContractGridTopKCodec, FrequencyOrderTopKCodec, PredictedValueTopKCodec,
            LevelSetTopKCodec)  # fmt: skip
    for codec in (QuantizedTopKCodec(vocab), *(c(vocab) for c in topk)):
        table.append(_stored_row(root, codec.name, codec, exact, exact, cap, repeats))
    default = codec_for(DEFAULT_CODEC, vocab)
    for top_p in args.top_p:
        adaptive = top_p_rows(exact, top_p)
        mean_n = float((adaptive.logprobs > -np.inf).sum(axis=1).mean())
        name = f"top_p:{top_p:g} ({DEFAULT_CODEC})"
        note = f"{mean_n:.1f} entries/position"
        table.append(_stored_row(root, name, default, adaptive, exact, cap, repeats, note))
    distinct = float((sampled.counts > 0).sum(axis=1).mean())
    note = f"{distinct:.1f} distinct ids/position"
    name = f"sampled U={args.samples}"
    table.append(_stored_row(root, name, SampledCodec(vocab), sampled, exact, cap, repeats, note))
    return table


def _targets(table: list[Row], args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(what, value, met) for every target of the issue, at each vocabulary."""
    checks: list[tuple[str, str, bool]] = []
    by_name = {(r.name, r.vocab): r for r in table}
    for vocab in sorted({r.vocab for r in table}):
        dk = by_name[DISTILLKIT, vocab]
        for name in (TopKCodec.name, ContractGridTopKCodec.name, FrequencyOrderTopKCodec.name,
                     PredictedValueTopKCodec.name, LevelSetTopKCodec.name):  # fmt: skip
            r = by_name[name, vocab]
            f, at = r.fid, f"{name} (vocab {vocab:,})"
            assert f is not None and r.read_rate is not None
            ratio = r.bytes_per_position / dk.bytes_per_position
            err_hi, err_lo = f["max_err_p_ge_0.001"], f["max_prob_err_p_lt_0.001"]
            checks += [
                (f"{at}: bytes/position <= 0.5 x DistillKit-style (aim 1/3)",
                 f"{r.bytes_per_position:.1f} vs {dk.bytes_per_position:.1f} = {ratio:.2f}x",
                 ratio <= 0.5),
                (f"{at}: mean KL <= DistillKit-style's", f"{f['kl_mean']:.2e} vs "
                 f"{dk.fid['kl_mean']:.2e}" if dk.fid else "-",
                 dk.fid is not None and f["kl_mean"] <= dk.fid["kl_mean"]),
                (f"{at}: entries p >= 1e-3 within 0.01 nats, p < 1e-3 within 1e-4",
                 f"max {err_hi:.4f} nats, {err_lo:.1e}", err_hi <= 0.01 and err_lo <= 1e-4),
                (f"{at}: decode >= 2M positions/s, read + decode >= 0.5M on one core",
                 f"{r.decode_rate / 1e6:.2f}M, {r.read_rate / 1e6:.2f}M",
                 r.decode_rate >= 2e6 and r.read_rate >= 0.5e6),
            ]  # fmt: skip
        pairs = (
            (TopKCodec, ContractGridTopKCodec),
            (ContractGridTopKCodec, FrequencyOrderTopKCodec),
            (FrequencyOrderTopKCodec, PredictedValueTopKCodec),
            (PredictedValueTopKCodec, LevelSetTopKCodec),
        )
        for old, new in pairs:
            a, b = by_name[old.name, vocab], by_name[new.name, vocab]
            checks.append(
                (f"{new.name} bytes/position <= {old.name}'s (vocab {vocab:,})",
                 f"{b.bytes_per_position:.1f} vs {a.bytes_per_position:.1f}",
                 b.bytes_per_position <= a.bytes_per_position)
            )  # fmt: skip
    sampled = by_name[f"sampled U={args.samples}", args.synthetic_vocab]
    checks.append(
        (f"sampled U={args.samples} <= 40 bytes/position (vocab {args.synthetic_vocab:,})",
         f"{sampled.bytes_per_position:.1f}", sampled.bytes_per_position <= 40)
    )  # fmt: skip
    return checks


def run_storage_benchmark(args: argparse.Namespace) -> None:
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    if args.top_k < 17:
        raise SystemExit("bench storage: --top-k must be at least 17 (DistillKit keeps 16 exact)")
    for case in cases(args):
        _run_case(args, case)


def _run_case(args: argparse.Namespace, case: Case) -> None:
    print(f"== {case.label}: {case.teacher}, texts: {case.data or 'demo language'}", flush=True)
    cap = asyncio.run(_capture(args, case))
    vocab, big = resolve_teacher(case.teacher).vocab_size, args.synthetic_vocab
    print(
        f"teacher {case.label}: vocab {vocab:,}, mean entropy {cap.mean_entropy:.2f} nats, "
        f"top-{args.top_k} mass {cap.top_k_mass:.3f}; {len(cap.exact):,} positions "
        f"({len(cap.lengths)} sequences), k={args.top_k}; synthetic vocabulary {big:,} (same "
        "distributions, ids mapped)\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-storage-") as root:
        table = _encodings(args, cap, root, False, vocab) + _encodings(args, cap, root, True, big)
    reference = {r.vocab: r.bytes_per_position for r in table if r.name == DISTILLKIT}
    _print_table(table, reference)
    print(
        "\nB/pos: bytes per position of a sealed segment on disk (DistillKit-style and naive: "
        "their fixed record size); vs DK: over the DistillKit-style reference's at the same "
        "vocabulary size.\n"
        "KL mean: KL(exact top-k with tail || decoded top-k with tail) per position; "
        "err p>=1e-3: largest log-prob error over entries with p >= 1e-3 (nats); "
        "dp p<1e-3: largest probability error below that.\n"
    )
    print(f"targets ({case.label}: mean entropy {cap.mean_entropy:.2f} nats, "
          f"top-{args.top_k} mass {cap.top_k_mass:.3f}, vocab {vocab:,}):")  # fmt: skip
    for what, value, ok in _targets(table, args):
        print(f"  [{'met' if ok else 'MISSED'}] {what}: {value}")
    print(flush=True)
