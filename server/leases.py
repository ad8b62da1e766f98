"""Leases: which process owns a piece of shared work (a dataset being built, its job), until when.

A lease has one owner and an expiry time. The owner renews it well before it expires; anyone
else may take it only once it has expired, or at once when its holder ran on this host and its
process is gone (a crash or kill -9 is seen without waiting for the expiry). A server or a
``precompute`` process that stalls past the expiry loses its lease to whoever asks next, and
learns so at its next renewal.

:class:`LeaseStore` is the whole interface. :class:`FileLeaseStore` keeps one small JSON document
per lease next to a local store and changes it under an exclusive ``flock``, writing each
document atomically (a temporary file renamed over it). :class:`PostgresLeaseStore` keeps them in
the shared state (a ``postgresql://`` state URL), for servers and workers on several machines;
:func:`leases_for` picks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.server.store.liveness import process_alive

if TYPE_CHECKING:  # the store is imported where leases are picked, so a lease holder stays light
    from logitcache.server.store.store import Store

log = logging.getLogger(__name__)
DEFAULT_LEASE_S = 30.0  # a holder renews every third of this; a dead one is replaced after it


@dataclass(frozen=True)
class Lease:
    """Who holds the lease ``name`` until ``expires_at`` (Unix time), and what for (``note``)."""

    name: str
    owner: str
    host: str
    pid: int
    note: str
    expires_at: float

    def live(self, now: float) -> bool:
        """Not expired, and (when held on this host) its process still runs."""
        if now >= self.expires_at:
            return False
        return self.host != socket.gethostname() or process_alive(self.pid)

    def describe(self) -> str:
        return f"{self.note} (pid {self.pid} on host {self.host})"


class LeaseStore(Protocol):
    """Leases of one owner (``owner``): a process or a part of one, such as a job manager."""

    owner: str

    def acquire(self, name: str, ttl_s: float, note: str) -> Lease | None:
        """The lease, now ours for ``ttl_s`` seconds; None while another owner holds it."""

    def renew(self, name: str, ttl_s: float) -> Lease | None:
        """Extend our lease; None if it is no longer ours (it expired and was taken)."""

    def release(self, name: str) -> None:
        """Give up our lease (nothing happens if it is not ours)."""

    def holder(self, name: str) -> Lease | None:
        """The live holder of ``name``, if any."""


def new_owner() -> str:
    """An owner id that no other process, nor another owner of this one, ever has."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class FileLeaseStore:
    """Leases as files under ``root`` (``root/<name>.json``), for processes on one host or one
    shared file system with working ``flock``."""

    def __init__(self, root: Path, owner: str | None = None) -> None:
        self.root = root
        self.owner = owner or new_owner()

    def acquire(self, name: str, ttl_s: float, note: str) -> Lease | None:
        with self._locked(name) as path:
            held = _read(path)
            if held is not None and held.owner != self.owner and held.live(time.time()):
                return None
            return self._write(path, name, ttl_s, note)

    def renew(self, name: str, ttl_s: float) -> Lease | None:
        with self._locked(name) as path:
            held = _read(path)
            if held is None or held.owner != self.owner:
                return None
            return self._write(path, name, ttl_s, held.note)

    def release(self, name: str) -> None:
        with self._locked(name) as path:
            held = _read(path)
            if held is not None and held.owner == self.owner:
                path.unlink(missing_ok=True)

    def holder(self, name: str) -> Lease | None:
        held = _read(self._path(name))
        return held if held is not None and held.live(time.time()) else None

    def _path(self, name: str) -> Path:
        if not name or any(part in ("", ".", "..") for part in name.split("/")):
            raise InvalidArgument(f"lease name {name[:64]!r} is not a relative name")
        return self.root.joinpath(*name.split("/")).with_suffix(".json")

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield path  # the lock goes with the file descriptor

    def _write(self, path: Path, name: str, ttl_s: float, note: str) -> Lease:
        lease = Lease(
            name=name,
            owner=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            note=note,
            expires_at=time.time() + ttl_s,
        )
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(asdict(lease)))
        os.replace(tmp, path)
        return lease


def _read(path: Path) -> Lease | None:
    try:
        return Lease(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None


_LEASES_DDL = """
CREATE TABLE IF NOT EXISTS leases (
    scope TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL, host TEXT NOT NULL,
    pid INTEGER NOT NULL, note TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, name));
"""
_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION"
_LEASE_COLUMNS = "name, owner, host, pid, note, expires_at"


class PostgresLeaseStore:
    """Leases as rows of one PostgreSQL table, for processes on any number of hosts.

    ``scope`` (the store's URL) keeps the leases of different stores that share one database
    apart. Expiry is measured on the database's clock, so hosts whose clocks disagree agree on
    it. A takeover locks the row (``SELECT ... FOR UPDATE``) while it checks the holder, so of
    many acquirers exactly one wins; a new lease is an ``INSERT ... ON CONFLICT DO NOTHING``.
    A holder on another host is freed only by expiry; one on this host also when its process
    is gone, as with :class:`FileLeaseStore`.
    """

    def __init__(self, url: str, scope: str, owner: str | None = None) -> None:
        from logitcache.server.postgres import Database

        self.scope = scope
        self.owner = owner or new_owner()
        self._db = Database(url)
        self._db.ensure_schema("leases", 1, _LEASES_DDL)

    def acquire(self, name: str, ttl_s: float, note: str) -> Lease | None:
        mine = (self.owner, socket.gethostname(), os.getpid(), note, ttl_s)
        insert = (
            f"INSERT INTO leases VALUES (%s, %s, %s, %s, %s, %s, {_NOW} + %s) "
            f"ON CONFLICT (scope, name) DO NOTHING RETURNING {_LEASE_COLUMNS}"
        )
        with self._db.transaction() as db:
            row = db.execute(insert, (self.scope, name, *mine)).fetchone()
            if row is not None:
                return Lease(*row)
            found = db.execute(
                f"SELECT {_LEASE_COLUMNS}, {_NOW} FROM leases "
                "WHERE scope = %s AND name = %s FOR UPDATE",
                (self.scope, name),
            ).fetchone()
            if found is None:  # released meanwhile: whoever inserts it first wins
                row = db.execute(insert, (self.scope, name, *mine)).fetchone()
            elif found[1] != self.owner and Lease(*found[:-1]).live(found[-1]):
                return None
            else:  # expired, its process gone, or ours: taken over under the row lock
                row = db.execute(
                    f"UPDATE leases SET owner = %s, host = %s, pid = %s, note = %s, "
                    f"expires_at = {_NOW} + %s WHERE scope = %s AND name = %s "
                    f"RETURNING {_LEASE_COLUMNS}",
                    (*mine, self.scope, name),
                ).fetchone()
        return Lease(*row) if row is not None else None

    def renew(self, name: str, ttl_s: float) -> Lease | None:
        with self._db.transaction() as db:
            row = db.execute(
                f"UPDATE leases SET expires_at = {_NOW} + %s "
                f"WHERE scope = %s AND name = %s AND owner = %s RETURNING {_LEASE_COLUMNS}",
                (ttl_s, self.scope, name, self.owner),
            ).fetchone()
        return Lease(*row) if row is not None else None

    def release(self, name: str) -> None:
        with self._db.transaction() as db:
            db.execute(
                "DELETE FROM leases WHERE scope = %s AND name = %s AND owner = %s",
                (self.scope, name, self.owner),
            )

    def holder(self, name: str) -> Lease | None:
        with self._db.transaction() as db:
            row = db.execute(
                f"SELECT {_LEASE_COLUMNS}, {_NOW} FROM leases WHERE scope = %s AND name = %s",
                (self.scope, name),
            ).fetchone()
        if row is None:
            return None
        held = Lease(*row[:-1])
        return held if held.live(row[-1]) else None

    def close(self) -> None:
        self._db.close()


def leases_for(store: Store, owner: str | None = None, state_url: str = "") -> LeaseStore:
    """The leases of everything that works on ``store``: rows in the shared state when
    ``state_url`` is a ``postgresql://`` URL (servers and workers on several hosts), otherwise
    files in ``leases/`` inside a local store."""
    from logitcache.server.postgres import is_postgres_url
    from logitcache.server.store.backend import LocalBackend

    if is_postgres_url(state_url):
        return PostgresLeaseStore(state_url, store.url, owner)
    if state_url:
        raise InvalidArgument("a state URL is a postgresql:// URL", fields=("state_url",))
    if not isinstance(store.backend, LocalBackend):
        # Object storage has no flock: without shared state, the processes of this one host
        # share leases in a local folder (one server on S3 works alone; replicas on several
        # hosts need --state-url postgresql://...).
        from logitcache.server.store.objectstore import host_lease_dir

        return FileLeaseStore(host_lease_dir(store.url), owner)
    return FileLeaseStore(store.backend.root / "leases", owner)


def dataset_lease(name: str) -> str:
    """The lease held by whoever builds dataset ``name`` (a precompute, or a server's job)."""
    return f"datasets/{name}"


def busy(what: str, holder: Lease | None, todo: str) -> str:
    """What to say about work that another owner holds: who holds it and what to do about it."""
    if holder is None:  # released between our attempt and the look
        return f"{what} was just held by another process; try again"
    until = time.strftime("%H:%M:%S", time.localtime(holder.expires_at))
    return f"{what} is held by {holder.describe()}, lease renewed until {until}; {todo}"


@contextlib.contextmanager
def claimed(
    leases: LeaseStore, name: str, note: str, *, what: str, todo: str,
    ttl_s: float = DEFAULT_LEASE_S,
) -> Iterator[Lease]:  # fmt: skip
    """Hold ``name`` for a short change (not renewed); :func:`busy` if another owner holds it."""
    lease = leases.acquire(name, ttl_s, note)
    if lease is None:
        raise FailedPrecondition(busy(what, leases.holder(name), todo))
    try:
        yield lease
    finally:
        leases.release(name)


class LeaseKeeper:
    """Holds leases of one :class:`LeaseStore` and renews them on the running loop.

    Every ``ttl_s / 3`` seconds each held lease is renewed (in an executor: it is file I/O); a
    lease that could not be renewed is dropped and ``on_lost(name)`` is called, so that its
    holder stops the work that lease covered.
    """

    def __init__(
        self,
        leases: LeaseStore,
        ttl_s: float = DEFAULT_LEASE_S,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.leases = leases
        self.ttl_s = ttl_s
        self.on_lost = on_lost
        self._held: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def holds(self, name: str) -> bool:
        return name in self._held

    async def acquire(self, name: str, note: str) -> bool:
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, self.leases.acquire, name, self.ttl_s, note) is None:
            return False
        self._held.add(name)
        if self._task is None:
            self._task = loop.create_task(self._renew_forever())
        return True

    async def release(self, name: str) -> None:
        if name in self._held:
            self._held.discard(name)
            await asyncio.get_running_loop().run_in_executor(None, self.leases.release, name)

    async def close(self) -> None:
        """Stop renewing and release every lease held."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for name in list(self._held):
            await self.release(name)

    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            for name in list(self._held):
                renewed = await loop.run_in_executor(None, self.leases.renew, name, self.ttl_s)
                if renewed is None and name in self._held:
                    self._held.discard(name)
                    log.warning("lost the lease %s: another process took it over", name)
                    if self.on_lost is not None:
                        self.on_lost(name)


@contextlib.asynccontextmanager
async def holding(
    leases: LeaseStore, name: str, note: str, *, what: str, todo: str,
    ttl_s: float = DEFAULT_LEASE_S, wait_s: float = 0.0,
) -> AsyncIterator[LeaseKeeper]:  # fmt: skip
    """Hold the lease ``name`` (renewed) for the body; :func:`busy` if another owner holds it
    still after ``wait_s`` seconds (a retried worker waits out its killed predecessor's lease,
    which only expiry frees when that one ran on another host)."""
    keeper = LeaseKeeper(leases, ttl_s)
    deadline = time.monotonic() + wait_s
    while not await keeper.acquire(name, note):
        holder = await asyncio.get_running_loop().run_in_executor(None, leases.holder, name)
        if time.monotonic() >= deadline:
            raise FailedPrecondition(busy(what, holder, todo))
        log.info("waiting for %s", busy(what, holder, "it expires or is released"))
        await asyncio.sleep(min(1.0, ttl_s / 10))
    try:
        yield keeper
    finally:
        await keeper.close()
