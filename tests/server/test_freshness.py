"""A running server sees what other processes write to its store, within the documented bound.

The regressions: streaming a complete dataset that a separate process had built failed with
"record 96 missing", and with allow_partial the stream quietly returned no records until
someone called DescribeDataset. Here the server is a real process and the writer is this test's
process: a read of a record the server has not indexed looks at the store before it fails, a
description of a dataset it has not seen looks first, and listings catch up within
``--store-refresh-seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_store import SPACE, synthetic_record

from logitcache.server.launcher import ServerProcess
from logitcache.server.store.store import open_store
from logitcache.server.store.summary import RECOUNT_S, StoreSummaries
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

REFRESH_S = 0.5
RPC_S = 60


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, pb_grpc.LogitCacheStub]]:
    store_dir = tmp_path / "store"
    open_store(str(store_dir), writable=True)  # empty: every space, segment, dataset comes later
    with ServerProcess(None, store_dir, "--store-refresh-seconds", str(REFRESH_S)) as process:
        channel = grpc.insecure_channel(process.target)
        yield process, pb_grpc.LogitCacheStub(channel)
        channel.close()


def write_dataset(store_dir: Path, name: str, sealed: int, total: int, *, complete: bool) -> None:
    """What a separate precompute leaves: ``sealed`` of ``total`` records sealed in segments of
    ten, and the dataset's key list (``complete`` once all are sealed)."""
    store = open_store(str(store_dir), writable=True)
    records = [synthetic_record(10_000 + i, 6 + i % 5) for i in range(total)]
    for start in range(0, sealed, 10):
        store.write_segment(SPACE, records[start : min(sealed, start + 10)])
    store.create_dataset(name, SPACE, [r.key for r in records], 0, provenance={})
    if complete:
        store.mark_complete(name)


def stream(stub: pb_grpc.LogitCacheStub, name: str, *, allow_partial: bool = False) -> list[int]:
    request = pb.StreamDatasetRequest(
        dataset=name, no_shuffle=True, batch_records=16, allow_partial=allow_partial
    )
    return [i for batch in stub.StreamDataset(request, timeout=RPC_S) for i in batch.indices]


def listed(stub: pb_grpc.LogitCacheStub) -> dict[str, pb.DatasetInfo]:
    return {d.name: d for d in stub.ListDatasets(pb.ListDatasetsRequest(), timeout=RPC_S).datasets}


def eventually(condition, within_s: float) -> bool:
    """Poll ``condition`` until it holds or ``within_s`` has passed."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_dataset_another_process_built_streams_whole_at_once(server, tmp_path: Path) -> None:
    process, stub = server
    assert listed(stub) == {}  # the server has looked, and found nothing
    write_dataset(process.store, "elsewhere", 120, 120, complete=True)
    assert stream(stub, "elsewhere") == list(range(120))
    info = stub.DescribeDataset(pb.DescribeDatasetRequest(dataset="elsewhere"), timeout=RPC_S)
    assert info.state == "complete" and info.sequences == info.sealed_sequences == 120
    assert "elsewhere" in listed(stub)  # listed at once: this process has seen it


def test_listings_catch_up_within_the_refresh_interval(server) -> None:
    process, stub = server
    assert listed(stub) == {}
    write_dataset(process.store, "later", 30, 30, complete=True)
    # Bound: one refresh interval, plus the time one look takes (generous on a loaded machine).
    assert eventually(lambda: "later" in listed(stub), within_s=10 * REFRESH_S + 5)


def test_a_partial_stream_returns_what_another_process_sealed(server) -> None:
    process, stub = server
    write_dataset(process.store, "growing", 40, 100, complete=False)
    assert stream(stub, "growing", allow_partial=True) == list(range(40))
    info = stub.DescribeDataset(pb.DescribeDatasetRequest(dataset="growing"), timeout=RPC_S)
    assert info.state == "building" and info.sealed_sequences == 40

    store = open_store(str(process.store), writable=True)  # the other process seals the rest
    records = [synthetic_record(10_000 + i, 6 + i % 5) for i in range(100)]
    store.write_segment(SPACE, records[40:])
    assert stream(stub, "growing", allow_partial=True) == list(range(100))
    store.mark_complete("growing")
    assert stream(stub, "growing") == list(range(100))

    def described_whole() -> bool:
        info = stub.DescribeDataset(pb.DescribeDatasetRequest(dataset="growing"), timeout=RPC_S)
        return info.state == "complete" and info.sealed_sequences == 100

    assert eventually(described_whole, within_s=10 * REFRESH_S + 5)


def test_changes_made_through_the_server_show_at_once(tmp_path: Path) -> None:
    """The summaries' cache never hides this process's own writes, however long the interval."""
    store = open_store(str(tmp_path / "store"), writable=True)
    summaries = StoreSummaries(store, refresh_seconds=3600)
    records = [synthetic_record(20_000 + i, 5) for i in range(10)]

    async def scenario() -> list[object]:
        await summaries.start()
        try:
            seen: list[object] = [await summaries.datasets()]
            store.create_dataset("mine", SPACE, [r.key for r in records], 50, provenance={})
            seen.append((await summaries.dataset("mine"))["sealed_sequences"])
            store.write_segment(SPACE, records[:4])
            await asyncio.sleep(RECOUNT_S)  # a building dataset is recounted at most this often
            seen.append((await summaries.dataset("mine"))["sealed_sequences"])
            store.write_segment(SPACE, records[4:])
            store.mark_complete("mine")
            (entry,) = await summaries.datasets()
            seen.append((entry["state"], entry["sealed_sequences"]))
            store.delete_dataset("mine")
            seen.append(await summaries.datasets())
            return seen
        finally:
            await summaries.close()

    assert asyncio.run(scenario()) == [[], 0, 4, ("complete", 10), []]
