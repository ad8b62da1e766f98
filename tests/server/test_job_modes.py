"""Every capture mode through jobs and read-through, in process on the reference engine.

A job and a read-through miss in top-p or sampled mode capture exactly what the offline
precompute stores for the same input in the same space (sampled: the same draws, seeded by the
record key); the spaces of different modes and k stay apart; a mode this version lacks, or a k
outside its mode's range, is INVALID_ARGUMENT naming the field. Through the real servicer and
client, a job's and a read-through's mode reach the core and come back in the records' space.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from job_managers import USE, last_update, manager, sequences
from test_core_readthrough import assert_same, cache_on

import logitcache
import logitcache.cli
from logitcache.client.client import Client
from logitcache.client.errors import InvalidArgument
from logitcache.client.record import Record
from logitcache.client.use import Use
from logitcache.server.config import ServerConfig
from logitcache.server.grpc import convert
from logitcache.server.grpc.servicer import LogitCacheService
from logitcache.server.jobs import JobManager, JobSpec, JobState
from logitcache.server.metrics import ServerMetrics
from logitcache.server.precompute import PrecomputeRequest, precompute
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import open_store
from logitcache.server.streaming import DatasetStreamer
from logitcache.server.teachers.registry import Teacher, TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb

MODES = [("top_p:0.9", 8, (2.0,)), ("sampled", 6, ())]  # (mode, k, temperatures)


@pytest.fixture
def teacher(reference_teachers: TeacherRegistry) -> Teacher:
    return reference_teachers.get("demo")


def offline(teacher: Teacher, inputs: list[list[int]], mode: str, k: int,
            temperatures: tuple[float, ...], tmp: Path) -> list[Record]:  # fmt: skip
    """What ``logitcache precompute`` stores for ``inputs`` in this mode, in order."""
    data = tmp / "input.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in inputs))
    config = teacher.capture(mode, k)
    url = str(tmp / "offline")
    req = PrecomputeRequest(teacher="demo", data=data, out=url, dataset="offline", top_k=k,
                            mode=config.mode, top_p=config.top_p, temperatures=temperatures,
                            progress=False, use=USE)  # fmt: skip
    store = open_store(url, writable=True)
    asyncio.run(precompute(req, teacher.engine, store=store, info=teacher.info))
    ds = logitcache.open_store(url).dataset("offline")
    return [ds[i] for i in range(len(inputs))]


@pytest.mark.parametrize(("mode", "k", "temperatures"), MODES)
def test_jobs_and_read_through_store_what_precompute_stores(teacher, reference_teachers, mode, k,
                                                            temperatures, tmp_path):  # fmt: skip
    inputs = sequences(seed=16, count=4, lengths=(3, 24))
    want = offline(teacher, inputs, mode, k, temperatures, tmp_path)
    url = str(tmp_path / "served")

    async def scenario() -> tuple[JobState, str, list[Record], int]:
        jobs = manager(url, reference_teachers)
        try:
            spec = JobSpec(use=USE, dataset="job", mode=mode, top_k=k,
                           temperatures=list(temperatures))  # fmt: skip
            done = await last_update(jobs, (await jobs.submit(spec, inputs, [])).id)
        finally:
            await jobs.close()
        cache = cache_on(open_store(str(tmp_path / "rt"), writable=True))
        cache.start()
        try:
            capture = teacher.capture(mode, k, temperatures)
            batch = [np.asarray(s) for s in inputs]
            records, computed = await cache.get(teacher, capture, batch, use=USE)
            assert records.space.mode == mode and records.space.k == k
            assert records.space.temperatures == temperatures
        finally:
            await cache.close()
        return done.state, done.error, records.decode(), computed

    state, error, answered, computed = asyncio.run(scenario())
    assert state is JobState.COMPLETED, error
    ds = logitcache.open_store(url).dataset("job")
    assert ds.space.mode == mode and ds.space.k == k and ds.space.temperatures == temperatures
    assert computed == len(inputs)
    for i, expected in enumerate(want):
        for got in (ds[i], answered[i]):
            assert_same(got, expected)
            assert got.temperatures == temperatures
            if temperatures:
                np.testing.assert_array_equal(got.tempered_log_tails, expected.tempered_log_tails)
    if mode == "sampled":
        assert all(r.counts is not None and int(r.counts.sum(axis=1).max()) == k for r in want)


def test_read_through_keeps_each_mode_and_k_in_its_own_space(teacher, tmp_path):
    batch = [np.asarray(s) for s in sequences(seed=17, count=3)]
    captures = [teacher.capture(m, k) for m, k in [("", 8), ("sampled", 6),
                                                               ("sampled", 4), ("top_p:0.9", 8)]]  # fmt: skip

    async def scenario() -> list[tuple[str, int]]:
        cache = cache_on(open_store(str(tmp_path / "rt"), writable=True))
        cache.start()
        try:
            answers = [await cache.get(teacher, c, batch, use=USE) for c in captures]
            again = [await cache.get(teacher, c, batch, use=USE) for c in captures]
        finally:
            await cache.close()
        assert [computed for _, computed in again] == [0] * len(captures)
        return [(records.space.space_id, computed) for records, computed in answers]

    answers = asyncio.run(scenario())
    assert [computed for _, computed in answers] == [len(batch)] * len(captures)
    assert len({space_id for space_id, _ in answers}) == len(captures)


@pytest.mark.parametrize(
    ("mode", "k", "field"),
    [("nucleus", 8, "mode"), ("top_p", 8, "mode"), ("sampled:3", 6, "mode"),
     ("top_p:x", 8, "mode"), ("top_p:1.5", 8, "top_p"), ("sampled", 256, "top_k"),
     ("topk", 9, "top_k")],
)  # fmt: skip
def test_a_bad_mode_or_k_is_invalid_argument_naming_it(teacher, mode, k, field):
    with pytest.raises(InvalidArgument) as refused:
        teacher.capture(mode, k)
    assert field in refused.value.fields


@pytest.mark.parametrize(("mode", "temperatures"), [("sampled", (2.0,)), ("topk", (0.0,))])
def test_bad_temperatures_are_invalid_argument_naming_them(teacher, mode, temperatures):
    with pytest.raises(InvalidArgument) as refused:
        teacher.capture(mode, 6, temperatures)
    assert "temperatures" in refused.value.fields


def test_a_job_with_a_bad_mode_is_refused_and_leaves_nothing(reference_teachers, tmp_path):
    url = str(tmp_path / "store")

    async def scenario() -> None:
        jobs = manager(url, reference_teachers)
        try:
            with pytest.raises(InvalidArgument) as refused:
                spec = JobSpec(use=USE, dataset="bad", mode="nucleus")
                await jobs.submit(spec, sequences(seed=18, count=2), [])
            assert refused.value.fields == ("mode",)
        finally:
            await jobs.close()

    asyncio.run(scenario())
    assert "bad" not in open_store(url).datasets()


def test_the_wire_mode_and_temperatures_reach_the_job_spec():
    spec = convert.job_spec(pb.JobSpec(dataset="d", mode="top_p:0.9", top_k=6, temperatures=[2]))
    assert spec.mode == "top_p:0.9" and spec.top_k == 6 and spec.temperatures == [2.0]


@pytest.fixture(scope="module")
def served(tmp_path_factory, reference_teachers, loop_thread) -> Iterator[str]:
    """The real servicer on the reference engine (no policy gate): its address."""
    root = tmp_path_factory.mktemp("modes")
    store = open_store(str(root / "store"), writable=True)

    async def start() -> tuple[int, grpc.aio.Server, ReadThroughCache, JobManager]:
        metrics, loaded = ServerMetrics(), SegmentCache(1 << 26)
        readthrough = cache_on(store)
        jobs = manager(str(root / "store"), reference_teachers)
        service = LogitCacheService(ServerConfig(store=str(root / "store")), store,
                                    reference_teachers, readthrough,
                                    DatasetStreamer(store, loaded, prefetch=2), jobs,
                                    metrics)  # fmt: skip
        server = grpc.aio.server()
        service.add_to_server(server)
        readthrough.start()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return port, server, readthrough, jobs

    port, server, readthrough, jobs = loop_thread.run(start())
    yield f"127.0.0.1:{port}"

    async def stop() -> None:
        await server.stop(None)
        await jobs.close()
        await readthrough.close()

    loop_thread.run(stop())


CLIENT_USE = Use("research", "test-student", "test", "tests")


def test_the_client_submits_and_fetches_in_every_mode(served):
    inputs = sequences(seed=19, count=3)
    with Client(served, retries=0, timeout=60, use=CLIENT_USE) as client:
        job = client.wait(client.precompute("drawn", input_ids=inputs, mode="sampled", top_k=5))
        assert job.spec.mode == "sampled" and job.spec.top_k == 5
        records = client.get_distributions(inputs, mode="sampled", top_k=5)
        assert all(r.counts is not None and int(r.counts.sum(axis=1).max()) == 5 for r in records)
        feed = [inputs]
        adaptive = next(
            iter(client.get_distributions_iter(feed, mode="top_p:0.5", temperatures=[2]))
        )
        assert all(r.tail_logprobs is not None and r.counts is None for r in adaptive)
        assert all(r.temperatures == (2.0,) and r.tempered_log_tails is not None for r in adaptive)
        for refused in (lambda: client.get_distributions(inputs, mode="nucleus"),
                        lambda: client.precompute("bad", input_ids=inputs, mode="top_p")):  # fmt: skip
            with pytest.raises(grpc.RpcError) as raised:
                refused()
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details().startswith("mode ")


def test_the_cli_submits_and_fetches_with_a_mode_and_temperatures(served, tmp_path, capsys):
    inputs = sequences(seed=20, count=3)
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in inputs))
    use = ["--purpose", "research", "--student-name", "test-student", "--student-family",
           "test", "--requester", "tests"]  # fmt: skip
    common = ["--server", served, "--data", str(data), "--top-k", "5", "--no-progress", *use]
    assert logitcache.cli.main(["submit", "--dataset", "cli-drawn", "--mode", "sampled",
                                "--wait", *common]) == 0  # fmt: skip
    assert "completed" in capsys.readouterr().out
    assert logitcache.cli.main(["submit", "--dataset", "cli-tempered", "--temperatures", "2",
                                "--wait", *common]) == 0  # fmt: skip
    out = tmp_path / "x.npz"
    assert logitcache.cli.main(["fetch", "--out", str(out), "--mode", "top_p:0.5",
                                "--temperatures", "2,4", *common]) == 0  # fmt: skip
    with Client(served, retries=0, timeout=60, use=CLIENT_USE) as client:
        assert client.describe_dataset("cli-drawn").space.mode == "sampled"
        assert tuple(client.describe_dataset("cli-tempered").space.temperatures) == (2.0,)
        expected = client.get_distributions(inputs, mode="top_p:0.5", top_k=5,
                                            temperatures=[2, 4])  # fmt: skip
    width = max(r.k for r in expected)
    with np.load(out) as z:
        assert z["token_ids"].shape == (sum(len(s) for s in inputs), width)
        rows = np.split(z["logprobs"], z["offsets"][1:-1])
        for got, want in zip(rows, expected, strict=True):
            np.testing.assert_array_equal(got[:, : want.k], want.logprobs)
            assert np.all(got[:, want.k :] == -np.inf)
        np.testing.assert_array_equal(z["temperatures"], [2.0, 4.0])
        np.testing.assert_array_equal(
            z["tempered_log_tails"], np.concatenate([r.tempered_log_tails for r in expected])
        )
    with pytest.raises(SystemExit):  # argparse: a temperature must be positive
        logitcache.cli.main(["fetch", "--out", str(out), "--temperatures", "0", *common])
    assert "temperatures must be positive numbers" in capsys.readouterr().err
