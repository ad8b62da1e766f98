"""TeacherStream: a dataset of teacher distributions as a PyTorch IterableDataset.

The same stream comes from a logitcache server (``grpc://host:port``) or straight from a store
(a path or file:// URL on a shared file system), with identical semantics, because both use the
order arithmetic of ``logitcache.client.order``:

- the global order of an epoch is a keyed permutation of the dataset, fixed by (seed, epoch);
- rank r of W reads global positions r, r+W, ...; DataLoader worker w of N within that rank reads
  every N-th of those, which is exactly partition ``r + W*w`` of ``W*N``. So the global order is
  the same whatever the number of ranks and workers, and partitions are disjoint and complete;
- every rank reads the same number of records per epoch (``uneven``), so with the same batch size
  and workers every rank runs the same number of batches and no rank waits forever in a
  collective that the others never reach. Where the world size does not divide the dataset,
  ``uneven="wrap"`` (the default, as ``DistributedSampler``) gives every rank ceil(n / W) records:
  the ranks that are one short read the first records of the epoch's global order once more, so
  every record is read at least once and ``W * ceil(n / W) - n`` of them twice.
  ``uneven="drop"`` gives every rank floor(n / W): the last ``n mod W`` records of the epoch's
  order are left out of that epoch (other records each epoch, as the order changes). With one
  rank nothing is padded or dropped, nor with ``allow_partial``, whose missing records make the
  ranks' shares uneven anyway (so do not train multi-rank on a dataset that is still building);
- progress is (batch cursor, records taken since it): ``state_dict()`` after any record and
  ``load_state_dict()`` on a fresh stream continue with the very next record;
  :meth:`TeacherStream.load_batches_taken` does the same from a count of DataLoader batches (what
  a trainer's checkpoint knows, whatever the number of workers). Without a loaded state, every
  ``iter()`` is a new pass over the epoch. ``len()`` counts this rank's records of an epoch, also
  when ``allow_partial`` streams only the dataset's sealed part.

Records are fetched by a background thread into a bounded queue, so the training loop does not
wait on the network while the source keeps up, and memory stays bounded when it does not.
Records of a chat dataset carry their ``loss_mask`` (the assistant positions, see
:class:`~logitcache.client.record.Record`), from either source; the collator applies it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from logitcache.client.order import (
    EpochPermutation,
    rank_length,
    rank_positions,
    worker_partition,
)
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace

STATE_VERSION = 1
_END = object()
Uneven = Literal["wrap", "drop"]


@dataclass(frozen=True)
class Partition:
    """Which share of an epoch one iterator reads: ``rank`` of ``world_size`` partitions."""

    rank: int
    world_size: int


class TeacherStream(IterableDataset):
    """Records of ``dataset`` for this rank (and DataLoader worker), in the (seed, epoch) order.

    ``source`` is ``grpc://host:port`` (a logitcache server) or a store URL. ``rank`` and
    ``world_size`` default to torch.distributed's when it is initialised, else 0 and 1.
    ``allow_partial`` streams a dataset that is still building, up to its sealed part.
    ``uneven``: how a dataset that the world size does not divide is evened out across ranks,
    "wrap" (default) or "drop" (module docstring).
    """

    def __init__(
        self,
        source: str,
        dataset: str,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        shuffle: bool = True,
        allow_partial: bool = False,
        batch_records: int = 64,
        prefetch_records: int = 256,
        uneven: Uneven = "wrap",
    ) -> None:
        super().__init__()
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
            world_size = world_size if world_size is not None else (
                dist.get_world_size() if initialised else 1
            )  # fmt: skip
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if uneven not in ("wrap", "drop"):
            raise ValueError(f"uneven must be 'wrap' or 'drop', got {uneven!r}")
        self.source = source
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.allow_partial = allow_partial
        self.batch_records = batch_records
        self.prefetch_records = prefetch_records
        self.uneven = uneven
        self._offsets: dict[Partition, int] | None = None  # from load_batches_taken
        self._rotation = 0  # ... which also rotates the workers for that one pass
        self._cursor = 0  # batch cursor of this iterator's partition
        self._skip = 0  # records already taken after that cursor
        self._partition: Partition | None = None
        self._resuming = False  # the next __iter__ continues from a loaded state
        self._space: CaptureSpace | None = None
        self._length: int | None = None

    # -- what the dataset is --------------------------------------------------------------------

    @property
    def space(self) -> CaptureSpace:
        """The capture space of the dataset (teacher, tokenizer, vocabulary, k, codec)."""
        if self._space is None:
            self._space, self._length = _describe(self.source, self.dataset)
        return self._space

    def __len__(self) -> int:
        """Records this rank reads in one epoch (all workers together), the same on every rank."""
        n = self.dataset_length
        if self.world_size == 1 or self.allow_partial:
            return rank_length(n, self.rank, self.world_size)
        return -(-n // self.world_size) if self.uneven == "wrap" else n // self.world_size

    @property
    def dataset_length(self) -> int:
        """Records in the dataset (all ranks)."""
        if self._length is None:
            self._space, self._length = _describe(self.source, self.dataset)
        return self._length

    def _partition_length(self, partition: Partition) -> int:
        """Records of an epoch that ``partition`` (a worker of this rank) reads: every
        ``workers``-th of this rank's ``len(self)``, starting at the worker's index."""
        workers = partition.world_size // self.world_size
        return rank_length(len(self), partition.rank // self.world_size, workers)

    def check_student(
        self,
        *,
        tokenizer_path: str | None = None,
        tokenizer_fingerprint: str | None = None,
        vocab_size: int | None = None,
        allow_vocab_padding: bool = False,
    ) -> None:
        """Refuse a student this dataset cannot teach (see ``logitcache.trainer.guards``)."""
        from logitcache.trainer.guards import check_student

        check_student(
            self.space,
            tokenizer_path=tokenizer_path,
            tokenizer_fingerprint=tokenizer_fingerprint,
            vocab_size=vocab_size,
            allow_vocab_padding=allow_vocab_padding,
        )

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (a new permutation)."""
        self.epoch = epoch
        self._cursor = self._skip = 0
        self._resuming = False
        self._offsets, self._rotation = None, 0

    # -- iteration ------------------------------------------------------------------------------

    def _current_partition(self) -> Partition:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if self._resuming and self._offsets is not None:
            worker = (worker + self._rotation) % workers
        return Partition(*worker_partition(self.rank, self.world_size, worker, workers))

    def __iter__(self) -> Iterator[Record]:
        partition = self._current_partition()
        if self._resuming and self._offsets is not None:  # continue after the batches taken
            if partition not in self._offsets:
                raise ValueError(
                    f"this stream was resumed for {len(self._offsets)} DataLoader worker(s) but "
                    f"it is iterated as partition {partition}: resume with the same workers"
                )
            self._cursor, self._skip = self._offsets[partition], 0
            self._resuming, self._offsets, self._rotation = False, None, 0
        elif self._resuming:  # continue where a loaded state stood
            if self._partition != partition:
                raise ValueError(
                    f"this stream's state belongs to partition {self._partition} but it is "
                    f"iterated as {partition}: resume with the same world size and workers"
                )
            self._resuming = False
        else:  # a new pass over the epoch
            self._cursor = self._skip = 0
        self._partition = partition
        source = _evened(self, partition, self._cursor)
        records = _prefetched(source, self.prefetch_records)
        try:
            to_skip = self._skip  # records of the first batch taken before the state was saved
            for record, cursor_after in records:
                if to_skip > 0:
                    to_skip -= 1
                    continue
                if cursor_after is not None:
                    self._cursor, self._skip = cursor_after, 0
                else:
                    self._skip += 1
                yield record
        finally:
            records.close()
        # The state now says "epoch finished": resuming from it yields nothing more.

    # -- resumption -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this iterator stands; ``load_state_dict`` on an equal stream continues there."""
        partition = self._partition or self._current_partition()
        return {
            "version": STATE_VERSION,
            "dataset": self.dataset,
            "seed": self.seed,
            "epoch": self.epoch,
            "partition": [partition.rank, partition.world_size],
            "cursor": self._cursor,
            "skip": self._skip,
        }

    def load_batches_taken(self, batches: int, batch_size: int, num_workers: int) -> None:
        """Continue this epoch after the first ``batches`` batches that a
        ``DataLoader(self, batch_size=batch_size, num_workers=num_workers)`` delivered.

        Each worker batches its own partition, and the DataLoader takes one batch from each
        worker in turn, skipping those that are done; so the batch count says how many records
        each worker had delivered, and each continues right after them. A new DataLoader starts
        its turns at worker 0, so for this pass the workers are rotated: worker 0 reads the
        partition whose batch was next, and the batches come in the very order they would have.
        With workers, call :meth:`set_epoch` before the next pass (the workers iterate copies).
        """
        workers = max(num_workers, 1)
        partitions = [
            Partition(*worker_partition(self.rank, self.world_size, w, workers))
            for w in range(workers)
        ]
        left = [-(-self._partition_length(p) // batch_size) for p in partitions]
        taken = [0] * workers
        remaining, next_worker = batches, 0
        while remaining > 0 and any(left):  # one round: a batch from each worker not yet done
            for w in range(workers):
                if remaining > 0 and left[w] > 0:
                    taken[w], left[w], remaining = taken[w] + 1, left[w] - 1, remaining - 1
                    next_worker = (w + 1) % workers
        self._rotation = next_worker
        self._offsets = {
            p: min(t * batch_size, self._partition_length(p))
            for p, t in zip(partitions, taken, strict=True)
        }
        self._resuming = True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown TeacherStream state version {state.get('version')!r}")
        if state["dataset"] != self.dataset or state["seed"] != self.seed:
            raise ValueError(
                f"state is for dataset {state['dataset']!r} seed {state['seed']}, this stream "
                f"reads {self.dataset!r} seed {self.seed}"
            )
        self.epoch = state["epoch"]
        self._partition = Partition(*state["partition"])
        self._cursor, self._skip = int(state["cursor"]), int(state["skip"])
        self._offsets, self._rotation = None, 0
        self._resuming = True


# ---- sources: (record, cursor after it if it ends a batch) ---------------------------------


def _evened(
    stream: TeacherStream, partition: Partition, cursor: int
) -> Iterator[tuple[Record, int | None]]:
    """The partition's records from ``cursor``, evened out to its share of ``len(stream)``.

    The partition's j-th record is the one at global position ``partition.rank + P * j``
    (P = partition.world_size): its own records while that position is inside the dataset, then
    (wrap) the record at that position modulo the dataset's length, which is the first record of
    another partition's share; or (drop) it stops before its share runs out.
    """
    length = stream._partition_length(partition)
    n = stream.dataset_length
    own = min(length, rank_length(n, partition.rank, partition.world_size))
    position = cursor
    if position < own:
        source = _open_source(stream, partition, position)
        try:
            for record, cursor_after in source:
                position += 1
                yield record, (position if position == own else cursor_after)
                if position == own:
                    break
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
    for j in range(max(position, own), length):  # wrapped around: a record of another partition
        g = (partition.rank + partition.world_size * j) % n
        owner = Partition(g % partition.world_size, partition.world_size)
        source = _open_source(stream, owner, g // partition.world_size)
        try:
            record, _ = next(iter(source))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        yield record, j + 1


def _open_source(stream: TeacherStream, partition: Partition, cursor: int):
    if stream.source.startswith("grpc://"):
        return _grpc_source(stream, partition, cursor)
    return _store_source(stream, partition, cursor)


def _grpc_source(
    stream: TeacherStream, partition: Partition, cursor: int
) -> Iterator[tuple[Record, int | None]]:
    from logitcache.client.client import Client

    with Client(stream.source.removeprefix("grpc://")) as client:
        records = client.stream_dataset(
            stream.dataset, rank=partition.rank, world_size=partition.world_size,
            seed=stream.seed, epoch=stream.epoch, start_cursor=cursor,
            batch_records=stream.batch_records, allow_partial=stream.allow_partial,
            shuffle=stream.shuffle,
        )  # fmt: skip
        last = records.cursor
        try:
            for record in records:
                ended = records.cursor != last
                last = records.cursor
                yield record, (last if ended else None)
        finally:
            records.close()


def _store_source(
    stream: TeacherStream, partition: Partition, cursor: int
) -> Iterator[tuple[Record, int | None]]:
    import logitcache  # open_store loads the store code when called, never at import

    store = logitcache.open_store(stream.source)
    ds = store.dataset(stream.dataset)
    if not ds.complete and not stream.allow_partial:
        raise RuntimeError(
            f"dataset {stream.dataset!r} is still building; pass allow_partial=True to stream "
            "its sealed part"
        )
    permutation = EpochPermutation(len(ds), stream.seed, stream.epoch, shuffle=stream.shuffle)
    total = rank_length(len(ds), partition.rank, partition.world_size)
    while cursor < total:
        count = min(stream.batch_records, total - cursor)
        positions = rank_positions(
            len(ds), partition.rank, partition.world_size, start=cursor, count=count
        )
        cursor += count
        # One batched read and one decode per batch, as a server streams it, with the
        # dataset's loss masks where it has them.
        indices = permutation(positions)
        read = ds.read(indices, allow_missing=stream.allow_partial)
        batch = read.decode()
        if ds.loss_masks is not None and batch:
            masks = ds.loss_masks.read(indices[read.found], read.lengths)
            pieces = np.split(masks, np.cumsum(read.lengths)[:-1])
            batch = [replace(r, loss_mask=m) for r, m in zip(batch, pieces, strict=True)]
        for i, record in enumerate(batch):
            yield record, (cursor if i == len(batch) - 1 else None)


def _describe(source: str, dataset: str) -> tuple[CaptureSpace, int]:
    if source.startswith("grpc://"):
        from logitcache.client.client import Client

        with Client(source.removeprefix("grpc://")) as client:
            info = client.describe_dataset(dataset)
        fields = {f: getattr(info.space, f) for f in CaptureSpace.__dataclass_fields__}
        return CaptureSpace(**fields), int(info.sequences)
    import logitcache

    ds = logitcache.open_store(source).dataset(dataset)
    return ds.space, len(ds)


class _prefetched:
    """Iterate ``source`` in a background thread through a queue of at most ``size`` items."""

    def __init__(self, source: Iterator, size: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    break
            self._put_final(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put_final(e)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _put_final(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> _prefetched:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
