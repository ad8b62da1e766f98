"""Segments held in memory for batched reads, least recently used evicted past a byte budget.

Streams, read-through hits and a trainer reading a store all take whole segments into memory
once and then cut records out of them with slices. Loading is single-flight: threads asking for
a segment that is being loaded wait for that load instead of starting their own, so a segment is
read once and counted once, and ``held_bytes`` is exactly the bytes of the segments held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future

import numpy as np

from logitcache.server.store.reader import SegmentReader

SegmentArrays = Mapping[str, np.ndarray]  # "input_ids" and the codec's arrays, whole segment


class SegmentCache:
    """Whole segments' encoded arrays by segment, bounded by ``budget_bytes``.

    The most recently used segment is always kept, even when it alone is over the budget.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._held: OrderedDict[str, tuple[SegmentArrays, int]] = OrderedDict()
        self._loading: dict[str, Future[SegmentArrays]] = {}
        self._bytes = 0
        self.loads = 0  # segments read from storage, reloads after eviction included
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def held(self) -> dict[str, int]:
        """The segments held now (cache key -> bytes), least recently used first."""
        with self._lock:
            return {key: nbytes for key, (_, nbytes) in self._held.items()}

    def arrays(self, segment: SegmentReader) -> SegmentArrays:
        """The segment's arrays, loaded now unless held (or being loaded by another thread)."""
        key = segment.cache_key
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
                return held[0]
            loading = self._loading.get(key)
            owner = loading is None
            if loading is None:
                loading = self._loading[key] = Future()
        if not owner:
            return loading.result()
        try:
            arrays = segment.load()
        except BaseException as e:
            with self._lock:
                del self._loading[key]
            loading.set_exception(e)
            raise
        nbytes = sum(a.nbytes for a in arrays.values())
        with self._lock:
            self.loads += 1
            del self._loading[key]
            self._held[key] = (arrays, nbytes)
            self._bytes += nbytes
            while self._bytes > self.budget_bytes and len(self._held) > 1:
                _, (_, evicted) = self._held.popitem(last=False)
                self._bytes -= evicted
        loading.set_result(arrays)
        return arrays
