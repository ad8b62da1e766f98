"""``logitcache bench stream`` and ``logitcache bench lookup``: the service as a trainer sees it.

stream: positions/s delivered from a warm store to one client over loopback, decoded into numpy,
with the CPU time the client and the server spent. The store holds synthetic top-k rows shaped
like a real teacher's (peaked, descending, a 32k vocabulary) unless ``--store``/``--dataset``
name real ones; the server is store-only, so no engine competes for the CPUs.

lookup: latency of a cache hit through GetDistributions for one 512-token sequence and for a
batch of 64, against a server running the demo teacher (the sequences are computed once first).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from logitcache.client.codecs import DEFAULT_CODEC, TopKRows
from logitcache.client.space import CaptureSpace, record_key
from logitcache.client.wire import decode_batch
from logitcache.server.launcher import ServerProcess
from logitcache.server.store.segments import CapturedRecord
from logitcache.server.store.store import open_store
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]


def synthetic_store(root: Path, positions: int, seq_len: int, k: int, vocab: int = 32000) -> str:
    """A store with one dataset, ``bench``, of peaked descending top-k rows (vectorised)."""
    space = CaptureSpace("bench-teacher", "bench-tokenizer", vocab, "topk", k, "bfloat16",
                         DEFAULT_CODEC)  # fmt: skip
    store = open_store(str(root), writable=True)
    rng = np.random.default_rng(0)
    n = max(1, positions // seq_len)
    keys, builder = [], store.new_segment(space)
    for i in range(n):
        ids = rng.integers(0, vocab, seq_len, dtype=np.int32)
        gaps = rng.exponential(0.35, size=(seq_len, k)).astype(np.float32)
        gaps[:, 0] = np.abs(rng.normal(0.0, 0.6, seq_len))
        rows = TopKRows(
            token_ids=rng.integers(0, vocab, (seq_len, k), dtype=np.int32),
            logprobs=-np.cumsum(gaps, axis=1),
            target_logprobs=np.append(-rng.exponential(1.5, seq_len - 1), np.nan).astype(
                np.float32
            ),
        )
        key = record_key(space.space_id, ids)
        keys.append(key)
        builder.add(CapturedRecord.encode(key, ids, rows, space))
        if builder.positions >= 1 << 16 or i == n - 1:
            store.seal(builder)
            builder = store.new_segment(space)
    store.create_dataset("bench", space, keys, n * seq_len, provenance={"synthetic": True})
    store.mark_complete("bench")
    return str(root)


def _stream_once(stub, dataset: str, batch_records: int) -> tuple[int, float]:
    positions = 0
    started = time.perf_counter()
    request = pb.StreamDatasetRequest(dataset=dataset, seed=1, batch_records=batch_records)
    for batch in stub.StreamDataset(request):
        for record in decode_batch(batch):
            positions += len(record)
    return positions, time.perf_counter() - started


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    total = proc.cpu_times().user + proc.cpu_times().system
    for child in proc.children(recursive=True):
        times = child.cpu_times()
        total += times.user + times.system
    return total


def run_stream_benchmark(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-") as tmp:
        if args.store:
            url, dataset = args.store, args.dataset
        else:
            print(f"building a synthetic store: {args.positions:,} positions, k={args.top_k} ...")
            url, dataset = (
                synthetic_store(Path(tmp) / "store", args.positions, args.seq_len, args.top_k),
                "bench",
            )
        with ServerProcess(None, Path(url), log_path=Path(tmp) / "serve.log") as server:
            stub = pb_grpc.LogitCacheStub(grpc.insecure_channel(server.target, _CHANNEL_OPTIONS))
            positions, _ = _stream_once(stub, dataset, args.batch_records)  # warm: segments in RAM
            results = []
            for _ in range(args.passes):
                client_cpu, server_cpu = _cpu_self(), _cpu_of(server.pid)
                positions, seconds = _stream_once(stub, dataset, args.batch_records)
                results.append(
                    (positions / seconds, (_cpu_self() - client_cpu) / seconds,
                     (_cpu_of(server.pid) - server_cpu) / seconds)
                )  # fmt: skip
    print(
        f"\n{positions:,} positions per pass, k={args.top_k}, batches of {args.batch_records} records"
    )
    print(f"{'pass':>5} {'positions/s':>14} {'client CPU':>11} {'server CPU':>11}")
    for i, (rate, client, srv) in enumerate(results, 1):
        print(f"{i:>5} {rate:>14,.0f} {client:>10.0%} {srv:>10.0%}")
    best = max(r[0] for r in results)
    print(
        f"best: {best:,.0f} positions/s (target 1,000,000 on a 2-core machine: {best / 1e6:.2f}x)"
    )
    print("CPU shares are of one core (100% = one core busy for the whole pass).")


def run_lookup_benchmark(args: argparse.Namespace, teacher: str) -> None:
    from logitcache.bench.capture import benchmark_sequences

    tokens = np.stack(benchmark_sequences(teacher, 65, 512, seed=11))
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-") as tmp:
        with ServerProcess(teacher, Path(tmp) / "store", "--max-top-k", str(args.top_k),
                           "--default-top-k", str(args.top_k)) as server:  # fmt: skip
            stub = pb_grpc.LogitCacheStub(grpc.insecure_channel(server.target, _CHANNEL_OPTIONS))

            def call(rows: np.ndarray) -> float:
                request = pb.DistributionsRequest(
                    sequences=[pb.Sequence(input_ids=r.tolist()) for r in rows]
                )
                started = time.perf_counter()
                (response,) = list(stub.GetDistributions(iter([request])))
                decode_batch(response.records)
                elapsed = time.perf_counter() - started
                return elapsed if response.computed == 0 else float("nan")

            call(tokens)  # computes all 65 sequences once; everything after is a hit
            single = np.array([call(tokens[i % 65 : i % 65 + 1]) for i in range(args.repeats)])
            batch = np.array([call(tokens[:64]) for _ in range(max(10, args.repeats // 10))])
    print(f"\ncache-hit latency through GetDistributions, k={args.top_k}, 512-token sequences")
    print(f"{'request':>22} {'p50 ms':>9} {'p99 ms':>9} {'n':>6}")
    for name, values in (("1 sequence", single), ("batch of 64", batch)):
        p50, p99 = np.nanpercentile(values, [50, 99]) * 1e3
        print(f"{name:>22} {p50:>9.2f} {p99:>9.2f} {np.isfinite(values).sum():>6}")
