"""Where a store's bytes live. A store URL picks the backend; everything above talks to this.

The store needs little from its backend: objects read and replaced atomically, create-only puts,
listing by prefix, a zarr store rooted at a prefix, spooled uploads, and one create-only
``publish`` that makes a fully written staging prefix visible under its final name. Of two
writers publishing one name, exactly one succeeds; the other is told (``False``) and its staging
is removed. That is the whole commit protocol: on a POSIX file system it is a no-replace rename,
on object storage (``store.objectstore``) a create-only claim, copies, and the claim dropped.
Backends without an atomic rename (``renames`` False) let segments seal in place instead: the
segment's group metadata is written last, by ``create`` (a conditional put), see ``writer``.

Names (``rel``) are ``/``-separated and relative to the store's root. Names whose last part
starts with ``.`` are the backend's own (temporary files, claims) and never listed.

Storage errors are typed here, once, for every caller: out of space or quota is
ResourceExhausted, a read-only, refused or unreachable store is Unavailable, each with a message
that says what to do (never the bare errno text). Every backend keeps a :class:`WriteHealth`: the
outcome of its last write, which readiness reports and which logs once when writes start failing
and once when they succeed again.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar, cast
from urllib.parse import urlparse

from zarr.abc.store import ByteRequest
from zarr.abc.store import Store as ZarrStore
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, StorePath

from logitcache.client.errors import (
    InvalidArgument,
    LogitCacheError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

if TYPE_CHECKING:
    from logitcache.server.store.objectstore import S3Settings

log = logging.getLogger(__name__)
# A command (precompute) reports the typed error itself; only a server's log shows the episode.
log.addHandler(logging.NullHandler())


# ---- storage errors -----------------------------------------------------------------------------

_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS}
_REFUSED = {errno.EACCES, errno.EPERM}
_UNREACHABLE = {
    getattr(errno, name)
    for name in ("EIO", "ENOTCONN", "ESTALE", "ETIMEDOUT", "EHOSTDOWN", "EHOSTUNREACH",
                 "ENETUNREACH", "ENODEV", "ENXIO", "ENOLINK", "EREMOTEIO", "ECONNREFUSED")
    if hasattr(errno, name)
}  # fmt: skip


def storage_error(error: OSError, url: str, doing: str) -> LogitCacheError | None:
    """The typed error a caller sees for a failed storage operation; None: not a storage fault
    (a missing file, a bug), which the caller handles or which stays what it is."""
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    where = f"store {url} ({code} while {doing})"
    if error.errno in _OUT_OF_SPACE:
        return ResourceExhausted(
            f"{where} is out of space or quota: free space on it or raise its quota, then retry"
        )
    if error.errno in _READ_ONLY:
        return Unavailable(f"{where} is read-only: remount it writable, then retry")
    if error.errno in _REFUSED:
        return Unavailable(
            f"{where} refused access: give the server's user read and write permission on the "
            "store, then retry"
        )
    if error.errno in _UNREACHABLE:
        return Unavailable(
            f"{where} could not be reached: check its disk or network mount, then retry"
        )
    return None


class WriteHealth:
    """Whether a store accepted its last write, shared by everything that writes to it.

    The first failure of an episode is logged (once, however many requests meet it), and so is
    the first success after it; readiness reports :attr:`error` while it is set.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._error: LogitCacheError | None = None
        self._since = 0.0
        self._lock = threading.Lock()

    @property
    def error(self) -> LogitCacheError | None:
        """The error of the last write if it failed; None while writes succeed."""
        return self._error

    def succeeded(self) -> None:
        if self._error is None:
            return
        with self._lock:
            if self._error is not None:
                log.warning("the store %s accepts writes again, after %.0f s of failures",
                            self.url, time.monotonic() - self._since)  # fmt: skip
                self._error = None

    def failed(self, error: LogitCacheError) -> None:
        with self._lock:
            if self._error is None:
                log.error("the store cannot be written (logged once until it can): %s", error)
                self._since = time.monotonic()
            self._error = error


@contextmanager
def guarded(
    health: WriteHealth, doing: str, *, write: bool = True, proves: bool | None = None
) -> Iterator[None]:
    """Type the storage errors of the block (see :func:`storage_error`). A failed ``write``
    is recorded in ``health``; a success only if it ``proves`` the store takes data (bytes
    written and flushed: a full disk still removes, renames and creates empty files)."""
    try:
        yield
    except OSError as e:
        typed = storage_error(e, health.url, doing)
        if typed is None:
            raise
        if write:
            health.failed(typed)
        raise typed from e
    if write if proves is None else proves:
        health.succeeded()


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _storage_op(
    doing: str, *, write: bool, proves: bool | None = None
) -> Callable[[_Method], _Method]:
    """A backend method whose storage errors are typed (its first argument names the object)."""

    def wrap(method: _Method) -> _Method:
        @functools.wraps(method)
        def run(self: LocalBackend, rel: str, *args: Any, **kwargs: Any) -> Any:
            with guarded(self.health, f"{doing} {rel or '/'}", write=write, proves=proves):
                return method(self, rel, *args, **kwargs)

        return cast(_Method, run)

    return wrap


class Upload(Protocol):
    """An object written in chunks as they arrive, then published create-only (or abandoned)."""

    def write(self, chunk: bytes) -> None: ...

    def publish(self) -> bool:
        """Make the object visible under its name; False (and nothing kept) if it exists."""
        ...

    def abort(self) -> None: ...


ZarrLocation = ZarrStore | StorePath  # where a zarr group lives: its own store, or a path in one


class StoreBackend(Protocol):
    """What the store needs from the place its bytes live (see the module docstring)."""

    url: str
    health: WriteHealth
    renames: bool  # whether ``publish`` is one atomic rename (else segments seal in place)

    def read_bytes(self, rel: str) -> bytes: ...

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace an object atomically: readers see the old or the new bytes, never half."""
        ...

    def read_json(self, rel: str) -> dict: ...

    def write_json(self, rel: str, obj: dict) -> None: ...

    def create(self, rel: str, data: bytes) -> bool:
        """Put an object only if the name is free; False if it exists (then nothing changes)."""
        ...

    def exists(self, rel: str) -> bool: ...

    def list_dir(self, rel: str) -> list[str]:
        """The names one level below ``rel``, sorted; empty if there is nothing there."""
        ...

    def remove_tree(self, rel: str) -> None:
        """Remove an object or everything under a prefix (no error if absent)."""
        ...

    def modified_at(self, rel: str) -> float: ...

    def stored_bytes(self, rel: str = "") -> int:
        """Bytes held under a prefix (or by one object)."""
        ...

    def object_sizes(self, rel: str) -> dict[str, int]:
        """Every object under the prefix ``rel``, named relative to it, with its size in bytes."""
        ...

    def zarr_store(self, rel: str, *, read_only: bool) -> ZarrLocation:
        """A zarr store rooted at ``rel``, so each group is self-contained and movable."""
        ...

    def spool(self, rel: str) -> Upload: ...

    def probe_write(self) -> None:
        """Write and remove a small hidden object (readiness): the typed error if it fails."""
        ...

    def open_read(self, rel: str) -> BinaryIO:
        """A readable binary stream of one object (NotFound if it does not exist)."""
        ...

    def publish(self, staging: str, final: str) -> bool:
        """Publish the fully written prefix ``staging`` as ``final``, create-only.

        True: ``final`` now holds exactly what ``staging`` held. False: ``final`` existed
        (another writer won); ``staging`` has been removed.
        """
        ...

    def unpublish(self, final: str) -> None:
        """Withdraw a published prefix: it leaves listings and reads at once, then is freed.

        The inverse of ``publish`` (garbage collection uses it); no error if it is absent.
        """
        ...

    def clean_abandoned(self, parent: str) -> int:
        """Remove what publishers that died left half done under ``parent``; how many names."""
        ...


@dataclass(frozen=True)
class StoredObject:
    """One object of a backend, named like a file (an input file that lives in the store)."""

    backend: StoreBackend
    rel: str
    label: str = ""  # how messages name it instead of its place in the store ("job input")

    @property
    def name(self) -> str:
        return self.label or f"{self.backend.url.rstrip('/')}/{self.rel}"

    def open(self) -> BinaryIO:
        return self.backend.open_read(self.rel)

    def exists(self) -> bool:
        return self.backend.exists(self.rel)

    def __str__(self) -> str:
        return self.name


# ---- the local file system ----------------------------------------------------------------------


class LocalBackend:
    """A store on a local or shared POSIX file system; the only code that touches its paths."""

    renames = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        self.health = WriteHealth(self.url)

    def _path(self, rel: str) -> Path:
        parts = [p for p in rel.split("/") if p]
        if rel.startswith("/") or any(p in (".", "..") for p in parts):
            raise InvalidArgument(f"store object name {rel!r} must stay inside the store")
        return self.root.joinpath(*parts)

    @_storage_op("reading", write=False)
    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._path(rel).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{rel} is not in store {self.url}") from None

    @_storage_op("writing", write=True)
    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self._path(rel)
        tmp = _write_temp(target, data)
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def read_json(self, rel: str) -> dict:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json_bytes(obj))

    @_storage_op("writing", write=True)
    def create(self, rel: str, data: bytes) -> bool:
        target = self._path(rel)
        tmp = _write_temp(target, data)
        if _rename_no_replace(tmp, target):
            _fsync_dir(target.parent)
            return True
        tmp.unlink()
        return False

    @_storage_op("looking up", write=False)
    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    @_storage_op("listing", write=False)
    def list_dir(self, rel: str) -> list[str]:
        p = self._path(rel)
        if not p.is_dir():
            return []
        return sorted(e.name for e in p.iterdir() if not e.name.startswith("."))

    @_storage_op("removing", write=True, proves=False)
    def remove_tree(self, rel: str) -> None:
        p = self._path(rel)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    @_storage_op("looking up", write=False)
    def modified_at(self, rel: str) -> float:
        try:
            return self._path(rel).stat().st_mtime
        except FileNotFoundError:
            raise NotFound(f"{rel} is not in store {self.url}") from None

    @_storage_op("measuring", write=False)
    def stored_bytes(self, rel: str = "") -> int:
        p = self._path(rel)
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    @_storage_op("measuring", write=False)
    def object_sizes(self, rel: str) -> dict[str, int]:
        p = self._path(rel)
        return {f.relative_to(p).as_posix(): f.stat().st_size for f in p.rglob("*") if f.is_file()}

    def zarr_store(self, rel: str, *, read_only: bool) -> LocalStore:
        return GuardedLocalStore(self._path(rel), read_only=read_only, health=self.health, rel=rel)

    @_storage_op("writing", write=True, proves=False)
    def spool(self, rel: str) -> LocalUpload:
        return LocalUpload(self._path(rel), self.health, rel)

    def probe_write(self) -> None:
        self.write_bytes(_PROBE, b"\0" * _PROBE_BYTES)  # one block: a full disk refuses it
        self._path(_PROBE).unlink(missing_ok=True)

    @_storage_op("reading", write=False)
    def open_read(self, rel: str) -> BinaryIO:
        try:
            return open(self._path(rel), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"{rel} is not in store {self.url}") from None

    @_storage_op("publishing", write=True, proves=False)
    def publish(self, staging: str, final: str) -> bool:
        src, dst = self._path(staging), self._path(final)
        _fsync_tree(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not _rename_no_replace(src, dst):
            shutil.rmtree(src, ignore_errors=True)
            return False
        _fsync_dir(dst.parent)
        _fsync_dir(src.parent)
        return True

    @_storage_op("removing", write=True, proves=False)
    def unpublish(self, final: str) -> None:
        path = self._path(final)
        hidden = path.with_name(f".{path.name}.{uuid.uuid4().hex}.removing")
        try:
            os.rename(path, hidden)  # one step: readers see all of it or nothing
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)
        shutil.rmtree(hidden, ignore_errors=True)

    @_storage_op("cleaning", write=True, proves=False)
    def clean_abandoned(self, parent: str) -> int:
        # A rename is whole or not done, so nothing is ever left half published; but a remover
        # that died between its hiding rename and the removal leaves the hidden name behind.
        # Nothing reads a hidden name, so it is garbage as soon as it exists.
        p = self._path(parent)
        if not p.is_dir():
            return 0
        cleaned = 0
        for entry in p.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".removing"):
                shutil.rmtree(entry, ignore_errors=True)
                cleaned += 1
        return cleaned


class LocalUpload:
    """A spooled upload into a hidden file beside its target, linked into place create-only."""

    def __init__(self, target: Path, health: WriteHealth, rel: str) -> None:
        self._target = target
        self._health = health
        self._doing = f"writing {rel}"
        target.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.spool")
        self._file: BinaryIO | None = open(self._tmp, "wb")

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            raise ValueError("this upload was already published or aborted")
        with guarded(self._health, self._doing, proves=False):  # buffered, not flushed yet
            self._file.write(chunk)

    def publish(self) -> bool:
        if self._file is None:
            raise ValueError("this upload was already published or aborted")
        with guarded(self._health, self._doing):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            if _rename_no_replace(self._tmp, self._target):
                _fsync_dir(self._target.parent)
                return True
        self._tmp.unlink(missing_ok=True)
        return False

    def abort(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # bytes it could not flush (a full disk) belong to a file being removed
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> LocalUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # a no-op after publish


def json_bytes(obj: dict) -> bytes:
    """How the store writes its JSON documents (stable, so equal documents are equal bytes)."""
    return json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")


def _write_temp(target: Path, data: bytes) -> Path:
    """``data`` in a durable hidden file beside ``target``, ready to be renamed into place
    (nothing is left behind if it cannot be written: a full disk keeps no half files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


class GuardedLocalStore(LocalStore):
    """zarr's local store with this backend's typed storage errors and write outcomes."""

    def __init__(
        self, root: Path | str, *, read_only: bool = False, health: WriteHealth, rel: str
    ) -> None:
        super().__init__(root, read_only=read_only)
        self.health = health
        self.rel = rel

    def with_read_only(self, read_only: bool = False) -> GuardedLocalStore:
        return GuardedLocalStore(self.root, read_only=read_only, health=self.health, rel=self.rel)

    async def _open(self, *args: Any, **kwargs: Any) -> None:
        with guarded(self.health, f"opening {self.rel}", write=not self.read_only, proves=False):
            await super()._open(*args, **kwargs)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        with guarded(self.health, f"writing {self.rel}/{key}"):
            await super()._set(key, value, exclusive)

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        with guarded(self.health, f"reading {self.rel}/{key}", write=False):
            return await super().get(key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        with guarded(self.health, f"reading {self.rel}", write=False):
            return await super().get_partial_values(prototype, key_ranges)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Make everything under ``root`` durable before it is published."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


# ---- create-only rename -------------------------------------------------------------------------
#
# Linux: renameat2(RENAME_NOREPLACE), macOS: renamex_np(RENAME_EXCL); both fail with EEXIST when
# the target exists, atomically. Where neither exists, or the file system refuses the flag (NFS
# answers EINVAL), a publisher first takes the name's claim, a hidden file created with O_EXCL
# (create-only on local file systems and NFSv3+), then checks that the target is absent and
# renames. Only the claim's holder renames, so that is create-only among publishers too. The
# claim is removed right after; a publisher killed between claim and rename leaves a claim that
# blocks that one name until it is deleted (segment names are never reused, dataset names are).

_PROBE = ".write-probe"
_PROBE_BYTES = 4096
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCL = 0x4  # darwin stdio.h
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


def _load_no_replace_rename() -> Callable[[bytes, bytes], int] | None:
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda src, dst: fn(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda src, dst: fn(src, dst, _RENAME_EXCL)
    return None


_NO_REPLACE_RENAME = _load_no_replace_rename()


def _rename_no_replace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists; True if this call renamed it."""
    if _NO_REPLACE_RENAME is not None:
        if _NO_REPLACE_RENAME(os.fsencode(src), os.fsencode(dst)) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    return _claimed_rename(src, dst)


def _claimed_rename(src: Path, dst: Path) -> bool:
    """The portable create-only rename: hold the name's O_EXCL claim, check, rename."""
    claim = dst.with_name(f".{dst.name}.claim")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    try:
        if os.path.lexists(dst):
            return False
        os.rename(src, dst)
        return True
    finally:
        os.unlink(claim)


# ---- choosing a backend by URL ------------------------------------------------------------------


def _local_backend(url: str, create: bool, s3: S3Settings | None) -> LocalBackend:
    parsed = urlparse(url)
    root = Path(parsed.path if parsed.scheme == "file" else url).expanduser().resolve()
    if not root.exists():
        if not create:
            raise NotFound(f"store {url!r} does not exist")
        root.mkdir(parents=True)
    elif not root.is_dir():
        raise InvalidArgument(f"store {url!r} is not a directory")
    return LocalBackend(root)


def _s3_backend(url: str, create: bool, s3: S3Settings | None) -> StoreBackend:
    from logitcache.server.store.objectstore import s3_backend  # obstore only where used

    return s3_backend(url, create, s3)


_BACKENDS: dict[str, Callable[[str, bool, S3Settings | None], StoreBackend]] = {
    "": _local_backend,
    "file": _local_backend,
    "s3": _s3_backend,
}


def backend_for_url(url: str, *, create: bool, s3: S3Settings | None = None) -> StoreBackend:
    """The backend of a store URL: a path or ``file://`` URL, or ``s3://bucket/prefix``
    (``s3``: endpoint, region and credentials; empty ones come from the AWS variables)."""
    scheme = urlparse(url).scheme
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    try:
        make = _BACKENDS[scheme]
    except KeyError:
        raise InvalidArgument(
            f"store URL {url!r}: scheme {scheme!r} is not supported by this version "
            "(use a local path, a file:// URL or s3://BUCKET/PREFIX)"
        ) from None
    return make(url, create, s3)
