"""Dataset streaming: a rank's share of a dataset, in a deterministic shuffled order, in batches.

The order arithmetic lives in ``logitcache.client.order`` (shared with trainers that read a store
directly). Here positions become dataset indices, and the store's batched read path turns those
into :class:`StreamBatch`\\ es of encoded arrays, with the dataset's loss masks where it has them
(``store.masks``); the gRPC adapter wraps them for the wire.
Batches are prepared ahead in worker threads, at most ``prefetch`` of them, so a slow client
bounds the server's memory instead of growing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.client.order import EpochPermutation, rank_length, rank_positions
from logitcache.client.space import CaptureSpace
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import Dataset, Store


@dataclass(frozen=True)
class StreamRequest:
    dataset: str
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    epoch: int = 0
    start_cursor: int = 0
    batch_records: int = 64
    allow_partial: bool = False
    shuffle: bool = True


@dataclass(frozen=True)
class StreamBatch:
    """One batch of a stream: encoded records, their dataset indices, and the cursor after it."""

    space: CaptureSpace
    keys: list[bytes]
    lengths: np.ndarray  # int64 [n]
    input_ids: np.ndarray  # int32 [P]
    arrays: dict[str, np.ndarray]  # the codec's arrays, records concatenated
    indices: list[int]  # each record's index in the dataset
    cursor: int  # the rank's cursor after this batch: resume a stream there
    loss_mask: np.ndarray | None = None  # uint8 [P]: chat datasets' masks (None: all count)

    @property
    def positions(self) -> int:
        return int(self.input_ids.shape[0])


class DatasetStreamer:
    def __init__(
        self, store: Store, loaded: SegmentCache, *, prefetch: int, threads: int = 2
    ) -> None:
        self.store = store
        self.prefetch = prefetch
        self.loaded = loaded
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stream")

    async def stream(self, req: StreamRequest) -> AsyncIterator[StreamBatch]:
        if req.world_size < 1 or not 0 <= req.rank < req.world_size:
            raise InvalidArgument(f"rank {req.rank} is outside [0, world_size={req.world_size})")
        if req.batch_records < 1:
            raise InvalidArgument("batch_records must be at least 1")
        loop = asyncio.get_running_loop()
        ds = await loop.run_in_executor(self._pool, self._open, req)
        total = rank_length(len(ds), req.rank, req.world_size)
        if req.start_cursor > total:
            raise InvalidArgument(
                f"start_cursor {req.start_cursor} is past the end of this rank's {total} records"
            )
        queue: asyncio.Queue[StreamBatch | None] = asyncio.Queue(maxsize=self.prefetch)
        producer = loop.create_task(self._produce(ds, req, total, queue))
        try:
            while True:
                batch = await queue.get()
                if batch is None:
                    break
                yield batch
            await producer  # surfaces a producer error
        finally:
            producer.cancel()

    def _open(self, req: StreamRequest) -> Dataset:
        ds = self.store.dataset(req.dataset)
        if not ds.complete and not req.allow_partial:
            raise FailedPrecondition(
                f"dataset {req.dataset!r} is still building; set allow_partial to stream its "
                "sealed part"
            )
        return ds

    async def _produce(
        self, ds: Dataset, req: StreamRequest, total: int, queue: asyncio.Queue
    ) -> None:
        loop = asyncio.get_running_loop()
        permutation = EpochPermutation(len(ds), req.seed, req.epoch, shuffle=req.shuffle)
        cursor = req.start_cursor
        try:
            while cursor < total:
                count = min(req.batch_records, total - cursor)
                batch = await loop.run_in_executor(
                    self._pool, self._build_batch, ds, req, permutation, cursor, count
                )
                cursor += count
                if batch.keys:
                    await queue.put(batch)
        except Exception:
            await queue.put(None)  # wake the consumer; it re-raises through `await producer`
            raise
        # Cancelled (the client went away): nobody reads the queue, so put nothing more.
        await queue.put(None)

    def _build_batch(
        self,
        ds: Dataset,
        req: StreamRequest,
        permutation: EpochPermutation,
        cursor: int,
        count: int,
    ) -> StreamBatch:
        positions = rank_positions(len(ds), req.rank, req.world_size, start=cursor, count=count)
        indices = permutation(positions)
        batch = ds.read(indices, allow_missing=req.allow_partial, cache=self.loaded)
        found = indices[batch.found]
        masks = ds.loss_masks
        return StreamBatch(
            space=batch.space,
            keys=batch.keys,
            lengths=batch.lengths,
            input_ids=batch.input_ids,
            arrays=batch.arrays,
            indices=found.tolist(),
            cursor=cursor + count,
            loss_mask=None if masks is None else masks.read(found, batch.lengths),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
