"""``logitcache bench stream``: positions/s a trainer receives from a warm store over loopback.

Positions are delivered to one client and decoded into numpy; the client's and the server's CPU
time are reported beside the rate. The store holds synthetic top-k rows shaped like a real
teacher's (see :mod:`logitcache.bench.synthetic`) unless ``--store``/``--dataset`` name real
ones; the server is store-only, so no engine competes for the CPUs.

``--store s3://BUCKET/PREFIX`` compares object storage with a local directory in one run: the
synthetic store is built locally, copied object for object under the prefix (unless the prefix
holds the dataset already), and streamed from both, each by its own server. The first pass of
each is reported too: it reads every segment from its storage (later passes are served from
the servers' memory).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from logitcache.bench.synthetic import synthetic_store
from logitcache.client.wire import decode_batch
from logitcache.server.launcher import ServerProcess
from logitcache.server.store.backend import backend_for_url
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


def _copy_store(local: Path, url: str) -> None:
    """Every file of a local store as an object under ``url``; each segment's group metadata
    last, as a writer seals it."""
    backend = backend_for_url(url, create=True)
    files = sorted(
        (f for f in local.rglob("*") if f.is_file()), key=lambda f: f.name == "zarr.json"
    )
    rest = [f for f in files if f.name != "zarr.json" or f.parent.parent.name != "segments"]
    seals = [f for f in files if f not in set(rest)]

    def put(f: Path) -> None:
        backend.write_bytes(f.relative_to(local).as_posix(), f.read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, rest))
        list(pool.map(put, seals))


def _measure(
    url: str, dataset: str, args: argparse.Namespace, log: Path
) -> tuple[int, float, list[tuple[float, float, float]]]:
    """Positions per pass, the first (cold) pass's rate, and (rate, client CPU, server CPU) of
    each timed pass, from a store-only server on ``url``."""
    with ServerProcess(None, url, log_path=log) as server:
        stub = pb_grpc.LogitCacheStub(grpc.insecure_channel(server.target, CHANNEL_OPTIONS))
        positions, seconds = _stream_once(stub, dataset, args.batch_records)  # segments to RAM
        cold = positions / seconds
        results = []
        for _ in range(args.passes):
            client_cpu, server_cpu = _cpu_self(), _cpu_of(server.pid)
            positions, seconds = _stream_once(stub, dataset, args.batch_records)
            results.append(
                (positions / seconds, (_cpu_self() - client_cpu) / seconds,
                 (_cpu_of(server.pid) - server_cpu) / seconds)
            )  # fmt: skip
    return positions, cold, results


def run_stream_benchmark(args: argparse.Namespace) -> None:
    on_s3 = bool(args.store) and str(args.store).startswith("s3://")
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-") as tmp:
        if args.store and not on_s3:
            targets, dataset = {"store": args.store}, args.dataset
        else:
            print(f"building a synthetic store: {args.positions:,} positions, k={args.top_k} ...")
            local = synthetic_store(Path(tmp) / "store", args.positions, args.seq_len, args.top_k)
            targets, dataset = {"local": local}, "bench"
        if on_s3:
            if not backend_for_url(args.store, create=True).exists(f"datasets/{dataset}"):
                print(f"copying it to {args.store} ...")
                _copy_store(Path(local), args.store)
            targets["s3"] = args.store
        measured = {
            label: _measure(url, dataset, args, Path(tmp) / f"serve-{label}.log")
            for label, url in targets.items()
        }
    for label, (positions, cold, results) in measured.items():
        print(
            f"\n{label} ({targets[label]}): {positions:,} positions per pass, k={args.top_k}, "
            f"batches of {args.batch_records} records"
        )
        print(f"{'pass':>5} {'positions/s':>14} {'client CPU':>11} {'server CPU':>11}")
        print(f"{'cold':>5} {cold:>14,.0f}")
        for i, (rate, client, srv) in enumerate(results, 1):
            print(f"{i:>5} {rate:>14,.0f} {client:>10.0%} {srv:>10.0%}")
        best = max(r[0] for r in results)
        print(
            f"best: {best:,.0f} positions/s (target 1,000,000 on a 2-core machine: "
            f"{best / 1e6:.2f}x)"
        )
    if on_s3:
        (_, local_cold, local_runs), (_, s3_cold, s3_runs) = measured["local"], measured["s3"]
        warm = max(r[0] for r in s3_runs) / max(r[0] for r in local_runs)
        print(
            f"\ns3 / local: {warm:.2f}x warm (target >= 0.8x), {s3_cold / local_cold:.2f}x on the "
            "cold first pass (every segment read from its storage)"
        )
    print("CPU shares are of one core (100% = one core busy for the whole pass).")
