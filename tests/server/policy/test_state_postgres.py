"""The policy state's contract on both of its backends, SQLite (a state directory) and a real
PostgreSQL server (a ``postgresql://`` URL), through the one ``open_state``; and what replicas
sharing PostgreSQL rely on: quotas and stream limits hold across processes."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from logitcache.client.errors import AlreadyExists, InvalidArgument, ResourceExhausted, Unavailable
from logitcache.server.policy.quotas import QuotaKeeper
from logitcache.server.policy.state import (
    DatasetAccess,
    FlagState,
    GuardFlag,
    Limits,
    PolicyState,
    Role,
    TokenRecord,
    open_state,
)
from logitcache.server.policy.state_postgres import PostgresState


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    """Where a state lives: a state directory, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("postgres_url")


def record(id_: str = "tok_1", user: str = "alice", role: Role = Role.PRODUCER) -> TokenRecord:
    return TokenRecord(id_, "h" + id_, user, role, ("nlp", "ops"), created_at=1.0)


def test_everything_survives_reopening(target: str) -> None:
    state = open_state(target)
    state.add_token(record())
    state.set_access("wiki", DatasetAccess("alice", ("bob",), ("nlp",)))
    state.set_access("wiki", DatasetAccess("alice", ("bob", "carol"), ()))  # replaced
    state.set_access("books", DatasetAccess("alice", (), ("nlp", "ops")))
    state.set_limits("tok_1", Limits(positions_computed_per_day=10, requests_per_second=2.5))
    assert state.add_usage("tok_1", "positions_computed", "2026-12-01", 7, 10) == 7
    flag = GuardFlag("tok_1", FlagState.THROTTLED, "bulk", 5.0, {"novel_positions": 9.0})
    state.set_flag(flag)
    state.close()

    state = open_state(target)
    assert state.token("tok_1") == state.token_by_hash("htok_1") == record()
    assert state.token("tok_2") is None and state.token_by_hash("nope") is None
    assert state.access("wiki") == DatasetAccess("alice", ("bob", "carol"), ())
    assert state.access("books") == DatasetAccess("alice", (), ("nlp", "ops"))
    assert state.access("other") is None
    assert state.datasets_owned_by("alice") == ["books", "wiki"]
    assert state.datasets_owned_by("bob") == []
    assert state.limits("tok_1") == Limits(positions_computed_per_day=10, requests_per_second=2.5)
    assert state.limits("tok_2") is None
    assert state.usage("tok_1", "positions_computed", "2026-12-01") == 7
    assert state.flag("tok_1") == flag
    state.close()


def test_tokens_are_listed_in_order_and_revoked_once(target: str) -> None:
    state = open_state(target)
    state.add_token(record("tok_1"))
    state.add_token(record("tok_2", "bob", Role.CONSUMER))
    assert [t.id for t in state.tokens()] == ["tok_1", "tok_2"]  # same created_at: as added
    assert state.revoke_token("tok_2", at=9.0)
    assert not state.revoke_token("tok_2", at=10.0)
    assert not state.revoke_token("tok_missing", at=10.0)
    revoked = state.token("tok_2")
    assert revoked is not None and not revoked.active and revoked.revoked_at == 9.0
    with pytest.raises(AlreadyExists):
        state.add_token(record("tok_1"))
    state.close()


def test_a_charge_over_the_limit_adds_nothing(target: str) -> None:
    state = open_state(target)
    assert state.add_usage("tok", "c", "d", 11, 10) is None  # a first charge past the limit
    assert state.usage("tok", "c", "d") == 0
    assert state.add_usage("tok", "c", "d", 10, 10) == 10
    assert state.add_usage("tok", "c", "d", 1, 10) is None
    assert state.add_usage("tok", "c", "d", 0, 10) == 10
    assert state.add_usage("tok", "c", "d", 5, None) == 15  # no limit
    assert state.usage("tok", "c", "another day") == 0
    state.close()


def test_usage_never_passes_its_limit_under_concurrent_charges(target: str) -> None:
    """Threads on one handle and on a second one (as the CLI or another replica holds)."""
    state, other = open_state(target), open_state(target)
    granted: list[int] = []

    def charge(on: PolicyState) -> None:
        for _ in range(40):
            if on.add_usage("tok", "positions_served", "d", 3, 200) is not None:
                granted.append(3)

    threads = [threading.Thread(target=charge, args=(s,)) for s in [state, other] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == state.usage("tok", "positions_served", "d") == 198
    state.close()
    other.close()


def test_stream_leases_count_against_a_limit_and_die_with_their_replica(target: str) -> None:
    state = open_state(target)
    first = state.open_stream("tok", "replica-a", limit=2)
    second = state.open_stream("tok", "replica-a", limit=2)
    assert first and second and first != second
    assert state.open_stream("tok", "replica-a", limit=2) is None
    state.close_stream(first)
    assert state.open_stream("tok", "replica-b", limit=2) is not None
    state.clear_streams("replica-a")
    assert state.open_stream("tok", "replica-a", limit=2) is not None
    assert state.open_stream("tok", "replica-a", limit=2) is None
    assert state.open_stream("other", "replica-a", limit=None) is not None
    state.close()


def test_flags_are_listed_replaced_and_cleared(target: str) -> None:
    state = open_state(target)
    state.set_flag(GuardFlag("tok_2", FlagState.SUSPENDED, "b", 2.0))
    state.set_flag(GuardFlag("tok_1", FlagState.THROTTLED, "a", 1.0))
    state.set_flag(GuardFlag("tok_1", FlagState.SUSPENDED, "worse", 3.0, {"rate": 1.5}))
    assert [(f.token_id, f.state) for f in state.flags()] == [
        ("tok_2", FlagState.SUSPENDED),
        ("tok_1", FlagState.SUSPENDED),
    ]
    assert state.clear_flag("tok_1") and not state.clear_flag("tok_1")
    assert state.flag("tok_1") is None
    state.close()


def test_a_newer_postgres_schema_is_refused(postgres_url: str) -> None:
    import psycopg

    PostgresState(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE logitcache.schema_versions SET version = 99 WHERE component = 'policy'")
    with pytest.raises(InvalidArgument, match="newer"):
        PostgresState(postgres_url)


def test_a_role_that_may_not_create_works_once_the_tables_exist(postgres_url: str) -> None:
    """As a deployment runs replicas: the tables made once by an owner, the replicas' role
    only allowed to read and write rows."""
    import psycopg

    from logitcache.server.leases import PostgresLeaseStore

    PostgresState(postgres_url).close()
    PostgresLeaseStore(postgres_url, "s3://bucket/store")
    with psycopg.connect(postgres_url, autocommit=True) as db:
        if db.execute("SELECT 1 FROM pg_roles WHERE rolname = 'lc_replica'").fetchone() is None:
            db.execute("CREATE ROLE lc_replica LOGIN")
        db.execute("GRANT USAGE ON SCHEMA logitcache TO lc_replica")
        db.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA logitcache "
                   "TO lc_replica")  # fmt: skip
        db.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA logitcache TO lc_replica")
    as_replica = postgres_url.replace("postgresql://postgres@", "postgresql://lc_replica@")
    state = open_state(as_replica)
    state.add_token(record())
    assert state.add_usage("tok_1", "c", "d", 3, 10) == 3
    leases = PostgresLeaseStore(as_replica, "s3://bucket/store")
    assert leases.acquire("datasets/d", 5.0, "replica") is not None
    state.close()
    leases.close()


def test_an_unreachable_database_is_unavailable(tmp_path) -> None:
    url = f"postgresql://postgres@/db?host={tmp_path}&port=5999"  # no server listens there
    with pytest.raises(Unavailable, match="shared state postgresql://postgres@"):
        open_state(url)


def test_calls_are_unavailable_while_the_database_is_down_and_work_after(
    postgres, postgres_url: str
) -> None:
    state = open_state(postgres_url)
    state.add_token(record())
    postgres.stop()  # ends the state's connection, as a restart or failover does
    try:
        with pytest.raises(Unavailable, match="shared state"):
            state.token("tok_1")
        with pytest.raises(Unavailable):
            state.add_usage("tok_1", "c", "d", 1, None)
    finally:
        postgres.start()
    assert state.token("tok_1") == record()  # reconnected; nothing was lost
    assert state.add_usage("tok_1", "c", "d", 1, None) == 1
    state.close()


LIMIT, CHARGE, STREAMS = 500, 7, 3


def _replica(url: str, name: str, go, results) -> None:
    """One replica: requests that compute, then reads served, of one token until its daily
    limits refuse them; then streams."""
    keeper = QuotaKeeper(open_state(url), replica=name)
    results.put("ready")
    go.wait()
    computed = served = opened = 0
    while True:
        try:
            keeper.admit_computing("tok_shared")
        except ResourceExhausted:
            break
        keeper.record_computed("tok_shared", CHARGE)  # what the admitted request computed
        computed += CHARGE
    while True:
        try:
            keeper.charge_served("tok_shared", CHARGE)
        except ResourceExhausted:
            break
        served += CHARGE
    for _ in range(STREAMS):
        try:
            keeper.open_stream("tok_shared")
            opened += 1
        except ResourceExhausted:
            pass
    results.put((computed, served, opened))


def test_quotas_hold_across_two_replica_processes(postgres_url: str) -> None:
    """Two processes race one token's requests on one database. Computed positions (known
    only after a request ran) pass the limit by at most one request of each replica; served
    positions (checked and charged in one statement) and streams never pass theirs."""
    state = open_state(postgres_url)
    state.set_limits(
        "tok_shared",
        Limits(
            positions_computed_per_day=LIMIT,
            positions_served_per_day=LIMIT,
            concurrent_streams=STREAMS,
        ),
    )
    context = multiprocessing.get_context("spawn")
    results, go = context.Queue(), context.Event()
    replicas = [
        context.Process(target=_replica, args=(postgres_url, f"replica-{i}", go, results))
        for i in range(2)
    ]
    for p in replicas:
        p.start()
    assert [results.get(timeout=60) for _ in replicas] == ["ready"] * len(replicas)
    go.set()  # both connected: they start together
    done = [results.get(timeout=60) for _ in replicas]
    for p in replicas:
        p.join(timeout=60)
    usage = QuotaKeeper(state, replica="admin").usage("tok_shared")
    computed = sum(c for c, _, _ in done)
    assert computed == usage["positions_computed"]
    assert LIMIT <= computed < LIMIT + len(replicas) * CHARGE
    assert sum(s for _, s, _ in done) == usage["positions_served"] == LIMIT // CHARGE * CHARGE
    assert sum(o for _, _, o in done) == STREAMS
    state.close()
