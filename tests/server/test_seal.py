"""Create-only publishing from several processes at once: one winner, the others told, no leftovers.

Every process is started with ``spawn`` and waits at a barrier, so that all of them publish at
the same moment: the same final name from staging folders, the same object name, the same
dataset name, and segments of overlapping keys into one store.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_store import SPACE, assert_matches, synthetic_record

from logitcache.client.errors import AlreadyExists
from logitcache.server.store import backend as backend_module
from logitcache.server.store.backend import LocalBackend
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.store import open_store

PROCESSES = 5
PARTS = 12  # files in each staging folder
CTX = multiprocessing.get_context("spawn")
MECHANISMS = ["no-replace-rename", "o_excl-claim"]


def _use(mechanism: str) -> None:
    """In a child: publish with the system's no-replace rename, or with the portable fallback."""
    if mechanism == "o_excl-claim":
        backend_module._NO_REPLACE_RENAME = None


def _run(target: Any, args_of: list[tuple]) -> list[Any]:
    """Start one process per argument tuple (plus a shared barrier and queue); their results."""
    barrier, results = CTX.Barrier(len(args_of)), CTX.Queue()
    procs = [CTX.Process(target=target, args=(*a, barrier, results)) for a in args_of]
    for p in procs:
        p.start()
    out: list[Any] = []
    deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
    while len(out) < len(procs) and time.monotonic() < deadline:
        try:
            out.append(results.get(timeout=0.5))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break  # a process failed before reporting
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert len(out) == len(procs)
    return sorted(out, key=lambda r: r[0])


# ---- one final name, several publishers --------------------------------------------------------


def _publish_folder(root: str, me: int, mechanism: str, barrier, results) -> None:
    _use(mechanism)
    backend = LocalBackend(Path(root))
    staging = f"race/staging-{me}"
    for j in range(PARTS):
        backend.write_bytes(f"{staging}/deep/part-{j}", f"{me}:{j}:".encode() * 1000)
    backend.write_json(f"{staging}/who.json", {"writer": me})
    barrier.wait(60)
    results.put((me, backend.publish(staging, "race/final")))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_one_of_several_processes_publishing_one_name_wins(tmp_path: Path, mechanism) -> None:
    results = _run(_publish_folder, [(str(tmp_path), i, mechanism) for i in range(PROCESSES)])

    winners = [me for me, won in results if won]
    assert len(winners) == 1
    (winner,) = winners
    final = tmp_path / "race" / "final"
    assert LocalBackend(tmp_path).read_json("race/final/who.json") == {"writer": winner}
    for j in range(PARTS):  # complete, and all of the winner's
        assert (final / "deep" / f"part-{j}").read_bytes() == f"{winner}:{j}:".encode() * 1000
    assert os.listdir(tmp_path / "race") == ["final"]  # no staging, no claim left behind


def _create_object(root: str, me: int, mechanism: str, spooled: bool, barrier, results) -> None:
    _use(mechanism)
    backend = LocalBackend(Path(root))
    data = f"writer {me}\n".encode() * 5000
    if spooled:
        upload = backend.spool("objects/input.jsonl")
        upload.write(data[:100])
        barrier.wait(60)
        upload.write(data[100:])
        results.put((me, upload.publish()))
    else:
        barrier.wait(60)
        results.put((me, backend.create("objects/input.jsonl", data)))


@pytest.mark.parametrize("spooled", [False, True], ids=["create", "spool"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_one_of_several_processes_creating_one_object_wins(tmp_path, mechanism, spooled) -> None:
    args = [(str(tmp_path), i, mechanism, spooled) for i in range(PROCESSES)]
    results = _run(_create_object, args)

    winners = [me for me, won in results if won]
    assert len(winners) == 1
    assert (tmp_path / "objects" / "input.jsonl").read_bytes() == (
        f"writer {winners[0]}\n".encode() * 5000
    )
    assert os.listdir(tmp_path / "objects") == ["input.jsonl"]


# ---- datasets ----------------------------------------------------------------------------------


def _create_dataset(root: str, me: int, barrier, results) -> None:
    store = open_store(root, writable=True)
    keys = [synthetic_record(100 * me + i, 4).key for i in range(3)]
    barrier.wait(60)
    try:
        store.create_dataset("same", SPACE, keys, positions=12, provenance={"writer": me})
    except AlreadyExists:
        results.put((me, None))
    else:
        results.put((me, [k.hex() for k in keys]))


def test_one_of_several_processes_creating_one_dataset_wins(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    open_store(root, writable=True)
    results = _run(_create_dataset, [(root, i) for i in range(PROCESSES)])

    winners = [(me, keys) for me, keys in results if keys is not None]
    assert len(winners) == 1
    (winner, keys), store = winners[0], open_store(root)
    assert store.datasets() == ["same"]
    assert store.dataset("same").keys == keys
    assert store.dataset("same").provenance == {"writer": winner}
    assert os.listdir(tmp_path / "store" / "datasets" / ".unsealed") == []


# ---- segments of overlapping keys --------------------------------------------------------------

POOL = 9  # sequences; each process seals its own numbers for some of them
SEGMENTS_EACH = 3


def _pool_record(seed: int, writer: int):
    return synthetic_record(seed, 6 + seed, row_seed=writer)


def _seal_segments(root: str, me: int, barrier, results) -> None:
    store = open_store(root, writable=True)
    rng = np.random.default_rng(me)
    chosen = [rng.choice(POOL, size=4, replace=False).tolist() for _ in range(SEGMENTS_EACH)]
    barrier.wait(60)
    written = [store.write_segment(SPACE, [_pool_record(s, me) for s in seeds]) for seeds in chosen]
    barrier.wait(60)  # every process has sealed: now each handle says where each key is
    store.refresh()
    where = {}
    for seed in range(POOL):
        key = _pool_record(seed, me).key
        where[key.hex()] = store.locate(key).segment.segment_id if store.contains(key) else None
    results.put((me, written, where))


def test_segments_sealed_by_several_processes_agree_on_every_key(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    early = open_store(root, writable=True)  # opened before any segment exists
    early.ensure_space(SPACE)
    results = _run(_seal_segments, [(root, i) for i in range(PROCESSES)])

    written = sorted(s for _, segments, _ in results for s in segments)
    assert len(set(written)) == PROCESSES * SEGMENTS_EACH  # ids unique across writers
    fresh = open_store(root)
    early.refresh()
    for store in (fresh, early):
        assert sorted(s.segment_id for s in store.segments()) == written
    # The answer for a key is its copy in the smallest segment id holding it, from every handle.
    readers = {s: SegmentReader(fresh.backend, SPACE, s) for s in written}
    for seed in range(POOL):
        key = _pool_record(seed, 0).key
        holders = [s for s in written if key in {bytes(k) for k in readers[s].keys}]
        first = min(holders) if holders else None
        for _, _, where in results:
            assert where[key.hex()] == first
        if first is None:
            continue
        for store in (fresh, early):
            assert store.locate(key).segment.segment_id == first
        writer = next(me for me, segments, _ in results if first in segments)
        expected = _pool_record(seed, writer)  # that writer's own numbers, exactly
        assert_matches(fresh.get(key), expected)
        for name, array in fresh.encoded(key).arrays.items():
            np.testing.assert_array_equal(array, expected.arrays[name], err_msg=name)
