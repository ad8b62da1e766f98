"""What only the embedded policy state has: a state directory holds it in one SQLite file, with
a schema check of its own. The contract both backends keep (reopening, tokens, charges under
concurrency, streams, flags) is tests/server/policy/test_state_postgres.py's, run on both."""

from __future__ import annotations

import sqlite3

import pytest

from logitcache.client.errors import InvalidArgument
from logitcache.server.policy.state import (
    STATE_FILE,
    Role,
    SqliteState,
    TokenRecord,
    open_state,
)


def test_the_state_lives_in_its_sqlite_file(tmp_path) -> None:
    state = open_state(tmp_path / "state")
    state.add_token(TokenRecord("tok_1", "htok_1", "alice", Role.PRODUCER, (), created_at=1.0))
    state.close()
    reopened = SqliteState(tmp_path / "state" / STATE_FILE)
    assert reopened.token("tok_1") is not None
    reopened.close()


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
