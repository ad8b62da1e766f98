"""The batched read path and the segment cache behind it (exact accounting under threads)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
from test_store import SPACE, assert_matches, synthetic_record

import logitcache
from logitcache.client.errors import FailedPrecondition
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.read import gather, record_slice
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.store import Store, open_store

LENGTHS = [3, 1, 7, 4, 2, 9, 5, 6]


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    """Three segments, and a dataset whose keys interleave them, with two keys never sealed."""
    writer = open_store(str(tmp_path / "store"), writable=True)
    recs = [synthetic_record(seed, n) for seed, n in enumerate(LENGTHS)]
    writer.write_segment(SPACE, recs[:3])
    writer.write_segment(SPACE, recs[3:6])
    writer.write_segment(SPACE, recs[6:])
    keys = [recs[5].key, recs[0].key, synthetic_record(100, 4).key, recs[1].key, recs[2].key,
            recs[7].key, synthetic_record(101, 4).key, recs[3].key]  # fmt: skip
    writer.create_dataset("mixed", SPACE, keys, positions=40, provenance={})
    return str(tmp_path / "store")


def records_by_key() -> dict[bytes, object]:
    return {r.key: r for r in (synthetic_record(seed, n) for seed, n in enumerate(LENGTHS))}


def test_a_batch_is_the_records_in_the_order_asked(store_path: str) -> None:
    ds = logitcache.open_store(store_path).dataset("mixed")
    batch = ds.read([7, 0, 1, 3, 4, 5], allow_missing=False)
    expected = [ds.raw_key(i) for i in (7, 0, 1, 3, 4, 5)]
    assert batch.keys == expected and batch.found.tolist() == list(range(6))
    by_key = records_by_key()
    assert batch.lengths.tolist() == [len(by_key[k]) for k in expected]
    np.testing.assert_array_equal(
        batch.input_ids, np.concatenate([by_key[k].input_ids for k in expected])
    )
    for got, key in zip(batch.decode(), expected, strict=True):
        assert_matches(got, by_key[key])
    for got, key in zip(batch.records(), expected, strict=True):  # encoded, undecoded
        for name, array in by_key[key].arrays.items():
            np.testing.assert_array_equal(got.arrays[name], array, err_msg=name)


def test_missing_records_are_left_out_or_refused(store_path: str) -> None:
    ds = logitcache.open_store(store_path).dataset("mixed")
    batch = ds.read(range(len(ds)), allow_missing=True)
    assert batch.found.tolist() == [0, 1, 3, 4, 5, 7]
    assert batch.keys == [ds.raw_key(i) for i in (0, 1, 3, 4, 5, 7)]
    with pytest.raises(FailedPrecondition, match="record 2 of dataset 'mixed' is missing"):
        ds.read(range(len(ds)))
    empty = ds.read([2, 6], allow_missing=True)
    assert len(empty) == 0 and empty.positions == 0 and empty.decode() == []


def test_records_sealed_after_the_handle_opened_are_found(store_path: str) -> None:
    reader = logitcache.open_store(store_path)
    late = synthetic_record(100, 4)  # one of the dataset's missing keys
    open_store(store_path, writable=True).write_segment(SPACE, [late])
    batch = reader.dataset("mixed").read(range(8), allow_missing=True)
    assert batch.found.tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert_matches(batch.decode()[2], late)


def test_records_in_memory_and_in_segments_gather_into_one_batch(store_path: str) -> None:
    store = logitcache.open_store(store_path)
    sealed = store.read_batch(SPACE, [synthetic_record(2, 7).key])
    memory = synthetic_record(200, 5)
    slices = [record_slice(memory, SPACE)]
    both = gather(SPACE, [*slices, *[record_slice(r, SPACE) for r in sealed.records()]])
    assert both.lengths.tolist() == [5, 7]
    assert_matches(both.decode()[0], memory)
    assert_matches(both.decode()[1], synthetic_record(2, 7))


# ---- the segment cache -------------------------------------------------------------------------


class CountingReader(SegmentReader):
    """A real segment reader that counts (and slows down) its whole-segment loads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loads = 0
        self._count = threading.Lock()

    def load(self):
        with self._count:
            self.loads += 1
        threading.Event().wait(0.01)  # widen the window in which threads overlap
        return super().load()


@pytest.fixture
def segments(tmp_path: Path) -> list[CountingReader]:
    store: Store = open_store(str(tmp_path / "many"), writable=True)
    ids = [store.write_segment(SPACE, [synthetic_record(10 * s + i, 20 + s) for i in range(3)])
           for s in range(10)]  # fmt: skip
    return [CountingReader(store.backend, SPACE, s) for s in ids]


def nbytes(segment: SegmentReader) -> int:
    return sum(a.nbytes for a in segment.load().values())


def test_threads_loading_one_segment_load_it_once(segments: list[CountingReader]) -> None:
    cache = SegmentCache(1 << 30)
    start = threading.Barrier(8)
    got: list[object] = []

    def worker() -> None:
        start.wait()
        got.append(cache.arrays(segments[0]))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert segments[0].loads == 1
    assert all(g is got[0] for g in got)
    assert cache.held_bytes == nbytes(segments[0])


def test_byte_accounting_is_exact_under_concurrent_use(segments: list[CountingReader]) -> None:
    sizes = {s.cache_key: nbytes(s) for s in segments}
    for s in segments:
        s.loads = 0
    budget = 3 * max(sizes.values())
    cache = SegmentCache(budget)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                segment = segments[rng.randrange(len(segments))]
                arrays = cache.arrays(segment)
                assert arrays["input_ids"].shape[0] == segment.positions
                held = cache.held()
                assert sum(held.values()) <= budget or len(held) == 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    held = cache.held()
    assert held == {key: sizes[key] for key in held}  # each held segment counted at its size
    assert cache.held_bytes == sum(held.values()) <= budget
    assert sum(s.loads for s in segments) > len(segments)  # evictions happened, and reloads
