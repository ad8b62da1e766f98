"""Prometheus metrics of one server, on a private registry.

Each `ServerMetrics` owns its own `CollectorRegistry` rather than the process-global one, so
several servers (as in tests) can live in one process without sharing or clashing on values.
Everything is a running count kept as events happen; a scrape only reads them (the hit ratio
and the store's size are read through callbacks, which must be as cheap: a scrape never walks
the store). Every label takes values from a small fixed set (methods, status codes, configured
teachers, sources, queues, job states), never job ids or dataset names, so the number of series
stays bounded however long the server runs.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from logitcache.server.store.cache import SegmentCache

log = logging.getLogger(__name__)

SERVED_SOURCES = ("cache", "computed", "stream")
# A request can wait behind a long teacher forward pass under load: buckets reach minutes.
REQUEST_SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class ServerMetrics:
    """The server's counters and gauges, and their Prometheus exposition text.

    Safe to update from any thread (the engine's worker threads as well as the event loop).
    """

    def __init__(self, store_bytes: Callable[[], int] | None = None) -> None:
        """`store_bytes` is called at every scrape, on the event loop: it must read a running
        total (the store's own), never measure the store."""
        self._registry = CollectorRegistry()
        self._lock = threading.Lock()  # guards the plain counts and sets below
        self._hits = 0
        self._misses = 0
        self._job_states: set[str] = set()
        registry = self._registry

        self._requests = Counter(
            "logitcache_requests_total",
            "gRPC requests handled, by method and final status code.",
            ["method", "code"],
            registry=registry,
        )
        self._request_seconds = Histogram(
            "logitcache_request_seconds",
            "gRPC request wall time in seconds, by method.",
            ["method"],
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=registry,
        )
        self._computed = Counter(
            "logitcache_positions_computed_total",
            "Token positions the teacher computed.",
            ["teacher"],
            registry=registry,
        )
        self._served = Counter(
            "logitcache_positions_served_total",
            "Token positions returned to clients, by where their distributions came from.",
            ["source"],
            registry=registry,
        )
        self._lookups = Counter(
            "logitcache_cache_lookups_total",
            "Cache lookups, by result.",
            ["result"],
            registry=registry,
        )
        self._hit_ratio = Gauge(
            "logitcache_cache_hit_ratio",
            "Cache hits / (hits + misses) since start; 0 before any lookup.",
            registry=registry,
        )
        self._hit_ratio.set_function(self._hit_ratio_now)
        self._queue_depth = Gauge(
            "logitcache_queue_depth",
            "Requests or work items waiting, by queue.",
            ["queue"],
            registry=registry,
        )
        # Summed over the jobs in progress: a label per job id would grow without bound.
        self._job_progress: dict[str, tuple[int, int]] = {}
        Gauge(
            "logitcache_job_positions_done",
            "Positions the precompute jobs in progress have finished, together.",
            registry=registry,
        ).set_function(lambda: self._job_positions(0))
        Gauge(
            "logitcache_job_positions_total",
            "Positions the precompute jobs in progress have in all, together.",
            registry=registry,
        ).set_function(lambda: self._job_positions(1))
        self._jobs = Gauge(
            "logitcache_jobs",
            "Precompute jobs, by state.",
            ["state"],
            registry=registry,
        )
        self._retained_bytes = Gauge(
            "logitcache_readthrough_retained_bytes",
            "Bytes of records no dataset references (read-through results) kept after the last "
            "retention pass.",
            registry=registry,
        )
        self._evicted_segments = Counter(
            "logitcache_readthrough_evicted_segments_total",
            "Unreferenced segments deleted by read-through retention.",
            registry=registry,
        )
        self._evicted_bytes = Counter(
            "logitcache_readthrough_evicted_bytes_total",
            "Bytes of unreferenced segments deleted by read-through retention.",
            registry=registry,
        )
        if store_bytes is not None:
            Gauge(
                "logitcache_store_bytes",
                "Bytes the store occupies, read at scrape time; NaN when it cannot be read.",
                registry=registry,
            ).set_function(lambda: _read_store_bytes(store_bytes))

        # Known label values start at 0, so rate() and ratios work before the first event.
        for source in SERVED_SOURCES:
            self._served.labels(source)
        for result in ("hit", "miss"):
            self._lookups.labels(result)

    def record_request(self, method: str, code: str, seconds: float) -> None:
        """Count one finished gRPC call (`code` is the status code name, e.g. "OK") and time it."""
        self._requests.labels(method, code).inc()
        self._request_seconds.labels(method).observe(seconds)

    def add_computed(self, teacher: str, positions: int) -> None:
        self._computed.labels(teacher).inc(positions)

    def add_served(self, source: str, positions: int) -> None:
        """`source` is one of SERVED_SOURCES; anything else is refused to keep labels bounded."""
        if source not in SERVED_SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {SERVED_SOURCES}")
        self._served.labels(source).inc(positions)

    def add_lookups(self, hits: int, misses: int) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses
        self._lookups.labels("hit").inc(hits)
        self._lookups.labels("miss").inc(misses)

    def record_retention(
        self, retained_bytes: int, evicted_segments: int, evicted_bytes: int
    ) -> None:
        """One read-through retention pass: what it kept and what it deleted."""
        self._retained_bytes.set(retained_bytes)
        self._evicted_segments.inc(evicted_segments)
        self._evicted_bytes.inc(evicted_bytes)

    def set_queue_depth(self, queue: str, depth: int) -> None:
        self._queue_depth.labels(queue).set(depth)

    def set_job_progress(self, job: str, done: int, total: int) -> None:
        """A job's progress, counted in the job series until :meth:`remove_job`."""
        with self._lock:
            self._job_progress[job] = (done, total)

    def remove_job(self, job: str) -> None:
        """A finished job leaves the progress sums; idempotent."""
        with self._lock:
            self._job_progress.pop(job, None)

    def _job_positions(self, which: int) -> int:
        with self._lock:
            return sum(progress[which] for progress in self._job_progress.values())

    def track_segment_cache(self, cache: SegmentCache) -> None:
        """Export the bytes, segments and loads of the server's segment cache at each scrape."""
        self._registry.register(_SegmentCacheCollector(cache))

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        """Set the number of jobs per state; states seen before but absent now read 0."""
        with self._lock:
            for state in self._job_states - counts.keys():
                self._jobs.labels(state).set(0)
            for state, count in counts.items():
                self._jobs.labels(state).set(count)
            self._job_states |= counts.keys()

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric, and the content type to serve it with."""
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def _hit_ratio_now(self) -> float:
        with self._lock:
            lookups = self._hits + self._misses
            return self._hits / lookups if lookups else 0.0


class _SegmentCacheCollector(Collector):
    """The segment cache's own counts, read at scrape time (a few attributes, under its lock)."""

    def __init__(self, cache: SegmentCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        held = self._cache.held()
        yield GaugeMetricFamily(
            "logitcache_loaded_segment_bytes",
            "Bytes of the segments held in memory for batched reads (budget: "
            "--loaded-segment-bytes).",
            value=sum(held.values()),
        )
        yield GaugeMetricFamily(
            "logitcache_loaded_segments", "Segments held in memory for batched reads.",
            value=len(held),
        )  # fmt: skip
        yield CounterMetricFamily(
            "logitcache_segment_loads",
            "Segments read whole from storage into memory, reloads after eviction included.",
            value=self._cache.loads,
        )


def _read_store_bytes(store_bytes: Callable[[], int]) -> float:
    """A failing size probe must not fail the whole scrape: it reads NaN and is logged."""
    try:
        return float(store_bytes())
    except Exception:
        log.warning("store size probe failed", exc_info=True)
        return math.nan
