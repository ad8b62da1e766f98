"""Read-through retention: records no dataset references, kept under a size and an age budget.

A read-through server stores every sequence it computes, and nothing references those records
but the cache itself. Without a budget they pile up for ever (random sequences at 16k positions/s
are 4.5 GB an hour). A retention pass, run periodically in an executor by the server, evicts
whole unreferenced segments, least recently used first: those idle longer than ``max_age_s``,
then more until the unreferenced bytes fit in ``max_bytes``. A segment's last use is its last
read-through hit, or its seal time if it has none; hits are counted in memory as they happen
and saved with each pass to ``retention/access.json`` (so a restart keeps the order). Evicted
segments go through gc's handshake (``store.gc``): condemned in one pass, deleted in the next,
``grace_s`` later at the earliest, so other servers on the store stop reading them first.
Records that a dataset references are never evicted, whatever the budget.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from logitcache.client.errors import NotFound
from logitcache.server.store.backend import StoreBackend
from logitcache.server.store.gc import (
    SegmentUse,
    check,
    collector_lock,
    mark,
    segment_uses,
    sweep,
)
from logitcache.server.store.store import Store

log = logging.getLogger(__name__)
ACCESS_TIMES = "retention/access.json"


class AccessTimes:
    """When read-through hits last used each segment (seconds since the epoch), thread-safe."""

    def __init__(self, backend: StoreBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._times = self._saved()
        self._changed = False

    def _saved(self) -> dict[str, float]:
        try:
            return {s: float(t) for s, t in self._backend.read_json(ACCESS_TIMES).items()}
        except (NotFound, ValueError, AttributeError):
            return {}

    def touch(self, segment_ids: Iterable[str], when: float) -> None:
        with self._lock:
            for segment_id in segment_ids:
                self._times[segment_id] = when
                self._changed = True

    def last_used(self, use: SegmentUse) -> float:
        """Its last hit, or its seal time if it has had none (since the times were saved)."""
        return self._times.get(use.segment.segment_id, use.sealed_at)

    def save(self, keep: set[str]) -> None:
        """Write the times of the segments in ``keep`` (merged with what another server saved)."""
        with self._lock:
            if not self._changed and set(self._times) <= keep:
                return
            merged = self._saved()
            for segment_id, when in self._times.items():
                merged[segment_id] = max(when, merged.get(segment_id, 0.0))
            self._times = {s: t for s, t in merged.items() if s in keep}
            self._changed = False
            snapshot = dict(self._times)
        self._backend.write_json(ACCESS_TIMES, snapshot)


@dataclass(frozen=True)
class RetentionBudget:
    """How much read-through data a server keeps; 0 means no bound of that kind."""

    max_bytes: int = 0
    max_age_s: float = 0.0
    min_idle_s: float = 60.0  # never evict what was sealed or hit this recently (in-flight reads)

    @property
    def bounded(self) -> bool:
        return self.max_bytes > 0 or self.max_age_s > 0


@dataclass(frozen=True)
class RetentionPass:
    """What one pass found and did, as the server's metrics report it."""

    retained_bytes: int  # unreferenced bytes kept after the pass
    condemned_segments: int  # evicted now, deleted by a later pass (or this one, grace 0)
    evicted_segments: int  # deleted by this pass
    evicted_bytes: int


def choose_evictions(
    uses: Sequence[SegmentUse], access: AccessTimes, budget: RetentionBudget, now: float
) -> list[SegmentUse]:
    """The unreferenced segments to evict, least recently used first."""
    unreferenced = sorted((u for u in uses if u.unreferenced), key=access.last_used)
    total = sum(u.segment.stored_bytes for u in unreferenced)
    evict = []
    for use in unreferenced:
        idle = now - access.last_used(use)
        too_old = budget.max_age_s > 0 and idle > budget.max_age_s
        too_big = budget.max_bytes > 0 and total > budget.max_bytes
        if idle < budget.min_idle_s or not (too_old or too_big):
            break  # every later one is used more recently
        evict.append(use)
        total -= use.segment.stored_bytes
    return evict


class ReadThroughRetention:
    """Keeps a store's unreferenced records within a budget; one :meth:`run_once` per pass."""

    def __init__(
        self,
        store: Store,
        budget: RetentionBudget,
        *,
        grace_s: float,
        on_pass: Callable[[RetentionPass], None] | None = None,
    ) -> None:
        self.store = store
        self.budget = budget
        self.grace_s = grace_s
        self.on_pass = on_pass
        self.access = AccessTimes(store.backend)

    def touch(self, keys: Sequence[bytes]) -> None:
        """Count read-through hits on these keys (their segments were used now)."""
        found = (self.store.find(k) for k in keys)
        self.access.touch({loc.segment.segment_id for loc in found if loc is not None}, time.time())

    def run_once(self) -> RetentionPass | None:
        """Delete what earlier passes condemned, then condemn what is over budget now.

        Blocking (store I/O): run it in an executor. None if another collector holds the lock.
        """
        with collector_lock(self.store.backend, wait=False) as held:
            if not held:
                return None
            deleted, _ = sweep(self.store, grace_s=self.grace_s)
            uses = segment_uses(self.store)
            evict = choose_evictions(uses, self.access, self.budget, time.time())
            mark(self.store.backend, (u.segment for u in evict))
            check(self.store)
            if self.grace_s <= 0:
                now_deleted, _ = sweep(self.store, grace_s=0.0)
                deleted += now_deleted
            evicted = {u.segment.segment_id for u in evict}
            kept = [u for u in uses if u.segment.segment_id not in evicted]
            self.access.save({u.segment.segment_id for u in kept})
        result = RetentionPass(
            retained_bytes=sum(u.segment.stored_bytes for u in kept if u.unreferenced),
            condemned_segments=len(evict),
            evicted_segments=deleted.segments,
            evicted_bytes=deleted.stored_bytes,
        )
        if self.on_pass is not None:
            self.on_pass(result)
        return result

    async def run_periodically(self, interval_s: float) -> None:
        """A pass every ``interval_s`` seconds, each in an executor, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await loop.run_in_executor(None, self.run_once)
            except Exception:  # the next pass tries again; serving goes on
                log.exception("read-through retention pass failed")
