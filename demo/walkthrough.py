"""``logitcache demo-service``: the service end to end on the demo teacher, as ``make demo`` runs it.

Start a server in the background, submit a dataset as a job and watch it, read a few sequences
through the read-through cache, stream the dataset back as two ranks, check every streamed
record against the store; then the authenticated path of a lab's server: an admin makes a
producer and a consumer, the producer builds two datasets and shares one, the consumer streams
that one and is refused the other; and stop the server.

The server runs in single-user mode (``--allow-anonymous`` on loopback: callers without a token
have every right) with a policy state of its own, so the callers that do send tokens get their
roles and access lists, as on a server where every call needs one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import grpc
import numpy as np

import logitcache
from logitcache.client import Client
from logitcache.client.use import Use
from logitcache.server.launcher import ServerProcess
from logitcache.server.policy.governance import Governance
from logitcache.server.policy.state import open_state

# What the demo's distributions are for (the licence policy decides on it; the demo teacher's
# Apache-2.0 licence allows any use).
DEMO_USE = Use("research", "demo-student", "demo", "logitcache demo")


def run_walkthrough(args: argparse.Namespace) -> None:
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines() if line]
    store = Path(args.store)
    print(f"starting logitcache serve on the demo teacher (store {store}) ...")
    state_dir = tempfile.TemporaryDirectory(prefix="logitcache-demo-state-")
    with state_dir, ServerProcess(args.teacher, store, "--default-top-k", str(args.top_k),
                                  "--max-top-k", str(max(64, args.top_k)),
                                  "--state-dir", state_dir.name) as server:  # fmt: skip
        print(f"serving gRPC on {server.target}, HTTP on {server.http_url}")
        with Client(server.target, use=DEMO_USE) as client:
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
        authenticated_path(server.target, Path(state_dir.name), texts[:12], args.top_k)
    if mismatches or len(seen) != len(ds):
        raise SystemExit(
            f"verification failed: {len(seen)} records streamed for {len(ds)} in the dataset, "
            f"{mismatches} differ from the store"
        )
    print(f"verified: the {len(seen)} streamed records equal the store's, each exactly once")
    print("server stopped")


def authenticated_path(target: str, state_dir: Path, texts: list[str], top_k: int) -> None:
    """Users, roles and access lists: what a lab's server enforces on every call."""
    print("\nthe authenticated path:")
    state = open_state(state_dir)  # offline, on the server's state: the first admin's way in
    admin_token, _ = Governance(state).create_token("root", "admin")
    state.close()
    print("  `logitcache tokens create --state DIR --user root --role admin`: the first admin")
    with Client(target, token=admin_token) as admin:
        producer = admin.create_token("pat", "producer").token
        consumer = admin.create_token("carol", "consumer", groups=["nlp"]).token
        print("  admin created producer pat and consumer carol (group nlp); tokens are shown "
              "once, the server keeps their hashes")  # fmt: skip
        for name in ("demo-shared", "demo-private"):
            if name in {d.name for d in admin.list_datasets()}:
                admin.delete_dataset(name)  # left by an earlier run
    with Client(target, token=producer, use=DEMO_USE) as pat:
        for name, part in (("demo-shared", texts[:6]), ("demo-private", texts[6:])):
            final = pat.wait(pat.precompute(name, texts=part, top_k=top_k), progress=False)
            print(f"  pat built {name}: {final.sequences_done} sequences ({final.state})")
        access = pat.share_dataset("demo-shared", add_groups=["nlp"])
        print(f"  pat shared demo-shared with group {', '.join(access.groups)}")
    with Client(target, token=consumer, retries=0) as carol:
        print(f"  carol sees {[d.name for d in carol.list_datasets()]}")
        streamed = sum(len(r) for r in carol.stream_dataset("demo-shared"))
        print(f"  carol streamed demo-shared: {streamed:,} positions")
        try:
            list(carol.stream_dataset("demo-private"))
        except grpc.RpcError as e:
            print(f"  carol on demo-private: {e.code().name}: {e.details()}")
        else:
            raise SystemExit("verification failed: carol streamed a dataset not shared with her")
        try:
            carol.get_distributions([[5, 6, 7]])
        except grpc.RpcError as e:
            print(
                f"  carol asking the teacher: {e.code().name} (consumers read, producers compute)"
            )
    with Client(target, token=producer) as pat:
        for name in ("demo-shared", "demo-private"):
            pat.delete_dataset(name)


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
