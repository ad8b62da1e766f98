"""Client, AsyncClient and the client CLI commands against a real `logitcache serve` process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from declared_use import USE

import logitcache
from logitcache.client import AsyncClient, Client, Record

pytestmark = pytest.mark.slow

DEFAULT_K = 16  # the session server runs with --default-top-k 16


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, use=USE) as c:
        yield c


@pytest.fixture(scope="module")
def teacher(client):
    (info,) = client.list_teachers().teachers
    return info


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from logitcache.demo.language import generate_documents

    return generate_documents(24, seed=2024)


@pytest.fixture(scope="module")
def built(client, texts) -> str:
    """A dataset built by a precompute job from texts, shared by the streaming tests."""
    name = "client-built"
    job = client.precompute(dataset=name, texts=texts)
    final = client.wait(job, progress=True)  # the tqdm bar goes to (captured) stderr
    assert final.state == "completed" and final.sequences_done == len(texts)
    return name


def random_sequences(vocab: int, lengths: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n, dtype=np.int64) for n in lengths]


def assert_same(a: Record, b: Record) -> None:
    assert a.key == b.key
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    np.testing.assert_array_equal(a.target_logprobs, b.target_logprobs)  # NaN == NaN here


# ---- read-through ---------------------------------------------------------------------------


def test_get_distributions_in_order_and_cached(client, teacher):
    seqs = random_sequences(teacher.vocab_size, [5, 1, 37, 2, 200], seed=1)
    records = client.get_distributions([s.tolist() for s in seqs])
    assert [len(r) for r in records] == [5, 1, 37, 2, 200]
    assert len({r.key for r in records}) == len(seqs)
    for seq, r in zip(seqs, records, strict=True):
        T = len(seq)
        np.testing.assert_array_equal(r.input_ids, seq)
        assert r.input_ids.shape == (T,) and r.input_ids.dtype == np.int32
        assert r.token_ids.shape == (T, DEFAULT_K) and r.token_ids.dtype == np.int32
        assert r.logprobs.shape == (T, DEFAULT_K) and r.logprobs.dtype == np.float32
        assert r.target_logprobs.shape == (T,) and r.target_logprobs.dtype == np.float32
        assert np.isnan(r.target_logprobs[-1]) and not np.isnan(r.target_logprobs[:-1]).any()
        assert (np.diff(r.logprobs, axis=1) <= 0).all()  # descending probability
        assert ((r.token_ids >= 0) & (r.token_ids < teacher.vocab_size)).all()
    # A second call (numpy arrays this time) is served from the cache: exactly the same records.
    again = client.get_distributions(seqs)
    for a, b in zip(records, again, strict=True):
        assert_same(a, b)


def test_top_k(client, teacher):
    seqs = random_sequences(teacher.vocab_size, [9, 4], seed=2)
    assert {r.k for r in client.get_distributions(seqs, top_k=None)} == {DEFAULT_K}
    eight = client.get_distributions(seqs, top_k=8, teacher=teacher.name)
    assert [r.token_ids.shape for r in eight] == [(9, 8), (4, 8)]
    assert [r.logprobs.shape for r in eight] == [(9, 8), (4, 8)]


def test_invalid_sequence_names_its_index(client, teacher):
    with pytest.raises(grpc.RpcError) as e:
        client.get_distributions([[1, 2, 3], [1, teacher.vocab_size + 5], [4]])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence 1" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.get_distributions([[1, 2], []])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence 1" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.get_distributions([[1, 2]], top_k=10_000)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_distributions_iter_pipelines_batches(client, teacher):
    seqs = random_sequences(teacher.vocab_size, [3, 50, 7, 12, 1, 30, 8, 9, 64, 2, 5], seed=3)
    batches = [seqs[i : i + 2] for i in range(0, len(seqs), 2)]
    results = list(client.get_distributions_iter(iter(batches), top_k=8, window=3))
    assert [len(r) for r in results] == [len(b) for b in batches]
    expected = client.get_distributions(seqs, top_k=8)
    for a, b in zip([r for batch in results for r in batch], expected, strict=True):
        assert_same(a, b)
    assert list(client.get_distributions_iter([])) == []


# ---- jobs and streaming ---------------------------------------------------------------------


def test_precompute_then_stream_every_record_once(client, built, texts, server):
    info = client.describe_dataset(built)
    assert info.state == "complete" and info.sequences == len(texts)
    assert built in {d.name for d in client.list_datasets()}
    assert any(j.spec.dataset == built and j.state == "completed" for j in client.list_jobs())

    streamed = list(client.stream_dataset(built, rank=0, world_size=1, seed=0, epoch=0))
    ds = logitcache.open_store(str(server.store)).dataset(built)
    assert len(streamed) == len(ds) == len(texts)
    assert sorted(r.key for r in streamed) == sorted(ds.keys)
    by_key = {ds[i].key: ds[i] for i in range(len(ds))}
    for r in streamed:
        assert_same(r, by_key[r.key])

    # Two ranks: disjoint, together the whole dataset; the order depends on (seed, epoch) only.
    ranks = [list(client.stream_dataset(built, rank=r, world_size=2)) for r in range(2)]
    assert sorted(r.key for part in ranks for r in part) == sorted(ds.keys)
    assert [r.key for r in streamed] == [r.key for r in client.stream_dataset(built)]
    in_order = [r.key for r in client.stream_dataset(built, shuffle=False)]
    assert in_order == list(ds.keys)


def test_stream_resumes_from_cursor(client, built):
    full = [r.key for r in client.stream_dataset(built, batch_records=4, seed=7)]
    stream = client.stream_dataset(built, batch_records=4, seed=7)
    head = [next(stream).key for _ in range(10)]
    assert stream.cursor == 8  # the last batch handed out completely
    stream.close()
    tail = client.stream_dataset(built, batch_records=4, seed=7, start_cursor=stream.cursor)
    assert head[:8] + [r.key for r in tail] == full
    assert tail.cursor == len(full)


def test_stream_survives_a_server_restart(tmp_path):
    """kill -9 mid-stream, restart on the same port: the stream goes on, each record once."""
    from logitcache.bench.synthetic import synthetic_store
    from logitcache.server.launcher import ServerProcess

    # A store-only server (starts in about a second) on a synthetic dataset of ~50 MB on the
    # wire, far more than grpc buffers, so the stream really breaks and must resume.
    store = tmp_path / "store"
    synthetic_store(store, positions=200_000, seq_len=256, k=64)
    first = ServerProcess(None, store)
    restarted = None
    try:
        with Client(first.target, retries=8, use=USE) as c:
            full = [r.key for r in c.stream_dataset("bench", batch_records=4, seed=3)]
            stream = c.stream_dataset("bench", batch_records=4, seed=3)
            seen = [next(stream).key for _ in range(10)]
            first.kill()
            restarted = ServerProcess(
                None, store, "--port", str(first.port), log_path=tmp_path / "restarted.log"
            )
            seen += [r.key for r in stream]
        assert seen == full
        assert stream.cursor == len(full)
        metrics = urllib.request.urlopen(f"{restarted.http_url}/metrics").read().decode()
        assert 'logitcache_requests_total{code="OK",method="StreamDataset"} 1.0' in metrics or (
            'logitcache_requests_total{method="StreamDataset",code="OK"} 1.0' in metrics
        )
    finally:
        first.kill()
        if restarted is not None:
            restarted.stop()


def test_async_client(server, client, built, teacher):
    seqs = random_sequences(teacher.vocab_size, [6, 3, 11], seed=4)
    expected = client.get_distributions(seqs)
    sync_stream = [r.key for r in client.stream_dataset(built, batch_records=5)]

    async def run():
        async with AsyncClient(server.target, use=USE) as ac:
            records = await ac.get_distributions(seqs)

            async def batches():
                for s in seqs:
                    yield [s]

            piped = [b async for b in ac.get_distributions_iter(batches(), window=2)]
            stream = ac.stream_dataset(built, batch_records=5)
            keys = [r.key async for r in stream]
            (job,) = [j for j in await ac.list_jobs() if j.spec.dataset == built]
            return records, piped, keys, stream.cursor, job, await ac.wait(job.id)

    records, piped, keys, cursor, job, final = asyncio.run(run())
    for a, b in zip(records, expected, strict=True):
        assert_same(a, b)
    for [a], b in zip(piped, expected, strict=True):
        assert_same(a, b)
    assert keys == sync_stream and cursor == len(keys)
    assert final.id == job.id and final.state == "completed"


def test_bad_dataset_name_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as e:
        client.precompute(dataset="../x", texts=["some text"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "../x" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.describe_dataset("no-such-dataset")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ValueError, match="exactly one"):
        client.precompute(dataset="x", texts=["a"], input_ids=[[1]])


def test_wait_on_a_cancelled_job_raises(client, teacher):
    seqs = random_sequences(teacher.vocab_size, [1000] * 48, seed=5)
    job = client.precompute(dataset="client-cancelled", input_ids=seqs)
    cancelled = client.cancel_job(job)
    assert cancelled.state == "cancelled"
    with pytest.raises(RuntimeError, match="cancelled"):
        client.wait(job)
    with pytest.raises(grpc.RpcError) as e:
        client.cancel_job(job)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---- CLI ------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "logitcache.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


USE_FLAGS = ("--purpose", USE.purpose, "--student-name", USE.student_name, "--student-family",
             USE.student_family, "--requester", USE.requester)  # fmt: skip


def test_cli_submit_jobs_fetch(server, client, teacher, texts, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts[:6]])
    r = cli("submit", "--server", server.target, "--dataset", "client-cli", "--data", str(data),
            "--top-k", "8", "--wait", *USE_FLAGS)  # fmt: skip
    assert r.returncode == 0, r.stderr
    job_id, summary = r.stdout.strip().splitlines()
    assert client.get_job(job_id).state == "completed"
    assert "completed" in summary and "client-cli" in summary
    assert client.describe_dataset("client-cli").space.k == 8

    r = cli("jobs", "--server", server.target)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["ID", "DATASET", "STATE", "PROGRESS", "RATE", "ETA"]
    assert any(row.split()[:4] == [job_id, "client-cli", "completed", "100.0%"] for row in rows)

    r = cli("jobs", "--server", server.target, job_id)
    assert r.returncode == 0 and "state:     completed" in r.stdout

    seqs = random_sequences(teacher.vocab_size, [4, 19, 1, 33, 7], seed=6)
    data = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": s.tolist()} for s in seqs])
    out = tmp_path / "out" / "x.npz"
    r = cli("fetch", "--server", server.target, "--data", str(data), "--out", str(out),
            "--batch", "2", "--top-k", "8", *USE_FLAGS)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "5 records" in r.stdout
    expected = client.get_distributions(seqs, top_k=8)
    with np.load(out) as z:
        assert z["offsets"].tolist() == [0, 4, 23, 24, 57, 64]
        assert z["keys"].tolist() == [e.key for e in expected]
        np.testing.assert_array_equal(z["input_ids"], np.concatenate(seqs))
        for name in ("token_ids", "logprobs", "target_logprobs"):
            np.testing.assert_array_equal(
                z[name], np.concatenate([getattr(e, name) for e in expected])
            )


def test_cli_errors(server, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [3,\n')
    for command in ("submit", "fetch"):
        extra = ["--dataset", "client-never"] if command == "submit" else ["--out", "x.npz"]
        r = cli(command, "--server", server.target, "--data", str(bad), *extra)
        assert r.returncode == 2
        assert f"{bad}:2:" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "a b c"}])
    r = cli("fetch", "--server", server.target, "--data", str(texts), "--out", "x.npz")
    assert r.returncode == 2 and f"{texts}:1:" in r.stderr and "submit" in r.stderr

    r = cli("jobs", "--server", server.target, "no-such-job")
    assert r.returncode == 2
    assert r.stderr.strip() == "logitcache: error: NOT_FOUND: job 'no-such-job' does not exist"

    r = cli("submit", "--server", server.target, "--dataset", "../x", "--data", str(texts))
    assert r.returncode == 2
    assert r.stderr.startswith("logitcache: error: INVALID_ARGUMENT: ")

    r = cli("submit", "--help")
    assert r.returncode == 0 and "--server-path" in r.stdout and "--wait" in r.stdout
