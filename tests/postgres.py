"""A throwaway PostgreSQL server for tests: ``initdb`` and ``pg_ctl`` in a temporary directory.

The server listens on a unix socket in its own directory only (no TCP port to collide with),
runs without fsync (its data dies with the test session) and trusts local connections. As root
(CI), it runs as the ``postgres`` user, since PostgreSQL refuses to run as root. Each test asks
for an empty database (:meth:`PostgresServer.empty_database`), so tests never see each other's
rows.

Importable from every test (``tests/`` is on ``sys.path`` through its conftest).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from logitcache.server.postgres import SCHEMA

SUPERUSER = "postgres"


def missing_reason() -> str | None:
    """Why no server can start here (the binaries are missing), or None."""
    for binary in ("initdb", "pg_ctl"):
        if shutil.which(binary) is None:
            return f"PostgreSQL's {binary} is not on PATH (install postgresql to run these tests)"
    return None


@dataclass(frozen=True)
class PostgresServer:
    """A server whose data and socket are under ``root``, run as ``user`` (None: as we are)."""

    root: Path
    port: int
    user: str | None

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    def url(self, database: str = "postgres") -> str:
        """A libpq URL of ``database`` on this server, over its unix socket."""
        return (
            f"postgresql://{SUPERUSER}@/{database}?host={quote(str(self.socket_dir), safe='')}"
            f"&port={self.port}"
        )

    def empty_database(self) -> str:
        """The URL of the server's database emptied of logitcache's tables (its schema is
        dropped, which takes a fraction of what creating a database takes)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        return self.url()

    def start(self) -> None:
        options = (
            f"-k {self.socket_dir} -p {self.port} -c listen_addresses='' -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        log = str(self.root / "server.log")
        self._pg_ctl("-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop it; ``fast`` ends every session as a restart of the database does."""
        self._pg_ctl("-m", mode, "-w", "stop")

    def _pg_ctl(self, *args: str) -> None:
        as_user = {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid} if self.user else {}
        command = ["pg_ctl", "-D", str(self.root / "data"), *args]
        subprocess.run(command, check=True, capture_output=True, **as_user)


@contextmanager
def running_postgres(port: int = 5432) -> Iterator[PostgresServer]:
    """Start a server with its data and socket in a new temporary directory (one the
    ``postgres`` user can reach, unlike pytest's own); stop it and delete it on leaving."""
    user = SUPERUSER if os.geteuid() == 0 else None  # initdb and postgres refuse root
    with tempfile.TemporaryDirectory(prefix="logitcache-pg-") as tmp:
        server = PostgresServer(Path(tmp), port, user)
        server.socket_dir.mkdir()
        as_user = {}
        if user is not None:
            owner = pwd.getpwnam(user)
            for path in (server.root, server.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            as_user = {"user": user, "group": owner.pw_gid}
        subprocess.run(
            ["initdb", "-D", str(server.root / "data"), "-U", SUPERUSER, "--auth=trust",
             "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, **as_user,
        )  # fmt: skip
        server.start()
        try:
            yield server
        finally:
            server.stop("immediate")
