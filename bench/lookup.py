"""``logitcache bench lookup``: how long a read-through cache hit takes, as a trainer sees it.

Latency of GetDistributions for one 512-token sequence and for a batch of 64, against a server
running the teacher; the sequences are computed once first, so every timed request is a hit
(a response that computed anything is not counted).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from logitcache.bench.stream import CHANNEL_OPTIONS
from logitcache.bench.synthetic import benchmark_sequences
from logitcache.client.wire import decode_batch
from logitcache.demo.assets import demo_teacher_path
from logitcache.server.launcher import ServerProcess
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc


def run_lookup_benchmark(args: argparse.Namespace) -> None:
    teacher = args.teacher or str(demo_teacher_path())
    tokens = np.stack(benchmark_sequences(teacher, 65, 512, seed=11))
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-") as tmp:
        with ServerProcess(teacher, Path(tmp) / "store", "--max-top-k", str(args.top_k),
                           "--default-top-k", str(args.top_k)) as server:  # fmt: skip
            stub = pb_grpc.LogitCacheStub(grpc.insecure_channel(server.target, CHANNEL_OPTIONS))

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
