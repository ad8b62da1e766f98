"""``logitcache demo-service``: the service end to end on the demo teacher, as ``make demo`` runs it.

Start a server in the background, submit a dataset as a job and watch it, read a few sequences
through the read-through cache, stream the dataset back as two ranks, check every streamed
record against the store, and stop the server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import logitcache
from logitcache.client import Client
from logitcache.server.launcher import ServerProcess


def run_walkthrough(args: argparse.Namespace) -> None:
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines() if line]
    store = Path(args.store)
    print(f"starting logitcache serve on the demo teacher (store {store}) ...")
    with ServerProcess(args.teacher, store, "--default-top-k", str(args.top_k),
                       "--max-top-k", str(max(64, args.top_k))) as server:  # fmt: skip
        print(f"serving gRPC on {server.target}, HTTP on {server.http_url}")
        with Client(server.target) as client:
            if args.dataset in store_datasets(store):
                print(f"dataset {args.dataset!r} is already in the store; streaming it")
            else:
                job = client.precompute(dataset=args.dataset, texts=texts, top_k=args.top_k)
                print(f"submitted job {job} ({len(texts)} texts); watching it")
                final = client.wait(job)
                print(
                    f"job {final.state}: {final.sequences_done} sequences, "
                    f"{final.positions_done:,} positions"
                )

            reader = logitcache.open_store(str(store))
            ds = reader.dataset(args.dataset)
            sample = [ds[i].input_ids for i in range(min(4, len(ds)))]
            fresh = [np.asarray(s[: max(1, len(s) // 2)]) for s in sample]
            records = client.get_distributions(sample + fresh, top_k=args.top_k)
            print(
                f"read-through: {len(records)} sequences answered "
                f"({len(sample)} from the store, {len(fresh)} prefixes computed on demand)"
            )

            seen: dict[int, object] = {}
            for rank in range(2):
                stream = client.stream_dataset(
                    args.dataset, rank=rank, world_size=2, seed=0, epoch=0
                )
                count = 0
                for rec in stream:
                    seen[len(seen)] = rec
                    count += 1
                print(f"rank {rank}/2 streamed {count} records")
            mismatches = _verify(reader, ds, list(seen.values()))
    if mismatches or len(seen) != len(ds):
        raise SystemExit(
            f"verification failed: {len(seen)} records streamed for {len(ds)} in the dataset, "
            f"{mismatches} differ from the store"
        )
    print(f"verified: the {len(seen)} streamed records equal the store's, each exactly once")
    print("server stopped")


def store_datasets(store: Path) -> list[str]:
    try:
        return logitcache.open_store(str(store)).datasets()
    except Exception:  # no store yet
        return []


def _verify(reader, ds, streamed: list) -> int:
    """How many distinct records differ from the store's (or are missing from the stream)."""
    by_key = {rec.key: rec for rec in streamed}
    if len(by_key) != len(set(ds.keys)):
        return abs(len(set(ds.keys)) - len(by_key)) or 1
    mismatches = 0
    for key in set(ds.keys):
        a, b = by_key[key], reader.get(key)
        same = (
            np.array_equal(a.input_ids, b.input_ids)
            and np.array_equal(a.token_ids, b.token_ids)
            and np.array_equal(a.logprobs, b.logprobs)
            and np.array_equal(a.target_logprobs, b.target_logprobs, equal_nan=True)
        )
        mismatches += not same
    return mismatches
