"""The one segment writer: records in, sealed segments out, for precompute and read-through alike.

:func:`write_segment` lays out one segment (see ``segments``) and seals it create-only: on a
backend that renames atomically (a file system), under a staging name, then published by a
no-replace rename; on object storage in place under its final name, sealed by a conditional put
of the group's metadata, written last (until then the segment has no group and nothing reads
it). Either way the group's ``sealed_ns`` attribute is the time of sealing, which orders
copies of one key (the first sealed copy is the answer). :class:`SegmentWriter` feeds it from the event loop: it gathers encoded records
per capture space, seals a segment when it reaches ``segment_positions`` positions or when its
oldest record is ``flush_seconds`` old, and writes in its own thread with at most two seals
pending, so ``await add()`` waits when storage is slower than the engine and memory stays bounded.

A staging folder names its writer (``liveness.writer_identity``), so a cleaner can tell a dead
writer's leftovers from a live write; a write that fails removes its own staging folder.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata

from logitcache.client.codecs import TopKRows, codec_for
from logitcache.client.errors import (
    FailedPrecondition,
    LogitCacheError,
    ResourceExhausted,
    Unavailable,
)
from logitcache.client.space import KEY_BYTES, CaptureSpace
from logitcache.server.store.backend import StoreBackend
from logitcache.server.store.liveness import writer_identity
from logitcache.server.store.segments import (
    CHUNK_POSITIONS,
    ENTRY_CHUNK,
    PLAIN,
    SEGMENT_FORMAT,
    SHUFFLED,
    codec_fields,
    segments_dir,
    shard_rows,
    unsealed_dir,
)

if TYPE_CHECKING:
    from logitcache.server.store.store import Store

log = logging.getLogger(__name__)
MAX_PENDING_SEALS = 2
# Seals that failed on a storage error are retried after this long, doubling up to the maximum.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
StorageFault = (ResourceExhausted, Unavailable)


@dataclass
class CapturedRecord:
    """One sequence and its rows in the codec's encoding, waiting to be written (or sent)."""

    key: bytes
    input_ids: np.ndarray  # int32 [T]
    arrays: dict[str, np.ndarray]  # the codec's arrays for T rows

    @classmethod
    def encode(
        cls, key: bytes, input_ids: np.ndarray, rows: TopKRows, space: CaptureSpace
    ) -> CapturedRecord:
        codec = codec_for(space.codec, space.vocab_size, space.temperatures)
        return cls(key, np.asarray(input_ids, dtype=np.int32), codec.encode(rows))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory the record holds (what a bound on unsealed records counts)."""
        return int(self.input_ids.nbytes + sum(a.nbytes for a in self.arrays.values()))


def write_segment(
    backend: StoreBackend, space: CaptureSpace, records: Sequence[CapturedRecord]
) -> str:
    """Write ``records`` as one segment and publish it create-only; returns the segment id."""
    if not records:
        raise ValueError("refusing to seal an empty segment")
    writer_id = uuid.uuid4().hex[:12]
    if not backend.renames:
        return _seal_in_place(backend, space, records, writer_id)
    staging = f"{unsealed_dir(space.space_id)}/{writer_id}"
    try:
        attrs = _lay_out(backend, staging, space, records)
        # Named at seal time, so the sorted order of segment ids is (per clock) the seal order.
        sealed_ns = time.time_ns()
        segment_id = f"{sealed_ns:020d}-{writer_id}"
        backend.write_bytes(f"{staging}/zarr.json", _group_metadata(attrs, sealed_ns))
        published = backend.publish(staging, f"{segments_dir(space.space_id)}/{segment_id}")
    except BaseException:
        _discard(backend, staging)  # a failed write (a full disk) keeps no partial folder
        raise
    if not published:
        raise FailedPrecondition(f"segment {segment_id} exists already in {backend.url}")
    return segment_id


def _seal_in_place(
    backend: StoreBackend, space: CaptureSpace, records: Sequence[CapturedRecord], writer_id: str
) -> str:
    """Object storage: the arrays under the segment's own name, then its group, create-only."""
    segment_id = f"{time.time_ns():020d}-{writer_id}"
    rel = f"{segments_dir(space.space_id)}/{segment_id}"
    try:
        attrs = _lay_out(backend, rel, space, records)
        sealed = backend.create(f"{rel}/zarr.json", _group_metadata(attrs, time.time_ns()))
    except BaseException:
        _discard(backend, rel)
        raise
    if not sealed:
        raise FailedPrecondition(f"segment {segment_id} exists already in {backend.url}")
    return segment_id


def _discard(backend: StoreBackend, rel: str) -> None:
    """Remove what a failed seal wrote. A store that refuses this too (it is unreachable) keeps
    it, unsealed, for ``Store.clean_unsealed``; the caller sees the seal's own error."""
    try:
        backend.remove_tree(rel)
    except StorageFault:
        pass


def _group_metadata(attrs: dict, sealed_ns: int) -> bytes:
    """The segment group's ``zarr.json``: what makes the arrays beside it one sealed segment."""
    meta = GroupMetadata(attributes={**attrs, "sealed_ns": sealed_ns})
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _lay_out(
    backend: StoreBackend, staging: str, space: CaptureSpace, records: Sequence[CapturedRecord]
) -> dict:
    """The segment's arrays under ``staging``, complete, with its writer named first; returns
    the group's attributes (the group itself is written by the seal)."""
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    fields = codec_fields(space)
    arrays: dict[str, np.ndarray] = {
        "keys": np.frombuffer(b"".join(r.key for r in records), dtype=np.uint8).reshape(
            -1, KEY_BYTES
        ),
        "offsets": offsets,
        "input_ids": np.concatenate([r.input_ids for r in records]).astype(np.int32),
    }
    for f in fields:
        arrays[f.name] = np.concatenate([r.arrays[f.name] for r in records])
    codec = codec_for(space.codec, space.vocab_size, space.temperatures)
    arrays = codec.seal(arrays)  # + the codec's segment tables
    per_entry = [f.name for f in fields if f.per == "entry"]
    if per_entry:
        entries = np.array([len(r.arrays[per_entry[0]]) for r in records], dtype=np.int64)
        arrays["entry_offsets"] = np.concatenate([[0], np.cumsum(entries)])
    plain = {f.name for f in fields if not f.shuffle}
    backend.write_json(f"{staging}/writer.json", writer_identity())
    for name, data in arrays.items():
        rows = ENTRY_CHUNK if name in per_entry else CHUNK_POSITIONS
        chunks = (min(rows, max(1, data.shape[0])),) + data.shape[1:]
        compressor = PLAIN if name in plain else SHUFFLED
        zarr.create_array(
            # Each array in a store of its own: zarr writes no group metadata above it, so the
            # segment has none until its seal writes it.
            backend.zarr_store(f"{staging}/{name}", read_only=False),
            data=data,
            chunks=chunks,
            shards=(shard_rows(data.shape[0], chunks[0]),) + data.shape[1:],
            compressors=compressor,
        )
    sizes = backend.object_sizes(staging)  # one listing, not one per array
    return {
        "format": SEGMENT_FORMAT,
        "space_id": space.space_id,
        "codec": space.codec,
        "records": len(records),
        "positions": int(offsets[-1]),
        "stored_bytes": sum(n for path, n in sizes.items() if path.split("/")[0] in arrays),
    }


@dataclass
class _OpenSegment:
    space: CaptureSpace
    started: float  # time.monotonic() of its first record
    records: list[CapturedRecord] = field(default_factory=list)
    positions: int = 0


class SegmentWriter:
    """Seals records into segments by size and age, in a writer thread, with back-pressure.

    ``on_sealed(records)`` runs on the event loop once a segment is sealed and indexed (the
    read-through cache drops them from memory then); ``on_failed(records, error, retrying)``
    when a seal fails. Seals are executor futures, not tasks, so they finish even when the loop
    cancels every task (shutdown, a cancelled job).

    A failed seal is raised once from the next :meth:`add`, :meth:`flush` or :meth:`close`,
    unless the writer ``retries``: then a seal that failed on a storage fault (out of space, an
    unreachable store) keeps its records and is tried again with backoff until it succeeds, so
    results are sealed once space returns. The store's :class:`WriteHealth` logs the episode
    (once); only unexpected errors are logged here, with their traceback.
    """

    def __init__(
        self,
        store: Store,
        *,
        segment_positions: int,
        flush_seconds: float | None = None,
        on_sealed: Callable[[list[CapturedRecord]], None] | None = None,
        on_failed: Callable[[list[CapturedRecord], BaseException, bool], None] | None = None,
        retries: bool = False,
    ) -> None:
        self.store = store
        self.segment_positions = segment_positions
        self.flush_seconds = flush_seconds
        self.on_sealed = on_sealed
        self.on_failed = on_failed
        self.retries = retries
        self.segments_written = 0
        self._open: dict[str, _OpenSegment] = {}
        self._held: dict[str, _OpenSegment] = {}  # failed seals waiting for their retry
        self._retry_delay = RETRY_FIRST_S
        self._retrying: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(MAX_PENDING_SEALS)  # FIFO: seals start in order
        self._pending: set[asyncio.Future[str]] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-writer")
        self._timer: asyncio.Task | None = None
        self._opened = asyncio.Event()
        self._error: BaseException | None = None

    @property
    def unsealed_positions(self) -> int:
        """Positions gathered and not yet handed to the writer thread."""
        return sum(s.positions for s in self._open.values())

    @property
    def held_records(self) -> int:
        """Records whose seal failed on a storage fault and waits for its retry."""
        return sum(len(s.records) for s in self._held.values())

    async def add(self, space: CaptureSpace, record: CapturedRecord) -> None:
        """Add one encoded record; waits while two seals are pending."""
        self._raise_error()
        self.start()
        segment = self._open.get(space.space_id)
        if segment is None:
            segment = self._open[space.space_id] = _OpenSegment(space, time.monotonic())
            self._opened.set()
        segment.records.append(record)
        segment.positions += len(record)
        if segment.positions >= self.segment_positions:
            await self._seal(segment)

    async def seal_now(self, space_id: str) -> None:
        """Hand the open segment of one capture space to the writer thread now (not waiting
        for its age): for callers that wait until their records are sealed."""
        segment = self._open.get(space_id)
        if segment is not None:
            await self._seal(segment)

    async def flush(self) -> None:
        """Seal every open segment now (and those held for a retry, once more) and wait until
        all seals are done."""
        for segment in list(self._open.values()):
            await self._seal(segment)
        held, self._held = self._held, {}
        for segment in held.values():
            await self._submit(segment, retry=False)
        while self._pending:
            await asyncio.wait(set(self._pending))  # wait: never cancels the seals themselves
        self._raise_error()

    async def close(self) -> None:
        """Seal what is left, wait for it, and stop the writer thread."""
        for task in (self._timer, self._retrying):
            if task is not None:
                task.cancel()
        try:
            await self.flush()
        finally:
            self._thread.shutdown(wait=False)

    def start(self) -> None:
        """Start sealing by age on the running loop (idempotent; ``add`` starts it too)."""
        if self._timer is None and self.flush_seconds is not None:
            coro = self._flush_when_due(self.flush_seconds)
            self._timer = asyncio.get_running_loop().create_task(coro)

    async def _seal(self, segment: _OpenSegment) -> None:
        if self._open.get(segment.space.space_id) is not segment:
            return  # sealed meanwhile
        del self._open[segment.space.space_id]
        try:
            await self._submit(segment, retry=self.retries)
        except asyncio.CancelledError:  # the caller stopped waiting: keep the records open
            newer = self._open.get(segment.space.space_id)
            if newer is not None:
                segment.records += newer.records
                segment.positions += newer.positions
            self._open[segment.space.space_id] = segment
            raise

    async def _submit(self, segment: _OpenSegment, *, retry: bool) -> None:
        """Hand a segment to the writer thread once a seal slot is free."""
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._thread, self.store.write_segment, segment.space, segment.records
        )
        self._pending.add(future)
        future.add_done_callback(lambda f: self._sealed(f, segment, retry))

    def _sealed(self, future: asyncio.Future[str], segment: _OpenSegment, retry: bool) -> None:
        self._pending.discard(future)
        self._slots.release()
        error = future.exception() if not future.cancelled() else None
        if error is None:
            self.segments_written += 1
            self._retry_delay = RETRY_FIRST_S
            if self.on_sealed is not None:
                self.on_sealed(segment.records)
            return
        retrying = retry and isinstance(error, StorageFault)
        if self.on_failed is not None:
            self.on_failed(segment.records, error, retrying)
        if retrying:
            self._hold(segment)
            return
        if not isinstance(error, LogitCacheError):  # a typed error tells its caller enough
            log.error("sealing %d records failed", len(segment.records), exc_info=error)
        self._error = self._error or error

    def _hold(self, segment: _OpenSegment) -> None:
        """Keep a failed segment's records for a retry after the backoff."""
        self._keep(segment)
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.get_running_loop().create_task(self._retry_held())

    def _keep(self, segment: _OpenSegment) -> None:
        """Hold a segment's records, merged with those held for its capture space."""
        held = self._held.get(segment.space.space_id)
        if held is None:
            self._held[segment.space.space_id] = segment
        else:
            held.records += segment.records
            held.positions += segment.positions

    async def _retry_held(self) -> None:
        while self._held:
            await asyncio.sleep(self._retry_delay)
            self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
            for space_id in list(self._held):
                segment = self._held.pop(space_id)
                try:
                    await self._submit(segment, retry=True)
                except asyncio.CancelledError:  # not handed over (close): held for its flush
                    self._keep(segment)
                    raise

    async def _flush_when_due(self, flush_seconds: float) -> None:
        while True:
            if not self._open:
                self._opened.clear()
                await self._opened.wait()
                continue
            now = time.monotonic()
            due = min(s.started for s in self._open.values()) + flush_seconds
            if due > now:
                await asyncio.sleep(due - now)
                continue
            for segment in [s for s in self._open.values() if s.started + flush_seconds <= now]:
                await self._seal(segment)

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error
