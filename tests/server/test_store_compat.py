"""A store written before issue 9 (tests/data/store-v1) opens, reads and streams unchanged.

The fixture was written by the code of commit 6643b39, and the expected values are what that
code decoded (see tests/data/README.md): three codecs, several segments per space, one key
sealed twice with different numbers, and a dataset that is still building.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.client.errors import FailedPrecondition
from logitcache.client.record import Record
from logitcache.client.wire import decode_batch
from logitcache.server.grpc.convert import stream_batch
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import open_store
from logitcache.server.store.writer import CapturedRecord
from logitcache.server.streaming import DatasetStreamer, StreamBatch, StreamRequest
from logitcache.trainer import TeacherStream

DATA = Path(__file__).resolve().parents[1] / "data"
FIELDS = ("input_ids", "token_ids", "logprobs", "target_logprobs", "tail_logprobs", "counts")
COMPLETE = ("topk", "q64", "sampled")
SEALED_IN_PARTIAL = [0, 2, 4]  # the other two keys of "partial" were never sealed


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(DATA / "store-v1-expected.npz") as f:
        return dict(f)


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    """A copy of the fixture, so that no test can change the committed files."""
    path = tmp_path / "store-v1"
    shutil.copytree(DATA / "store-v1", path)
    return str(path)


def expected_indices(expected: dict[str, np.ndarray], name: str) -> list[int]:
    return sorted(int(k.split("/")[1]) for k in expected if k.startswith(f"{name}/") and
                  k.endswith("/input_ids"))  # fmt: skip


def assert_record(record: Record, expected: dict[str, np.ndarray], name: str, i: int) -> None:
    """Exactly the old code's values (same arrays, same codec), dtypes and shapes included."""
    assert record.key == bytes(expected[f"{name}/keys"][i]).hex()
    for field in FIELDS:
        want = expected.get(f"{name}/{i}/{field}")
        got = getattr(record, field)
        if want is None:
            assert got is None, (name, i, field)
        else:
            assert got.dtype == want.dtype and got.shape == want.shape, (name, i, field)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}[{i}].{field}")


def test_opens_and_lists_the_old_store(store_path: str, expected) -> None:
    store = logitcache.open_store(store_path)
    assert store.datasets() == ["partial", "q64", "sampled", "topk"]
    assert sorted(s.codec for s in store.spaces()) == ["sampled-v1", "topk-q64-delta-v1", "topk-v2"]
    assert len(store.segments()) == 6
    totals = store.totals()  # old segments carry no stored_bytes: measured once here
    assert (totals.spaces, totals.segments, totals.records, totals.positions) == (3, 6, 27, 184)
    assert totals.stored_bytes > 0
    for name in COMPLETE:
        ds = store.dataset(name)
        assert ds.complete
        assert ds.keys == [bytes(k).hex() for k in expected[f"{name}/keys"]]
    partial = store.dataset("partial")
    assert not partial.complete and partial.sealed_count() == len(SEALED_IN_PARTIAL)


@pytest.mark.parametrize("name", [*COMPLETE, "partial"])
def test_every_record_reads_as_the_old_code_read_it(store_path: str, expected, name) -> None:
    ds = logitcache.open_store(store_path).dataset(name)
    indices = expected_indices(expected, name)
    assert indices == (SEALED_IN_PARTIAL if name == "partial" else list(range(len(ds))))
    for i in indices:
        assert_record(ds[i], expected, name, i)
    batch = ds.read(range(len(ds)), allow_missing=True)  # the batched read path
    assert batch.found.tolist() == indices
    for i, record in zip(indices, batch.decode(), strict=True):
        assert_record(record, expected, name, i)


def test_the_first_sealed_copy_of_a_twice_sealed_key_is_the_answer(store_path, expected) -> None:
    store = logitcache.open_store(store_path)
    keys = [bytes(k) for k in expected["topk/keys"]]
    per_segment = [{bytes(k) for k in s.keys} for s in store.segments()]
    twice = [k for k in set(keys) if sum(k in held for held in per_segment) > 1]
    assert len(twice) == 1  # written into a later segment with other numbers
    i = keys.index(twice[0])
    assert_record(store.get(twice[0]), expected, "topk", i)
    assert_record(store.dataset("topk")[len(keys) - 1], expected, "topk", len(keys) - 1)


def stream_all(store_path: str, req: StreamRequest) -> list[StreamBatch]:
    async def run() -> list[StreamBatch]:
        streamer = DatasetStreamer(open_store(store_path), SegmentCache(1 << 24), prefetch=2)
        try:
            return [batch async for batch in streamer.stream(req)]
        finally:
            streamer.close()

    return asyncio.run(run())


@pytest.mark.parametrize("name", COMPLETE)
def test_streams_through_the_dataset_streamer(store_path: str, expected, name) -> None:
    batches = stream_all(store_path, StreamRequest(dataset=name, seed=3, batch_records=4))
    seen = []
    for batch in batches:
        records = decode_batch(stream_batch(batch))  # what a client of the service decodes
        for index, record in zip(batch.indices, records, strict=True):
            assert_record(record, expected, name, index)
            seen.append(index)
    assert sorted(seen) == expected_indices(expected, name)
    assert batches[-1].cursor == len(seen)


def test_a_building_dataset_streams_only_with_allow_partial(store_path: str, expected) -> None:
    with pytest.raises(FailedPrecondition, match="still building"):
        stream_all(store_path, StreamRequest(dataset="partial"))
    batches = stream_all(store_path, StreamRequest(dataset="partial", allow_partial=True))
    assert sorted(i for b in batches for i in b.indices) == SEALED_IN_PARTIAL


@pytest.mark.parametrize("name", COMPLETE)
def test_streams_through_teacher_stream_on_the_store(store_path: str, expected, name) -> None:
    records = list(TeacherStream(store_path, name, shuffle=False, batch_records=4))
    assert len(records) == len(expected_indices(expected, name))
    for i, record in enumerate(records):
        assert_record(record, expected, name, i)
    shuffled = list(TeacherStream(store_path, name, seed=5, batch_records=3))
    assert sorted(r.key for r in shuffled) == sorted(r.key for r in records)


def test_the_new_code_adds_to_an_old_store(store_path: str, expected) -> None:
    """A writer on an old store seals new segments beside the old ones; both read back."""
    writer = open_store(store_path, writable=True)
    ds = writer.dataset("q64")
    old = ds.read(range(len(ds))).records()
    moved = [CapturedRecord(r.key[::-1], r.input_ids, r.arrays) for r in old[:2]]
    writer.write_segment(ds.space, moved)
    reader = logitcache.open_store(store_path)
    assert len(reader.segments()) == 7
    for i in range(len(ds)):
        assert_record(reader.dataset("q64")[i], expected, "q64", i)
    for r in moved:
        np.testing.assert_array_equal(reader.encoded(r.key).input_ids, r.input_ids)
