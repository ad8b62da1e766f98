"""The order in which a dataset is read: per-epoch shuffling and partitioning across ranks/workers.

Training reads a dataset of ``n`` records in epochs. Each epoch visits every record once in a
shuffled order, and the order is split among ``world_size`` ranks and, within a rank, among
DataLoader workers. Everything here is pure arithmetic on positions, so it is cheap to test
exhaustively and every caller agrees on it:

* a *global position* ``p`` in ``[0, n)`` is a step of the epoch's single global order;
* ``EpochPermutation`` maps a global position to the dataset index read at that step;
* ``rank_positions`` / ``worker_positions`` say which global positions a rank / worker reads.

The global order does not depend on the world size or the number of workers (rank ``r`` reads
the positions ``p`` with ``p % world_size == r``), so a job resumed on a different number of
machines continues the same epoch, and the permutation is computed on demand from a keyed hash,
never materialised, so it is identical on every platform and numpy version and O(1) in memory.
Changing any constant below changes every run's order: treat it as a format.
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = [
    "EpochPermutation",
    "rank_length",
    "rank_positions",
    "worker_partition",
    "worker_positions",
]

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2**64 / golden ratio, odd)
_MUL1 = 0xBF58476D1CE4E5B9  # splitmix64 finaliser multipliers
_MUL2 = 0x94D049BB133111EB
_ROUNDS = 6  # Feistel rounds: 4 make a pseudo-random permutation; 2 more mix small domains
_MAX_N = 1 << 63  # positions and indices are int64


def _mix_int(z: int) -> int:
    """The splitmix64 finaliser on a Python int: derives the round keys (scalars, exact)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays; numpy array products wrap modulo 2**64."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL2)
    return z ^ (z >> np.uint64(31))


def _check_int(name: str, value: int) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


class EpochPermutation:
    """A keyed pseudo-random bijection on [0, n), different for each (seed, epoch).

    A balanced Feistel network over the smallest even-bit power-of-two domain holding ``n`` is a
    bijection on that domain whatever its round function; cycle-walking (re-applying it to any
    output ``>= n``) restricts it to a bijection on ``[0, n)``. The domain is less than ``4 n``,
    so an output needs fewer than four applications on average.
    """

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool = True) -> None:
        n = _check_int("n", n)
        seed = _check_int("seed", seed)
        epoch = _check_int("epoch", epoch)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > _MAX_N:
            raise ValueError(f"n must be <= 2**63 (positions are int64), got {n}")
        self.n = n
        self.seed = seed
        self.epoch = epoch
        self.shuffle = bool(shuffle)
        bits = max(2, max(n - 1, 0).bit_length())
        bits += bits % 2  # a balanced Feistel network needs two equal halves
        self._half = bits // 2
        self._half_mask = (1 << self._half) - 1
        # One key per round, from the seed (reduced mod 2**64, so negative seeds work) and epoch.
        base = _mix_int(_mix_int(seed) + (epoch & _M64) * _GAMMA)
        self._keys = tuple(_mix_int(base + (r + 1) * _GAMMA) for r in range(_ROUNDS))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"EpochPermutation(n={self.n}, seed={self.seed}, epoch={self.epoch}, "
            f"shuffle={self.shuffle})"
        )

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        """One pass of the network over the power-of-two domain (uint64 in, uint64 out)."""
        half = np.uint64(self._half)
        mask = np.uint64(self._half_mask)
        left = x >> half
        right = x & mask
        for key in self._keys:
            left, right = right, left ^ (_mix_array(right ^ np.uint64(key)) & mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Dataset index (int64) at each global position (int64 array, values in [0, n))."""
        pos = np.asarray(positions)
        if pos.size == 0:
            return np.zeros(pos.shape, dtype=np.int64)
        if pos.dtype.kind not in "iu":
            raise TypeError(f"positions must be an integer array, got dtype {pos.dtype}")
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= self.n:
            raise ValueError(f"positions must lie in [0, {self.n}), got values in [{lo}, {hi}]")
        if not self.shuffle:
            return pos.astype(np.int64, copy=True)
        out = self._feistel(pos.astype(np.uint64).ravel())
        n = np.uint64(self.n)
        # Cycle-walk: only the shrinking subset still outside [0, n) is re-encrypted.
        idx = np.flatnonzero(out >= n)
        while idx.size:
            walked = self._feistel(out[idx])
            out[idx] = walked
            idx = idx[walked >= n]
        return out.astype(np.int64).reshape(pos.shape)


def _check_rank(n: int, rank: int, world_size: int) -> tuple[int, int, int]:
    n = _check_int("n", n)
    rank = _check_int("rank", rank)
    world_size = _check_int("world_size", world_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return n, rank, world_size


def _check_worker(worker: int, num_workers: int) -> tuple[int, int]:
    worker = _check_int("worker", worker)
    num_workers = _check_int("num_workers", num_workers)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, num_workers={num_workers}), got {worker}")
    return worker, num_workers


def rank_length(n: int, rank: int, world_size: int) -> int:
    """How many items rank `rank` reads in one epoch.

    Ranks ``< n % world_size`` read one more item than the others; callers that need equal
    step counts across ranks must pad or drop the remainder themselves.
    """
    n, rank, world_size = _check_rank(n, rank, world_size)
    return max(0, -(-(n - rank) // world_size))


def rank_positions(
    n: int, rank: int, world_size: int, start: int = 0, count: int | None = None
) -> np.ndarray:
    """Global positions that rank `rank` of `world_size` reads, from its local cursor `start`.

    Local item ``j`` is global position ``rank + j * world_size``: striding keeps the global
    order independent of the world size. ``start`` and ``count`` behave like a slice
    ``[start:start + count]`` of the rank's sequence, so a cursor at or past the end is empty.
    """
    n, rank, world_size = _check_rank(n, rank, world_size)
    start = _check_int("start", start)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    length = rank_length(n, rank, world_size)
    stop = length
    if count is not None:
        count = _check_int("count", count)
        if count < 0:
            raise ValueError(f"count must be >= 0 or None, got {count}")
        stop = min(length, start + count)
    start = min(start, stop)
    return np.arange(rank + start * world_size, rank + stop * world_size, world_size, np.int64)


def worker_positions(local: np.ndarray, worker: int, num_workers: int) -> np.ndarray:
    """Split one rank's local sequence of positions among DataLoader workers: worker w takes items j with j % num_workers == w.

    Striding again (rather than contiguous chunks) means that taking one item from each worker
    in turn reproduces the rank's order, and every worker's items span the whole epoch, so a
    worker that falls behind does not leave the end of the epoch unread. Returns a view.
    """
    worker, num_workers = _check_worker(worker, num_workers)
    arr = np.asarray(local)
    if arr.ndim != 1:
        raise ValueError(f"local must be a 1-D array of positions, got shape {arr.shape}")
    return arr[worker::num_workers]


def worker_partition(rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    """The (rank, world_size) partition that DataLoader worker ``worker`` of rank ``rank`` reads.

    ``rank_positions(n, *worker_partition(r, W, w, N))`` equals
    ``worker_positions(rank_positions(n, r, W), w, N)``: a worker's share is itself a rank of
    ``W * N``, so a reader that knows only ranks (a server stream) serves it unchanged.
    """
    _, rank, world_size = _check_rank(0, rank, world_size)
    worker, num_workers = _check_worker(worker, num_workers)
    return rank + world_size * worker, world_size * num_workers
