"""Garbage collection: sealed segments that no dataset references, found once, removed safely.

A record is referenced when a dataset (building, partial or complete) lists its key. Sealed
segments are never modified, so collection works on whole segments: a segment none of whose keys
is referenced is collected; one that mixes referenced and unreferenced records is kept whole
(rewriting it would move records under readers' feet) and reported. ``logitcache gc`` and the
server's read-through retention (``store.retention``) both collect through this module, and
both decide from :func:`segment_uses`.

Collection never loses a record that a dataset references, whatever datasets are being written
and read meanwhile. It is a handshake of marks, per capture space under ``spaces/<id>/gc/``:

1. :func:`mark`: each candidate segment gets ``marked/<segment_id>``.
2. :func:`check`: with the marks in place, every dataset's keys are read again. A marked segment
   that is referenced now is unmarked (rescued); the others get ``condemned/<segment_id>``.
3. :func:`sweep`: condemned segments at least ``grace`` seconds old are checked once more, then
   unpublished (they leave listings in one step, then their bytes are freed), then unmarked.

A dataset's writer publishes its key list first and, before counting on any record that is
already sealed, reads the marks and the segment listing (``Store.create_dataset``): a record in
a marked, condemned or vanished segment is computed again. Each side writes first and reads the
other second, so either the writer sees the mark and recomputes, or the check sees the dataset
and rescues the segment. Readers keep reading marked segments (a dataset published just before
the mark may count on one until the check rescues it) and drop condemned ones at their next
refresh: a server that refreshes within the grace period never loads a segment being deleted.
One collector runs at a time (``gc.lock`` at the store's root).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from logitcache.client.errors import FailedPrecondition, NotFound
from logitcache.client.space import KEY_BYTES
from logitcache.server.store.backend import StoreBackend, json_bytes
from logitcache.server.store.liveness import process_alive
from logitcache.server.store.reader import SegmentReader, Unsealed
from logitcache.server.store.segments import segments_dir

if TYPE_CHECKING:
    from logitcache.server.store.store import Store

log = logging.getLogger(__name__)
LOCK = "gc.lock"
STALE_LOCK_S = 24 * 3600.0  # a collector holds the lock for minutes; a day-old lock is dead
_KEY = np.dtype((np.void, KEY_BYTES))  # one key as one comparable element


def marked_dir(space_id: str) -> str:
    return f"spaces/{space_id}/gc/marked"


def condemned_dir(space_id: str) -> str:
    return f"spaces/{space_id}/gc/condemned"


def condemned_segments(backend: StoreBackend, space_id: str) -> set[str]:
    """Segments gc will delete: readers stop using them."""
    return set(backend.list_dir(condemned_dir(space_id)))


def withdrawn_segments(backend: StoreBackend, space_id: str) -> set[str]:
    """Segments gc has marked or condemned: a dataset's writer does not count on them."""
    return set(backend.list_dir(marked_dir(space_id))) | condemned_segments(backend, space_id)


def sealed_at(segment: SegmentReader) -> float:
    """When a segment was sealed (seconds since the epoch)."""
    return segment.sealed_ns / 1e9


def _as_keys(keys: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] keys as n comparable elements (for isin and unique)."""
    return np.ascontiguousarray(keys, dtype=np.uint8).reshape(-1, KEY_BYTES).view(_KEY).ravel()


def referenced_keys(store: Store) -> np.ndarray:
    """Every key some dataset lists, read now (sorted, unique).

    A dataset that exists and cannot be read stops the collection: nothing would be safe.
    """
    parts = [np.empty(0, _KEY)]
    for name in store.datasets():
        try:
            parts.append(_as_keys(store.dataset(name).raw_keys))
        except Exception:
            if store.backend.exists(f"datasets/{name}"):
                raise
    return np.unique(np.concatenate(parts))


def _concatenated(readers: Sequence[SegmentReader]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All the segments' keys in one array, which segment each came from, and where each starts."""
    lengths = np.array([len(r) for r in readers], dtype=np.int64)
    keys = np.concatenate([np.empty(0, _KEY), *(_as_keys(r.keys) for r in readers)])
    owner = np.repeat(np.arange(len(readers)), lengths)
    return keys, owner, np.concatenate([[0], np.cumsum(lengths)])


def referenced_counts(readers: Sequence[SegmentReader], referenced: np.ndarray) -> np.ndarray:
    """How many records of each segment a dataset references (one vectorised pass)."""
    keys, owner, _ = _concatenated(readers)
    return np.bincount(owner[np.isin(keys, referenced)], minlength=len(readers))


def other_copies(
    readers: Sequence[SegmentReader], keys: Sequence[bytes]
) -> Iterator[tuple[SegmentReader, int]]:
    """Where ``keys`` are sealed among ``readers``: (segment, record index) pairs."""
    all_keys, owner, starts = _concatenated(readers)
    wanted = _as_keys(np.frombuffer(b"".join(keys), dtype=np.uint8))
    for at in np.flatnonzero(np.isin(all_keys, wanted)):
        segment = int(owner[at])
        yield readers[segment], int(at - starts[segment])


@dataclass(frozen=True)
class SegmentUse:
    """One sealed segment and how many of its records datasets reference."""

    segment: SegmentReader
    referenced: int
    sealed_at: float

    @property
    def unreferenced(self) -> bool:
        return self.referenced == 0

    @property
    def mixed(self) -> bool:
        return 0 < self.referenced < len(self.segment)


def segment_uses(store: Store) -> list[SegmentUse]:
    """Every sealed segment the store indexes (after a refresh), with its references."""
    store.refresh()
    readers = store.segments()
    counts = referenced_counts(readers, referenced_keys(store))
    return [SegmentUse(r, int(c), sealed_at(r)) for r, c in zip(readers, counts, strict=True)]


@dataclass
class Tally:
    """Segments counted with what they hold."""

    segments: int = 0
    records: int = 0
    positions: int = 0
    stored_bytes: int = 0

    def add(self, segment: SegmentReader) -> None:
        self.segments += 1
        self.records += len(segment)
        self.positions += segment.positions
        self.stored_bytes += segment.stored_bytes

    def __iadd__(self, other: Tally) -> Tally:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self


# ---- the handshake ------------------------------------------------------------------------------


def mark(backend: StoreBackend, segments: Iterable[SegmentReader]) -> int:
    """Step 1: mark candidates (create-only; a mark left by an earlier run stands). How many."""
    marked = 0
    for segment in segments:
        doc = json_bytes({"marked_at": time.time()})
        marked += backend.create(f"{marked_dir(segment.space.space_id)}/{segment.segment_id}", doc)
    return marked


def check(store: Store) -> int:
    """Step 2: read the datasets again, with every mark in place; rescue the referenced marked
    segments and condemn the rest (this handle stops using them at once). How many rescued."""
    backend = store.backend
    pending: list[SegmentReader] = []
    for space in store.spaces():
        condemned = condemned_segments(backend, space.space_id)
        for segment_id in backend.list_dir(marked_dir(space.space_id)):
            if segment_id not in condemned:
                reader = _open_segment(store, space.space_id, segment_id)
                if reader is not None:
                    pending.append(reader)
    counts = referenced_counts(pending, referenced_keys(store))  # read after listing the marks
    rescued = 0
    for reader, referenced in zip(pending, counts, strict=True):
        if referenced:
            backend.remove_tree(f"{marked_dir(reader.space.space_id)}/{reader.segment_id}")
            rescued += 1
        else:
            doc = json_bytes({"condemned_at": time.time()})
            backend.create(f"{condemned_dir(reader.space.space_id)}/{reader.segment_id}", doc)
    store.forget_segments(r.segment_id for r, c in zip(pending, counts, strict=True) if not c)
    return rescued


def sweep(store: Store, *, grace_s: float) -> tuple[Tally, list[str]]:
    """Step 3: delete the segments condemned at least ``grace_s`` ago that are still unreferenced.

    Returns what was deleted and the ids of the segments deleted.
    """
    backend = store.backend
    due: list[SegmentReader] = []
    now = time.time()
    for space in store.spaces():
        base = condemned_dir(space.space_id)
        for segment_id in backend.list_dir(base):
            try:
                old_enough = now - backend.modified_at(f"{base}/{segment_id}") >= grace_s
            except NotFound:
                continue
            if old_enough:
                reader = _open_segment(store, space.space_id, segment_id)
                if reader is not None:
                    due.append(reader)
    counts = referenced_counts(due, referenced_keys(store))
    deleted, ids = Tally(), []
    for reader, referenced in zip(due, counts, strict=True):
        if referenced:  # a dataset created since lists one of its keys: keep it, to be safe
            log.info("segment %s is referenced again; kept", reader.segment_id)
        else:
            deleted.add(reader)  # sized before its bytes go
            backend.unpublish(reader.rel)
            ids.append(reader.segment_id)
        _unmark(backend, reader.space.space_id, reader.segment_id)
    store.forget_segments(ids)
    return deleted, ids


def _unmark(backend: StoreBackend, space_id: str, segment_id: str) -> None:
    backend.remove_tree(f"{condemned_dir(space_id)}/{segment_id}")
    backend.remove_tree(f"{marked_dir(space_id)}/{segment_id}")


def _open_segment(store: Store, space_id: str, segment_id: str) -> SegmentReader | None:
    """A marked segment's reader; None (and its marks removed) if it is gone already, or half
    removed (an unpublish that stopped after the segment's group metadata: its rest goes now)."""
    rel = f"{segments_dir(space_id)}/{segment_id}"
    if store.backend.exists(rel):
        try:
            return SegmentReader(store.backend, store.space(space_id), segment_id)
        except Unsealed:
            store.backend.remove_tree(rel)
    _unmark(store.backend, space_id, segment_id)
    return None


@contextmanager
def collector_lock(backend: StoreBackend, *, wait: bool = True) -> Iterator[bool]:
    """Hold the store's one collector lock. Yields False if another collector holds it and
    ``wait`` is False; with ``wait`` True that is FailedPrecondition instead."""
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    held = backend.create(LOCK, json_bytes(doc)) or (
        _lock_is_stale(backend) and backend.create(LOCK, json_bytes(doc))
    )
    if not held and wait:
        raise FailedPrecondition(
            f"another gc holds {backend.url}/{LOCK}; wait for it, or remove the file if its "
            "process is gone"
        )
    try:
        yield held
    finally:
        if held:
            backend.remove_tree(LOCK)


def _lock_is_stale(backend: StoreBackend) -> bool:
    """A lock whose process is gone (same host) or that is a day old; removed if so."""
    try:
        doc = backend.read_json(LOCK)
    except (NotFound, ValueError):
        return False
    same_host = doc.get("host") == socket.gethostname()
    dead = same_host and not process_alive(int(doc.get("pid", -1)))
    if dead or time.time() - float(doc.get("started", 0)) > STALE_LOCK_S:
        backend.remove_tree(LOCK)
        return True
    return False


# ---- logitcache gc --------------------------------------------------------------------------------


@dataclass
class GcReport:
    """What ``logitcache gc`` found and did (or, in a dry run, would do)."""

    store: str
    dry_run: bool
    min_age_s: float
    collectable: Tally = field(default_factory=Tally)  # unreferenced and old enough
    kept_recent: Tally = field(default_factory=Tally)  # unreferenced, sealed too recently
    kept_mixed: Tally = field(default_factory=Tally)  # some records referenced, some not
    rescued: int = 0  # candidates a dataset referenced by the time of the check
    deleted: Tally = field(default_factory=Tally)

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        c, r, m, d = self.collectable, self.kept_recent, self.kept_mixed, self.deleted
        lines = [
            f"store {self.store}" + (" (dry run: nothing was removed)" if self.dry_run else ""),
            f"no dataset references {c.segments} segments sealed over {self.min_age_s:g} s ago: "
            f"{c.records:,} records, {c.positions:,} positions, {c.stored_bytes:,} bytes",
            f"kept: {r.segments} unreferenced segments sealed more recently "
            f"({r.stored_bytes:,} bytes); {m.segments} segments that mix referenced and "
            f"unreferenced records ({m.stored_bytes:,} bytes)",
        ]
        if not self.dry_run:
            lines.append(
                f"deleted {d.segments} segments ({d.records:,} records, {d.stored_bytes:,} bytes); "
                f"rescued {self.rescued} that a dataset referenced by the time of the check"
            )
        return "\n".join(lines)


def collect(
    store: Store,
    *,
    dry_run: bool,
    min_age_s: float,
    grace_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> GcReport:
    """Find the unreferenced segments sealed at least ``min_age_s`` ago, and unless ``dry_run``
    delete them through the handshake, waiting ``grace_s`` between condemning and deleting."""
    report = GcReport(store.url, dry_run, min_age_s)
    if dry_run:
        _plan(store, report)
        return report
    with collector_lock(store.backend):
        candidates = _plan(store, report)
        mark(store.backend, candidates)
        report.rescued = check(store)
        sleep(grace_s)
        report.deleted, _ = sweep(store, grace_s=grace_s)
    return report


def _plan(store: Store, report: GcReport) -> list[SegmentReader]:
    candidates = []
    now = time.time()
    for use in segment_uses(store):
        if use.mixed:
            report.kept_mixed.add(use.segment)
        elif not use.unreferenced:
            continue
        elif now - use.sealed_at < report.min_age_s:
            report.kept_recent.add(use.segment)
        else:
            report.collectable.add(use.segment)
            candidates.append(use.segment)
    return candidates
