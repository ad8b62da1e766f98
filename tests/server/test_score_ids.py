"""ScoreIds through the real servicer and client, on the reference engine in process: the scores
are the teacher's full log-softmax at the ids asked for, the stored record comes back where the
store has one, nothing new is stored, bad id sets (more ids at a position than the server's
max_ids_per_position, set small here) and a consumer's call are refused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from counting_engine import REFERENCE_K

from logitcache.client.client import Client, use_message
from logitcache.client.space import record_key
from logitcache.client.use import Use
from logitcache.server.config import ServerConfig
from logitcache.server.engine.reference import TransformersReference
from logitcache.server.grpc.servicer import LogitCacheService
from logitcache.server.jobs import JobManager
from logitcache.server.metrics import ServerMetrics
from logitcache.server.policy.gate import PolicyGate
from logitcache.server.policy.governance import Governance
from logitcache.server.policy.state import Limits, open_state
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.spool import teacher_tokenize
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import Store, open_store
from logitcache.server.streaming import DatasetStreamer
from logitcache.trainer.online import online_reverse_kl, service_scorer
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

USE = Use("research", "scoring-student", "test", "tests")
VOCAB = 1785
MAX_IDS = 64  # the served core's max_ids_per_position


@dataclass
class Scoring:
    target: str
    store: Store
    consumer: str  # a consumer's token
    producer: str  # a producer's token that may compute 10 positions a day

    def client(self, token: str | None = None) -> Client:
        return Client(self.target, token=token, retries=0, timeout=30, use=USE)


@pytest.fixture(scope="module")
def scoring(tmp_path_factory, reference_teachers, loop_thread) -> Iterator[Scoring]:
    """A served core (anonymous callers are admins) with a consumer's token."""
    root = tmp_path_factory.mktemp("score-ids")
    store = open_store(str(root / "store"), writable=True)
    state = open_state(root / "state")
    consumer, _ = Governance(state).create_token("carol", "consumer")
    producer, status = Governance(state).create_token("pat", "producer")
    Governance(state).set_limits(status.record.id, Limits(positions_computed_per_day=10))
    gate = PolicyGate(state, allow_anonymous=True)

    async def start() -> tuple[int, grpc.aio.Server, ReadThroughCache, JobManager, DatasetStreamer]:
        metrics, loaded = ServerMetrics(), SegmentCache(1 << 26)
        readthrough = ReadThroughCache(store, metrics, segment_positions=1 << 16,
                                       flush_seconds=0.5, loaded=loaded,
                                       max_unsealed_bytes=1 << 26)  # fmt: skip
        streamer = DatasetStreamer(store, loaded, prefetch=2)
        jobs = JobManager(store, reference_teachers, metrics, max_running=1, max_in_flight=4,
                          segment_positions=1 << 16)  # fmt: skip
        config = ServerConfig(store=str(root / "store"), max_tokens_per_request=4096,
                              max_ids_per_position=MAX_IDS)  # fmt: skip
        service = LogitCacheService(config, store, reference_teachers, readthrough, streamer,
                                    jobs, metrics, gate=gate)  # fmt: skip
        server = grpc.aio.server()
        service.add_to_server(server)
        readthrough.start()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return port, server, readthrough, jobs, streamer

    port, server, readthrough, jobs, streamer = loop_thread.run(start())
    yield Scoring(f"127.0.0.1:{port}", store, consumer, producer)

    async def stop() -> None:
        await server.stop(None)
        await gate.close()
        await jobs.close()
        await readthrough.close()

    loop_thread.run(stop())
    streamer.close()


@pytest.fixture(scope="module")
def reference(demo_teacher: Path) -> TransformersReference:
    return TransformersReference(demo_teacher)


def random_ids(rng: np.random.Generator, length: int, width: int) -> np.ndarray:
    """[length, width] distinct ids per row, a random number of them kept, -1 after."""
    ids = np.stack([rng.choice(VOCAB, width, replace=False) for _ in range(length)])
    keep = rng.integers(0, width + 1, size=(length, 1))
    return np.where(np.arange(width) < keep, ids, -1)


def test_scores_are_the_full_log_softmax_at_the_ids(scoring, reference) -> None:
    rng = np.random.default_rng(0)
    sequences = [rng.integers(4, VOCAB, n) for n in (1, 9, 40)]
    # 64 ids at a position: at the served bound, which allows them
    ids = [random_ids(rng, len(s), w) for s, w in zip(sequences, (3, 16, MAX_IDS), strict=True)]
    ids[1][4] = -1  # a position with nothing to score
    with scoring.client() as client:
        scored = client.score_ids(sequences, ids)
    for seq, asked, got in zip(sequences, ids, scored, strict=True):
        full = reference.full_logprobs(seq).numpy()
        want = np.where(asked >= 0, np.take_along_axis(full, np.maximum(asked, 0), 1), -np.inf)
        assert got.logprobs.shape == asked.shape and got.logprobs.dtype == np.float32
        np.testing.assert_allclose(got.logprobs, want, rtol=0, atol=1e-5)
        assert got.record is None


def test_the_stored_record_comes_back_and_scoring_stores_nothing(
    scoring, reference_teachers
) -> None:
    rng = np.random.default_rng(1)
    cached, fresh = rng.integers(4, VOCAB, 12), rng.integers(4, VOCAB, 7)
    with scoring.client() as client:
        [record] = client.get_distributions([cached], durable=True)
        first, second = client.score_ids([cached, fresh], [random_ids(rng, 12, 8),
                                                           random_ids(rng, 7, 8)])  # fmt: skip
    assert first.record is not None and second.record is None
    assert first.record.key == record.key
    np.testing.assert_array_equal(first.record.input_ids, record.input_ids)
    np.testing.assert_array_equal(first.record.token_ids, record.token_ids)
    np.testing.assert_array_equal(first.record.logprobs, record.logprobs)
    space = reference_teachers.get("").space(REFERENCE_K)  # the default space read-through fills
    assert scoring.store.contains(record_key(space.space_id, cached))
    assert not scoring.store.contains(record_key(space.space_id, fresh))


def test_bad_id_sets_are_invalid_arguments_naming_the_sequence(scoring) -> None:
    rng = np.random.default_rng(2)
    seqs = [rng.integers(4, VOCAB, 5), rng.integers(4, VOCAB, 6)]
    good = random_ids(rng, 5, 4)
    too_many = np.tile(np.arange(MAX_IDS + 1), (6, 1))
    outside = random_ids(rng, 6, 4)
    outside[2, 0] = VOCAB
    with scoring.client() as client:
        bound = f"65 ids at position 0; at most {MAX_IDS} per position (the server's max_ids_"
        for bad, words in ((too_many, bound), (outside, "outside")):
            with pytest.raises(grpc.RpcError) as raised:
                client.score_ids(seqs, [good, bad])
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "sequence 1" in raised.value.details() and words in raised.value.details()
    # Counts that do not fit the sequence, over the raw stub (the client cannot send them).
    request = pb.ScoreIdsRequest(
        sequences=[pb.Sequence(input_ids=s.tolist()) for s in seqs],
        ids=[pb.IdSets(ids=[1, 2], counts=[1, 1, 0, 0, 0]), pb.IdSets(ids=[1], counts=[1])],
        use=use_message(USE),
    )
    with grpc.insecure_channel(scoring.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            list(pb_grpc.LogitCacheStub(channel).ScoreIds(iter([request]), timeout=30))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence 1: 1 id counts for 6 positions" in raised.value.details()


def test_a_consumer_may_not_score(scoring) -> None:
    with scoring.client(scoring.consumer) as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.score_ids([[5, 6, 7]], [np.array([[1], [2], [3]])])
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_scoring_without_a_declared_use_is_refused(scoring) -> None:
    with Client(scoring.target, retries=0, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.score_ids([[5, 6, 7]], [np.array([[1], [2], [3]])])
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_online_reverse_kl_scores_the_students_top_m_through_the_service(
    scoring, reference
) -> None:
    """The trainer's loss with the teacher scored by the server equals it with the teacher's
    values from the reference's own full log-softmax."""
    input_ids = torch.from_numpy(np.random.default_rng(3).integers(4, VOCAB, (2, 6)))
    attention_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    logits = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(3)).requires_grad_()

    def from_reference(sequences: list[np.ndarray], ids: list[np.ndarray]) -> list[np.ndarray]:
        return [np.take_along_axis(reference.full_logprobs(s).numpy(), i, 1)
                for s, i in zip(sequences, ids, strict=True)]  # fmt: skip

    with scoring.client() as client:
        served = online_reverse_kl(logits, input_ids, attention_mask, service_scorer(client), m=8)
    (served_grad,) = torch.autograd.grad(served, logits)
    want = online_reverse_kl(logits, input_ids, attention_mask, from_reference, m=8)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(served, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served_grad, want_grad, rtol=1e-4, atol=1e-8)


def test_sequences_with_sensitive_data_are_refused(scoring, reference_teachers) -> None:
    """Every scored sequence reaches the teacher, so the server's filter screens each one."""
    secret = teacher_tokenize(reference_teachers.get("").info)(["mail alice@example.com now"])[0]
    seqs = [np.arange(4, 10), np.asarray(secret)]
    ids = [np.ones((len(s), 1), dtype=np.int64) for s in seqs]
    with scoring.client() as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.score_ids(seqs, ids)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert details.startswith("sequence 1 contains sensitive data") and "alice" not in details


def test_scored_positions_count_as_computed(scoring) -> None:
    """Scoring computes every position it answers: the producer's daily computed positions
    (10) allow two calls of 8 and refuse the third."""
    seqs, ids = [np.arange(4, 12)], [np.ones((8, 2), dtype=np.int64)]
    with scoring.client(scoring.producer) as client:
        for _ in range(2):
            client.score_ids(seqs, ids)
        with pytest.raises(grpc.RpcError) as raised:
            client.score_ids(seqs, ids)
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "positions_computed_per_day limit of 10 reached" in (raised.value.details() or "")


def test_the_ids_of_a_request_count_against_its_token_limit(scoring) -> None:
    """4096 tokens per request on this server: 70 positions of 64 ids are too many at once."""
    seqs = [np.arange(4, 74)]
    ids = [np.tile(np.arange(MAX_IDS), (70, 1))]
    with scoring.client() as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.score_ids(seqs, ids)
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4480 ids to score in one request" in (raised.value.details() or "")
        [half] = client.score_ids(seqs, [ids[0][:, :32]])
    assert half.logprobs.shape == (70, 32) and np.isfinite(half.logprobs).all()


def test_the_bound_is_a_server_setting(tmp_path) -> None:
    """``--max-ids-per-position`` (or the config key, or LOGITCACHE_MAX_IDS_PER_POSITION) sets
    the bound; one below 1 is refused at start-up."""
    from logitcache.client.errors import InvalidArgument
    from logitcache.server.config import load_config

    store = str(tmp_path / "store")
    assert load_config(None, {"store": store}).max_ids_per_position == 256
    assert (
        load_config(None, {"store": store, "max_ids_per_position": "8"}).max_ids_per_position == 8
    )
    with pytest.raises(InvalidArgument, match="max_ids_per_position must be at least 1"):
        load_config(None, {"store": store, "max_ids_per_position": "0"})
