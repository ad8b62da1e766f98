"""TeacherStream on real stores: partitions, order, resumption, both sources, early stops.

The stores are synthetic (no engine), so these run in seconds; the gRPC source is a store-only
``logitcache serve`` process over the same store (those tests are marked slow: a subprocess).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

import logitcache
from logitcache.bench.synthetic import synthetic_store
from logitcache.client.order import EpochPermutation
from logitcache.client.record import Record
from logitcache.client.space import record_key
from logitcache.server.launcher import ServerProcess
from logitcache.server.store.store import open_store
from logitcache.trainer import TeacherStream

N = 37  # records of "bench": prime, so no world size or worker count divides it
SEQ_LEN, K = 8, 4
SEALED, UNSEALED = 12, 7  # "building": keys of 12 stored records interleaved with 7 never written


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A store with "bench" (complete, N records) and "building" (only partly sealed)."""
    path = tmp_path_factory.mktemp("stream") / "store"
    synthetic_store(path, N * SEQ_LEN, SEQ_LEN, K, vocab=100)
    writer = open_store(str(path), writable=True)
    bench = writer.dataset("bench")
    sealed = [bench.raw_key(i) for i in range(SEALED)]
    missing = [
        record_key(bench.space.space_id, np.full(SEQ_LEN, 100 + i, dtype=np.int32))
        for i in range(UNSEALED)
    ]
    keys = [key for pair in zip(sealed, missing, strict=False) for key in pair]
    keys += sealed[len(missing) :]
    writer.create_dataset("building", bench.space, keys, len(keys) * SEQ_LEN, provenance={})
    return str(path)


@pytest.fixture(scope="module")
def grpc_source(store: str) -> Iterator[str]:
    """The same store served by a store-only server (no engine: starts in about a second)."""
    with ServerProcess(None, Path(store)) as server:
        yield "grpc://" + server.target


SOURCES = ["store", pytest.param("grpc", marks=pytest.mark.slow)]


@pytest.fixture
def url(request: pytest.FixtureRequest, store: str) -> str:
    """The store, or the server over it (parametrize indirectly with SOURCES)."""
    return store if request.param == "store" else request.getfixturevalue("grpc_source")


def keys(records: Iterable[Record]) -> list[str]:
    return [r.key for r in records]


def read(stream: TeacherStream, workers: int = 0) -> list[Record]:
    if workers == 0:
        return list(stream)
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def take(iterator: Iterator[Record], n: int) -> list[Record]:
    return [next(iterator) for _ in range(n)]


def assert_same_records(got: list[Record], want: list[Record]) -> None:
    assert keys(got) == keys(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        np.testing.assert_array_equal(a.target_logprobs, b.target_logprobs)  # NaN == NaN here


def epoch_order(store: str, dataset: str, seed: int, epoch: int) -> list[str]:
    """The documented global order: dataset index permutation(p) at global position p."""
    ds = logitcache.open_store(store).dataset(dataset)
    indices = EpochPermutation(len(ds), seed, epoch)(np.arange(len(ds)))
    return [ds.keys[i] for i in indices]


# --- size, partitions, order -----------------------------------------------------------------------


@pytest.mark.parametrize("uneven", ["wrap", "drop"])
def test_every_rank_reads_the_same_number_of_records(store: str, uneven: str) -> None:
    for world_size in (1, 2, 3, 4):
        streams = [
            TeacherStream(store, "bench", rank=r, world_size=world_size, uneven=uneven)  # type: ignore[arg-type]
            for r in range(world_size)
        ]
        want = (
            N if world_size == 1 else (-(-N // world_size) if uneven == "wrap" else N // world_size)
        )
        assert [len(s) for s in streams] == [want] * world_size
        assert [len(read(s)) for s in streams] == [want] * world_size


@pytest.mark.parametrize("uneven", ["wrap", "drop"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_and_workers_split_one_global_order(
    store: str, world_size: int, workers: int, uneven: str
) -> None:
    per_rank = [
        keys(read(TeacherStream(store, "bench", 5, rank=r, world_size=world_size, batch_records=4,
                                uneven=uneven), workers))  # type: ignore[arg-type]
        for r in range(world_size)
    ]  # fmt: skip
    order = epoch_order(store, "bench", seed=5, epoch=0)
    # Rank r's item i is global position r + W * i (workers interleave inside a rank), modulo N
    # where "wrap" pads a rank that is one short with the first records of the order.
    length = len(per_rank[0])
    assert per_rank == [
        [order[(r + world_size * i) % N] for i in range(length)] for r in range(world_size)
    ]
    everything = [k for rank_keys in per_rank for k in rank_keys]
    if uneven == "wrap":  # every record at least once, the first W * L - N of the order twice
        assert set(everything) == set(order)
        assert everything.count(order[0]) == (2 if N % world_size else 1)
    else:  # each record at most once; the last N mod W of the order are left out
        assert len(set(everything)) == len(everything) == N - N % world_size


def test_wrapped_epochs_stay_in_step_over_grpc_and_store_alike(store: str) -> None:
    """The padding record is read through the same source path as any other (store here)."""
    stream = TeacherStream(store, "bench", 3, rank=3, world_size=4, batch_records=4)
    order = epoch_order(store, "bench", seed=3, epoch=0)
    assert keys(stream)[-1] == order[(3 + 4 * (len(stream) - 1)) % N] == order[2]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batches", [0, 1, 3, 4, 5, 7])
def test_load_batches_taken_continues_after_the_batches_a_dataloader_delivered(
    store: str, workers: int, batches: int
) -> None:
    def loader(stream: TeacherStream) -> DataLoader:
        return DataLoader(stream, batch_size=3, num_workers=workers, collate_fn=keys)

    def make() -> TeacherStream:
        return TeacherStream(store, "bench", 4, rank=1, world_size=2, batch_records=5)

    expected = list(loader(make()))  # 19 records: 7 batches (2 workers: 4 + 3)
    assert len(expected) == 7
    resumed = make()
    resumed.load_batches_taken(batches, batch_size=3, num_workers=workers)
    assert list(loader(resumed)) == expected[batches:]
    resumed.set_epoch(resumed.epoch)  # (workers iterate copies: the next pass is set explicitly)
    assert list(loader(resumed)) == expected


def test_order_is_fixed_by_seed_and_epoch(store: str) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        return keys(TeacherStream(store, "bench", seed=seed, epoch=epoch))

    assert order(3, 0) == order(3, 0)
    assert order(3, 1) != order(3, 0)
    assert order(4, 0) != order(3, 0)
    assert sorted(order(3, 1)) == sorted(order(3, 0))
    unshuffled = keys(TeacherStream(store, "bench", shuffle=False))
    assert unshuffled == logitcache.open_store(store).dataset("bench").keys


def test_set_epoch_restarts_in_the_new_epoch_order(store: str) -> None:
    stream = TeacherStream(store, "bench", seed=3, batch_records=5)
    it = iter(stream)
    take(it, 7)  # mid-epoch
    it.close()
    stream.set_epoch(2)
    assert stream.state_dict()["cursor"] == 0 and stream.state_dict()["skip"] == 0
    assert keys(stream) == keys(TeacherStream(store, "bench", seed=3, epoch=2))
    assert stream.epoch == 2


# --- exact resumption ------------------------------------------------------------------------------


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 3)])
@pytest.mark.parametrize("taken", [0, 1, 4, 5, 6, 10, 11, "all"])
def test_state_dict_resumes_with_exactly_the_next_record(
    store: str, rank: int, world_size: int, taken: int | str
) -> None:
    def make() -> TeacherStream:
        return TeacherStream(store, "bench", 9, 1, rank, world_size, batch_records=5)

    expected = read(make())
    n = len(expected) if taken == "all" else taken
    stream = make()
    it = iter(stream)
    first = take(it, n)
    state = json.loads(json.dumps(stream.state_dict()))  # checkpoints may store it as JSON
    it.close()

    resumed = make()
    resumed.load_state_dict(state)
    assert keys(first) + keys(resumed) == keys(expected)
    # The epoch ended: iterating again starts the epoch over.
    assert keys(resumed) == keys(expected)


def test_a_new_iteration_starts_the_epoch_over_and_a_finished_state_stays_finished(
    store: str,
) -> None:
    full = keys(read(TeacherStream(store, "bench", batch_records=5)))
    stream = TeacherStream(store, "bench", batch_records=5)
    take(iter(stream), 3)  # a peek, abandoned
    assert sorted(keys(read(stream, workers=2))) == sorted(full)
    assert keys(read(stream)) == full
    finished = stream.state_dict()
    again = TeacherStream(store, "bench", batch_records=5)
    again.load_state_dict(finished)
    assert list(again) == []


def test_resuming_twice_in_a_row_stays_exact(store: str) -> None:
    expected = keys(TeacherStream(store, "bench", batch_records=5))
    got: list[str] = []
    state = None
    for n in (3, 9, 2, 8):  # resume, take a few, save again: skips accumulate correctly
        stream = TeacherStream(store, "bench", batch_records=5)
        if state is not None:
            stream.load_state_dict(state)
        it = iter(stream)
        got += keys(take(it, n))
        state = stream.state_dict()
        it.close()
    stream = TeacherStream(store, "bench", batch_records=5)
    stream.load_state_dict(state)
    assert got + keys(stream) == expected


def test_resume_refuses_another_partition_or_dataset(store: str) -> None:
    stream = TeacherStream(store, "bench", rank=0, world_size=2, batch_records=5)
    it = iter(stream)
    take(it, 3)
    state = stream.state_dict()
    it.close()

    other_world = TeacherStream(store, "bench", rank=0, world_size=3, batch_records=5)
    other_world.load_state_dict(state)
    with pytest.raises(ValueError, match="partition"):
        next(iter(other_world))

    in_workers = TeacherStream(store, "bench", rank=0, world_size=2, batch_records=5)
    in_workers.load_state_dict(state)  # a state of the whole rank, iterated by 2 workers
    loader = iter(DataLoader(in_workers, batch_size=None, num_workers=2))
    with pytest.raises(ValueError, match="partition"):
        next(loader)
    # Re-raising a worker's error leaves the loader in a reference cycle; if the garbage collector
    # finalises it (at any later time, on any thread), its queues are closed first and shutting
    # down the workers waits out 2 x 5 s. Stop them now.
    loader._shutdown_workers()

    with pytest.raises(ValueError, match="seed"):
        TeacherStream(store, "bench", seed=1, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset"):
        TeacherStream(store, "building", rank=0, world_size=2).load_state_dict(state)


# --- the gRPC source -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_grpc_source_streams_the_same_records_as_the_store(
    store: str, grpc_source: str, rank: int, world_size: int
) -> None:
    via_grpc = TeacherStream(grpc_source, "bench", 2, 1, rank, world_size, batch_records=5)
    via_store = TeacherStream(store, "bench", 2, 1, rank, world_size, batch_records=5)
    assert len(via_grpc) == len(via_store)
    assert via_grpc.space == via_store.space
    assert_same_records(read(via_grpc), read(via_store))


@pytest.mark.slow
@pytest.mark.parametrize("taken", [5, 8])
def test_state_from_grpc_resumes_on_the_store(store: str, grpc_source: str, taken: int) -> None:
    expected = keys(TeacherStream(store, "bench", 4, batch_records=5))
    stream = TeacherStream(grpc_source, "bench", 4, batch_records=5)
    it = iter(stream)
    first = keys(take(it, taken))
    state = stream.state_dict()
    it.close()
    resumed = TeacherStream(store, "bench", 4, batch_records=5)
    resumed.load_state_dict(state)
    assert first + keys(resumed) == expected


# --- a dataset still building ----------------------------------------------------------------------


@pytest.mark.parametrize("url", SOURCES, indirect=True)
def test_allow_partial_streams_only_the_sealed_part(store: str, url: str) -> None:
    sealed = set(logitcache.open_store(store).dataset("bench").keys[:SEALED])
    order = [k for k in epoch_order(store, "building", seed=0, epoch=0) if k in sealed]
    with pytest.raises(Exception, match="still building"):  # RuntimeError, or FAILED_PRECONDITION
        list(TeacherStream(url, "building"))
    assert keys(TeacherStream(url, "building", batch_records=3, allow_partial=True)) == order
    halves = [
        keys(TeacherStream(url, "building", rank=r, world_size=2, allow_partial=True))
        for r in (0, 1)
    ]
    assert sorted(halves[0] + halves[1]) == sorted(sealed)


def test_allow_partial_resumes_exactly_across_missing_records(store: str) -> None:
    def make() -> TeacherStream:
        return TeacherStream(store, "building", batch_records=3, allow_partial=True)

    expected = keys(make())
    for n in range(len(expected) + 1):
        stream = make()
        it = iter(stream)
        first = keys(take(it, n))
        state = stream.state_dict()
        it.close()
        resumed = make()
        resumed.load_state_dict(state)
        assert first + keys(resumed) == expected, n


# --- prefetching stops when the consumer does --------------------------------------------------------


def wait_for_no_new_threads(before: set[threading.Thread], timeout: float = 5.0) -> list[str]:
    """Threads started since ``before`` that are still alive, waiting up to ``timeout``.

    The client's one event-loop thread (``logitcache-client``) lives as long as the process, by
    design (logitcache.client.sync), so it does not count.
    """
    deadline = time.monotonic() + timeout
    while True:
        new = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name != "logitcache-client"
        ]
        if not new or time.monotonic() > deadline:
            return [t.name for t in new]
        time.sleep(0.05)


@pytest.mark.parametrize("source", ["store", "grpc"])
def test_breaking_early_stops_the_prefetch_thread(
    store: str, grpc_source: str, source: str
) -> None:
    url = store if source == "store" else grpc_source
    before = set(threading.enumerate())
    # A queue of one record: the producer is blocked on a full queue when the consumer leaves.
    stream = TeacherStream(url, "bench", batch_records=2, prefetch_records=1)
    started = time.monotonic()
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert wait_for_no_new_threads(before) == []

    it = iter(stream)
    take(it, 1)
    time.sleep(0.2)  # let the producer fill the queue and block
    it.close()
    assert wait_for_no_new_threads(before) == []
    assert time.monotonic() - started < 5.0


# --- torchdata's StatefulDataLoader ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("taken", [6, 13])
def test_stateful_dataloader_resumes_mid_epoch(store: str, workers: int, taken: int) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader() -> DataLoader:
        stream = TeacherStream(store, "bench", 1, rank=1, world_size=2, batch_records=5)
        return stateful.StatefulDataLoader(stream, batch_size=None, num_workers=workers)

    expected = keys(loader())
    first_loader = loader()
    it = iter(first_loader)
    first = keys(take(it, taken))
    state = first_loader.state_dict()
    del it

    resumed = loader()
    resumed.load_state_dict(state)
    assert first + keys(resumed) == expected
