"""Two server processes on one ``s3://`` store (a real SeaweedFS), and an outage of the store.

Each replica serves what the other sealed: a record it does not know is looked for at once, and
listings are at most ``--store-refresh-seconds`` old (the documented staleness). Misses computed
on both replicas never split the answer: everyone serves the first sealed copy. While the object
store is down, calls that need it are UNAVAILABLE and readiness turns; once it is back the
server recovers by itself and nothing sealed before is lost.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from job_managers import sequences
from reference_server import ReferenceServer

from logitcache.client import Client
from logitcache.client.errors import Unavailable
from logitcache.client.record import Record
from logitcache.client.space import record_key
from logitcache.client.use import Use
from logitcache.server.store.store import open_store

REFRESH_S = 1.0  # the replicas' --store-refresh-seconds: how stale a listing may be
SLACK_S = 5.0  # a loaded CI machine's scheduling on top of it
USE = Use("research", "test-student", "test", "tests")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(
    seaweedfs, demo_teacher: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ReferenceServer, ReferenceServer]]:
    url = seaweedfs.url()
    tmp = tmp_path_factory.mktemp("replicas")
    flags = ("--store-refresh-seconds", str(REFRESH_S), "--flush-seconds", "0.2")
    with pytest.MonkeyPatch.context() as env:
        for name, value in seaweedfs.env().items():
            env.setenv(name, value)  # the servers inherit them: the AWS variables
        with ThreadPoolExecutor(2) as pool:
            started = [
                pool.submit(ReferenceServer, demo_teacher, url, *flags, log_path=tmp / f"{n}.log")
                for n in ("a", "b")
            ]
            a, b = (f.result() for f in started)
        with a, b:
            yield url, a, b


def figure(server: ReferenceServer, name: str) -> float:
    """A metric of the server's /metrics, summed over its labels (0 while it has none)."""
    text = urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((f"{name}{{", f"{name} "))
    )


def ready(server: ReferenceServer) -> bool:
    try:
        with urllib.request.urlopen(f"{server.http_url}/readyz", timeout=10) as answer:
            return answer.status == 200
    except urllib.error.HTTPError:
        return False


def unavailable(error: BaseException) -> bool:
    """Whether a client's error is UNAVAILABLE (typed, or a stream's status as grpc raised it)."""
    if isinstance(error, grpc.RpcError):
        return error.code() == grpc.StatusCode.UNAVAILABLE
    return isinstance(error, Unavailable)


def assert_same(got: list[Record], want: list[Record]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.key == w.key
        assert np.array_equal(g.token_ids, w.token_ids)
        assert np.array_equal(g.logprobs, w.logprobs)


def test_a_replica_serves_what_the_other_sealed_within_the_staleness(replicas) -> None:
    url, a, b = replicas
    seqs = sequences(seed=1, count=4)
    with Client(a.target, use=USE) as ca, Client(b.target, use=USE) as cb:
        written = ca.get_distributions(seqs, durable=True)  # sealed on S3 when answered
        sealed_bytes = open_store(url).totals().stored_bytes
        sealed = time.monotonic()
        while figure(b, "logitcache_store_bytes") < sealed_bytes:  # B's next look at the store
            assert time.monotonic() - sealed < REFRESH_S + SLACK_S, "B never saw A's segment"
            time.sleep(0.1)
        before = figure(b, "logitcache_positions_computed_total")
        assert_same(cb.get_distributions(seqs), written)
        assert figure(b, "logitcache_positions_computed_total") == before  # B computed nothing

        store = open_store(url, writable=True)  # a third process's dataset of those records
        space = store.spaces()[0]
        keys = [bytes.fromhex(r.key) for r in written]
        store.create_dataset("shared", space, keys, sum(len(s) for s in seqs), {})
        store.mark_complete("shared")
        published = time.monotonic()
        while "shared" not in [d.name for d in cb.list_datasets()]:
            assert time.monotonic() - published < REFRESH_S + SLACK_S, "B never listed it"
            time.sleep(0.1)
        assert_same(list(cb.stream_dataset("shared", seed=0, shuffle=False)), written)


def test_misses_on_both_replicas_agree_on_the_first_sealed_copy(replicas) -> None:
    url, a, b = replicas
    seqs = sequences(seed=2, count=3)
    with (
        Client(a.target, use=USE) as ca,
        Client(b.target, use=USE) as cb,
        ThreadPoolExecutor(2) as pool,
    ):
        both = [pool.submit(c.get_distributions, seqs, durable=True) for c in (ca, cb)]
        for f in both:
            f.result()
        store = open_store(url)
        space = store.spaces()[0]
        first = [store.get(record_key(space.space_id, np.asarray(s, np.int32))) for s in seqs]
        time.sleep(REFRESH_S)  # both have seen both copies by now
        for client in (ca, cb):
            assert_same(client.get_distributions(seqs), first)


def test_an_outage_of_the_store_is_unavailable_then_recovered(seaweedfs, replicas) -> None:
    url, a, b = replicas
    sealed_seqs, new_seqs = sequences(seed=3, count=3), sequences(seed=4, count=3)
    with Client(a.target, retries=0, use=USE) as ca:
        sealed = ca.get_distributions(sealed_seqs, durable=True)
        seaweedfs.stop()
        try:
            with pytest.raises((Unavailable, grpc.RpcError)) as refused:
                ca.get_distributions(new_seqs, durable=True)  # computed, cannot be sealed
            assert unavailable(refused.value)
            with pytest.raises(Unavailable):
                open_store(url)
            deadline = time.monotonic() + 30
            while ready(a):
                assert time.monotonic() < deadline, "A stayed ready without its store"
                time.sleep(0.2)
        finally:
            seaweedfs.start()
        deadline = time.monotonic() + 60
        while not ready(a):  # a probe write succeeds again
            assert time.monotonic() < deadline, a.log_tail()
            time.sleep(0.2)
    with Client(a.target, use=USE) as ca:  # retries UNAVAILABLE, as clients do
        again = ca.get_distributions(new_seqs, durable=True)
    with Client(b.target, use=USE) as cb:
        assert_same(cb.get_distributions(sealed_seqs + new_seqs), sealed + again)
    fresh = open_store(url)
    assert all(fresh.contains(r.key) for r in sealed + again)  # nothing sealed was lost
