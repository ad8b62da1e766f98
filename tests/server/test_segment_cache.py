"""The segment cache keeps its count under concurrent cold loads, and a burst leaves the hot set.

The regression: threads loading the same segment counted it twice (3.97x over-count, drifting
up), so after a burst of cold clients the cache believed itself full and every later pass read
from disk again (113x slower until restart). The invariant tested here, in process under
hypothesis and through a real server's /metrics: held bytes == the sum of the sizes of the held
segments <= the budget, and once the burst is over a pass over data that fits loads nothing.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store import SPACE, synthetic_record

from logitcache.server.launcher import ServerProcess
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.store import open_store
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

SEGMENTS = 8


class SlowReader(SegmentReader):
    """A real segment reader whose whole-segment load takes a little longer, so that threads
    asking for one segment at once overlap inside the load."""

    def load(self):
        threading.Event().wait(0.002)
        return super().load()


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> list[SlowReader]:
    """Segments of different sizes (1 to 8 records of 5 to 40 positions)."""
    store = open_store(str(tmp_path_factory.mktemp("cache") / "store"), writable=True)
    ids = [
        store.write_segment(
            SPACE, [synthetic_record(100 * s + i, 5 * (s + 1)) for i in range(s + 1)]
        )
        for s in range(SEGMENTS)
    ]
    return [SlowReader(store.backend, SPACE, i) for i in ids]


def size(segment: SegmentReader) -> int:
    return sum(a.nbytes for a in segment.load().values())


def assert_exact(cache: SegmentCache, sizes: dict[str, int]) -> None:
    held = cache.held()
    assert held == {key: sizes[key] for key in held}  # each held segment at its own size, once
    assert cache.held_bytes == sum(held.values())
    assert cache.held_bytes <= cache.budget_bytes or len(held) == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget_segments=st.integers(1, SEGMENTS + 1),
    plans=st.lists(
        st.lists(st.integers(0, SEGMENTS - 1), min_size=1, max_size=30), min_size=2, max_size=8
    ),
)
def test_held_bytes_are_exact_whatever_threads_load(
    segments: list[SlowReader], budget_segments: int, plans: list[list[int]]
) -> None:
    """Threads start together (all cold) and read segments in their own orders."""
    sizes = {s.cache_key: size(s) for s in segments}
    cache = SegmentCache(budget_segments * max(sizes.values()))
    start = threading.Barrier(len(plans))
    errors: list[BaseException] = []

    def run(plan: list[int]) -> None:
        try:
            start.wait()
            for i in plan:
                arrays = cache.arrays(segments[i])
                assert arrays["input_ids"].shape[0] == segments[i].positions
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(plan,)) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_exact(cache, sizes)
    if budget_segments >= SEGMENTS:  # everything fits: each segment was read exactly once
        assert cache.loads == len({i for plan in plans for i in plan})


def test_after_a_cold_burst_the_hot_set_is_resident_and_a_pass_loads_nothing(
    segments: list[SlowReader],
) -> None:
    sizes = {s.cache_key: size(s) for s in segments}
    cache = SegmentCache(sum(sizes.values()))  # the whole hot set fits, with nothing to spare
    start = threading.Barrier(8)

    def cold_client(offset: int) -> None:
        start.wait()
        for round_ in range(5):
            for i in range(SEGMENTS):
                cache.arrays(segments[(i * (offset + 1) + round_) % SEGMENTS])

    threads = [threading.Thread(target=cold_client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.held() == sizes and cache.held_bytes == sum(sizes.values())
    assert cache.loads == SEGMENTS
    for s in segments:  # a warm pass
        cache.arrays(s)
    assert cache.loads == SEGMENTS


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    found = re.findall(
        r"^(logitcache_(?:loaded_segment\w*|segment_loads_total)) (\S+)$", text, re.M
    )
    return {name: float(value) for name, value in found}


def test_a_server_keeps_its_count_through_concurrent_cold_streams(tmp_path: Path) -> None:
    """Eight clients stream one dataset at once from a cold server whose segment budget just
    holds it; afterwards the server holds exactly the dataset, and a pass reads nothing."""
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir), writable=True)
    records = [synthetic_record(1000 + i, 20 + i % 7) for i in range(60)]
    for part in range(6):
        store.write_segment(SPACE, records[10 * part : 10 * part + 10])
    store.create_dataset("hot", SPACE, [r.key for r in records], 0, provenance={})
    store.mark_complete("hot")
    hot_bytes = sum(size(s) for s in store.segments())
    with ServerProcess(None, store_dir, "--loaded-segment-bytes", str(hot_bytes)) as server:
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def stream(seed: int) -> int:
            channel = grpc.insecure_channel(server.target)
            request = pb.StreamDatasetRequest(dataset="hot", seed=seed, batch_records=3)
            try:
                return sum(len(b.keys) for b in pb_grpc.LogitCacheStub(channel).StreamDataset(
                    request, timeout=120))  # fmt: skip
            finally:
                channel.close()

        def client(seed: int) -> None:
            try:
                start.wait()
                for epoch in range(3):
                    assert stream(seed * 10 + epoch) == len(records)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        after_burst = scrape(server.http_url)
        assert after_burst["logitcache_loaded_segment_bytes"] == hot_bytes
        assert after_burst["logitcache_loaded_segments"] == 6
        assert after_burst["logitcache_segment_loads_total"] == 6  # each read once, never twice
        assert stream(99) == len(records)
        assert scrape(server.http_url)["logitcache_segment_loads_total"] == 6
