"""The policy on every RPC, through the real servicer and real clients: tokens, roles, access
lists, quotas, the extraction guard and the audit log.

Each test serves the real core (reference engine, real store) on loopback in process, with a
policy gate over a real state directory and a clock the test moves, so a daily quota resets
without waiting for midnight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from counting_engine import REFERENCE_K
from reference_server import ReferenceServer

from logitcache.cli import main
from logitcache.client.client import Client, use_message
from logitcache.client.space import record_key
from logitcache.client.use import Use
from logitcache.server.config import ServerConfig
from logitcache.server.grpc.servicer import LogitCacheService
from logitcache.server.jobs import JobManager
from logitcache.server.metrics import ServerMetrics
from logitcache.server.policy.audit import AuditLog, verify
from logitcache.server.policy.gate import PolicyGate
from logitcache.server.policy.governance import Governance
from logitcache.server.policy.guard import GuardAction, GuardPolicy
from logitcache.server.policy.state import DatasetAccess, open_state
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import Store, open_store
from logitcache.server.store.summary import StoreSummaries
from logitcache.server.store.writer import CapturedRecord
from logitcache.server.streaming import DatasetStreamer
from logitcache.server.teachers.registry import TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

Code = grpc.StatusCode
NOON = 1_796_126_400.0  # 2026-12-01 12:00 UTC
DAY = 86_400.0
USE_CLIENT = Use("research", "edge-student", "test", "tests")
USE = use_message(USE_CLIENT)


class Clock:
    def __init__(self) -> None:
        self.at = NOON

    def __call__(self) -> float:
        return self.at


@dataclass
class Edge:
    """A served core with its policy; ``tokens`` are the admin's, a producer's and two
    consumers' (``carol`` in group ``nlp``)."""

    target: str
    store: Store
    state_dir: Path
    clock: Clock
    tokens: dict[str, str]

    def client(self, who: str | None) -> Client:
        return Client(self.target, token=self.tokens[who] if who else None, retries=0, timeout=30)


class Served:
    """The core of one server, on ``loop``; ``start`` serves it with a gate."""

    def __init__(self, root: Path, teachers: TeacherRegistry, loop: asyncio.AbstractEventLoop):
        self.config = ServerConfig(store=str(root / "store"))
        self.teachers, self.loop = teachers, loop
        self.store = open_store(self.config.store, writable=True)
        self.metrics = ServerMetrics()
        loaded = SegmentCache(1 << 26)
        self.readthrough = ReadThroughCache(self.store, self.metrics, segment_positions=1 << 16,
                                            flush_seconds=0.5, loaded=loaded,
                                            max_unsealed_bytes=1 << 26)  # fmt: skip
        self.streamer = DatasetStreamer(self.store, loaded, prefetch=2)
        self.jobs = JobManager(self.store, teachers, self.metrics, max_running=1,
                               max_in_flight=4, segment_positions=1 << 16)  # fmt: skip
        self.server: grpc.aio.Server | None = None
        self.gate: PolicyGate | None = None

    async def start(self, gate: PolicyGate) -> str:
        self.gate = gate
        self.readthrough.start()
        service = LogitCacheService(self.config, self.store, self.teachers, self.readthrough,
                                    self.streamer, self.jobs, self.metrics,
                                    StoreSummaries(self.store), gate)  # fmt: skip
        self.server = grpc.aio.server()
        service.add_to_server(self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
        if self.gate is not None:
            await self.gate.close()

    async def close(self) -> None:
        await self.stop()
        await self.jobs.close()
        await self.readthrough.close()
        self.streamer.close()


def policy_gate(state_dir: Path, clock: Clock, **options) -> PolicyGate:
    return PolicyGate(
        open_state(state_dir),
        audit=AuditLog(state_dir / "audit"),
        clock=clock,
        dataset_positions=lambda names: 0,
        **options,
    )


@pytest.fixture
def served(tmp_path, reference_teachers, loop_thread) -> Iterator[Served]:
    core = Served(tmp_path, reference_teachers, loop_thread.loop)
    yield core
    loop_thread.run(core.close())


def tokens_for(state_dir: Path) -> dict[str, str]:
    """An admin made offline (the first admin's way in), the rest online by that admin."""
    state = open_state(state_dir)
    admin, _ = Governance(state).create_token("root", "admin")
    state.close()
    return {"admin": admin}


@pytest.fixture
def edge(served, tmp_path, loop_thread) -> Edge:
    state_dir, clock = tmp_path / "state", Clock()
    tokens = tokens_for(state_dir)
    target = loop_thread.run(served.start(policy_gate(state_dir, clock)))
    with Client(target, token=tokens["admin"]) as admin:
        for user, role, groups in (("pat", "producer", ()), ("carol", "consumer", ("nlp",)),
                                   ("dave", "consumer", ())):  # fmt: skip
            tokens[user] = admin.create_token(user, role, groups).token
    return Edge(target, served.store, state_dir, clock, tokens)


def make_dataset(
    served: Served, loop_thread, name: str, seed: int, owner: str | None, repeat: int = 1
) -> int:
    """A complete dataset of four sequences computed by the engine (no RPC, no policy), each
    ``repeat`` times; owned by ``owner`` as a job of its would make it. Its positions."""
    teacher = served.teachers.get("")
    space = teacher.space(REFERENCE_K)
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(4, 1785, size=int(rng.integers(5, 30))) for _ in range(4)]

    async def capture() -> list[CapturedRecord]:
        return [
            CapturedRecord.encode(record_key(space.space_id, s), s,
                                  await teacher.engine.capture(s, REFERENCE_K), space)
            for s in seqs
        ]  # fmt: skip

    records = loop_thread.run(capture())
    served.store.write_segment(space, records)
    positions = sum(len(s) for s in seqs) * repeat
    keys = [r.key for r in records] * repeat
    served.store.create_dataset(name, space, keys, positions, {})
    served.store.mark_complete(name)
    if owner is not None:
        state = open_state(served.store.backend.root.parent / "state")
        state.set_access(name, DatasetAccess(owner=owner))
        state.close()
    return positions


def code_of(call) -> tuple[Code, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details() or ""


def distributions(edge: Edge, who: str, seqs: list[list[int]]) -> pb.DistributionsResponse:
    """One GetDistributions request over the raw stub (with its use declaration)."""

    async def call() -> pb.DistributionsResponse:
        async with grpc.aio.insecure_channel(edge.target) as channel:
            stub = pb_grpc.LogitCacheStub(channel)
            request = pb.DistributionsRequest(
                sequences=[pb.Sequence(input_ids=s) for s in seqs], use=USE
            )
            metadata = (("authorization", f"Bearer {edge.tokens[who]}"),)
            [answer] = [r async for r in stub.GetDistributions(iter([request]), metadata=metadata)]
            return answer

    return asyncio.run(call())


# ---- authentication -----------------------------------------------------------------------------


def test_no_bad_or_revoked_token_is_unauthenticated(edge: Edge) -> None:
    with edge.client(None) as anonymous:
        code, message = code_of(anonymous.list_teachers)
    assert code is Code.UNAUTHENTICATED and "needs a token" in message
    with Client(edge.target, token="lc_" + "x" * 43, retries=0) as forged:
        code, message = code_of(forged.list_datasets)
    assert code is Code.UNAUTHENTICATED and "unknown token" in message
    with edge.client("admin") as admin:
        dave = next(t for t in admin.list_tokens() if t.user == "dave")
        assert admin.revoke_token(dave.id).revoked_at > 0
    with edge.client("dave") as revoked:
        code, message = code_of(revoked.list_datasets)
    assert code is Code.UNAUTHENTICATED and f"token {dave.id} was revoked" in message


def test_token_from_the_environment(edge: Edge, monkeypatch) -> None:
    monkeypatch.setenv("LOGITCACHE_TOKEN", edge.tokens["carol"])
    with Client(edge.target) as client:
        assert client.list_datasets() == []


# ---- roles and access lists ----------------------------------------------------------------------


def test_roles_refuse_what_they_do_not_allow(edge: Edge) -> None:
    with edge.client("carol") as consumer:
        code, message = code_of(lambda: consumer.get_distributions([[5, 6, 7]]))
        assert code is Code.PERMISSION_DENIED and "role consumer" in message
        code, _ = code_of(lambda: consumer.create_token("eve", "admin"))
        assert code is Code.PERMISSION_DENIED
    with edge.client("pat") as producer:
        code, message = code_of(producer.list_tokens)
        assert code is Code.PERMISSION_DENIED and "administer needs admin" in message


def test_a_consumer_reads_only_what_is_shared_with_it(edge: Edge, served, loop_thread) -> None:
    positions = make_dataset(served, loop_thread, "pats", seed=1, owner="pat")
    make_dataset(served, loop_thread, "secret", seed=2, owner="pat")
    with edge.client("carol") as carol:
        assert carol.list_datasets() == []
        code, message = code_of(lambda: list(carol.stream_dataset("pats")))
        assert code is Code.PERMISSION_DENIED and "not shared with user 'carol'" in message
        code, _ = code_of(lambda: carol.describe_dataset("pats"))
        assert code is Code.PERMISSION_DENIED
        code, _ = code_of(lambda: carol.share_dataset("pats", add_users=["carol"]))
        assert code is Code.PERMISSION_DENIED  # only its owner or an admin
    with edge.client("pat") as pat:
        access = pat.share_dataset("pats", add_groups=["nlp"])
        assert (access.owner, list(access.groups)) == ("pat", ["nlp"])
    with edge.client("carol") as carol:
        assert [d.name for d in carol.list_datasets()] == ["pats"]
        info = carol.describe_dataset("pats")
        assert (info.access.owner, list(info.access.groups)) == ("pat", ["nlp"])
        assert sum(len(r) for r in carol.stream_dataset("pats")) == positions
        code, _ = code_of(lambda: list(carol.stream_dataset("secret")))
        assert code is Code.PERMISSION_DENIED
    with edge.client("dave") as dave:  # not in the group
        code, _ = code_of(lambda: list(dave.stream_dataset("pats")))
        assert code is Code.PERMISSION_DENIED
    with edge.client("admin") as admin:
        assert {d.name for d in admin.list_datasets()} == {"pats", "secret"}
        code, _ = code_of(lambda: admin.share_dataset("nowhere", add_users=["x"]))
        assert code is Code.NOT_FOUND


# ---- quotas -------------------------------------------------------------------------------------


def test_served_positions_are_exhausted_then_recover_after_the_reset(edge, served, loop_thread):
    positions = make_dataset(served, loop_thread, "daily", seed=3, owner="carol")
    with edge.client("admin") as admin:
        carol = next(t for t in admin.list_tokens() if t.user == "carol")
        admin.set_limits(carol.id, positions_served_per_day=positions)
    with edge.client("carol") as client:
        assert sum(len(r) for r in client.stream_dataset("daily")) == positions
        code, message = code_of(lambda: list(client.stream_dataset("daily")))
        assert code is Code.RESOURCE_EXHAUSTED
        assert f"positions_served_per_day limit of {positions:,}" in message
        assert "resets at 2026-12-02T00:00:00+00:00" in message
        edge.clock.at += DAY
        assert sum(len(r) for r in client.stream_dataset("daily")) == positions
    with edge.client("admin") as admin:
        [carol] = [t for t in admin.list_tokens() if t.user == "carol"]
        assert carol.positions_served_today == positions


def test_computed_positions_are_exhausted_then_recover_and_hold_across_a_restart(
    edge, served, loop_thread
):
    with edge.client("admin") as admin:
        pat = next(t for t in admin.list_tokens() if t.user == "pat")
        admin.set_limits(pat.id, positions_computed_per_day=20)
    first = distributions(edge, "pat", [list(range(10, 35))])
    assert first.computed == 1
    code, message = code_of(lambda: distributions(edge, "pat", [list(range(40, 50))]))
    assert code is Code.RESOURCE_EXHAUSTED
    assert "positions_computed_per_day limit of 20 reached" in message and "resets at" in message

    loop_thread.run(served.stop())  # a restart: the same state directory, a new gate
    edge.target = loop_thread.run(served.start(policy_gate(edge.state_dir, edge.clock)))
    code, _ = code_of(lambda: distributions(edge, "pat", [list(range(40, 50))]))
    assert code is Code.RESOURCE_EXHAUSTED
    with edge.client("admin") as admin:
        [pat] = [t for t in admin.list_tokens() if t.user == "pat"]
        assert (pat.limits.positions_computed_per_day, pat.positions_computed_today) == (20, 25)
    edge.clock.at += DAY
    assert distributions(edge, "pat", [list(range(40, 50))]).computed == 1


def test_a_jobs_positions_count_as_computed_and_its_creator_owns_the_dataset(edge: Edge) -> None:
    with edge.client("admin") as admin:
        pat = next(t for t in admin.list_tokens() if t.user == "pat")
        admin.set_limits(pat.id, positions_computed_per_day=5)
    with Client(edge.target, token=edge.tokens["pat"], use=USE_CLIENT) as client:
        job = client.precompute("pats-job", input_ids=[[5, 6, 7, 8], [9, 10, 11]])
        assert client.wait(job, progress=False).state == "completed"
        assert client.describe_dataset("pats-job").access.owner == "pat"
        code, message = code_of(lambda: client.precompute("more", input_ids=[[1, 2]]))
        assert code is Code.RESOURCE_EXHAUSTED and "positions_computed_per_day" in message
    with edge.client("carol") as carol:  # a consumer sees no job, and may not cancel one
        code, _ = code_of(lambda: carol.cancel_job(job))
        assert code is Code.PERMISSION_DENIED
    with edge.client("admin") as admin:
        [pat] = [t for t in admin.list_tokens() if t.user == "pat"]
        assert pat.positions_computed_today == 7
        assert [j.id for j in admin.list_jobs()] == [job]


def test_concurrent_streams_and_request_rate(edge: Edge, served, loop_thread) -> None:
    # Long enough that the first stream cannot be sent whole before the client reads it.
    make_dataset(served, loop_thread, "open", seed=4, owner="carol", repeat=2000)
    with edge.client("admin") as admin:
        carol = next(t for t in admin.list_tokens() if t.user == "carol")
        admin.set_limits(carol.id, concurrent_streams=1, requests_per_second=3)
    with edge.client("carol") as client:
        stream = client.stream_dataset("open", batch_records=1)
        next(stream)  # one stream open
        code, message = code_of(lambda: next(client.stream_dataset("open")))
        assert code is Code.RESOURCE_EXHAUSTED and "concurrent_streams limit of 1" in message
        stream.close()
        code, message = code_of(lambda: [client.list_teachers() for _ in range(5)])
        assert code is Code.RESOURCE_EXHAUSTED and "requests_per_second limit of 3" in message
        edge.clock.at += 1.0  # the bucket refills with the clock
        client.list_teachers()


def test_the_guard_flags_bulk_novel_reads_and_admins_see_and_clear_it(served, tmp_path,
                                                                       loop_thread):  # fmt: skip
    state_dir, clock = tmp_path / "state", Clock()
    tokens = tokens_for(state_dir)
    policy = GuardPolicy(floor=30, owned_ratio=10.0, action=GuardAction.SUSPEND)
    target = loop_thread.run(served.start(policy_gate(state_dir, clock, guard=policy)))
    with Client(target, token=tokens["admin"]) as admin:
        tokens["pat"] = admin.create_token("pat", "producer").token
    edge = Edge(target, served.store, state_dir, clock, tokens)
    distributions(edge, "pat", [list(range(100, 125))])  # 25 novel positions: under the floor
    distributions(edge, "pat", [list(range(200, 225))])  # 50: flagged, suspended
    code, message = code_of(lambda: distributions(edge, "pat", [[7, 8, 9]]))
    assert code is Code.PERMISSION_DENIED and "suspended by the extraction guard" in message
    with edge.client("admin") as admin:
        [pat] = [t for t in admin.list_tokens() if t.user == "pat"]
        assert pat.flag == "suspended" and "50 novel positions" in pat.flag_reason, pat
        assert admin.clear_flag(pat.id).flag == ""
    distributions(edge, "pat", [list(range(100, 125))])  # hits: nothing novel


# ---- audit, logs, metadata ------------------------------------------------------------------------


def test_every_call_is_audited_and_the_log_verifies(edge: Edge, served, loop_thread) -> None:
    make_dataset(served, loop_thread, "audited", seed=5, owner="pat")
    with edge.client("pat") as pat:
        records = list(pat.stream_dataset("audited"))
    with edge.client("carol") as carol:
        code_of(lambda: list(carol.stream_dataset("audited")))
    loop_thread.run(served.stop())  # a clean shutdown writes every queued line
    served.gate = None
    audit = edge.state_dir / "audit"
    assert verify(audit).ok
    lines = [json.loads(x) for f in sorted(audit.glob("audit-*.jsonl"))
             for x in f.read_text().splitlines()]  # fmt: skip
    events = [
        (e["who"], e["action"], e["target"], e["status"]) for e in lines if e["kind"] == "event"
    ]
    assert ("pat", "StreamDataset", "audited", "OK") in events
    assert ("carol", "StreamDataset", "audited", "PERMISSION_DENIED") in events
    [streamed] = [e for e in lines if e.get("who") == "pat" and e["action"] == "StreamDataset"]
    assert streamed["positions"] == sum(len(r) for r in records)
    assert all(edge.tokens[u] not in audit.joinpath(f.name).read_text()
               for f in audit.iterdir() for u in edge.tokens)  # fmt: skip
    assert main(["audit", "verify", str(audit)]) == 0


def test_tokens_never_reach_the_log(edge: Edge, caplog) -> None:
    from logitcache.server.app import redact_tokens_in_logs

    caplog.set_level(logging.INFO)
    redact_tokens_in_logs()  # as serve() does, on the handlers there are (caplog's among them)
    logging.getLogger("logitcache.server").error("a caller sent %s", edge.tokens["carol"])
    assert edge.tokens["carol"] not in caplog.text and "lc_[redacted]" in caplog.text


def test_fuzzed_authorization_metadata_never_crashes_the_server(edge: Edge) -> None:
    rng = random.Random(11)
    values = ["", " ", "Bearer", "Bearer ", "bearer lc_", "Basic dXNlcjpwYXNz", "Bearer " + "A" * 300,
              "x" * 8000, "Bearer lc_" + "é" * 40, "Bearer \t lc_abc", edge.tokens["carol"]]  # fmt: skip
    values += ["".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 200)))
               for _ in range(20)]  # fmt: skip

    async def probe() -> set[Code]:
        codes = set()
        async with grpc.aio.insecure_channel(edge.target) as channel:
            stub = pb_grpc.LogitCacheStub(channel)
            metadatas = [(("authorization", v),) for v in values]
            metadatas += [(("authorization", f"Bearer {edge.tokens['carol']}"),) * 3,
                          tuple(("authorization", "Bearer x") for _ in range(50)),
                          (("authorization-bin", bytes(range(256))),),
                          tuple((f"x-h{i}", "v" * 100) for i in range(100))]  # fmt: skip
            for metadata in metadatas:
                try:
                    await stub.ListTeachers(pb.ListTeachersRequest(), metadata=metadata, timeout=10)
                    codes.add(Code.OK)
                except grpc.aio.AioRpcError as e:
                    codes.add(e.code())
                except grpc.aio.UsageError:
                    pass
                except Exception as e:  # grpc's client refuses an illegal header value itself
                    assert "execute_batch" in str(e)
            await stub.ListTeachers(
                pb.ListTeachersRequest(),
                metadata=(("authorization", f"Bearer {edge.tokens['carol']}"),),
                timeout=10,
            )  # still serving
        return codes

    codes = asyncio.run(probe())
    # RESOURCE_EXHAUSTED: grpc's own bound on the size of a request's headers (8 KiB).
    assert codes <= {Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED}, codes
    assert Code.UNAUTHENTICATED in codes


# ---- a real server process ------------------------------------------------------------------------


def test_anonymous_mode_is_refused_on_a_non_loopback_bind(tmp_path, capsys) -> None:
    argv = ["serve", "--store", str(tmp_path / "store"), "--allow-anonymous"]
    assert main([*argv, "--host", "0.0.0.0"]) == 2
    assert "--allow-anonymous needs a loopback bind" in capsys.readouterr().err
    assert ServerConfig(store="s", host="::1", allow_anonymous=True).check() is None


def test_a_lab_server_end_to_end(demo_teacher, tmp_path, capsys) -> None:
    """The first admin offline, users online, a shared and an unshared dataset, and then the
    server's log holds no token and its audit log verifies (and catches an edited line)."""
    state = tmp_path / "state"
    assert (
        main(["tokens", "create", "--state", str(state), "--user", "root", "--role", "admin"]) == 0
    )
    admin = capsys.readouterr().out.strip()
    with ReferenceServer(demo_teacher, tmp_path / "store", "--state-dir", str(state),
                         allow_anonymous=False) as server:  # fmt: skip
        online = ["--server", server.target, "--token", admin]
        made = {}
        for user, role in (("pat", "producer"), ("carol", "consumer")):
            assert main(["tokens", "create", "--user", user, "--role", role, *online]) == 0
            made[user] = capsys.readouterr().out.strip()
        with Client(server.target, token="lc_" + "z" * 43, retries=0) as forged:
            assert code_of(forged.list_datasets)[0] is Code.UNAUTHENTICATED
        with Client(server.target, token=made["pat"]) as pat:
            for name in ("shared", "private"):
                job = pat.precompute(name, input_ids=[[5, 6, 7, 8], [9, 10, 11]], use=USE_CLIENT)
                assert pat.wait(job, progress=False).state == "completed"
        assert main(["datasets", "share", "shared", "--user", "carol",
                     "--server", server.target, "--token", made["pat"]]) == 0  # fmt: skip
        assert "owner pat, users carol" in capsys.readouterr().out
        with Client(server.target, token=made["carol"]) as carol:
            assert len(list(carol.stream_dataset("shared"))) == 2
            assert code_of(lambda: list(carol.stream_dataset("private")))[0] is (
                Code.PERMISSION_DENIED
            )
        assert main(["tokens", "list", "--json", *online]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert {r["user"]: r["positions_served_today"] for r in rows}["carol"] == 7
    log = server.log_path.read_text()
    assert all(token not in log for token in (admin, *made.values()))
    audit = state / "audit"
    assert main(["audit", "verify", str(audit)]) == 0
    [path] = audit.glob("audit-*.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    assert any('"who":"carol"' in line and '"PERMISSION_DENIED"' in line for line in lines)
    assert any('"SubmitJob"' in line and '"decision":"allow"' in line for line in lines)
    lines[3] = lines[3].replace('"who":"', '"who":"x', 1)
    path.write_text("".join(lines))
    assert main(["audit", "verify", str(audit)]) == 1
