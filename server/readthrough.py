"""The read-through cache: answer sequences from the store, compute the misses exactly once.

Hits come from sealed segments, or from records computed moments ago and not sealed yet. A miss
starts one computation; every request for the same key, from any client, awaits that same
computation. Computed records go to the store's :class:`SegmentWriter`, which seals them by size
or at least every ``flush_seconds``, so a crash loses at most that window, and only cache
entries, never answers already sent.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from logitcache.client.space import CaptureSpace, record_key
from logitcache.server.metrics import ServerMetrics
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.read import EncodedBatch, RecordSlice, gather, locate, record_slice
from logitcache.server.store.store import Store
from logitcache.server.store.writer import CapturedRecord, SegmentWriter
from logitcache.server.teachers.registry import Teacher

INTERACTIVE_PRIORITY = 0
log = logging.getLogger(__name__)


class ReadThroughCache:
    def __init__(
        self,
        store: Store,
        metrics: ServerMetrics,
        *,
        segment_positions: int,
        flush_seconds: float,
        loaded: SegmentCache,
    ) -> None:
        self.store = store
        self.loaded = loaded
        self.metrics = metrics
        self.segment_positions = segment_positions
        self.flush_seconds = flush_seconds
        self._inflight: dict[bytes, asyncio.Future[CapturedRecord]] = {}
        self._unsealed: dict[bytes, CapturedRecord] = {}
        self._writer = SegmentWriter(
            store,
            segment_positions=segment_positions,
            flush_seconds=flush_seconds,
            on_sealed=self._sealed,
        )
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readthrough-reader")
        self._computing: set[asyncio.Task] = set()  # strong references: the loop keeps weak ones
        self.computations = 0  # sequences computed by this cache since start

    def start(self) -> None:
        """Start sealing by time (on the running loop)."""
        self._writer.start()

    async def get(
        self, teacher: Teacher, k: int, sequences: list[np.ndarray]
    ) -> tuple[EncodedBatch, int]:
        """Records for ``sequences`` in order, as one batch, and how many this call computed."""
        teacher.check_sequences(sequences)
        space = teacher.space(k)
        loop = asyncio.get_running_loop()
        keys, slices, batch = await loop.run_in_executor(
            self._reader, self._lookup, space, sequences
        )
        if batch is not None:  # every record was sealed
            self.metrics.add_lookups(hits=len(keys), misses=0)
            self.metrics.add_served("cache", batch.positions)
            return batch, 0
        waits: dict[int, asyncio.Future[CapturedRecord]] = {}
        computed = 0
        for i, key in enumerate(keys):
            if slices[i] is not None:
                continue
            if key in self._unsealed:
                slices[i] = record_slice(self._unsealed[key], space)
            elif key in self._inflight:
                waits[i] = self._inflight[key]
            elif not self.store.contains(key):
                waits[i] = self._start(teacher, space, key, sequences[i])
                computed += 1
            # else: sealed (and dropped from _unsealed) since the lookup; read below
        self.metrics.add_lookups(hits=len(keys) - len(waits), misses=len(waits))
        hit_positions = sum(len(s) for i, s in enumerate(sequences) if i not in waits)
        self.metrics.add_served("cache", hit_positions)
        if waits:
            # shield: one client going away must not cancel a computation others wait for.
            done = await asyncio.gather(*(asyncio.shield(f) for f in waits.values()))
            for i, record in zip(waits, done, strict=True):
                slices[i] = record_slice(record, space)
            self.metrics.add_served("computed", sum(len(r) for r in done))
        batch = await loop.run_in_executor(self._reader, self._assemble, space, keys, slices)
        return batch, computed

    def _lookup(
        self, space: CaptureSpace, sequences: list[np.ndarray]
    ) -> tuple[list[bytes], list[RecordSlice | None], EncodedBatch | None]:
        """Keys, the sealed records among them, and the whole batch if every one was sealed."""
        self.store.ensure_space(space)
        keys = [record_key(space.space_id, ids) for ids in sequences]
        slices = locate(self.store, self.loaded, keys)
        if all(s is not None for s in slices):
            return keys, slices, gather(space, [s for s in slices if s is not None])
        return keys, slices, None

    def _assemble(
        self, space: CaptureSpace, keys: list[bytes], slices: list[RecordSlice | None]
    ) -> EncodedBatch:
        """One batch in request order; records sealed after the lookup are read now."""
        late = [i for i, s in enumerate(slices) if s is None]
        for i, s in zip(
            late, locate(self.store, self.loaded, [keys[i] for i in late]), strict=True
        ):
            slices[i] = s
        missing = [keys[i].hex() for i, s in enumerate(slices) if s is None]
        if missing:
            raise KeyError(f"records {missing} vanished from store {self.store.url}")
        return gather(space, [s for s in slices if s is not None])

    def _start(
        self, teacher: Teacher, space: CaptureSpace, key: bytes, ids: np.ndarray
    ) -> asyncio.Future[CapturedRecord]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CapturedRecord] = loop.create_future()
        self._inflight[key] = future
        self.computations += 1
        self.metrics.set_queue_depth("interactive", len(self._inflight))

        async def compute() -> None:
            try:
                rows = await teacher.engine.capture(ids, space.k, INTERACTIVE_PRIORITY)
                record = await loop.run_in_executor(
                    self._reader, CapturedRecord.encode, key, ids, rows, space
                )
                self._unsealed[key] = record
                self.metrics.add_computed(teacher.name, len(ids))
                future.set_result(record)
            except BaseException as e:  # the waiters get the error; the key can be retried
                if not future.done():
                    future.set_exception(e)
                if not isinstance(e, Exception):
                    raise
                return
            finally:
                self._inflight.pop(key, None)
                self.metrics.set_queue_depth("interactive", len(self._inflight))
            try:
                await self._writer.add(space, record)
            except Exception as e:  # the answer was sent; only this cache entry is lost
                log.error("caching a computed record failed", exc_info=e)

        task = loop.create_task(compute())
        self._computing.add(task)
        task.add_done_callback(self._computing.discard)
        return future

    def _sealed(self, records: list[CapturedRecord]) -> None:
        for record in records:
            self._unsealed.pop(record.key, None)

    async def close(self) -> None:
        """Seal everything computed so far (graceful shutdown)."""
        try:
            await self._writer.close()
        finally:
            self._reader.shutdown(wait=True)
