"""The store's contract on both backends: a local directory and ``s3://`` on a real SeaweedFS.

Sealing, content addressing, datasets, other handles' segments, unsealed leftovers, gc and the
create-only publish hold the same on both; sharded segments are one object per array, and a
record is read by range after its shard's index (cached).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_store import SPACE, assert_matches, dead_pid, synthetic_record

from logitcache.client.errors import AlreadyExists, NotFound
from logitcache.server.store import gc
from logitcache.server.store.backend import json_bytes
from logitcache.server.store.liveness import writer_identity
from logitcache.server.store.segments import array_names, segments_dir, unsealed_dir
from logitcache.server.store.store import Store, open_store
from logitcache.server.store.writer import _lay_out


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    server = request.getfixturevalue("seaweedfs")
    with pytest.MonkeyPatch.context() as env:
        for name, value in server.env().items():
            env.setenv(name, value)
        yield server.url()


@pytest.fixture
def writer(store_url: str) -> Store:
    return open_store(store_url, writable=True)


def test_sealed_records_and_datasets_round_trip(store_url: str, writer: Store) -> None:
    records = [synthetic_record(seed, length) for seed, length in enumerate([1, 17, 300, 5])]
    writer.write_segment(SPACE, records[:2])
    writer.write_segment(SPACE, records[2:])
    keys = [r.key for r in records]
    writer.create_dataset("ds", SPACE, keys, sum(len(r) for r in records), {"by": "test"})
    with pytest.raises(AlreadyExists):
        writer.create_dataset("ds", SPACE, keys[:1], 1, {})

    reader = open_store(store_url)
    assert reader.datasets() == ["ds"]
    ds = reader.dataset("ds")
    assert len(ds) == 4 and ds.provenance == {"by": "test"} and not ds.complete
    for got, want in zip(ds, records, strict=True):
        assert_matches(got, want)
    batch = ds.read([3, 0])
    assert [bytes(k) for k in batch.keys] == [keys[3], keys[0]]
    assert_matches(batch.decode()[0], records[3])

    writer.mark_complete("ds")
    assert reader.dataset("ds").complete
    writer.delete_dataset("ds")
    assert writer.datasets() == [] and open_store(store_url).datasets() == []
    with pytest.raises(NotFound):
        reader.dataset("ds")
    assert_matches(reader.get(keys[2]), records[2])  # records outlive their dataset


def test_first_sealed_copy_wins_on_every_handle(store_url: str, writer: Store) -> None:
    first = synthetic_record(7, 30)
    second = synthetic_record(7, 30, row_seed=1)  # same sequence, other teacher numbers
    other = open_store(store_url, writable=True)
    writer.write_segment(SPACE, [first])
    other.write_segment(SPACE, [synthetic_record(8, 3), second])
    for handle in (writer, other, open_store(store_url)):
        handle.refresh()
        assert_matches(handle.get(first.key), first)


def test_another_handle_sees_new_segments_at_its_refresh(store_url: str, writer: Store) -> None:
    reader = open_store(store_url)
    record = synthetic_record(3, 40)
    writer.write_segment(SPACE, [record])
    assert reader.find(record.key) is None  # not looked for yet
    reader.refresh()
    assert_matches(reader.get(record.key), record)


def test_an_unsealed_segment_is_invisible_and_later_cleaned(store_url: str, writer: Store) -> None:
    """A writer that died mid-segment: every array written, never sealed."""
    kept = synthetic_record(0, 5)
    writer.write_segment(SPACE, [kept])
    lost = synthetic_record(1, 5)
    base = (
        segments_dir(SPACE.space_id) if not writer.backend.renames else unsealed_dir(SPACE.space_id)
    )
    rel = f"{base}/{time.time_ns():020d}-deadwriter00"
    _lay_out(writer.backend, rel, SPACE, [lost])
    writer.backend.write_json(f"{rel}/writer.json", {**writer_identity(), "pid": dead_pid()})

    reader = open_store(store_url)
    assert reader.find(lost.key) is None and reader.totals().segments == 1
    with pytest.raises(KeyError):
        reader.get(lost.key)
    assert writer.clean_unsealed() == 1
    assert not writer.backend.exists(rel)
    assert_matches(open_store(store_url).get(kept.key), kept)


def test_gc_collects_unreferenced_segments(store_url: str, writer: Store) -> None:
    kept, dropped = synthetic_record(0, 20), synthetic_record(1, 20)
    writer.write_segment(SPACE, [kept])
    dropped_id = writer.write_segment(SPACE, [dropped])
    writer.create_dataset("keep", SPACE, [kept.key], len(kept), {})
    report = gc.collect(writer, dry_run=False, min_age_s=0.0, grace_s=0.0, sleep=lambda s: None)
    assert report.deleted.segments == 1
    assert writer.backend.list_dir(segments_dir(SPACE.space_id)) == [
        s.segment_id for s in writer.segments()
    ]
    assert dropped_id not in writer.backend.list_dir(segments_dir(SPACE.space_id))
    fresh = open_store(store_url)
    assert fresh.find(dropped.key) is None
    assert_matches(fresh.get(kept.key), kept)


def test_one_of_several_publishers_of_one_name_wins(writer: Store) -> None:
    backend = writer.backend
    barrier = threading.Barrier(4)
    results: list[bool] = []

    def publish(me: int) -> None:
        staging = f"race/.staging-{me}"
        backend.write_json(f"{staging}/deep/part.json", {"writer": me})
        backend.write_json(f"{staging}/who.json", {"writer": me})
        barrier.wait()
        results.append(backend.publish(staging, "race/final"))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    winner = backend.read_json("race/final/who.json")["writer"]
    assert backend.read_json("race/final/deep/part.json") == {"writer": winner}
    assert backend.list_dir("race") == ["final"]
    assert backend.create("race/object", b"1") and not backend.create("race/object", b"2")
    assert backend.read_bytes("race/object") == b"1"


def test_a_publisher_that_died_leaves_a_hidden_name_that_is_cleaned(store_url: str) -> None:
    if not store_url.startswith("s3://"):
        pytest.skip("a rename is never half done")
    store = open_store(store_url, writable=True)
    backend = store.backend
    backend.write_json("datasets/half/dataset.json", {"name": "half"})  # half copied, then died
    claim = {"writer": {**writer_identity(), "pid": dead_pid()}, "staging": "datasets/.unsealed/x"}
    assert backend.create("datasets/.half.publishing", json_bytes(claim))
    assert store.datasets() == []
    # ... and a gc that died while removing a segment: its group metadata gone, the rest not
    segment_id = store.write_segment(SPACE, [synthetic_record(5, 10)])
    rel = f"{segments_dir(SPACE.space_id)}/{segment_id}"
    assert backend.create(f"{segments_dir(SPACE.space_id)}/.{segment_id}.removing", b"{}")
    backend.remove_tree(f"{rel}/zarr.json")
    assert backend.list_dir(segments_dir(SPACE.space_id)) == []

    assert store.clean_unsealed() == 2
    assert not backend.exists("datasets/half") and store.datasets() == []
    assert not backend.exists(rel)


def test_spooled_objects_are_created_once_and_read_back(writer: Store) -> None:
    backend = writer.backend
    with backend.spool("jobs/j1/input.jsonl") as upload:
        upload.write(b'{"input_ids": [1, 2]}\n')
        upload.write(b'{"input_ids": [3]}\n')
        assert upload.publish()
    with backend.spool("jobs/j1/input.jsonl") as again:
        again.write(b"other")
        assert not again.publish()
    with backend.open_read("jobs/j1/input.jsonl") as f:
        assert f.read() == b'{"input_ids": [1, 2]}\n{"input_ids": [3]}\n'
    with pytest.raises(NotFound):
        backend.open_read("jobs/j2/input.jsonl")


def test_segments_are_sharded_one_object_per_array(writer: Store) -> None:
    records = [synthetic_record(seed, 3000) for seed in range(3)]  # 9,000 positions: 2 chunks
    segment_id = writer.write_segment(SPACE, records)
    rel = f"{segments_dir(SPACE.space_id)}/{segment_id}"
    objects = writer.backend.object_sizes(rel)
    data = [name for name in objects if "/c/" in name]
    assert sorted(name.split("/")[0] for name in data) == sorted(array_names(SPACE))
    assert len(objects) == 2 + 2 * len(array_names(SPACE))  # + group metadata and writer.json

    reader = open_store(writer.url)
    for record in records[:2]:  # both in the first inner chunk: read by range, not whole
        assert_matches(reader.get(record.key), record)
    backend = reader.backend
    if hasattr(backend, "indexes"):  # object storage: the second record found every index cached
        assert backend.indexes.hits >= len(array_names(SPACE)) - 2  # all but keys and offsets
    assert np.array_equal(reader.get(records[2].key).input_ids, records[2].input_ids)
