"""The read-through cache: answer sequences from the store, compute the misses exactly once.

Hits come from sealed segments, or from records computed moments ago and not sealed yet. A miss
starts one computation; every request for the same key, from any client, awaits that same
computation. Computed records are sealed in segments by size or at least every ``flush_seconds``,
so a crash loses at most that window, and only cache entries, never answers already sent.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from logitcache.client.space import CaptureSpace, record_key
from logitcache.server.metrics import ServerMetrics
from logitcache.server.store.segments import CapturedRecord, SegmentBuilder
from logitcache.server.store.store import Store
from logitcache.server.streaming import LoadedSegments
from logitcache.server.teachers.registry import Teacher

INTERACTIVE_PRIORITY = 0


class ReadThroughCache:
    def __init__(
        self,
        store: Store,
        metrics: ServerMetrics,
        *,
        segment_positions: int,
        flush_seconds: float,
        loaded: LoadedSegments,
    ) -> None:
        self.store = store
        self.loaded = loaded
        self.metrics = metrics
        self.segment_positions = segment_positions
        self.flush_seconds = flush_seconds
        self._inflight: dict[bytes, asyncio.Future[CapturedRecord]] = {}
        self._unsealed: dict[bytes, CapturedRecord] = {}
        self._builders: dict[str, SegmentBuilder] = {}
        self._builder_started: dict[str, float] = {}
        self._seals: set[asyncio.Future] = set()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readthrough-writer")
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readthrough-reader")
        self._flusher: asyncio.Task | None = None
        self.computations = 0  # sequences computed by this cache since start

    def start(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())

    async def get(
        self, teacher: Teacher, k: int, sequences: list[np.ndarray]
    ) -> tuple[list[CapturedRecord], int]:
        """Records for ``sequences`` in order, and how many of them this call computed."""
        teacher.check_sequences(sequences)
        space = teacher.space(k)
        self.store.ensure_space(space)
        keys = [record_key(space.space_id, ids) for ids in sequences]
        results: list[CapturedRecord | None] = [None] * len(keys)
        stored = [i for i, key in enumerate(keys) if self.store.contains(key)]
        if stored:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(
                self._reader, lambda: [self._read(keys[i]) for i in stored]
            )
            for i, rec in zip(stored, found, strict=True):
                results[i] = rec
        waits: dict[int, asyncio.Future[CapturedRecord]] = {}
        computed = 0
        for i, key in enumerate(keys):
            if results[i] is not None:
                continue
            if key in self._unsealed:
                results[i] = self._unsealed[key]
            elif self.store.contains(key):  # sealed (and dropped from _unsealed) meanwhile
                results[i] = self._read(key)
            elif key in self._inflight:
                waits[i] = self._inflight[key]
            else:
                waits[i] = self._start(teacher, space, key, sequences[i])
                computed += 1
        self.metrics.add_lookups(hits=len(keys) - len(waits), misses=len(waits))
        self.metrics.add_served("cache", sum(len(r) for r in results if r is not None))
        if waits:
            # shield: one client going away must not cancel a computation others wait for.
            done = await asyncio.gather(*(asyncio.shield(f) for f in waits.values()))
            for i, rec in zip(waits, done, strict=True):
                results[i] = rec
            self.metrics.add_served("computed", sum(len(r) for r in done))
        return results, computed

    def _read(self, key: bytes) -> CapturedRecord:
        """A stored record, from its segment held in memory (hits are memory copies)."""
        location = self.store.locate(key)
        self.loaded.use(location.segment)
        return location.segment.encoded(location.index)

    def _start(
        self, teacher: Teacher, space: CaptureSpace, key: bytes, ids: np.ndarray
    ) -> asyncio.Future[CapturedRecord]:
        future: asyncio.Future[CapturedRecord] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        self.computations += 1
        self.metrics.set_queue_depth("interactive", len(self._inflight))

        async def compute() -> None:
            try:
                rows = await teacher.engine.capture(ids, space.k, INTERACTIVE_PRIORITY)
                record = CapturedRecord.encode(key, ids, rows, space)
                self._unsealed[key] = record
                self._add_to_segment(space, record)
                self.metrics.add_computed(teacher.name, len(ids))
                future.set_result(record)
            except BaseException as e:  # the waiters get the error; the key can be retried
                if not future.done():
                    future.set_exception(e)
                if not isinstance(e, Exception):
                    raise
            finally:
                self._inflight.pop(key, None)
                self.metrics.set_queue_depth("interactive", len(self._inflight))

        asyncio.get_running_loop().create_task(compute())
        return future

    def _add_to_segment(self, space: CaptureSpace, record: CapturedRecord) -> None:
        builder = self._builders.get(space.space_id)
        if builder is None:
            builder = self._builders[space.space_id] = self.store.new_segment(space)
            self._builder_started[space.space_id] = time.monotonic()
        builder.add(record)
        if builder.positions >= self.segment_positions:
            self._seal(space.space_id)

    def _seal(self, space_id: str) -> None:
        builder = self._builders.pop(space_id)
        self._builder_started.pop(space_id, None)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._writer, self.store.seal, builder)
        self._seals.add(fut)

        def sealed(f: asyncio.Future) -> None:
            self._seals.discard(f)
            if not f.cancelled() and f.exception() is None:
                for rec in builder.records:
                    self._unsealed.pop(rec.key, None)

        fut.add_done_callback(sealed)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.flush_seconds))
            now = time.monotonic()
            for space_id, started in list(self._builder_started.items()):
                if now - started >= self.flush_seconds:
                    self._seal(space_id)

    async def close(self) -> None:
        """Seal everything computed so far (graceful shutdown)."""
        if self._flusher is not None:
            self._flusher.cancel()
        for space_id in list(self._builders):
            self._seal(space_id)
        if self._seals:
            await asyncio.gather(*self._seals, return_exceptions=True)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
