"""The audit log: append-only JSON lines of who did what, to which dataset or teacher, over how
many positions, with the policy decision and the status.

Each line carries the hash of the line before it (``prev``) and its own (``hash``, SHA-256 of
the line's canonical JSON without it), so :func:`verify` finds any edited, deleted or reordered
line. Every file opens with a ``head`` line that carries the last hash of the file before it, so
the chain runs on through rotation; ``audit.head`` holds the newest line's number and hash, so a
log cut short at its end is caught too. Files rotate by size, and rotated files older than the
retention are deleted (the oldest remaining head then anchors the chain).

Writes go through a queue to one writer thread, which writes in batches, each flushed and
fsynced before the head is updated: a caller waits only for a queue slot, and :meth:`close`
drains the queue, so a clean shutdown loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from logitcache.client.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

GENESIS = "0" * 64
HEAD_FILE = "audit.head"
_PREFIX, _SUFFIX = "audit-", ".jsonl"
_BATCH = 1024  # most events in one write + fsync
_TAIL = 1 << 20  # bytes read from a file's end to find its last line


@dataclass(frozen=True)
class AuditEvent:
    """One thing to record. ``who`` is a user (never a token); ``target`` the dataset, teacher,
    job or token acted on; ``decision`` the policy verdict, where one was made."""

    who: str
    action: str
    status: str = "OK"
    target: str | None = None
    positions: int = 0
    decision: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _hash(record: dict[str, Any]) -> str:
    """The hash of a record: of its canonical JSON without its own ``hash``."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def _sealed(record: dict[str, Any]) -> str:
    """The line of ``record`` with its hash added."""
    return _canonical({**record, "hash": _hash(record)}) + "\n"


def _files(directory: Path) -> list[Path]:
    """The log's files, oldest first (names carry a zero-padded index)."""
    return sorted(directory.glob(f"{_PREFIX}*{_SUFFIX}"))


def _timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def _last_record(path: Path) -> tuple[int, str] | None:
    """The number and hash of a file's last complete record (None when it has none), after
    cutting off a partial line that a crash left at its end: the one repair the log allows
    itself, since that line was never written whole."""
    size = path.stat().st_size
    with open(path, "rb+") as f:
        tail_size = min(size, _TAIL)
        while True:
            f.seek(size - tail_size)
            tail = f.read(tail_size)
            end = tail.rfind(b"\n")
            start = tail.rfind(b"\n", 0, end) if end >= 0 else -1
            if start >= 0 or tail_size == size:
                break
            tail_size = min(size, tail_size * 4)
        complete = size - tail_size + end + 1 if end >= 0 else 0
        if complete < size:
            f.truncate(complete)
        if end < 0:
            return None
    try:
        record = json.loads(tail[start + 1 : end])
        return int(record["seq"]), str(record["hash"])
    except (ValueError, KeyError, TypeError):
        raise FailedPrecondition(
            f"{path}: its last line is not an audit record; check the log with "
            "`logitcache audit verify` before appending to it"
        ) from None


class AuditLog:
    """The writer of one audit directory. :meth:`record` is safe from any thread."""

    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int = 64 << 20,
        retention_days: float | None = None,
        queue_size: int = 100_000,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.retention_days = max_bytes, retention_days
        self._queue: queue.Queue[tuple[AuditEvent, float] | None] = queue.Queue(queue_size)
        self._error: BaseException | None = None
        self._closed = False
        self._seq, self._hash, self._path = self._recover()
        self._file = open(self._path, "a", encoding="utf-8")
        if self._seq < 0:
            self._open_file(previous=None)
        self._thread = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._thread.start()

    def _recover(self) -> tuple[int, str, Path]:
        """Where the chain ends: the last record's number and hash, and the file to append to
        (seq -1 when the log is new)."""
        files = _files(self.directory)
        while files and files[-1].stat().st_size == 0:
            files.pop().unlink()  # created, never written: a crash before its head line
        while files:
            last = _last_record(files[-1])
            if last is not None:
                return *last, files[-1]
            files.pop().unlink()  # nothing whole in it: cut off before its head line ended
        return -1, GENESIS, self.directory / f"{_PREFIX}{0:06d}{_SUFFIX}"

    def check(self) -> None:
        """UNAVAILABLE while the log cannot be written: a server refuses calls then, rather
        than serve them unrecorded."""
        if self._error is not None:
            raise Unavailable(f"the audit log cannot be written: {self._error}")
        if self._closed:
            raise Unavailable("the audit log is closed")

    def record(self, event: AuditEvent) -> None:
        """Queue ``event``, stamped now; waits only when the queue is full."""
        self.check()
        self._queue.put((event, time.time()))

    def close(self) -> None:
        """Write everything queued, fsync it and stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._file.close()
        if self._error is not None:
            raise Unavailable(f"the audit log cannot be written: {self._error}")

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # the writer thread

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [item for item in batch if item is not None]
            stopping = len(events) < len(batch)
            if self._error is not None:
                continue  # keep draining so callers never wait on a dead writer
            try:
                self._write(events)
            except OSError as error:
                self._error = error

    def _write(self, events: list[tuple[AuditEvent, float]]) -> None:
        for event, at in events:
            if self._file.tell() >= self.max_bytes:
                self._sync()
                self._rotate()
            self._append(
                {
                    "kind": "event",
                    "time": _timestamp(at),
                    "who": event.who,
                    "action": event.action,
                    "target": event.target,
                    "positions": event.positions,
                    "decision": event.decision,
                    "status": event.status,
                    "detail": event.detail,
                }
            )
        self._sync()

    def _append(self, record: dict[str, Any]) -> None:
        record = {**record, "seq": self._seq + 1, "prev": self._hash}
        line = _sealed(record)
        self._file.write(line)
        self._seq, self._hash = record["seq"], json.loads(line)["hash"]

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        head = self.directory / HEAD_FILE
        tmp = head.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"seq": self._seq, "hash": self._hash, "file": self._path.name}),
            encoding="utf-8",
        )
        os.replace(tmp, head)

    def _open_file(self, previous: str | None) -> None:
        """Start the current file with its head line, the link to the file before it."""
        self._append({"kind": "head", "time": _timestamp(time.time()), "previous_file": previous})
        self._sync()

    def _rotate(self) -> None:
        previous = self._path
        index = int(previous.name[len(_PREFIX) : -len(_SUFFIX)]) + 1
        self._file.close()
        self._path = self.directory / f"{_PREFIX}{index:06d}{_SUFFIX}"
        self._file = open(self._path, "a", encoding="utf-8")
        self._open_file(previous=previous.name)
        if self.retention_days is not None:
            cutoff = time.time() - self.retention_days * 86400
            for path in _files(self.directory)[:-1]:
                if path.stat().st_mtime < cutoff:
                    path.unlink()


# --- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditProblem:
    """The first line that breaks the chain, and how."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class AuditReport:
    files: int
    lines: int
    problem: AuditProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(path: Path | str) -> AuditReport:
    """Check an audit directory (every file, in order, and the head) or one file of it."""
    path = Path(path)
    if path.is_dir():
        files, head_path = _files(path), path / HEAD_FILE
    elif path.is_file():
        files, head_path = [path], None
    else:
        raise NotFound(f"{path}: no audit log there")
    if not files:
        raise InvalidArgument(f"{path}: no audit files ({_PREFIX}*{_SUFFIX}) in it")
    seq, prev, lines = -1, None, 0  # prev None: the first head anchors the chain
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                lines += 1
                problem = _check(line, number == 1, seq, prev)
                if problem is not None:
                    return AuditReport(len(files), lines, AuditProblem(str(file), number, problem))
                record = json.loads(line)
                seq, prev = record["seq"], record["hash"]
    if head_path is not None and head_path.exists():
        try:
            head = json.loads(head_path.read_text(encoding="utf-8"))
            last = (int(head["seq"]), str(head["hash"]))
        except (ValueError, KeyError, TypeError):
            return AuditReport(
                len(files), lines, AuditProblem(str(head_path), 1, "the head is not readable")
            )
        if last != (seq, prev):
            reason = (
                f"the log ends at record {seq} but its head records {last[0]}: lines after the "
                "end of the last file were deleted"
                if last[0] > seq
                else f"the head records {last[0]}, not the last record {seq}"
            )
            return AuditReport(len(files), lines, AuditProblem(str(files[-1]), 0, reason))
    return AuditReport(len(files), lines, None)


def _check(line: str, first_in_file: bool, seq: int, prev: str | None) -> str | None:
    """What is wrong with one line, given the chain so far; None when it continues it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "not a JSON record (the line was edited or cut)"
    if not isinstance(record, dict) or not {"seq", "prev", "hash", "kind"} <= set(record):
        return "not an audit record (seq, prev, hash and kind are missing)"
    if _hash(record) != record["hash"]:
        return "its hash does not match its content: the line was edited"
    if (record["kind"] == "head") != first_in_file:
        return (
            "a file must open with a head line: the file's first lines were deleted"
            if first_in_file
            else "a head line inside a file: lines were moved"
        )
    if prev is None:  # the oldest file kept: its head starts the chain or follows a deleted file
        if record["prev"] == GENESIS and record["seq"] != 0:
            return "the chain's first record is not record 0"
        return None
    if record["seq"] != seq + 1:
        how = (
            "lines were reordered"
            if record["seq"] <= seq
            else "a line before it was deleted, or lines were reordered"
        )
        return f"expected record {seq + 1}, found {record['seq']}: {how}"
    if record["prev"] != prev:
        return "its prev does not match the hash of the line before: that line was edited"
    return None
