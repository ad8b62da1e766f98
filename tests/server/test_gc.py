"""Garbage collection of records no dataset references: what goes, what stays, and the race.

Real Zarr stores in temporary directories; the race runs a reader and a writer in their own
processes while gc collects in this one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from test_store import SPACE, dead_pid, synthetic_record

from logitcache.cli import main
from logitcache.client.errors import FailedPrecondition, Unavailable
from logitcache.server.store import gc
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.store import Store, open_store
from logitcache.server.store.writer import CapturedRecord

LENGTH = 12


def records(*seeds: int) -> list[CapturedRecord]:
    return [synthetic_record(seed, LENGTH) for seed in seeds]


def create_dataset(store: Store, name: str, recs: Sequence[CapturedRecord]) -> None:
    store.create_dataset(name, SPACE, [r.key for r in recs], LENGTH * len(recs), {"test": name})


def build_dataset(store: Store, name: str, recs: Sequence[CapturedRecord]) -> None:
    """What precompute does: publish the key list, then seal only the records not sealed yet."""
    create_dataset(store, name, recs)
    todo = [r for r in recs if not store.contains(r.key)]
    if todo:
        store.write_segment(SPACE, todo)
    store.mark_complete(name)


def readable(url: str, name: str) -> bool:
    """Whether every record of a dataset can be read from a fresh handle, with the right ids."""
    ds = open_store(url).dataset(name)
    try:
        batch = ds.read(np.arange(len(ds)))
    except FailedPrecondition:
        return False
    return [bytes.fromhex(r.key) for r in batch.decode()] == [bytes(k) for k in ds.raw_keys]


def segment_ids(path: Path) -> list[str]:
    return sorted(os.listdir(path / "spaces" / SPACE.space_id / "segments"))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(path: Path) -> Store:
    return open_store(str(path), writable=True)


def collect_now(store: Store, *, dry_run: bool = False) -> gc.GcReport:
    return gc.collect(store, dry_run=dry_run, min_age_s=0.0, grace_s=0.0)


# -- what goes and what stays ---------------------------------------------------------------------


def test_dry_run_reports_and_collect_deletes_only_unreferenced_segments(
    path: Path, store: Store
) -> None:
    used, unused, mixed = records(1, 2), records(3, 4), records(5, 6)
    for group in (used, unused, mixed):
        store.write_segment(SPACE, group)
    create_dataset(store, "ds", used + mixed[:1])
    before = segment_ids(path)

    dry = collect_now(store, dry_run=True)
    assert (dry.collectable.segments, dry.collectable.records) == (1, 2)
    assert dry.collectable.positions == 2 * LENGTH and dry.collectable.stored_bytes > 0
    assert dry.kept_mixed.segments == 1
    assert dry.deleted.segments == 0
    assert segment_ids(path) == before
    assert "dry run" in dry.format()

    done = collect_now(store)
    assert (done.deleted.segments, done.deleted.records) == (1, 2)
    assert done.deleted.stored_bytes == dry.collectable.stored_bytes
    assert len(segment_ids(path)) == 2
    fresh = open_store(str(path))
    assert not any(fresh.contains(r.key) for r in unused)
    assert all(fresh.contains(r.key) for r in used + mixed)
    assert readable(str(path), "ds")
    assert not list((path / "spaces" / SPACE.space_id / "gc").rglob("*.json"))
    assert not [p for p in (path / "spaces" / SPACE.space_id / "gc").rglob("*") if p.is_file()]


def test_records_of_a_deleted_dataset_are_collected(path: Path, store: Store) -> None:
    shared, own = records(1), records(2)
    store.write_segment(SPACE, shared)
    store.write_segment(SPACE, own)
    create_dataset(store, "keep", shared)
    create_dataset(store, "drop", shared + own)
    assert collect_now(store).deleted.segments == 0

    store.delete_dataset("drop")
    assert collect_now(store).deleted.segments == 1
    assert open_store(str(path)).contains(shared[0].key)
    assert not open_store(str(path)).contains(own[0].key)


def test_recent_segments_are_kept(path: Path, store: Store) -> None:
    store.write_segment(SPACE, records(1))
    report = gc.collect(store, dry_run=False, min_age_s=3600.0, grace_s=0.0)
    assert report.kept_recent.segments == 1
    assert report.deleted.segments == 0
    assert len(segment_ids(path)) == 1


def test_a_handle_opened_before_gc_drops_the_collected_segment_on_refresh(
    path: Path, store: Store
) -> None:
    used, unused = records(1), records(2)
    store.write_segment(SPACE, used)
    store.write_segment(SPACE, unused)
    create_dataset(store, "ds", used)
    server = open_store(str(path))  # a running server's handle, indexed before gc
    assert server.contains(unused[0].key) and server.totals().segments == 2

    collect_now(open_store(str(path), writable=True))
    server.refresh()

    assert not server.contains(unused[0].key)
    assert server.find(unused[0].key) is None
    assert (server.totals().segments, server.totals().records) == (1, 1)
    missing = server.read_batch(SPACE, [unused[0].key, used[0].key], allow_missing=True)
    assert missing.keys == [used[0].key]
    assert len(server.dataset("ds").read([0])) == 1


def test_a_second_copy_answers_when_the_first_is_collected(path: Path, store: Store) -> None:
    """Two writers sealed one key; the copy that answers goes, the other one answers then."""
    twin = records(1)[0]
    store.write_segment(SPACE, [twin, *records(2)])  # first copy, and an unreferenced record
    store.write_segment(SPACE, [twin])  # second copy
    first, second = segment_ids(path)
    assert store.find(twin.key).segment.segment_id == first
    store.forget_segments([first])
    assert store.find(twin.key).segment.segment_id == second


def test_gc_from_the_command_line(path: Path, store: Store, capsys: pytest.CaptureFixture) -> None:
    store.write_segment(SPACE, records(1))
    assert main(["gc", str(path), "--dry-run", "--min-age", "0"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert len(segment_ids(path)) == 1

    assert main(["gc", str(path), "--min-age", "0", "--grace", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deleted"]["segments"] == 1
    assert segment_ids(path) == []

    assert main(["gc", str(path.parent / "typo")]) == 2
    assert "not" in capsys.readouterr().err
    assert not (path.parent / "typo").exists()


def test_one_collector_at_a_time(path: Path, store: Store) -> None:
    store.write_segment(SPACE, records(1))
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    (path / gc.LOCK).write_text(json.dumps(doc))
    with pytest.raises(FailedPrecondition, match="another gc"):
        collect_now(store)
    assert len(segment_ids(path)) == 1

    doc["pid"] = dead_pid()  # its collector was killed: the lock is taken over
    (path / gc.LOCK).write_text(json.dumps(doc))
    assert collect_now(store).deleted.segments == 1
    assert not (path / gc.LOCK).exists()


# -- the handshake, step by step ------------------------------------------------------------------
#
# A writer builds a dataset that reuses a record sealed in an unreferenced segment, at every
# point of a collection. Its handle was opened before the collection began (a running server's).

Step = Callable[[Store, list[SegmentReader]], None]


def _plan(store: Store, chosen: list[SegmentReader]) -> None:
    chosen[:] = [u.segment for u in gc.segment_uses(store) if u.unreferenced]


def _unpublish(store: Store, chosen: list[SegmentReader]) -> None:
    for segment in chosen:
        store.backend.unpublish(segment.rel)


def _mark(store: Store, chosen: list[SegmentReader]) -> None:
    gc.mark(store.backend, chosen)


def _check(store: Store, chosen: list[SegmentReader]) -> None:
    gc.check(store)


def _sweep(store: Store, chosen: list[SegmentReader]) -> None:
    gc.sweep(store, grace_s=0.0)


HANDSHAKE: list[Step] = [_plan, _mark, _check, _sweep]
NAIVE: list[Step] = [_plan, _unpublish]  # decide, then delete: what the handshake prevents


def race_once(path: Path, steps: list[Step], writer_after: int) -> bool:
    """Run ``steps`` with the writer building its dataset after step ``writer_after``; whether
    the dataset is whole afterwards."""
    url = str(path)
    setup = open_store(url, writable=True)
    cached = records(1)
    setup.write_segment(SPACE, cached)  # a read-through result: no dataset lists it
    writer = open_store(url, writable=True)
    collector = open_store(url, writable=True)
    chosen: list[SegmentReader] = []
    for i, step in enumerate(steps):
        step(collector, chosen)
        if i == writer_after:
            build_dataset(writer, "reuses", cached + records(2))
    return readable(url, "reuses")


@pytest.mark.parametrize("writer_after", range(len(HANDSHAKE)))
def test_a_writer_reusing_a_record_loses_nothing_at_any_step(
    tmp_path: Path, writer_after: int
) -> None:
    assert race_once(tmp_path / "store", HANDSHAKE, writer_after)


def test_the_race_catches_a_gc_that_deletes_what_it_decided_on(tmp_path: Path) -> None:
    """The same interleaving against a collector without the handshake loses the record."""
    assert not race_once(tmp_path / "store", NAIVE, writer_after=0)


# -- the race, in real processes ------------------------------------------------------------------

WRITER_ROUNDS = 12
READER_SEEDS = tuple(range(900, 906))


def _writer(url: str, stop: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    """Seal read-through-like records, then build datasets that reuse some of them; delete every
    other dataset again so that gc has something to collect. Reports datasets left broken."""
    store = open_store(url, writable=True)
    broken = []
    try:
        for rnd in range(WRITER_ROUNDS):
            cached = records(*range(100 * rnd, 100 * rnd + 4))
            store.write_segment(SPACE, cached)  # unreferenced until the dataset below
            name = f"{'keep' if rnd % 2 else 'temp'}-{rnd}"
            build_dataset(store, name, cached[:2] + records(100 * rnd + 50))
            if not readable(url, name):
                broken.append(name)
            if rnd >= 2 and rnd % 2 == 0:
                store.delete_dataset(f"temp-{rnd - 2}")
    finally:
        stop.set()
        out.put(("writer", broken))


def _reader(url: str, stop: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    """Stream the referenced datasets from one long-lived handle while gc runs; any error or
    wrong record is reported."""
    store = open_store(url)
    errors: list[str] = []
    passes = 0
    while not stop.is_set() or passes < 3:
        store.refresh()
        for name in ["base", *(n for n in store.datasets() if n.startswith("keep-"))]:
            ds = store.dataset(name)
            if not ds.complete:
                continue
            try:
                got = [bytes.fromhex(r.key) for r in ds.read(np.arange(len(ds))).decode()]
            except Exception as e:
                errors.append(f"{name}: {type(e).__name__}: {e}")
                continue
            if got != [bytes(k) for k in ds.raw_keys]:
                errors.append(f"{name}: wrong records")
        passes += 1
    out.put(("reader", errors))


def test_gc_racing_a_reader_and_a_writer_loses_no_referenced_record(tmp_path: Path) -> None:
    path = tmp_path / "store"
    url = str(path)
    store = open_store(url, writable=True)
    base = records(*READER_SEEDS)
    store.write_segment(SPACE, base)
    store.write_segment(SPACE, records(999))  # unreferenced from the start
    build_dataset(store, "base", base)

    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=f, args=(url, stop, out)) for f in (_writer, _reader)]
    for p in procs:
        p.start()
    collected = 0
    deadline = time.monotonic() + 180
    try:
        while not stop.is_set() and procs[0].is_alive() and time.monotonic() < deadline:
            collected += collect_now(open_store(url, writable=True)).deleted.segments
        stop.set()
        results = dict(out.get(timeout=90) for _ in procs)  # Empty: a process crashed or hung
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    collected += collect_now(open_store(url, writable=True)).deleted.segments

    assert results["writer"] == []
    assert results["reader"] == []
    assert collected > 0  # gc did collect while they ran (temp datasets, unused results)
    fresh = open_store(url)
    for name in fresh.datasets():
        assert readable(url, name), name
    assert not any(u.unreferenced for u in gc.segment_uses(fresh))


def test_a_segment_collected_under_an_open_reader_is_an_error_not_zeros(tmp_path):
    """zarr reads a removed segment's chunks as zeros; the reader must say it is gone."""
    store = open_store(str(tmp_path), writable=True)
    recs = records(1, 2)
    segment = store.write_segment(SPACE, recs)
    reader = SegmentReader(store.backend, SPACE, segment)
    assert bytes(reader.encoded(0).key) == recs[0].key
    store.backend.unpublish(reader.rel)
    with pytest.raises(Unavailable, match="collected"):
        reader.load()
    with pytest.raises(Unavailable, match="collected"):
        reader.encoded(1)
