"""Shuffling and partitioning arithmetic: bijections, determinism, disjoint covering partitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.client.order import (
    EpochPermutation,
    rank_length,
    rank_positions,
    worker_partition,
    worker_positions,
)

SEEDS = st.integers(min_value=-(2**70), max_value=2**70)
EPOCHS = st.integers(min_value=0, max_value=10**6)
SPECIAL_N = sorted(
    {0, 1, 2, 3, 5, 7}
    | {2**b + d for b in range(1, 17) for d in (-1, 0, 1)}
    | {10**5, 99_991, 65_537}
)
FAST = settings(max_examples=60, deadline=None)


def full(perm: EpochPermutation) -> np.ndarray:
    return perm(np.arange(len(perm), dtype=np.int64))


# --- EpochPermutation ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", SPECIAL_N)
def test_bijection_on_special_sizes(n: int) -> None:
    out = full(EpochPermutation(n, seed=12345, epoch=3))
    assert out.dtype == np.int64
    assert out.shape == (n,)
    assert np.array_equal(np.sort(out), np.arange(n))


@FAST
@given(n=st.integers(0, 100_000), seed=SEEDS, epoch=EPOCHS)
def test_bijection_random_sizes(n: int, seed: int, epoch: int) -> None:
    out = full(EpochPermutation(n, seed, epoch))
    assert np.array_equal(np.sort(out), np.arange(n))


@FAST
@given(n=st.integers(0, 5000), seed=SEEDS, epoch=EPOCHS)
def test_deterministic(n: int, seed: int, epoch: int) -> None:
    assert np.array_equal(
        full(EpochPermutation(n, seed, epoch)), full(EpochPermutation(n, seed, epoch))
    )


@FAST
@given(n=st.integers(21, 5000), seed=SEEDS, epoch=EPOCHS, other=st.integers(1, 10**6))
def test_epochs_and_seeds_differ(n: int, seed: int, epoch: int, other: int) -> None:
    base = full(EpochPermutation(n, seed, epoch))
    assert not np.array_equal(base, full(EpochPermutation(n, seed, epoch + other)))
    assert not np.array_equal(base, full(EpochPermutation(n, seed + other, epoch)))


@FAST
@given(n=st.integers(21, 5000), seed=SEEDS, epoch=EPOCHS)
def test_shuffle_actually_shuffles(n: int, seed: int, epoch: int) -> None:
    out = full(EpochPermutation(n, seed, epoch))
    assert not np.array_equal(out, np.arange(n))


@FAST
@given(n=st.integers(0, 5000), seed=SEEDS, epoch=EPOCHS)
def test_no_shuffle_is_identity(n: int, seed: int, epoch: int) -> None:
    perm = EpochPermutation(n, seed, epoch, shuffle=False)
    assert len(perm) == n
    assert np.array_equal(full(perm), np.arange(n))


@FAST
@given(data=st.data(), n=st.integers(1, 5000), seed=SEEDS, epoch=EPOCHS)
def test_subset_equals_slice_of_full(data: st.DataObject, n: int, seed: int, epoch: int) -> None:
    perm = EpochPermutation(n, seed, epoch)
    subset = np.asarray(data.draw(st.lists(st.integers(0, n - 1), max_size=200)), dtype=np.int64)
    assert np.array_equal(perm(subset), full(perm)[subset])
    # Shape is kept and other integer dtypes are accepted.
    grid = subset[: (subset.size // 2) * 2].reshape(-1, 2).astype(np.uint32)
    assert np.array_equal(perm(grid), full(perm)[grid])


def test_contiguous_windows_agree_with_full() -> None:
    perm = EpochPermutation(10_007, seed=7, epoch=1)
    whole = full(perm)
    for lo in range(0, 10_007, 997):
        window = np.arange(lo, min(lo + 997, 10_007))
        assert np.array_equal(perm(window), whole[window])


@pytest.mark.parametrize("n", [10**10, 10**12, 2**62 + 3, 2**63])
def test_huge_n_few_positions(n: int) -> None:
    perm = EpochPermutation(n, seed=99, epoch=5)
    positions = np.array([0, 1, 2, n // 3, n - 2, n - 1], dtype=np.int64)
    out = perm(positions)
    assert out.dtype == np.int64
    assert ((out >= 0) & (out < n)).all()
    assert np.unique(out).size == positions.size  # injective on these positions
    assert np.array_equal(out, perm(positions))
    assert np.array_equal(out[::-1], perm(positions[::-1]))


def test_single_item_and_empty() -> None:
    assert np.array_equal(EpochPermutation(1, 0, 0)(np.array([0])), [0])
    assert len(EpochPermutation(0, 0, 0)) == 0
    assert EpochPermutation(0, 0, 0)(np.array([], dtype=np.int64)).shape == (0,)
    assert EpochPermutation(5, 0, 0)([]).dtype == np.int64


def test_rough_uniformity() -> None:
    """Over 4000 fixed seeds, position 0 lands on each of 8 indices ~500 times (sd ~21)."""
    counts = np.bincount(
        [int(EpochPermutation(8, seed, epoch=0)(np.array([0]))[0]) for seed in range(4000)],
        minlength=8,
    )
    assert counts.sum() == 4000
    assert counts.min() > 375 and counts.max() < 625, counts
    # The same across epochs with a fixed seed, for another position.
    counts = np.bincount(
        [int(EpochPermutation(8, 1, epoch)(np.array([5]))[0]) for epoch in range(4000)],
        minlength=8,
    )
    assert counts.min() > 375 and counts.max() < 625, counts


def test_pinned_values() -> None:
    """The order is a format: a resumed run must see the same permutation on any platform.

    If this fails, the hash or the network changed, and every run's data order with it.
    """
    assert full(EpochPermutation(10, seed=0, epoch=0)).tolist() == [7, 5, 1, 8, 6, 3, 4, 0, 9, 2]
    got = EpochPermutation(10**12, seed=2024, epoch=7)(np.array([0, 1, 123456789]))
    assert got.tolist() == [941570630803, 192276353784, 118355975552]


def test_permutation_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="n must be >= 0"):
        EpochPermutation(-1, 0, 0)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        EpochPermutation(2**63 + 1, 0, 0)
    perm = EpochPermutation(10, 0, 0)
    with pytest.raises(ValueError, match="positions must lie in"):
        perm(np.array([0, 10]))
    with pytest.raises(ValueError, match="positions must lie in"):
        perm(np.array([-1, 3]))
    with pytest.raises(ValueError, match="positions must lie in"):
        EpochPermutation(0, 0, 0)(np.array([0]))
    with pytest.raises(ValueError, match="positions must lie in"):
        EpochPermutation(10, 0, 0, shuffle=False)(np.array([10]))
    with pytest.raises(TypeError, match="integer"):
        perm(np.array([0.5]))
    with pytest.raises(TypeError, match="n must be an integer"):
        EpochPermutation(3.0, 0, 0)  # type: ignore[arg-type]


# --- rank_positions / rank_length ---------------------------------------------------------------

WORLD = st.integers(1, 8)


@FAST
@given(n=st.integers(0, 400), world_size=WORLD)
def test_ranks_partition_and_preserve_global_order(n: int, world_size: int) -> None:
    per_rank = [rank_positions(n, r, world_size) for r in range(world_size)]
    for r, seq in enumerate(per_rank):
        assert seq.dtype == np.int64
        assert len(seq) == rank_length(n, r, world_size)
        assert (seq % world_size == r).all()
        assert (np.diff(seq) > 0).all()
    together = np.concatenate(per_rank)
    assert np.array_equal(np.sort(together), np.arange(n))  # disjoint and covering
    assert sum(rank_length(n, r, world_size) for r in range(world_size)) == n
    # Round-robin over ranks (step j of every rank, then step j + 1) is the global order.
    interleaved = [
        int(seq[j]) for j in range(max(map(len, per_rank))) for seq in per_rank if j < len(seq)
    ]
    assert interleaved == list(range(n))


@FAST
@given(n=st.integers(0, 400), world_size=WORLD, data=st.data())
def test_resume_and_count(n: int, world_size: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    whole = rank_positions(n, rank, world_size)
    start = data.draw(st.integers(0, len(whole) + 3))
    count = data.draw(st.none() | st.integers(0, len(whole) + 3))
    got = rank_positions(n, rank, world_size, start=start, count=count)
    expected = whole[start:] if count is None else whole[start : start + count]
    assert np.array_equal(got, expected)
    assert np.array_equal(got, rank + world_size * np.arange(start, start + len(got)))


def test_rank_length_examples() -> None:
    assert [rank_length(10, r, 4) for r in range(4)] == [3, 3, 2, 2]
    assert [rank_length(2, r, 4) for r in range(4)] == [1, 1, 0, 0]
    assert rank_length(0, 0, 1) == 0
    assert rank_length(10**12, 3, 7) == len(range(3, 10**12, 7))
    assert rank_positions(10, 1, 4).tolist() == [1, 5, 9]
    assert rank_positions(10, 1, 4, start=1, count=1).tolist() == [5]


def test_rank_positions_huge_n_window() -> None:
    got = rank_positions(10**12, 5, 8, start=10**9, count=3)
    assert got.tolist() == [5 + 8 * (10**9 + i) for i in range(3)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 10, "rank": 0, "world_size": 0}, "world_size must be >= 1"),
        ({"n": 10, "rank": 4, "world_size": 4}, "rank must be in"),
        ({"n": 10, "rank": -1, "world_size": 4}, "rank must be in"),
        ({"n": -1, "rank": 0, "world_size": 1}, "n must be >= 0"),
        ({"n": 10, "rank": 0, "world_size": 2, "start": -1}, "start must be >= 0"),
        ({"n": 10, "rank": 0, "world_size": 2, "count": -1}, "count must be >= 0"),
    ],
)
def test_rank_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rank_positions(**kwargs)
    if set(kwargs) == {"n", "rank", "world_size"}:
        with pytest.raises(ValueError, match=message):
            rank_length(**kwargs)


# --- worker_positions ---------------------------------------------------------------------------


@FAST
@given(n=st.integers(0, 400), world_size=WORLD, num_workers=st.integers(1, 6), data=st.data())
def test_workers_partition_rank(
    n: int, world_size: int, num_workers: int, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    local = rank_positions(n, rank, world_size)
    parts = [worker_positions(local, w, num_workers) for w in range(num_workers)]
    assert sum(map(len, parts)) == len(local)
    assert np.array_equal(np.sort(np.concatenate(parts)), local)  # local is sorted and unique
    for w, part in enumerate(parts):
        assert np.array_equal(part, local[w::num_workers])


@FAST
@given(n=st.integers(0, 400), world_size=WORLD, num_workers=st.integers(1, 6))
def test_ranks_and_workers_preserve_global_order(n: int, world_size: int, num_workers: int) -> None:
    """Item k of worker w of rank r is global position r + world_size * (w + num_workers * k)."""
    streams = {
        (r, w): worker_positions(rank_positions(n, r, world_size), w, num_workers)
        for r in range(world_size)
        for w in range(num_workers)
    }
    order = [
        int(streams[r, w][k])
        for k in range(max(map(len, streams.values())))
        for w in range(num_workers)
        for r in range(world_size)
        if k < len(streams[r, w])
    ]
    assert order == list(range(n))


def test_workers_compose_with_permutation() -> None:
    """End to end: every dataset index is read exactly once per epoch across ranks and workers."""
    n, world_size, num_workers = 1001, 3, 4
    perm = EpochPermutation(n, seed=42, epoch=2)
    read = np.concatenate(
        [
            perm(worker_positions(rank_positions(n, r, world_size), w, num_workers))
            for r in range(world_size)
            for w in range(num_workers)
        ]
    )
    assert np.array_equal(np.sort(read), np.arange(n))


def test_worker_invalid_arguments() -> None:
    local = np.arange(10)
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        worker_positions(local, 0, 0)
    with pytest.raises(ValueError, match="worker must be in"):
        worker_positions(local, 2, 2)
    with pytest.raises(ValueError, match="worker must be in"):
        worker_positions(local, -1, 2)
    with pytest.raises(ValueError, match="1-D"):
        worker_positions(local.reshape(2, 5), 0, 2)


@FAST
@given(n=st.integers(0, 400), world_size=WORLD, num_workers=st.integers(1, 6), data=st.data())
def test_worker_partition_is_the_workers_share_of_its_rank(
    n: int, world_size: int, num_workers: int, data: st.DataObject
) -> None:
    """A worker's partition, read as a rank of its own, is exactly that worker's positions."""
    rank = data.draw(st.integers(0, world_size - 1))
    worker = data.draw(st.integers(0, num_workers - 1))
    expected = worker_positions(rank_positions(n, rank, world_size), worker, num_workers)
    as_rank = rank_positions(n, *worker_partition(rank, world_size, worker, num_workers))
    np.testing.assert_array_equal(as_rank, expected)


def test_worker_partition_refuses_bad_workers() -> None:
    with pytest.raises(ValueError):
        worker_partition(0, 2, 2, 2)
    with pytest.raises(ValueError):
        worker_partition(0, 2, 0, 0)
    with pytest.raises(ValueError):
        worker_partition(2, 2, 0, 1)
