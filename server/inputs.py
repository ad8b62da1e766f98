"""Reading sequences to capture from JSONL or Parquet, with every problem traced to file and line.

Input rows carry either ``text`` (tokenised with the teacher's tokenizer, special tokens added the
way the tokenizer adds them) or ``input_ids``. The whole file is checked before anything is
written, so a bad row never leaves a partial dataset behind.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from logitcache.client.errors import InvalidArgument, NotFound

OVERFLOW_POLICIES = ("error", "truncate", "split")


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
    path: str | Path,
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
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"input file {str(path)!r} does not exist")
    report = InputReport()
    texts: list[tuple[str, str]] = []  # (source, text), tokenised in one batch
    id_rows: list[tuple[str, object]] = []
    for source, row in _rows(path, report, skip_invalid):
        try:
            kind, value = _field_of(row)
        except _RowError as e:
            _fail_or_skip(report, skip_invalid, source, e.category, str(e))
            continue
        (texts if kind == "text" else id_rows).append((source, value))

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
                "(use --overflow truncate or --overflow split, or a larger --max-len)",
            )
    if not report.sequences:
        raise InvalidArgument(f"{path}: no usable sequences")
    return report


def _rows(path: Path, report: InputReport, skip_invalid: bool) -> Iterator[tuple[str, object]]:
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    with open(path, "rb") as f:
        for number, raw_line in enumerate(f, start=1):
            source = f"{path}:{number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                _fail_or_skip(report, skip_invalid, source, "malformed JSON", "not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as e:
                _fail_or_skip(
                    report, skip_invalid, source, "malformed JSON", f"malformed JSON ({e.msg})"
                )


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InvalidArgument(f"{path}: not a readable Parquet file ({e})") from None
    column = next((c for c in ("input_ids", "text") if c in table.column_names), None)
    if column is None:
        raise InvalidArgument(
            f"{path}: needs a 'text' or 'input_ids' column, has {table.column_names}"
        )
    for number, value in enumerate(table.column(column).to_pylist(), start=1):
        yield f"{path}:row {number}", {column: value}


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
    report: InputReport, skip_invalid: bool, source: str, category: str, reason: str
) -> None:
    if not skip_invalid:
        raise InvalidArgument(f"{source}: {reason}")
    report.skipped[category] += 1


def _source_order(source: str) -> int:
    return int(source.rsplit(":", 1)[1].removeprefix("row "))
