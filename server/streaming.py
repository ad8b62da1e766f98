"""Dataset streaming: a rank's share of a dataset, in a deterministic shuffled order, in batches.

The order arithmetic lives in ``logitcache.client.order`` (shared with trainers that read a store
directly). Here we turn positions into records: dataset index -> key -> (segment, row), then
gather the encoded arrays of a batch from segments held in memory and wrap them as a RecordBatch.
Batches are prepared ahead in a worker thread, at most ``prefetch`` of them, so a slow client
bounds the server's memory instead of growing it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.client.order import EpochPermutation, rank_length, rank_positions
from logitcache.client.wire import encode_batch
from logitcache.server.store.segments import SegmentReader, concat_arrays
from logitcache.server.store.store import Dataset, Store
from logitcache.v1 import logitcache_pb2 as pb


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


class LoadedSegments:
    """Segments held in memory for batched reads, least recently used evicted past a budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lru: OrderedDict[str, SegmentReader] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def use(self, segment: SegmentReader) -> None:
        with self._lock:
            if segment.segment_id in self._lru:
                self._lru.move_to_end(segment.segment_id)
                return
        nbytes = segment.load()
        with self._lock:
            self._lru[segment.segment_id] = segment
            self._bytes += nbytes
            while self._bytes > self.budget_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._bytes -= old.loaded_bytes
                old.unload()


class DatasetStreamer:
    def __init__(
        self, store: Store, loaded: LoadedSegments, *, prefetch: int, threads: int = 2
    ) -> None:
        self.store = store
        self.prefetch = prefetch
        self.loaded = loaded
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stream")

    async def stream(self, req: StreamRequest) -> AsyncIterator[pb.RecordBatch]:
        if req.world_size < 1 or not 0 <= req.rank < req.world_size:
            raise InvalidArgument(f"rank {req.rank} is outside [0, world_size={req.world_size})")
        if req.batch_records < 1:
            raise InvalidArgument("batch_records must be at least 1")
        ds = self.store.dataset(req.dataset)
        if not ds.complete and not req.allow_partial:
            raise FailedPrecondition(
                f"dataset {req.dataset!r} is still building; set allow_partial to stream its "
                "sealed part"
            )
        total = rank_length(len(ds), req.rank, req.world_size)
        if req.start_cursor > total:
            raise InvalidArgument(
                f"start_cursor {req.start_cursor} is past the end of this rank's {total} records"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.prefetch)
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

    async def _produce(self, ds: Dataset, req: StreamRequest, total: int, queue) -> None:
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
    ) -> pb.RecordBatch:
        positions = rank_positions(len(ds), req.rank, req.world_size, start=cursor, count=count)
        indices = permutation(positions)
        keys, lengths, ids, parts, kept = [], [], [], [], []
        for index in indices.tolist():
            key = ds.raw_key(index)
            if not self.store.contains(key):
                if req.allow_partial:
                    continue  # not sealed yet
                raise FailedPrecondition(f"record {index} of dataset {ds.name!r} is missing")
            loc = self.store.locate(key)
            self.loaded.use(loc.segment)
            rec = loc.segment.encoded(loc.index)
            keys.append(key)
            lengths.append(len(rec))
            ids.append(rec.input_ids)
            parts.append(rec.arrays)
            kept.append(index)
        if not keys:
            return pb.RecordBatch(cursor=cursor + count)
        return encode_batch(
            ds.space,
            keys,
            np.concatenate(ids),
            np.asarray(lengths),
            concat_arrays(ds.space, parts),
            indices=kept,
            cursor=cursor + count,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
