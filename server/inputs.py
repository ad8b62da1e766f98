"""Reading sequences to capture from JSONL or Parquet, with every problem traced to file and line.

Input rows carry either ``text`` (tokenised with the teacher's tokenizer, special tokens added the
way the tokenizer adds them) or ``input_ids``. The whole file is checked before anything is
written, so a bad row never leaves a partial dataset behind.

The input is a file path, an object in a store (a job's uploaded input, read through the
store's backend) or an open binary stream; it is Parquet when its name ends in ``.parquet``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from logitcache.client.errors import InvalidArgument, NotFound
from logitcache.server.store.backend import StoredObject

OVERFLOW_POLICIES = ("error", "truncate", "split")
InputSource = str | Path | StoredObject | BinaryIO


def source_name(source: InputSource) -> str:
    """How messages and provenance name an input: its path, store object name, or stream name."""
    if isinstance(source, str | Path | StoredObject):
        return str(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<input>"


def open_input(source: InputSource) -> AbstractContextManager[BinaryIO]:
    """The input as a binary stream (a given stream stays open: its caller owns it)."""
    if isinstance(source, StoredObject):
        if not source.exists():
            raise NotFound(f"input {source.name!r} does not exist")
        return source.open()
    if isinstance(source, str | Path):
        if not Path(source).is_file():
            raise NotFound(f"input file {str(source)!r} does not exist")
        return open(source, "rb")
    return nullcontext(source)


@dataclass(frozen=True)
class InputSequence:
    input_ids: np.ndarray  # int32 [T]
    source: str  # "file:line" of the row it came from


@dataclass
class InputReport:
    sequences: list[InputSequence] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows skipped
    truncated: int = 0
    split: int = 0


class _RowError(Exception):
    """A bad row: ``category`` counts skips, the message tells the user what to fix."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category


def load_sequences(
    source: InputSource,
    *,
    vocab_size: int,
    max_len: int,
    tokenize: Callable[[list[str]], list[list[int]]],
    overflow: str = "error",
    skip_invalid: bool = False,
) -> InputReport:
    """Read, tokenise and check every row; raise InvalidArgument naming the first bad one.

    ``overflow`` decides what happens to a sequence longer than ``max_len``: ``error``, keep the
    first ``max_len`` tokens (``truncate``), or cut it into consecutive pieces (``split``).
    ``skip_invalid`` skips bad rows instead of failing, counting them by reason.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise InvalidArgument(f"overflow must be one of {OVERFLOW_POLICIES}, not {overflow!r}")
    name = source_name(source)
    report = InputReport()
    texts: list[tuple[str, str]] = []  # (source, text), tokenised in one batch
    id_rows: list[tuple[str, object]] = []
    with open_input(source) as stream:
        rows: Iterable[tuple[str, object]] = (
            _parquet_rows(stream, name)
            if name.endswith(".parquet")
            else _jsonl_rows(stream, name, report, skip_invalid)
        )
        for where, row in rows:
            try:
                kind, value = _field_of(row)
            except _RowError as e:
                _fail_or_skip(report, skip_invalid, where, e.category, str(e))
                continue
            if kind == "text":
                texts.append((where, str(value)))
            else:
                id_rows.append((where, value))

    tokenized = tokenize([t for _, t in texts]) if texts else []
    candidates = [(s, ids) for (s, _), ids in zip(texts, tokenized, strict=True)] + id_rows
    candidates.sort(key=lambda c: _source_order(c[0]))
    for source, raw in candidates:
        try:
            ids = _check_ids(raw, vocab_size)
        except _RowError as e:
            _fail_or_skip(report, skip_invalid, source, e.category, str(e))
            continue
        if len(ids) <= max_len:
            report.sequences.append(InputSequence(ids, source))
        elif overflow == "truncate":
            report.truncated += 1
            report.sequences.append(InputSequence(ids[:max_len], source))
        elif overflow == "split":
            report.split += 1
            for start in range(0, len(ids), max_len):
                report.sequences.append(InputSequence(ids[start : start + max_len], source))
        else:
            _fail_or_skip(
                report,
                skip_invalid,
                source,
                "too long",
                f"sequence of {len(ids)} tokens exceeds the maximum of {max_len} "
                "(use overflow truncate or overflow split, or a larger max_len)",
                fields=("overflow", "max_len"),
            )
    if not report.sequences:
        raise InvalidArgument(f"{name}: no usable sequences")
    return report


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    """The stream's lines, read in blocks of about 4 MiB.

    Iterating a file line by line from a worker thread takes the GIL for every line and starves
    the server's event loop for the whole read (100-280 ms on a 100k-line input); block reads
    give it back between blocks.
    """
    while block := stream.readlines(1 << 22):
        yield from block


def _jsonl_rows(
    stream: BinaryIO, name: str, report: InputReport, skip_invalid: bool
) -> Iterator[tuple[str, object]]:
    for number, raw_line in enumerate(_lines(stream), start=1):
        where = f"{name}:{number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            _fail_or_skip(report, skip_invalid, where, "malformed JSON", "not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            _fail_or_skip(
                report, skip_invalid, where, "malformed JSON", f"malformed JSON ({e.msg})"
            )


def _parquet_rows(stream: BinaryIO, name: str) -> list[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(stream)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InvalidArgument(f"{name}: not a readable Parquet file ({e})") from None
    column = next((c for c in ("input_ids", "text") if c in table.column_names), None)
    if column is None:
        raise InvalidArgument(
            f"{name}: needs a 'text' or 'input_ids' column, has {table.column_names}"
        )
    values = table.column(column).to_pylist()
    return [(f"{name}:row {n}", {column: v}) for n, v in enumerate(values, start=1)]


def _field_of(row: object) -> tuple[str, object]:
    if not isinstance(row, dict):
        raise _RowError(
            "not an object", "each row must be a JSON object with 'text' or 'input_ids'"
        )
    if "input_ids" in row:
        return "input_ids", row["input_ids"]
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise _RowError("bad text", "'text' must be a string")
        if not text.strip():
            raise _RowError("empty text", "empty text")
        return "text", text
    raise _RowError(
        "missing field", f"missing field 'text' or 'input_ids' (found {sorted(row)[:5]})"
    )


def _check_ids(raw: object, vocab_size: int) -> np.ndarray:
    if not isinstance(raw, list | np.ndarray) or len(raw) == 0:
        raise _RowError("bad input_ids", "'input_ids' must be a non-empty list of integers")
    try:
        arr = np.asarray(raw)
    except ValueError:  # ragged nested lists
        raise _RowError("bad input_ids", "'input_ids' must be a flat list of integers") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise _RowError("bad input_ids", "'input_ids' must be a flat list of integers")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise _RowError(
            "id outside vocabulary",
            f"token id {int(arr[bad[0]])} at index {int(bad[0])} is outside the teacher's "
            f"vocabulary [0, {vocab_size})",
        )
    return arr.astype(np.int32)


def _fail_or_skip(
    report: InputReport,
    skip_invalid: bool,
    source: str,
    category: str,
    reason: str,
    fields: tuple[str, ...] = (),
) -> None:
    if not skip_invalid:
        raise InvalidArgument(f"{source}: {reason}", fields=fields)
    report.skipped[category] += 1


def _source_order(source: str) -> int:
    return int(source.rsplit(":", 1)[1].removeprefix("row "))
