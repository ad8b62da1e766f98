"""The one PostgreSQL connection of a process, for state that several replicas share.

The policy state (``policy.state_postgres``) and the job leases (``leases``) keep their rows in
the schema ``logitcache`` of the database that a ``postgresql://`` state URL names. Each
operation is a few rows, so one connection behind a lock serves all of a process's threads
(as :class:`~logitcache.server.policy.state.SqliteState` does); the atomicity that replicas rely
on comes from single statements and row locks in the database, never from this lock.

A connection that breaks (the database restarted, the network dropped) is reopened by the next
call; the call that saw it break fails with Unavailable, since whether its transaction committed
is unknown to it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from logitcache.client.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    import psycopg

SCHEMA = "logitcache"
URL_SCHEMES = ("postgresql://", "postgres://")
_SCHEMA_LOCK = 0x6C6F67697463  # pg_advisory_xact_lock key: schema changes one at a time


def is_postgres_url(target: object) -> bool:
    """Whether a state target names a PostgreSQL database (rather than a local directory)."""
    return isinstance(target, str) and target.startswith(URL_SCHEMES)


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:  # an unparsable URL is reported by connect(); show nothing of it here
        return "postgresql://..."
    host, db = info.get("host", ""), info.get("dbname", "")
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{info.get('user', '')}@{host}{port}/{db}"


class Database:
    """One lazily (re)opened connection to ``url``, its search path set to :data:`SCHEMA`."""

    def __init__(self, url: str) -> None:
        if not is_postgres_url(url):
            raise InvalidArgument(f"not a PostgreSQL URL: {shown_url(url)}")
        self.url = url
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            self._conn.execute(f"SET search_path TO {SCHEMA}")
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """The connection, inside one transaction (committed on leaving, rolled back on an
        error); Unavailable when the database cannot be reached."""
        import psycopg

        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    yield conn
            except psycopg.OperationalError as error:
                if self._conn is not None and self._conn.broken:
                    self._conn = None
                raise Unavailable(f"shared state {shown_url(self.url)}: {error}") from error

    def ensure_schema(self, component: str, version: int, ddl: str) -> None:
        """Create ``component``'s tables (``ddl``, idempotent) unless they are at ``version``
        already (so a role that may not create anything works once they exist);
        InvalidArgument if the database holds a newer version than this logitcache
        understands. Replicas starting together take turns (an advisory lock)."""
        with self.transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            found = db.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.schema_versions",)
            ).fetchone()
            row = None
            if found is not None and found[0]:
                row = db.execute(
                    "SELECT version FROM schema_versions WHERE component = %s", (component,)
                ).fetchone()
            if row is not None and row[0] > version:
                raise InvalidArgument(
                    f"{shown_url(self.url)}: {component} schema {row[0]} is newer than this "
                    f"logitcache understands ({version}); upgrade logitcache"
                )
            if row is not None and row[0] == version:
                return
            db.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            db.execute(ddl)
            db.execute(
                "INSERT INTO schema_versions VALUES (%s, %s) ON CONFLICT (component) "
                "DO UPDATE SET version = EXCLUDED.version",
                (component, version),
            )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
