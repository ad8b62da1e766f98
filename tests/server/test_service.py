"""The gRPC service against a real `logitcache serve` process, called through the raw stubs.

Every test talks to the session's shared server (demo teacher, k up to 64, default 16) as a
remote trainer would: read-through equals an offline precompute, concurrent clients share one
computation, job streaming is partitioned, deterministic and resumable, bad requests get the
documented status codes without hurting the server, and health, reflection and metrics work.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from declared_use import MESSAGE
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import logitcache
from logitcache.client.record import Record
from logitcache.client.wire import decode_batch
from logitcache.demo.language import generate_documents
from logitcache.server.launcher import ServerProcess
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

STEP = 1 / 64  # one quantisation step of the default codec, in nats
TOL = STEP + 1e-5
K = 16  # the shared server's default top-k
RPC_S = 120.0  # deadline of every call
JOB_S = 300.0  # longest wait for a job
SERVICE = "logitcache.v1.LogitCache"
ACTIVE = ("queued", "running")
Code = grpc.StatusCode


# ---- helpers --------------------------------------------------------------------------------


def make_stub(target: str) -> tuple[grpc.Channel, pb_grpc.LogitCacheStub]:
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
        ],
    )
    return channel, pb_grpc.LogitCacheStub(channel)


def request(sequences: Iterable[Sequence[int]], top_k: int = K, teacher: str = ""):
    return pb.DistributionsRequest(
        use=MESSAGE,
        teacher=teacher,
        top_k=top_k,
        sequences=[pb.Sequence(input_ids=[int(t) for t in s]) for s in sequences],
    )


def distributions(stub, sequences, top_k: int = K, teacher: str = "") -> pb.DistributionsResponse:
    """One GetDistributions request on its own stream; its single response."""
    responses = list(
        stub.GetDistributions(iter([request(sequences, top_k, teacher)]), timeout=RPC_S)
    )
    assert len(responses) == 1
    return responses[0]


def random_sequences(seed: int, count: int, vocab: int, lengths=(3, 60)) -> list[np.ndarray]:
    """Sequences no other test sends (a seed per test); ids avoid the special tokens 0-3."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(4, vocab, size=int(rng.integers(*lengths)), dtype=np.int64)
        for _ in range(count)
    ]


def expect_error(code: grpc.StatusCode, call: Callable[[], object], match: str = "") -> str:
    """``call`` makes one complete call (reading a streamed answer to its end)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    assert match in err.details(), f"{match!r} not in {err.details()!r}"
    return err.details()


def scrape(http_url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def computed_positions(http_url: str) -> float:
    key = ("logitcache_positions_computed_total", frozenset({("teacher", "demo")}))
    return scrape(http_url).get(key, 0.0)


def submit_job(stub, dataset: str, texts: Sequence[str], top_k: int = K) -> pb.Job:
    items = [pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset=dataset, top_k=top_k))]
    items += [pb.SubmitJobRequest(text=t) for t in texts]
    return stub.SubmitJob(iter(items), timeout=RPC_S)


def wait_job(stub, job_id: str, timeout: float = JOB_S) -> pb.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=RPC_S)
        if job.state not in ACTIVE:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state} after {timeout} s"
        time.sleep(0.1)


def stream(stub, dataset: str, **fields) -> list[pb.RecordBatch]:
    return list(
        stub.StreamDataset(pb.StreamDatasetRequest(dataset=dataset, **fields), timeout=RPC_S)
    )


def indices_of(batches: Iterable[pb.RecordBatch]) -> list[int]:
    return [int(i) for b in batches for i in b.indices]


def assert_same_record(got: Record, want: Record) -> None:
    """Bit-identical records (both decoded from the same stored codec arrays)."""
    assert got.key == want.key
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)
    np.testing.assert_array_equal(got.target_logprobs, want.target_logprobs)


def assert_close_rows(got: Record, want: Record, max_swapped_rows: float = 0.01) -> None:
    """Two captures of one sequence: the same ids up to rare tie swaps, log-probs within a step."""
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    assert got.token_ids.shape == want.token_ids.shape
    # Rows are sorted by descending probability, so values compare position by position even
    # where two near-equal entries swapped places.
    assert np.abs(got.logprobs - want.logprobs).max() <= TOL
    assert np.isnan(got.target_logprobs[-1]) and np.isnan(want.target_logprobs[-1])
    assert np.abs(got.target_logprobs[:-1] - want.target_logprobs[:-1]).max(initial=0) <= TOL
    differ = got.token_ids != want.token_ids
    rows = np.flatnonzero(differ.any(axis=1))
    assert rows.size <= max(1, max_swapped_rows * len(got)), f"ids differ in rows {rows}"
    k = got.token_ids.shape[1]
    for t, j in zip(*np.nonzero(differ), strict=True):
        if j == k - 1:
            continue  # the k-th entry may tie with the (k+1)-th, which is not stored
        # a tie swap: the id sits elsewhere in the other row with (nearly) the same log-prob
        (where,) = np.nonzero(want.token_ids[t] == got.token_ids[t, j])
        assert where.size == 1, f"row {t}: id {got.token_ids[t, j]} missing from the other capture"
        assert abs(want.logprobs[t, where[0]] - got.logprobs[t, j]) <= 2 * TOL


def check_ok(stub, known: Sequence[int] | None = None) -> None:
    """A normal call still succeeds (and a sequence cached before is still a hit)."""
    teachers = stub.ListTeachers(pb.ListTeachersRequest(), timeout=RPC_S)
    assert [t.name for t in teachers.teachers] == ["demo"]
    if known is not None:
        resp = distributions(stub, [known])
        assert resp.computed == 0
        (rec,) = decode_batch(resp.records)
        np.testing.assert_array_equal(rec.input_ids, known)


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(server):
    channel, stub = make_stub(server.target)
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def teacher_info(stub) -> pb.TeacherInfo:
    (info,) = stub.ListTeachers(pb.ListTeachersRequest(), timeout=RPC_S).teachers
    return info


@pytest.fixture(scope="module")
def built(stub):
    """A dataset built by a job on the server, with every state the job reported on WatchJob."""
    name = "svc-stream"
    texts = generate_documents(60, seed=5150)
    job = submit_job(stub, name, texts)
    updates = list(stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=JOB_S))
    return name, texts, job, updates


# ---- 1. read-through equals offline precompute ----------------------------------------------


def test_read_through_equals_offline_precompute(
    stub, server, demo_teacher, demo_sequences, tmp_path, precompute_in_process
):
    seqs = [np.asarray(s, dtype=np.int64) for s in demo_sequences]
    assert max(len(s) for s in seqs) >= 700 and min(len(s) for s in seqs) == 1
    first = distributions(stub, seqs)
    assert first.records.k == K and first.records.vocab_size == 1785
    got = decode_batch(first.records)
    assert len(got) == len(seqs)
    for rec, ids in zip(got, seqs, strict=True):  # one record per sequence, in request order
        np.testing.assert_array_equal(rec.input_ids, ids)
        assert rec.token_ids.shape == (len(ids), K)

    # Asked again: every record is a cache hit, and the answer is the same.
    again = distributions(stub, seqs)
    assert again.computed == 0
    for a, b in zip(decode_batch(again.records), got, strict=True):
        assert_same_record(a, b)

    data = tmp_path / "f.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s.tolist()}) + "\n" for s in seqs))
    out = tmp_path / "offline"
    # `logitcache precompute` in this process, on the session engine: another engine than the
    # server's, as an offline run's would be, without a third engine start.
    precompute_in_process("--teacher", str(demo_teacher), "--data", str(data), "--out", str(out),
                          "--dataset", "x", "--top-k", str(K), "--no-progress")  # fmt: skip
    offline = logitcache.open_store(str(out)).dataset("x")
    assert len(offline) == len(seqs) and offline.complete
    for i, rec in enumerate(got):
        want = offline[i]
        assert rec.key == want.key  # same capture space, same sequence: the same key
        assert_close_rows(rec, want)


# ---- 2. concurrent identical requests share one computation ---------------------------------


def test_concurrent_clients_compute_each_sequence_once(server, teacher_info):
    unique = random_sequences(seed=2202, count=16, vocab=teacher_info.vocab_size)
    clients = 8
    # Client c asks for 8 of the 16 sequences, starting at 2c: every sequence is asked for by
    # four clients, and every pair of neighbouring clients overlaps.
    wanted = [[(2 * c + j) % len(unique) for j in range(8)] for c in range(clients)]
    before = computed_positions(server.http_url)
    barrier = threading.Barrier(clients, timeout=60)

    def client(c: int) -> tuple[int, list[Record]]:
        channel, stub = make_stub(server.target)
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            barrier.wait()  # all clients send at the same moment
            resp = distributions(stub, [unique[i] for i in wanted[c]])
            return resp.computed, decode_batch(resp.records)
        finally:
            channel.close()

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients), timeout=RPC_S + 60))

    by_sequence: dict[int, Record] = {}
    for c, (_, records) in enumerate(results):
        assert len(records) == len(wanted[c])
        for i, rec in zip(wanted[c], records, strict=True):
            np.testing.assert_array_equal(rec.input_ids, unique[i])
            if i in by_sequence:
                assert_same_record(rec, by_sequence[i])
            else:
                by_sequence[i] = rec
    assert sorted(by_sequence) == list(range(len(unique)))
    assert sum(computed for computed, _ in results) == len(unique)
    after = computed_positions(server.http_url)
    assert after - before == sum(len(s) for s in unique)


# ---- 3. jobs and streaming ------------------------------------------------------------------


def test_job_reports_progress_until_completed(built):
    name, texts, job, updates = built
    assert job.state in ACTIVE and job.id
    assert job.spec.dataset == name and job.spec.teacher == "demo" and job.spec.top_k == K
    assert job.sequences_total == len(texts) and job.positions_total > len(texts)
    states = [u.state for u in updates]
    assert states[-1] == "completed", updates[-1].error
    assert set(states[:-1]) <= set(ACTIVE)
    if "running" in states:  # queued, then running; never back
        started = states.index("running")
        assert set(states[:started]) <= {"queued"} and set(states[started:-1]) == {"running"}
    done = [u.positions_done for u in updates]
    assert done == sorted(done)
    assert [u.sequences_done for u in updates] == sorted(u.sequences_done for u in updates)
    last = updates[-1]
    assert last.positions_done == last.positions_total == job.positions_total
    assert last.sequences_done == last.sequences_total == len(texts)
    assert last.finished_at >= last.started_at >= last.created_at > 0
    assert last.eta_seconds == 0


def test_running_job_reports_positions_done(built):
    _, _, _, updates = built
    midway = [u for u in updates if u.state == "running" and 0 < u.sequences_done < len(built[1])]
    if not midway:
        pytest.skip("the job finished before WatchJob could report it half done")
    for u in midway:
        assert 0 < u.positions_done < u.positions_total, (u.sequences_done, u.positions_done)


def test_stream_partitions_shuffles_and_matches_the_store(stub, server, built):
    name, texts, _, _ = built
    n = len(texts)
    info = stub.DescribeDataset(pb.DescribeDatasetRequest(dataset=name), timeout=RPC_S)
    assert info.state == "complete" and info.sequences == info.sealed_sequences == n
    assert info.space.k == K

    store_ds = logitcache.open_store(str(server.store)).dataset(name)
    assert len(store_ds) == n
    whole = stream(stub, name, seed=7, epoch=0, batch_records=5)
    order = indices_of(whole)
    assert sorted(order) == list(range(n)) and order != list(range(n))
    assert [b.cursor for b in whole] == [min(5 * (i + 1), n) for i in range(len(whole))]
    for batch in whole:
        assert batch.k == K and batch.space_id == store_ds.space.space_id
        records = decode_batch(batch)
        assert len(records) == len(batch.indices)
        for i, rec in zip(batch.indices, records, strict=True):
            assert_same_record(rec, store_ds[int(i)])

    for world in (1, 2, 3):
        per_rank = [
            indices_of(
                stream(stub, name, rank=r, world_size=world, seed=7, epoch=0, batch_records=4)
            )
            for r in range(world)
        ]
        seen = [i for part in per_rank for i in part]
        assert len(seen) == len(set(seen)) == n, f"world {world}: ranks overlap or miss records"
        assert set(seen) == set(range(n))
        # Rank r reads the global positions p with p % world == r of the one global order.
        for r, part in enumerate(per_rank):
            assert part == order[r::world], f"world {world}, rank {r}"

    assert indices_of(stream(stub, name, seed=7, epoch=0, batch_records=9)) == order
    other_epoch = indices_of(stream(stub, name, seed=7, epoch=1))
    assert sorted(other_epoch) == list(range(n)) and other_epoch != order
    other_seed = indices_of(stream(stub, name, seed=8, epoch=0))
    assert sorted(other_seed) == list(range(n)) and other_seed != order
    assert indices_of(stream(stub, name, no_shuffle=True, batch_records=7)) == list(range(n))


def test_stream_resumes_from_a_cursor(stub, built):
    name, texts, _, _ = built
    for world, rank in ((1, 0), (3, 1)):
        args = dict(rank=rank, world_size=world, seed=11, epoch=2, batch_records=4)
        full = stream(stub, name, **args)
        assert len(full) >= 4
        cut = full[2].cursor
        rest = stream(stub, name, start_cursor=cut, **args)
        assert indices_of(rest) == indices_of(full[3:])
        for a, b in zip(rest, full[3:], strict=True):
            assert a.cursor == b.cursor
            for x, y in zip(decode_batch(a), decode_batch(b), strict=True):
                assert_same_record(x, y)
        last = stream(stub, name, start_cursor=full[-1].cursor, **args)
        assert last == []  # resuming after the last batch: nothing left, no error


# ---- 4. bad input: status codes, and the server goes on --------------------------------------


def test_bad_sequences_are_refused_and_nothing_is_computed(stub, server, teacher_info):
    vocab, limit = teacher_info.vocab_size, teacher_info.max_sequence_len
    assert limit == 1023  # max_position_embeddings 1024
    known, *fresh = random_sequences(seed=4404, count=3, vocab=vocab)
    distributions(stub, [known])
    before = computed_positions(server.http_url)
    refused = [
        (Code.INVALID_ARGUMENT, [fresh[0], []], {}, "sequence 1"),
        (Code.INVALID_ARGUMENT, [fresh[0], fresh[1], [5, 6, vocab, 7]], {}, "sequence 2"),
        (Code.INVALID_ARGUMENT, [fresh[0], np.full(limit + 1, 9)], {}, "sequence 1"),
        (Code.INVALID_ARGUMENT, [fresh[0]], {"top_k": 65}, "top_k"),
        (Code.NOT_FOUND, [fresh[0]], {"teacher": "nope"}, "nope"),
        (Code.RESOURCE_EXHAUSTED, [[5]] * 4097, {}, "4096"),
    ]
    for code, sequences, fields, match in refused:
        call = functools.partial(distributions, stub, sequences, **fields)
        msg = expect_error(code, call, match)
        if match == "sequence 2":
            assert str(vocab) in msg  # the offending id and the vocabulary are named
        check_ok(stub, known)
    # A refused request computes nothing and leaves nothing behind.
    assert computed_positions(server.http_url) == before
    resp = distributions(stub, [fresh[0], fresh[1]])
    assert resp.computed == 2
    # The longest accepted sequence, and a request with k = 0 (the server's default).
    longest = random_sequences(seed=4405, count=1, vocab=vocab, lengths=(limit, limit + 1))[0]
    assert len(longest) == limit
    resp = distributions(stub, [longest], top_k=0)
    assert resp.computed == 1 and resp.records.k == teacher_info.default_top_k == K
    (rec,) = decode_batch(resp.records)
    assert rec.token_ids.shape == (limit, K)
    # An error inside a stream ends that stream only; earlier responses were delivered.
    responses = stub.GetDistributions(
        iter([request([fresh[0]]), request([[]]), request([fresh[1]])]), timeout=RPC_S
    )
    first = next(responses)
    assert first.computed == 0
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == Code.INVALID_ARGUMENT
    check_ok(stub, fresh[0])


def test_unknown_names_and_bad_job_requests(stub, built):
    name, texts, job, _ = built
    known = random_sequences(seed=4406, count=1, vocab=1785)[0]
    distributions(stub, [known])
    expect_error(
        Code.NOT_FOUND,
        lambda: stub.DescribeDataset(pb.DescribeDatasetRequest(dataset="no-such"), timeout=RPC_S),
        "no-such",
    )
    check_ok(stub, known)
    unknown = "0123abcd"
    expect_error(Code.NOT_FOUND, lambda: stub.GetJob(pb.GetJobRequest(id=unknown), timeout=RPC_S))
    check_ok(stub, known)
    expect_error(
        Code.NOT_FOUND, lambda: stub.CancelJob(pb.CancelJobRequest(id=unknown), timeout=RPC_S)
    )
    check_ok(stub, known)
    expect_error(
        Code.NOT_FOUND, lambda: list(stub.WatchJob(pb.WatchJobRequest(id=unknown), timeout=RPC_S))
    )
    check_ok(stub, known)
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: stub.SubmitJob(iter([pb.SubmitJobRequest(text="hello")]), timeout=RPC_S),
        "spec",
    )
    check_ok(stub, known)
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: stub.SubmitJob(
            iter([pb.SubmitJobRequest(spec=pb.JobSpec(use=MESSAGE, dataset="bad name!")),
                  pb.SubmitJobRequest(text=texts[0])]),
            timeout=RPC_S,
        ),
    )  # fmt: skip
    check_ok(stub, known)
    assert stub.GetJob(pb.GetJobRequest(id=job.id), timeout=RPC_S).state == "completed"
    expect_error(
        Code.FAILED_PRECONDITION,
        lambda: stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=RPC_S),
    )
    check_ok(stub, known)
    expect_error(Code.NOT_FOUND, lambda: stream(stub, "no-such"), "no-such")
    check_ok(stub, known)
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: stream(stub, name, start_cursor=len(texts) + 1),
        "start_cursor",
    )
    check_ok(stub, known)
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: stream(stub, name, rank=2, world_size=2),
        "rank",
    )
    assert len(indices_of(stream(stub, name))) == len(texts)


def test_submitting_other_content_under_an_existing_name_is_already_exists(stub, built):
    name, texts, _, _ = built
    expect_error(
        Code.ALREADY_EXISTS,
        lambda: submit_job(stub, name, texts[:3]),
        name,
    )


# ---- 5. a client that goes away mid-stream ----------------------------------------------------


def test_client_cancelling_a_stream_leaves_the_server_serving(stub, server, built):
    name, texts, _, _ = built
    known = random_sequences(seed=5505, count=1, vocab=1785)[0]
    distributions(stub, [known])
    for _ in range(5):
        call = stub.StreamDataset(
            pb.StreamDatasetRequest(dataset=name, seed=3, batch_records=1), timeout=RPC_S
        )
        first = next(call)
        assert len(first.keys) == 1
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == Code.CANCELLED
    # and with a channel that is closed under the stream
    channel, other = make_stub(server.target)
    call = other.StreamDataset(
        pb.StreamDatasetRequest(dataset=name, batch_records=1), timeout=RPC_S
    )
    next(call)
    channel.close()
    check_ok(stub, known)
    again = stream(stub, name, seed=3, batch_records=16)
    assert sorted(indices_of(again)) == list(range(len(texts)))


def test_abandoned_stream_leaves_no_task_behind(server, built):
    """In process: the streamer's producer task ends when its reader goes away."""
    from logitcache.server.store.cache import SegmentCache
    from logitcache.server.streaming import DatasetStreamer, StreamRequest

    name = built[0]

    async def abandon() -> list[str]:
        streamer = DatasetStreamer(
            logitcache.open_store(str(server.store)), SegmentCache(1 << 28), prefetch=2
        )
        try:
            async with asyncio.timeout(30):
                batches = streamer.stream(StreamRequest(dataset=name, batch_records=1))
                await batches.__anext__()
                await asyncio.sleep(1.0)  # the producer fills the prefetch queue, then waits
                await batches.aclose()  # what happens when the client goes away
                await asyncio.sleep(1.0)
            return [repr(t) for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        finally:
            streamer.close()

    left = asyncio.run(abandon())
    assert left == [], f"tasks left running: {left}"


# ---- 6. health, reflection, HTTP side ---------------------------------------------------------


def test_health_reflection_and_http_side(stub, server):
    channel = grpc.insecure_channel(server.target)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for s in answer.list_services_response.service}
        assert SERVICE in services and "grpc.health.v1.Health" in services
    finally:
        channel.close()

    with urllib.request.urlopen(f"{server.http_url}/healthz", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{server.http_url}/readyz", timeout=10) as r:
        assert r.status == 200
        body = json.loads(r.read())
    assert body["ready"] is True and body["checks"]["engine"] and body["checks"]["store"]

    stub.ListTeachers(pb.ListTeachersRequest(), timeout=RPC_S)
    with pytest.raises(grpc.RpcError):
        stub.GetJob(pb.GetJobRequest(id="feedfacefeedface"), timeout=RPC_S)
    samples = scrape(server.http_url)
    requests = {
        dict(labels)["method"] + "/" + dict(labels)["code"]: value
        for (sample, labels), value in samples.items()
        if sample == "logitcache_requests_total"
    }
    assert requests.get("ListTeachers/OK", 0) >= 1
    assert requests.get("GetJob/NOT_FOUND", 0) >= 1


# ---- 7. kill -9 during a job, restart on the same store ----------------------------------------


def sealed_segments(store: Path) -> int:
    return len(list(store.glob("spaces/*/segments/*")))


def test_killed_server_resumes_its_job_after_restart(
    stub, server, server_args, demo_teacher, tmp_path
):
    texts = generate_documents(200, seed=7707)
    # The same texts computed by an uninterrupted job on the shared server (same teacher, same
    # k: the same capture space), running while the other server starts.
    reference_job = submit_job(stub, "svc-restart-reference", texts)

    store = tmp_path / "store"
    args = (*server_args, "--segment-positions", "500")
    # Each process logs to a file of its own, to tell the killed server's log from its successor's.
    first = ServerProcess(demo_teacher, store, *args, log_path=tmp_path / "first.log")
    try:
        channel, own = make_stub(first.target)
        job = submit_job(own, "svc-restarted", texts)
        deadline = time.monotonic() + JOB_S
        while sealed_segments(store) < 2:
            assert time.monotonic() < deadline, "no 2 sealed segments in time"
            time.sleep(0.02)
        state = own.GetJob(pb.GetJobRequest(id=job.id), timeout=RPC_S).state
        assert state in ACTIVE, f"the job ended ({state}) before the kill; make it longer"
        first.kill()
        channel.close()
    finally:
        first.kill()

    # The kill landed in the middle of the job: some records sealed, not all, nothing complete.
    saved = json.loads((store / "jobs" / job.id / "job.json").read_text())
    assert saved["state"] in ACTIVE
    partial = logitcache.open_store(str(store)).dataset("svc-restarted")
    assert not partial.complete and 0 < partial.sealed_count() < len(texts)

    second = ServerProcess(demo_teacher, store, *args, log_path=tmp_path / "second.log")
    try:
        channel, own = make_stub(second.target)
        done = wait_job(own, job.id)
        assert done.state == "completed", done.error
        assert done.sequences_done == done.sequences_total == len(texts)
        assert done.positions_done == done.positions_total == job.positions_total
        info = own.DescribeDataset(
            pb.DescribeDatasetRequest(dataset="svc-restarted"), timeout=RPC_S
        )
        assert info.state == "complete" and info.sequences == len(texts)
        served = [
            rec
            for batch in stream(own, "svc-restarted", no_shuffle=True, batch_records=50)
            for rec in decode_batch(batch)
        ]
        channel.close()
    finally:
        second.stop()

    assert wait_job(stub, reference_job.id).state == "completed"
    reference = logitcache.open_store(str(server.store)).dataset("svc-restart-reference")
    restarted = logitcache.open_store(str(store)).dataset("svc-restarted")
    assert restarted.complete and restarted.space == reference.space
    assert restarted.keys == reference.keys
    assert len(served) == len(texts)
    for i, rec in enumerate(served):
        assert_same_record(rec, restarted[i])
        want = reference[i]
        np.testing.assert_array_equal(rec.input_ids, want.input_ids)
        np.testing.assert_array_equal(rec.token_ids, want.token_ids)
        assert np.abs(rec.logprobs - want.logprobs).max() <= TOL
        np.testing.assert_allclose(rec.target_logprobs, want.target_logprobs, rtol=0, atol=TOL)
