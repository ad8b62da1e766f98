""":class:`~logitcache.server.policy.state.PolicyState` in PostgreSQL, shared by every replica.

Several servers (and the admin CLI) that name the same ``postgresql://`` state URL see one set
of tokens, access lists, limits, usage counts, stream leases and guard flags. What must hold
across replicas is decided by the database, in one statement or under a row lock:

- a daily charge is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE total <= limit`` (the
  conflicting row is locked while it is checked and added to), so replicas together never
  count past a token's limit;
- a new stream counts the token's open streams under a transaction-scoped advisory lock on
  that token, so two replicas cannot both take its last slot.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict

import psycopg
from psycopg.types.json import Jsonb

from logitcache.client.errors import AlreadyExists
from logitcache.server.policy.state import (
    DatasetAccess,
    FlagState,
    GuardFlag,
    Limits,
    Role,
    TokenRecord,
)
from logitcache.server.postgres import Database

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, user_name TEXT NOT NULL, role TEXT NOT NULL,
    groups TEXT[] NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION, seq BIGSERIAL);
CREATE TABLE IF NOT EXISTS dataset_access (
    dataset TEXT PRIMARY KEY, owner TEXT NOT NULL, users TEXT[] NOT NULL, groups TEXT[] NOT NULL);
CREATE INDEX IF NOT EXISTS dataset_owner ON dataset_access (owner);
CREATE TABLE IF NOT EXISTS limits (token_id TEXT PRIMARY KEY, limits JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    token_id TEXT NOT NULL, counter TEXT NOT NULL, day TEXT NOT NULL, amount BIGINT NOT NULL,
    PRIMARY KEY (token_id, counter, day));
CREATE TABLE IF NOT EXISTS streams (
    lease TEXT PRIMARY KEY, token_id TEXT NOT NULL, replica TEXT NOT NULL,
    opened_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS stream_token ON streams (token_id);
CREATE INDEX IF NOT EXISTS stream_replica ON streams (replica);
CREATE TABLE IF NOT EXISTS flags (
    token_id TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL, detail JSONB NOT NULL);
"""
_TOKEN_COLUMNS = "id, hash, user_name, role, groups, created_at, revoked_at"
_FLAG_COLUMNS = "token_id, state, reason, at, detail"


class PostgresState:
    """The policy state in the database of ``url`` (tables created on first use)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db = Database(url)
        self._db.ensure_schema("policy", SCHEMA_VERSION, _DDL)

    def _rows(self, sql: str, params: tuple[object, ...] | dict[str, object] = ()) -> list[tuple]:
        with self._db.transaction() as db:
            return db.execute(sql, params).fetchall()

    def _changed(self, sql: str, params: tuple[object, ...]) -> int:
        """Run one change; the number of rows it changed."""
        with self._db.transaction() as db:
            return db.execute(sql, params).rowcount

    # tokens

    def add_token(self, record: TokenRecord) -> None:
        try:
            self._changed(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (record.id, record.hash, record.user, record.role.value, list(record.groups),
                 record.created_at, record.revoked_at),
            )  # fmt: skip
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists(f"token {record.id} (or its hash) exists already") from None

    @staticmethod
    def _token(row: tuple) -> TokenRecord:
        id_, hash_, user, role, groups, created_at, revoked_at = row
        return TokenRecord(id_, hash_, user, Role(role), tuple(groups), created_at, revoked_at)

    def token(self, token_id: str) -> TokenRecord | None:
        rows = self._rows(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = %s", (token_id,))
        return self._token(rows[0]) if rows else None

    def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        rows = self._rows(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE hash = %s", (token_hash,))
        return self._token(rows[0]) if rows else None

    def tokens(self) -> list[TokenRecord]:
        rows = self._rows(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, seq")
        return [self._token(r) for r in rows]

    def revoke_token(self, token_id: str, at: float) -> bool:
        return 1 == self._changed(
            "UPDATE tokens SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
            (at, token_id),
        )

    # access lists

    def set_access(self, dataset: str, access: DatasetAccess) -> None:
        self._changed(
            "INSERT INTO dataset_access VALUES (%s, %s, %s, %s) ON CONFLICT (dataset) DO UPDATE "
            "SET owner = EXCLUDED.owner, users = EXCLUDED.users, groups = EXCLUDED.groups",
            (dataset, access.owner, list(access.users), list(access.groups)),
        )

    def access(self, dataset: str) -> DatasetAccess | None:
        rows = self._rows(
            "SELECT owner, users, groups FROM dataset_access WHERE dataset = %s", (dataset,)
        )
        if not rows:
            return None
        owner, users, groups = rows[0]
        return DatasetAccess(owner, tuple(users), tuple(groups))

    def delete_access(self, dataset: str) -> None:
        self._changed("DELETE FROM dataset_access WHERE dataset = %s", (dataset,))

    def datasets_owned_by(self, user: str) -> list[str]:
        rows = self._rows(
            "SELECT dataset FROM dataset_access WHERE owner = %s ORDER BY dataset", (user,)
        )
        return [r[0] for r in rows]

    # quotas and usage

    def set_limits(self, token_id: str, limits: Limits) -> None:
        self._changed(
            "INSERT INTO limits VALUES (%s, %s) "
            "ON CONFLICT (token_id) DO UPDATE SET limits = EXCLUDED.limits",
            (token_id, Jsonb(asdict(limits))),
        )

    def limits(self, token_id: str) -> Limits | None:
        rows = self._rows("SELECT limits FROM limits WHERE token_id = %s", (token_id,))
        return Limits(**rows[0][0]) if rows else None

    def add_usage(
        self, token_id: str, counter: str, day: str, amount: int, limit: int | None
    ) -> int | None:
        """Check and add in one statement: a first charge is inserted only within the limit,
        a later one adds to the locked row only while the total stays within it."""
        rows = self._rows(
            "INSERT INTO usage AS u SELECT %(t)s, %(c)s, %(d)s, %(a)s "
            "WHERE %(l)s::BIGINT IS NULL OR %(a)s <= %(l)s::BIGINT "
            "ON CONFLICT (token_id, counter, day) DO UPDATE SET amount = u.amount + EXCLUDED.amount "
            "WHERE %(l)s::BIGINT IS NULL OR u.amount + EXCLUDED.amount <= %(l)s::BIGINT "
            "RETURNING amount",
            {"t": token_id, "c": counter, "d": day, "a": amount, "l": limit},
        )
        return int(rows[0][0]) if rows else None

    def usage(self, token_id: str, counter: str, day: str) -> int:
        rows = self._rows(
            "SELECT amount FROM usage WHERE token_id = %s AND counter = %s AND day = %s",
            (token_id, counter, day),
        )
        return int(rows[0][0]) if rows else 0

    def open_stream(self, token_id: str, replica: str, limit: int | None) -> str | None:
        lease = uuid.uuid4().hex
        with self._db.transaction() as db:
            if limit is not None:
                db.execute("SELECT pg_advisory_xact_lock(hashtext('streams:' || %s))", (token_id,))
                row = db.execute(
                    "SELECT COUNT(*) FROM streams WHERE token_id = %s", (token_id,)
                ).fetchone()
                if row is not None and row[0] >= limit:
                    return None
            db.execute(
                "INSERT INTO streams VALUES (%s, %s, %s, EXTRACT(EPOCH FROM clock_timestamp()))",
                (lease, token_id, replica),
            )
        return lease

    def close_stream(self, lease: str) -> None:
        self._changed("DELETE FROM streams WHERE lease = %s", (lease,))

    def clear_streams(self, replica: str) -> None:
        self._changed("DELETE FROM streams WHERE replica = %s", (replica,))

    # extraction-guard flags

    def set_flag(self, flag: GuardFlag) -> None:
        self._changed(
            f"INSERT INTO flags ({_FLAG_COLUMNS}) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (token_id) DO UPDATE SET state = EXCLUDED.state, "
            "reason = EXCLUDED.reason, at = EXCLUDED.at, detail = EXCLUDED.detail",
            (flag.token_id, flag.state.value, flag.reason, flag.at, Jsonb(flag.detail)),
        )

    @staticmethod
    def _flag(row: tuple) -> GuardFlag:
        token_id, state, reason, at, detail = row
        return GuardFlag(token_id, FlagState(state), reason, at, dict(detail))

    def flag(self, token_id: str) -> GuardFlag | None:
        rows = self._rows(f"SELECT {_FLAG_COLUMNS} FROM flags WHERE token_id = %s", (token_id,))
        return self._flag(rows[0]) if rows else None

    def flags(self) -> list[GuardFlag]:
        rows = self._rows(f"SELECT {_FLAG_COLUMNS} FROM flags ORDER BY at, token_id")
        return [self._flag(r) for r in rows]

    def clear_flag(self, token_id: str) -> bool:
        return 1 == self._changed("DELETE FROM flags WHERE token_id = %s", (token_id,))

    def close(self) -> None:
        self._db.close()
