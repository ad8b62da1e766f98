"""``logitcache bench stream``: positions/s a trainer receives from a warm store over loopback.

Positions are delivered to one client and decoded into numpy; the client's and the server's CPU
time are reported beside the rate. The store holds synthetic top-k rows shaped like a real
teacher's (see :mod:`logitcache.bench.synthetic`) unless ``--store``/``--dataset`` name real
ones; the server is store-only, so no engine competes for the CPUs.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import grpc

from logitcache.bench.synthetic import synthetic_store
from logitcache.client.wire import decode_batch
from logitcache.server.launcher import ServerProcess
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]


def _stream_once(
    stub: pb_grpc.LogitCacheStub, dataset: str, batch_records: int
) -> tuple[int, float]:
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
            stub = pb_grpc.LogitCacheStub(grpc.insecure_channel(server.target, CHANNEL_OPTIONS))
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
