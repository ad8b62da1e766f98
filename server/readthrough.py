"""The read-through cache: answer sequences from the store, compute the misses exactly once.

Hits come from sealed segments, or from records computed moments ago and not sealed yet. A miss
starts one computation; every request for the same key, from any client, awaits that same
computation. Computed records go to the store's :class:`SegmentWriter`, which seals them by size
or at least every ``flush_seconds``, so a crash loses at most that window, and only cache
entries, never answers already sent. A ``durable`` request is answered only once its records are
sealed, for callers that cannot lose that window.

Records answered and not sealed yet are held in memory, up to ``max_unsealed_bytes``. When the
store refuses writes (a full disk), the writer keeps them and retries with backoff, so they are
sealed once space returns; past the bound, requests that need a computation are refused with
UNAVAILABLE instead of growing the heap (hits are still answered).

Every capture mode is read through (top-k, top-p, sampled): a request names its mode and k
(``Teacher.capture``), its records live in that mode's capture space, and a miss is
captured as precompute captures it (``engine.capture.capture_record``), so a read-through
record equals the precompute's record of the same sequence in the same space.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from logitcache.client.errors import LogitCacheError, Unavailable
from logitcache.client.space import CaptureMode, CaptureSpace, record_key
from logitcache.server.engine.capture import CaptureConfig, capture_record, stored_rows
from logitcache.server.metrics import ServerMetrics
from logitcache.server.policy.admission import Admission, Admitted
from logitcache.server.policy.decision import UseRequest
from logitcache.server.policy.filters import FilterAction, screen_sequences
from logitcache.server.spool import teacher_detokenize
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.read import EncodedBatch, RecordSlice, gather, locate, record_slice
from logitcache.server.store.store import Store
from logitcache.server.store.writer import CapturedRecord, SegmentWriter
from logitcache.server.teachers.identity import capture_space
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
        max_unsealed_bytes: int,
        on_hits: Callable[[list[bytes]], None] | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.store = store
        # The licence policy and the sensitive-data filter every session goes through.
        self.admission = admission or Admission()
        self.loaded = loaded
        self.on_hits = on_hits  # told which keys were answered from sealed segments (retention)
        self.metrics = metrics
        self.segment_positions = segment_positions
        self.flush_seconds = flush_seconds
        self.max_unsealed_bytes = max_unsealed_bytes
        self._inflight: dict[bytes, asyncio.Future[CapturedRecord]] = {}
        self._unsealed: dict[bytes, CapturedRecord] = {}
        self.unsealed_bytes = 0  # memory held by _unsealed
        # Durable requests wait here for their records' next seal: None once sealed, else the
        # error of the failed seal.
        self._seal_waiters: dict[bytes, asyncio.Future[BaseException | None]] = {}
        self._writer = SegmentWriter(
            store,
            segment_positions=segment_positions,
            flush_seconds=flush_seconds,
            on_sealed=self._sealed,
            on_failed=self._failed,
            retries=True,
        )
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readthrough-reader")
        self._computing: set[asyncio.Task] = set()  # strong references: the loop keeps weak ones
        self.computations = 0  # sequences computed by this cache since start

    def start(self) -> None:
        """Start sealing by time (on the running loop)."""
        self._writer.start()

    async def get(
        self,
        teacher: Teacher,
        capture: CaptureConfig | int,
        sequences: list[np.ndarray],
        *,
        durable: bool = False,
        on_computed: Callable[[int], None] | None = None,
        use: UseRequest | None = None,
        user: str | None = None,
    ) -> tuple[EncodedBatch, int]:
        """Records for ``sequences`` in order, as one batch, in the space of ``capture`` (an int
        is top-k with that k), and how many this call computed; ``durable``: only once every one of them is sealed (else the store's error).
        ``on_computed`` is told the positions this call computes (for quotas), once.

        The licence policy decides on the declared ``use`` (by ``user``, as authenticated)
        first, and the sequences to compute go through the sensitive-data filter before they
        reach the teacher or the cache (hits are in the store already)."""
        self.admit(teacher, use, user)
        teacher.check_sequences(sequences)
        if isinstance(capture, int):
            capture = CaptureConfig(CaptureMode.TOPK, capture)
        space = capture_space(teacher.info, teacher.engine.dtype, capture)
        loop = asyncio.get_running_loop()
        keys, slices, batch = await loop.run_in_executor(
            self._reader, self._lookup, space, sequences
        )
        if batch is not None:  # every record was sealed
            self.metrics.add_lookups(hits=len(keys), misses=0)
            self.metrics.add_served("cache", batch.positions)
            return batch, 0
        waits: dict[int, asyncio.Future[CapturedRecord]] = {}
        computed = computed_positions = 0
        self._check_room(keys, slices)
        await self._screen(teacher, keys, slices, sequences)
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
                computed_positions += len(sequences[i])
            # else: sealed (and dropped from _unsealed) since the lookup; read below
        if on_computed is not None:
            on_computed(computed_positions)
        self.metrics.add_lookups(hits=len(keys) - len(waits), misses=len(waits))
        hit_positions = sum(len(s) for i, s in enumerate(sequences) if i not in waits)
        self.metrics.add_served("cache", hit_positions)
        if waits:
            # shield: one client going away must not cancel a computation others wait for.
            done = await asyncio.gather(*(asyncio.shield(f) for f in waits.values()))
            for i, record in zip(waits, done, strict=True):
                slices[i] = record_slice(record, space)
            self.metrics.add_served("computed", sum(len(r) for r in done))
        if durable:
            await self._until_sealed(space, keys)
        batch = await loop.run_in_executor(self._reader, self._assemble, space, keys, slices)
        return batch, computed

    def admit(self, teacher: Teacher, use: UseRequest | None, user: str | None) -> Admitted:
        """The licence policy's decision on a read-through use of ``teacher``: INVALID_ARGUMENT
        without a declared use, FAILED_PRECONDITION citing the clause when refused."""
        declared = self.admission.licence_of(
            teacher.name, teacher.config.license, teacher.info.license
        )
        return self.admission.admit(teacher.name, declared, use, user)

    async def _screen(
        self,
        teacher: Teacher,
        keys: list[bytes],
        slices: list[RecordSlice | None],
        sequences: list[np.ndarray],
    ) -> None:
        """Refuse the request (INVALID_ARGUMENT naming the sequence and the detector) when a
        sequence it would compute has findings, unless the server's filter allows them."""
        filter_ = self.admission.filter()
        if filter_.action is FilterAction.ALLOW:
            return
        fresh = [
            i
            for i, key in enumerate(keys)
            if slices[i] is None and key not in self._unsealed and key not in self._inflight
        ]
        if not fresh:
            return
        await asyncio.get_running_loop().run_in_executor(
            self._reader,
            lambda: screen_sequences(
                filter_,
                len(fresh),
                lambda j: sequences[fresh[j]],
                teacher_detokenize(teacher.info),
                filter_.report(),
                where=lambda j: fresh[j],
            ),
        )

    def _check_room(self, keys: list[bytes], slices: list[RecordSlice | None]) -> None:
        """Refuse a request that needs a computation while unsealed records fill their bound."""
        if self.unsealed_bytes < self.max_unsealed_bytes:
            return
        if all(s is not None or k in self._unsealed or k in self._inflight
               for k, s in zip(keys, slices, strict=True)):  # fmt: skip
            return
        error = self.store.backend.health.error
        why = f" (the store: {error})" if error is not None else ""
        raise Unavailable(
            f"{self.unsealed_bytes >> 20} MiB of computed results are waiting to be sealed"
            f"{why}; retry later"
        )

    async def _until_sealed(self, space: CaptureSpace, keys: list[bytes]) -> None:
        """Wait until every one of ``keys`` that is held unsealed has been sealed."""
        pending = {k for k in keys if k in self._unsealed}
        if not pending:
            return
        loop = asyncio.get_running_loop()
        waits = [self._seal_waiters.setdefault(k, loop.create_future()) for k in pending]
        await self._writer.seal_now(space.space_id)
        for outcome in await asyncio.gather(*(asyncio.shield(w) for w in waits)):
            if outcome is not None:
                raise outcome

    def _lookup(
        self, space: CaptureSpace, sequences: list[np.ndarray]
    ) -> tuple[list[bytes], list[RecordSlice | None], EncodedBatch | None]:
        """Keys, the sealed records among them, and the whole batch if every one was sealed."""
        keys = [record_key(space.space_id, ids) for ids in sequences]
        slices = locate(self.store, self.loaded, keys)
        if self.on_hits is not None:
            self.on_hits([k for k, s in zip(keys, slices, strict=True) if s is not None])
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
        config = CaptureConfig.of_space(space)
        self._inflight[key] = future
        self.computations += 1
        self.metrics.set_queue_depth("interactive", len(self._inflight))

        async def compute() -> None:
            try:
                answer = await capture_record(
                    teacher.engine, config, ids, key, INTERACTIVE_PRIORITY
                )
                record = await loop.run_in_executor(
                    self._reader,
                    lambda: CapturedRecord.encode(key, ids, stored_rows(config, answer), space),
                )
                self._unsealed[key] = record
                self.unsealed_bytes += record.nbytes
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
                self._failed([record], e, retrying=False)

        task = loop.create_task(compute())
        self._computing.add(task)
        task.add_done_callback(self._computing.discard)
        return future

    def _sealed(self, records: list[CapturedRecord]) -> None:
        for record in records:
            self._forget(record)
            self._tell(record.key, None)

    def _failed(self, records: list[CapturedRecord], error: BaseException, retrying: bool) -> None:
        """A seal failed: durable waiters are told; the records stay held for the writer's
        retry, or are dropped (cache entries lost) when it does not retry this error."""
        for record in records:
            if not retrying:
                self._forget(record)
            self._tell(record.key, error)

    def _forget(self, record: CapturedRecord) -> None:
        if self._unsealed.pop(record.key, None) is not None:
            self.unsealed_bytes -= record.nbytes

    def _tell(self, key: bytes, outcome: BaseException | None) -> None:
        waiter = self._seal_waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    async def close(self) -> None:
        """Seal everything computed so far (graceful shutdown)."""
        try:
            await self._writer.close()
        except LogitCacheError as e:  # the answers were sent; these cache entries are lost
            log.error("%d computed records could not be sealed before shutdown: %s",
                      len(self._unsealed), e)  # fmt: skip
        finally:
            self._reader.shutdown(wait=True)
