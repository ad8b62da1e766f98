"""The policy's state behind one small interface: tokens, access lists, quotas, usage and
extraction-guard flags.

:class:`PolicyState` is what every other policy module talks to. :class:`SqliteState` is the
embedded default, one SQLite file in the server's state directory (WAL, so the offline CLI can
read and write it while a server runs). A shared database for several replicas implements the
same protocol; nothing outside this module knows which one it has.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from logitcache.client.errors import AlreadyExists, InvalidArgument

STATE_FILE = "policy.sqlite3"
SCHEMA_VERSION = 1


class Role(StrEnum):
    """What a token may do: admin (teachers, tokens, licences, quotas), producer (jobs and
    read-through), consumer (read and stream the datasets shared with it)."""

    ADMIN = "admin"
    PRODUCER = "producer"
    CONSUMER = "consumer"

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls(value.lower())
        except ValueError:
            raise InvalidArgument(
                f"role must be one of {', '.join(r.value for r in cls)}", fields=("role",)
            ) from None


@dataclass(frozen=True)
class TokenRecord:
    """A token as stored: its hash, never the token. ``user`` is the principal the token speaks
    for (access lists name users); ``id`` is the public handle that lists and revokes it."""

    id: str
    hash: str
    user: str
    role: Role
    groups: tuple[str, ...] = ()
    created_at: float = 0.0
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class DatasetAccess:
    """Who may read a dataset besides admins: its owner, named users and groups."""

    owner: str
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """Per-token limits; None is unlimited. Daily counts reset at 00:00 UTC."""

    positions_computed_per_day: int | None = None
    positions_served_per_day: int | None = None
    concurrent_streams: int | None = None
    requests_per_second: float | None = None


class FlagState(StrEnum):
    THROTTLED = "throttled"
    SUSPENDED = "suspended"


@dataclass(frozen=True)
class GuardFlag:
    """A token the extraction guard flagged, and why (what it measured against what bound)."""

    token_id: str
    state: FlagState
    reason: str
    at: float
    detail: dict[str, float] = field(default_factory=dict)


class PolicyState(Protocol):
    """Everything the policy keeps between requests and across restarts. Methods are blocking
    and thread-safe: the server calls them from executors."""

    def add_token(self, record: TokenRecord) -> None: ...
    def token(self, token_id: str) -> TokenRecord | None: ...
    def token_by_hash(self, token_hash: str) -> TokenRecord | None: ...
    def tokens(self) -> list[TokenRecord]: ...
    def revoke_token(self, token_id: str, at: float) -> bool: ...

    def set_access(self, dataset: str, access: DatasetAccess) -> None: ...
    def access(self, dataset: str) -> DatasetAccess | None: ...
    def delete_access(self, dataset: str) -> None: ...
    def datasets_owned_by(self, user: str) -> list[str]: ...

    def set_limits(self, token_id: str, limits: Limits) -> None: ...
    def limits(self, token_id: str) -> Limits | None: ...

    def add_usage(
        self, token_id: str, counter: str, day: str, amount: int, limit: int | None
    ) -> int | None:
        """Add ``amount`` to a daily counter and return the new total, atomically; add nothing
        and return None when the total would pass ``limit``."""
        ...

    def usage(self, token_id: str, counter: str, day: str) -> int: ...

    def open_stream(self, token_id: str, replica: str, limit: int | None) -> str | None:
        """A lease on one concurrent stream, or None when ``limit`` are already open."""
        ...

    def close_stream(self, lease: str) -> None: ...
    def clear_streams(self, replica: str) -> None:
        """Drop a replica's leases: its streams died with it (called when it starts)."""
        ...

    def set_flag(self, flag: GuardFlag) -> None: ...
    def flag(self, token_id: str) -> GuardFlag | None: ...
    def flags(self) -> list[GuardFlag]: ...
    def clear_flag(self, token_id: str) -> bool: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, user TEXT NOT NULL, role TEXT NOT NULL,
    groups TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS dataset_access (
    dataset TEXT PRIMARY KEY, owner TEXT NOT NULL, users TEXT NOT NULL, groups TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS dataset_owner ON dataset_access (owner);
CREATE TABLE IF NOT EXISTS limits (token_id TEXT PRIMARY KEY, limits TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    token_id TEXT NOT NULL, counter TEXT NOT NULL, day TEXT NOT NULL, amount INTEGER NOT NULL,
    PRIMARY KEY (token_id, counter, day));
CREATE TABLE IF NOT EXISTS streams (
    lease TEXT PRIMARY KEY, token_id TEXT NOT NULL, replica TEXT NOT NULL, opened_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS stream_token ON streams (token_id);
CREATE TABLE IF NOT EXISTS flags (
    token_id TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL,
    detail TEXT NOT NULL);
"""


class SqliteState:
    """:class:`PolicyState` in one SQLite file. One connection behind a lock: every operation is
    a few rows, so serialising them costs less than a connection per executor thread, and
    writes take the database lock up front (``BEGIN IMMEDIATE``) so a check-and-add is atomic
    against another process too."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise InvalidArgument(
                    f"{self.path}: policy state schema {version} is newer than this logitcache "
                    f"understands ({SCHEMA_VERSION}); upgrade logitcache"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # tokens

    def add_token(self, record: TokenRecord) -> None:
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.hash,
                        record.user,
                        record.role.value,
                        json.dumps(list(record.groups)),
                        record.created_at,
                        record.revoked_at,
                    ),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"token {record.id} (or its hash) exists already") from None

    @staticmethod
    def _token(row: tuple) -> TokenRecord:
        id_, hash_, user, role, groups, created_at, revoked_at = row
        return TokenRecord(
            id_, hash_, user, Role(role), tuple(json.loads(groups)), created_at, revoked_at
        )

    def token(self, token_id: str) -> TokenRecord | None:
        rows = self._read("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return self._token(rows[0]) if rows else None

    def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        rows = self._read("SELECT * FROM tokens WHERE hash = ?", (token_hash,))
        return self._token(rows[0]) if rows else None

    def tokens(self) -> list[TokenRecord]:
        return [self._token(r) for r in self._read("SELECT * FROM tokens ORDER BY created_at")]

    def revoke_token(self, token_id: str, at: float) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (at, token_id),
            )
            return cursor.rowcount == 1

    # access lists

    def set_access(self, dataset: str, access: DatasetAccess) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO dataset_access VALUES (?, ?, ?, ?)",
                (
                    dataset,
                    access.owner,
                    json.dumps(list(access.users)),
                    json.dumps(list(access.groups)),
                ),
            )

    def access(self, dataset: str) -> DatasetAccess | None:
        rows = self._read(
            "SELECT owner, users, groups FROM dataset_access WHERE dataset = ?", (dataset,)
        )
        if not rows:
            return None
        owner, users, groups = rows[0]
        return DatasetAccess(owner, tuple(json.loads(users)), tuple(json.loads(groups)))

    def delete_access(self, dataset: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM dataset_access WHERE dataset = ?", (dataset,))

    def datasets_owned_by(self, user: str) -> list[str]:
        rows = self._read(
            "SELECT dataset FROM dataset_access WHERE owner = ? ORDER BY dataset", (user,)
        )
        return [r[0] for r in rows]

    # quotas and usage

    def set_limits(self, token_id: str, limits: Limits) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO limits VALUES (?, ?)",
                (token_id, json.dumps(asdict(limits))),
            )

    def limits(self, token_id: str) -> Limits | None:
        rows = self._read("SELECT limits FROM limits WHERE token_id = ?", (token_id,))
        return Limits(**json.loads(rows[0][0])) if rows else None

    def add_usage(
        self, token_id: str, counter: str, day: str, amount: int, limit: int | None
    ) -> int | None:
        with self._write() as db:
            row = db.execute(
                "SELECT amount FROM usage WHERE token_id = ? AND counter = ? AND day = ?",
                (token_id, counter, day),
            ).fetchone()
            total = (row[0] if row else 0) + amount
            if limit is not None and total > limit:
                return None
            db.execute(
                "INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?)", (token_id, counter, day, total)
            )
            return total

    def usage(self, token_id: str, counter: str, day: str) -> int:
        rows = self._read(
            "SELECT amount FROM usage WHERE token_id = ? AND counter = ? AND day = ?",
            (token_id, counter, day),
        )
        return rows[0][0] if rows else 0

    def open_stream(self, token_id: str, replica: str, limit: int | None) -> str | None:
        with self._write() as db:
            if limit is not None:
                (open_now,) = db.execute(
                    "SELECT COUNT(*) FROM streams WHERE token_id = ?", (token_id,)
                ).fetchone()
                if open_now >= limit:
                    return None
            lease = uuid.uuid4().hex
            db.execute(
                "INSERT INTO streams VALUES (?, ?, ?, ?)", (lease, token_id, replica, time.time())
            )
            return lease

    def close_stream(self, lease: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM streams WHERE lease = ?", (lease,))

    def clear_streams(self, replica: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM streams WHERE replica = ?", (replica,))

    # extraction-guard flags

    def set_flag(self, flag: GuardFlag) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO flags VALUES (?, ?, ?, ?, ?)",
                (flag.token_id, flag.state.value, flag.reason, flag.at, json.dumps(flag.detail)),
            )

    @staticmethod
    def _flag(row: tuple) -> GuardFlag:
        token_id, state, reason, at, detail = row
        return GuardFlag(token_id, FlagState(state), reason, at, json.loads(detail))

    def flag(self, token_id: str) -> GuardFlag | None:
        rows = self._read("SELECT * FROM flags WHERE token_id = ?", (token_id,))
        return self._flag(rows[0]) if rows else None

    def flags(self) -> list[GuardFlag]:
        return [self._flag(r) for r in self._read("SELECT * FROM flags ORDER BY at")]

    def clear_flag(self, token_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM flags WHERE token_id = ?", (token_id,)).rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_state(state_dir: Path | str) -> PolicyState:
    """The state shared by replicas when ``state_dir`` is a ``postgresql://`` URL; otherwise
    the embedded state of a server whose state directory is ``state_dir`` (created)."""
    from logitcache.server.postgres import is_postgres_url

    if is_postgres_url(state_dir):
        from logitcache.server.policy.state_postgres import PostgresState

        return PostgresState(str(state_dir))
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return SqliteState(directory / STATE_FILE)
