"""The embedded policy state: a real SQLite file that survives a restart and whose
check-and-add is atomic across threads."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from logitcache.client.errors import AlreadyExists, InvalidArgument
from logitcache.server.policy.state import (
    STATE_FILE,
    DatasetAccess,
    FlagState,
    GuardFlag,
    Limits,
    Role,
    SqliteState,
    TokenRecord,
    open_state,
)


def record(id_: str = "tok_1", user: str = "alice", role: Role = Role.PRODUCER) -> TokenRecord:
    return TokenRecord(id_, "h" + id_, user, role, ("nlp",), created_at=1.0)


def test_everything_survives_a_restart(tmp_path) -> None:
    state = open_state(tmp_path / "state")
    state.add_token(record())
    state.set_access("wiki", DatasetAccess("alice", ("bob",), ("nlp",)))
    state.set_limits("tok_1", Limits(positions_computed_per_day=10, requests_per_second=2.5))
    assert state.add_usage("tok_1", "positions_computed", "2026-12-01", 7, 10) == 7
    state.set_flag(GuardFlag("tok_1", FlagState.THROTTLED, "bulk", 5.0, {"novel_positions": 9.0}))
    state.close()

    state = open_state(tmp_path / "state")
    assert (tmp_path / "state" / STATE_FILE).exists()
    assert state.token("tok_1") == record()
    assert state.token_by_hash("htok_1") == record()
    assert state.access("wiki") == DatasetAccess("alice", ("bob",), ("nlp",))
    assert state.datasets_owned_by("alice") == ["wiki"]
    assert state.limits("tok_1") == Limits(positions_computed_per_day=10, requests_per_second=2.5)
    assert state.usage("tok_1", "positions_computed", "2026-12-01") == 7
    assert state.flag("tok_1") == GuardFlag(
        "tok_1", FlagState.THROTTLED, "bulk", 5.0, {"novel_positions": 9.0}
    )
    state.close()


def test_tokens_are_listed_and_revoked_once(tmp_path) -> None:
    state = open_state(tmp_path)
    state.add_token(record("tok_1"))
    state.add_token(record("tok_2", "bob", Role.CONSUMER))
    assert [t.id for t in state.tokens()] == ["tok_1", "tok_2"]
    assert state.revoke_token("tok_2", at=9.0)
    assert not state.revoke_token("tok_2", at=10.0)
    assert not state.revoke_token("tok_missing", at=10.0)
    revoked = state.token("tok_2")
    assert revoked is not None and not revoked.active and revoked.revoked_at == 9.0
    with pytest.raises(AlreadyExists):
        state.add_token(record("tok_1"))
    state.close()


def test_usage_never_passes_its_limit_under_concurrent_charges(tmp_path) -> None:
    """Threads on one connection and on a second one (as a CLI or a replica would hold)."""
    state, other = open_state(tmp_path), open_state(tmp_path)
    granted: list[int] = []

    def charge(on: SqliteState) -> None:
        for _ in range(50):
            if on.add_usage("tok", "positions_served", "d", 3, 200) is not None:
                granted.append(3)

    threads = [threading.Thread(target=charge, args=(s,)) for s in [state, other] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == state.usage("tok", "positions_served", "d") == 198
    assert state.usage("tok", "positions_served", "another day") == 0
    state.close()
    other.close()


def test_stream_leases_count_against_a_limit_and_die_with_their_replica(tmp_path) -> None:
    state = open_state(tmp_path)
    first = state.open_stream("tok", "replica-a", limit=2)
    second = state.open_stream("tok", "replica-a", limit=2)
    assert first and second and first != second
    assert state.open_stream("tok", "replica-a", limit=2) is None
    state.close_stream(first)
    assert state.open_stream("tok", "replica-b", limit=2) is not None
    state.clear_streams("replica-a")
    assert state.open_stream("tok", "replica-a", limit=2) is not None
    assert state.open_stream("other", "replica-a", limit=None) is not None
    state.close()


def test_flags_are_listed_and_cleared(tmp_path) -> None:
    state = open_state(tmp_path)
    state.set_flag(GuardFlag("tok_2", FlagState.SUSPENDED, "b", 2.0))
    state.set_flag(GuardFlag("tok_1", FlagState.THROTTLED, "a", 1.0))
    assert [f.token_id for f in state.flags()] == ["tok_1", "tok_2"]
    assert state.clear_flag("tok_1") and not state.clear_flag("tok_1")
    assert state.flag("tok_1") is None
    state.close()


def test_a_newer_schema_is_refused(tmp_path) -> None:
    path = tmp_path / STATE_FILE
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(InvalidArgument, match="newer"):
        SqliteState(path)


def test_roles_parse_case_insensitively_and_refuse_others() -> None:
    assert Role.parse("Admin") is Role.ADMIN
    with pytest.raises(InvalidArgument, match="admin, producer, consumer"):
        Role.parse("root")
