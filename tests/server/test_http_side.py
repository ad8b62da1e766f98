"""The HTTP side served for real on 127.0.0.1 and queried with a real aiohttp client."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from logitcache.server.http import make_http_app, start_http_side
from logitcache.server.metrics import ServerMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def all_ready() -> dict[str, bool]:
    return {"engine": True, "store": True}


@asynccontextmanager
async def serving(
    metrics: ServerMetrics | None = None,
    readiness: Callable[[], Awaitable[dict[str, bool]]] = all_ready,
) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """The app on a free port, and a client session with its base URL."""
    side = await start_http_side(
        make_http_app(metrics or ServerMetrics(), readiness), "127.0.0.1", 0
    )
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{side.port}"
    finally:
        await side.close()


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def scrape(session: aiohttp.ClientSession, base: str) -> Samples:
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_healthz_is_ok() -> None:
    async def scenario() -> None:
        async with serving() as (session, base):
            assert await get_json(session, f"{base}/healthz") == (200, {"status": "ok"})

    asyncio.run(scenario())


def test_readyz_is_200_when_every_check_passes() -> None:
    async def scenario() -> None:
        async with serving() as (session, base):
            status, body = await get_json(session, f"{base}/readyz")
        assert status == 200
        assert body == {"ready": True, "checks": {"engine": True, "store": True}}

    asyncio.run(scenario())


def test_readyz_is_503_when_a_check_fails() -> None:
    async def engine_down() -> dict[str, bool]:
        return {"engine": False, "store": True}

    async def scenario() -> None:
        async with serving(readiness=engine_down) as (session, base):
            status, body = await get_json(session, f"{base}/readyz")
        assert status == 503
        assert body == {"ready": False, "checks": {"engine": False, "store": True}}

    asyncio.run(scenario())


def test_readyz_is_503_with_the_error_when_readiness_raises() -> None:
    async def broken() -> dict[str, bool]:
        raise RuntimeError("store unreachable")

    async def scenario() -> None:
        async with serving(readiness=broken) as (session, base):
            status, body = await get_json(session, f"{base}/readyz")
            # The failure is per request: the server keeps answering.
            assert (await get_json(session, f"{base}/healthz"))[0] == 200
        assert status == 503
        assert body["ready"] is False
        assert "store unreachable" in body["error"]

    asyncio.run(scenario())


def test_metrics_content_type_and_recorded_values() -> None:
    metrics = ServerMetrics()
    metrics.record_request("GetDistributions", "OK", 0.02)
    metrics.record_request("GetDistributions", "OK", 0.3)
    metrics.record_request("GetDistributions", "INVALID_ARGUMENT", 0.001)
    metrics.add_computed("demo-teacher", 120)
    metrics.add_served("cache", 80)
    metrics.add_served("computed", 120)
    metrics.set_queue_depth("interactive", 3)
    metrics.set_queue_depth("jobs", 7)
    metrics.set_job_progress("job-1", 40, 100)

    async def scenario() -> Samples:
        async with serving(metrics) as (session, base):
            async with session.get(f"{base}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
            return await scrape(session, base)

    samples = asyncio.run(scenario())
    requests = "logitcache_requests_total"
    assert sample(samples, requests, method="GetDistributions", code="OK") == 2
    assert sample(samples, requests, method="GetDistributions", code="INVALID_ARGUMENT") == 1
    seconds = "logitcache_request_seconds"
    assert sample(samples, f"{seconds}_count", method="GetDistributions") == 3
    assert sample(samples, f"{seconds}_sum", method="GetDistributions") == pytest.approx(0.321)
    assert sample(samples, f"{seconds}_bucket", method="GetDistributions", le="0.025") == 2
    assert sample(samples, "logitcache_positions_computed_total", teacher="demo-teacher") == 120
    served = "logitcache_positions_served_total"
    assert sample(samples, served, source="cache") == 80
    assert sample(samples, served, source="computed") == 120
    assert sample(samples, served, source="stream") == 0  # known sources exist from the start
    assert sample(samples, "logitcache_queue_depth", queue="interactive") == 3
    assert sample(samples, "logitcache_queue_depth", queue="jobs") == 7
    assert sample(samples, "logitcache_job_positions_done") == 40
    assert sample(samples, "logitcache_job_positions_total") == 100
    # Without a store-size callback there is no store-size series.
    assert not any(name == "logitcache_store_bytes" for name, _ in samples)


def test_cache_hit_ratio_is_hits_over_lookups() -> None:
    metrics = ServerMetrics()

    async def scenario() -> tuple[Samples, Samples]:
        async with serving(metrics) as (session, base):
            before = await scrape(session, base)
            metrics.add_lookups(hits=3, misses=1)
            metrics.add_lookups(hits=3, misses=1)
            return before, await scrape(session, base)

    before, after = asyncio.run(scenario())
    assert sample(before, "logitcache_cache_hit_ratio") == 0
    assert sample(before, "logitcache_cache_lookups_total", result="hit") == 0
    assert sample(after, "logitcache_cache_lookups_total", result="hit") == 6
    assert sample(after, "logitcache_cache_lookups_total", result="miss") == 2
    assert sample(after, "logitcache_cache_hit_ratio") == pytest.approx(0.75)


def test_store_bytes_is_read_at_each_scrape() -> None:
    store_size = [1000]
    metrics = ServerMetrics(store_bytes=lambda: store_size[0])

    async def scenario() -> list[float]:
        async with serving(metrics) as (session, base):
            first = await scrape(session, base)
            store_size[0] = 5000
            second = await scrape(session, base)
        return [sample(s, "logitcache_store_bytes") for s in (first, second)]

    assert asyncio.run(scenario()) == [1000, 5000]


def test_a_failing_store_probe_reads_nan_and_the_scrape_still_succeeds() -> None:
    def unreadable() -> int:
        raise OSError("bucket unreachable")

    async def scenario() -> Samples:
        async with serving(ServerMetrics(store_bytes=unreadable)) as (session, base):
            return await scrape(session, base)

    assert math.isnan(sample(asyncio.run(scenario()), "logitcache_store_bytes"))


def test_job_progress_is_summed_without_job_labels_and_absent_states_read_zero() -> None:
    """Job ids never become labels (their number is unbounded): progress is one sum over the
    jobs in progress, and a finished job leaves it."""
    metrics = ServerMetrics()
    metrics.set_job_progress("job-1", 10, 20)
    metrics.set_job_progress("job-2", 1, 2)
    metrics.set_job_counts({"running": 2, "done": 1})
    metrics.remove_job("job-1")
    metrics.remove_job("job-1")  # idempotent
    metrics.set_job_counts({"done": 2, "failed": 1})

    async def scenario() -> Samples:
        async with serving(metrics) as (session, base):
            return await scrape(session, base)

    samples = asyncio.run(scenario())
    assert sample(samples, "logitcache_job_positions_done") == 1
    assert sample(samples, "logitcache_job_positions_total") == 2
    assert not any("job" in dict(labels) for _, labels in samples)
    assert sample(samples, "logitcache_jobs", state="running") == 0
    assert sample(samples, "logitcache_jobs", state="done") == 2
    assert sample(samples, "logitcache_jobs", state="failed") == 1


def test_two_instances_do_not_share_values() -> None:
    first, second = ServerMetrics(), ServerMetrics()
    first.record_request("GetDistributions", "OK", 0.01)
    first.add_lookups(hits=1, misses=0)
    second.add_lookups(hits=0, misses=1)

    async def scenario() -> tuple[Samples, Samples]:
        async with serving(first) as (session_a, base_a), serving(second) as (session_b, base_b):
            return await scrape(session_a, base_a), await scrape(session_b, base_b)

    samples_a, samples_b = asyncio.run(scenario())
    requests = "logitcache_requests_total"
    assert sample(samples_a, requests, method="GetDistributions", code="OK") == 1
    assert not any(name == requests for name, _ in samples_b)
    assert sample(samples_a, "logitcache_cache_hit_ratio") == 1
    assert sample(samples_b, "logitcache_cache_hit_ratio") == 0


def test_unknown_served_source_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        ServerMetrics().add_served("disk", 1)


def test_close_stops_listening() -> None:
    async def scenario() -> None:
        side = await start_http_side(make_http_app(ServerMetrics(), all_ready), "127.0.0.1", 0)
        assert side.port > 0
        await side.close()
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"http://127.0.0.1:{side.port}/healthz")

    asyncio.run(scenario())
