"""``logitcache bench soak``: one server under mixed load for a bounded time.

Two parts, on one store the benchmark builds: a streamable synthetic dataset (``bench``) and a
dataset of ``--listing-keys`` tiny records (``keys``, 2M by default), so that anything
proportional to the store's size shows.

1. Lister versus stream: one client streams ``bench`` in a loop, first alone, then while another
   client calls ListDatasets in a loop. Prints both rates and the largest gap between batches;
   the stream's rate should not change (within 10%).
2. Soak: ``--streams`` concurrent streams, ``--readthrough`` clients of GetDistributions (half
   repeated sequences, which become hits, half new ones, which the teacher computes) and one
   lister, for ``--duration`` seconds. Prints, per interval, stream positions/s, read-through
   requests/s with p50/p99 latency, the lister's p50/p99 and the server's RSS.

The server is a real ``logitcache serve`` process; with ``--readthrough 0`` it is store-only,
otherwise it runs the teacher (the demo teacher under vLLM by default).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import numpy as np

from logitcache.bench.stream import CHANNEL_OPTIONS
from logitcache.bench.synthetic import synthetic_store
from logitcache.client.codecs import DEFAULT_CODEC, TopKRows, codec_for
from logitcache.client.space import CaptureSpace, record_key
from logitcache.server.launcher import ServerProcess
from logitcache.server.store.store import open_store
from logitcache.server.store.writer import CapturedRecord
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

KEYS_DATASET = "keys"
_RECORDS_PER_SEGMENT = 1 << 16


def many_keys_dataset(url: str, records: int, *, k: int = 4, vocab: int = 32000) -> None:
    """Add a complete dataset ``keys`` of ``records`` two-token records to the store at ``url``.

    Rows are encoded once per segment and cut into records with slices, so two million records
    take seconds, not the minutes that one encode per record would.
    """
    space = CaptureSpace("bench-keys-teacher", "bench-tokenizer", vocab, "topk", k, "bfloat16",
                         DEFAULT_CODEC)  # fmt: skip
    space_id, codec = space.space_id, codec_for(space.codec, vocab)
    store = open_store(url, writable=True)
    rng = np.random.default_rng(1)
    keys: list[bytes] = []
    for first in range(0, records, _RECORDS_PER_SEGMENT):
        n = min(_RECORDS_PER_SEGMENT, records - first)
        index = np.arange(first, first + n)
        ids = np.stack([index // vocab, index % vocab], axis=1).astype(np.int32)  # unique
        gaps = rng.exponential(0.35, size=(2 * n, k)).astype(np.float32)
        encoded = codec.encode(
            TopKRows(
                token_ids=rng.integers(0, vocab, (2 * n, k), dtype=np.int32),
                logprobs=-np.cumsum(gaps, axis=1),
                target_logprobs=np.tile(np.array([-1.0, np.nan], np.float32), n),
            )
        )
        per_record = encoded["n"].astype(np.int64).reshape(n, 2).sum(axis=1)
        entries = np.concatenate([[0], np.cumsum(per_record)])
        segment = []
        for i in range(n):
            key = record_key(space_id, ids[i])
            keys.append(key)
            arrays = {
                f.name: encoded[f.name][entries[i] : entries[i + 1]]
                if f.per == "entry"
                else encoded[f.name][2 * i : 2 * i + 2]
                for f in codec.fields
            }
            segment.append(CapturedRecord(key, ids[i], arrays))
        store.write_segment(space, segment)
    store.create_dataset(KEYS_DATASET, space, keys, 2 * records, provenance={"synthetic": True})
    store.mark_complete(KEYS_DATASET)


@dataclass
class Load:
    """What the client threads saw, appended as it happens (lists are safe across threads)."""

    stop: threading.Event = field(default_factory=threading.Event)
    batches: list[tuple[float, int]] = field(default_factory=list)  # (arrival, positions)
    lookups: list[tuple[float, float, int]] = field(default_factory=list)  # (end, s, computed)
    listings: list[tuple[float, float]] = field(default_factory=list)  # (end, seconds)
    errors: list[str] = field(default_factory=list)

    def run(self, body: Callable[[], None]) -> threading.Thread:
        """Call ``body`` until told to stop, in a thread; errors are counted, not raised."""

        def loop() -> None:
            while not self.stop.is_set():
                try:
                    body()
                except grpc.RpcError as e:
                    self.errors.append(f"{e.code().name}: {e.details()}")
                    self.stop.wait(0.1)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread


def _stream(stub: pb_grpc.LogitCacheStub, load: Load, seed: int, batch_records: int) -> None:
    request = pb.StreamDatasetRequest(dataset="bench", seed=seed, batch_records=batch_records)
    call = stub.StreamDataset(request)
    for batch in call:
        load.batches.append((time.perf_counter(), sum(batch.lengths)))
        if load.stop.is_set():
            call.cancel()
            return


def _list(stub: pb_grpc.LogitCacheStub, load: Load) -> None:
    started = time.perf_counter()
    stub.ListDatasets(pb.ListDatasetsRequest())
    load.listings.append((time.perf_counter(), time.perf_counter() - started))


def _lookup(
    stub: pb_grpc.LogitCacheStub, load: Load, hot: np.ndarray, rng: np.random.Generator,
    vocab: int, sequences: int,
) -> None:  # fmt: skip
    """One request: half its sequences from ``hot`` (hits once computed), half new (misses)."""
    new = sequences // 2
    rows = np.concatenate([hot[rng.choice(len(hot), sequences - new)],
                           rng.integers(0, vocab, (new, hot.shape[1]))])  # fmt: skip
    request = pb.DistributionsRequest(sequences=[pb.Sequence(input_ids=r.tolist()) for r in rows])
    started = time.perf_counter()
    (response,) = list(stub.GetDistributions(iter([request])))
    load.lookups.append((time.perf_counter(), time.perf_counter() - started, response.computed))


def _rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def _gaps(batches: list[tuple[float, int]]) -> np.ndarray:
    times = np.array([t for t, _ in batches])
    return np.diff(times) if len(times) > 1 else np.zeros(1)


def _ms(values: list[float] | np.ndarray, q: float) -> str:
    return f"{np.percentile(values, q) * 1e3:.1f}" if len(values) else "-"


def lister_versus_stream(
    stub: pb_grpc.LogitCacheStub, seconds: float, batch_records: int
) -> tuple[float, float]:
    """Stream alone, then beside a lister; prints both and returns the two rates."""
    rates = []
    print(f"\n{'stream':>14} {'positions/s':>13} {'batches':>8} {'max gap ms':>11} "
          f"{'p99 gap ms':>11} {'listings':>9} {'list p50 ms':>12}")  # fmt: skip
    for with_lister in (False, True):
        load = Load()
        threads = [load.run(partial(_stream, stub, load, 1, batch_records))]
        if with_lister:
            threads.append(load.run(partial(_list, stub, load)))
        time.sleep(seconds)
        load.stop.set()
        for t in threads:
            t.join(timeout=120)
        positions = sum(p for _, p in load.batches)
        rates.append(positions / seconds)
        gaps = _gaps(load.batches)
        listings = [s for _, s in load.listings]
        print(f"{'with lister' if with_lister else 'alone':>14} {rates[-1]:>13,.0f} "
              f"{len(load.batches):>8} {gaps.max() * 1e3:>11.1f} {_ms(gaps, 99):>11} "
              f"{len(listings):>9} {_ms(listings, 50):>12}")  # fmt: skip
        if load.errors:
            print(f"{'':>14} errors: {len(load.errors)}, first: {load.errors[0]}")
    print(f"stream rate with a lister / alone: {rates[1] / rates[0]:.2f} (target: >= 0.90)")
    return rates[0], rates[1]


def soak(server: ServerProcess, stub: pb_grpc.LogitCacheStub, args: argparse.Namespace) -> None:
    """The mixed load for ``args.duration`` seconds, one table row per ``args.interval``."""
    load = Load()
    threads = [
        load.run(partial(_stream, stub, load, seed, args.batch_records))
        for seed in range(args.streams)
    ]
    threads.append(load.run(partial(_list, stub, load)))
    if args.readthrough:
        (teacher,) = stub.ListTeachers(pb.ListTeachersRequest()).teachers
        vocab = teacher.vocab_size
        hot = np.random.default_rng(7).integers(0, vocab, (4 * args.rt_batch, args.rt_seq_len))
        for client in range(args.readthrough):
            rng = np.random.default_rng(100 + client)
            threads.append(load.run(partial(_lookup, stub, load, hot, rng, vocab, args.rt_batch)))
    print(f"\nsoak: {args.streams} streams, {args.readthrough} read-through clients "
          f"({args.rt_batch} sequences of {args.rt_seq_len} tokens each, half new), 1 lister, "
          f"{args.duration:.0f} s")  # fmt: skip
    print(f"{'t s':>5} {'stream pos/s':>13} {'lookups/s':>10} {'lookup p50':>11} "
          f"{'lookup p99':>11} {'list p50':>9} {'list p99':>9} {'RSS MiB':>8}")  # fmt: skip
    started = time.perf_counter()
    rss = []
    for tick in range(1, int(args.duration / args.interval) + 1):
        load.stop.wait(max(0.0, started + tick * args.interval - time.perf_counter()))
        hi = time.perf_counter()
        lo = hi - args.interval
        positions = sum(p for t, p in load.batches if lo <= t < hi)
        lookups = [s for t, s, _ in load.lookups if lo <= t < hi]
        listings = [s for t, s in load.listings if lo <= t < hi]
        rss.append(_rss_mib(server.pid))
        print(f"{hi - started:>5.0f} {positions / args.interval:>13,.0f} "
              f"{len(lookups) / args.interval:>10.1f} {_ms(lookups, 50):>11} "
              f"{_ms(lookups, 99):>11} {_ms(listings, 50):>9} {_ms(listings, 99):>9} "
              f"{rss[-1]:>8.0f}")  # fmt: skip
    load.stop.set()
    for t in threads:
        t.join(timeout=120)
    gaps = _gaps(load.batches)
    computed = sum(c for _, _, c in load.lookups)
    print(f"whole run: {sum(p for _, p in load.batches) / args.duration:,.0f} stream positions/s "
          f"(largest gap {gaps.max() * 1e3:.0f} ms); {len(load.lookups)} lookups "
          f"(p50 {_ms([s for _, s, _ in load.lookups], 50)} ms, "
          f"p99 {_ms([s for _, s, _ in load.lookups], 99)} ms, {computed} sequences computed); "
          f"{len(load.listings)} listings (p50 {_ms([s for _, s in load.listings], 50)} ms, "
          f"p99 {_ms([s for _, s in load.listings], 99)} ms); server RSS {rss[0]:.0f} -> "
          f"{rss[-1]:.0f} MiB (max {max(rss):.0f}); errors: {len(load.errors)}"
          + (f", first: {load.errors[0]}" if load.errors else ""))  # fmt: skip


def run_soak_benchmark(args: argparse.Namespace) -> None:
    teacher = None
    if args.readthrough:
        from logitcache.demo.assets import demo_teacher_path

        teacher = args.teacher or str(demo_teacher_path())
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-") as tmp:
        store = Path(tmp) / "store"
        started = time.perf_counter()
        print(f"building the store: {args.positions:,} streamable positions (k={args.top_k}) "
              f"and a dataset of {args.listing_keys:,} records ...")  # fmt: skip
        synthetic_store(store, args.positions, args.seq_len, args.top_k)
        many_keys_dataset(str(store), args.listing_keys)
        print(f"built in {time.perf_counter() - started:.0f} s")
        extra = ["--max-top-k", str(args.top_k), "--default-top-k", str(args.top_k)] * bool(teacher)
        with ServerProcess(teacher, store, *extra, log_path=Path(tmp) / "serve.log") as server:
            stub = pb_grpc.LogitCacheStub(grpc.insecure_channel(server.target, CHANNEL_OPTIONS))
            load = Load()
            _stream(stub, load, 0, args.batch_records)  # warm: the dataset's segments in RAM
            print(f"server RSS after start and one pass: {_rss_mib(server.pid):.0f} MiB")
            lister_versus_stream(stub, args.compare_seconds, args.batch_records)
            soak(server, stub, args)
