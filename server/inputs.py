"""Reading sequences to capture from JSONL or Parquet shards, with every problem traced to its row.

Input rows carry either a text field (``text`` by default; tokenised with the teacher's tokenizer,
special tokens added the way the tokenizer adds them) or a token-id field (``input_ids``). Every
row is checked before anything is written, so a bad row never leaves a partial dataset behind.

The input is a file path, a directory of shards, a glob, a Hugging Face dataset (an ``hf://`` URL,
or a directory written by ``save_to_disk``: see ``inputs_hf``), an object in a store (a job's
uploaded input, read through the store's backend) or an open binary stream; a shard is Parquet
when its name ends in ``.parquet``, a saved dataset's Arrow stream when it ends in ``.arrow``. Shards are read in name order, so the same shard set always gives the
same sequences (and the same dataset keys): resume and idempotence do not depend on how the file
system lists them.

Reading is a stream: JSONL in blocks of lines, Parquet, Arrow and Hugging Face datasets in row
batches, and rows are tokenised and
checked ``BLOCK_ROWS`` at a time, so the raw input is never in memory whole. The checked token ids
are spooled to an unlinked temporary file (in ``TMPDIR``) and mapped back read-only
(``SpooledSequences``): the dataset's key list needs every sequence up front, and this way memory
holds only a small index per sequence, whatever the corpus size.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from logitcache.client.errors import InvalidArgument, NotFound
from logitcache.server.chat import ChatError, ChatMasks, ChatRenderer
from logitcache.server.inputs_hf import (
    SCHEME,
    HFDataset,
    arrow_rows,
    batch_rows,
    is_saved_dataset,
    saved_dataset_shards,
)
from logitcache.server.store.backend import StoredObject

OVERFLOW_POLICIES = ("error", "truncate", "split")
SHARD_SUFFIXES = (".jsonl", ".parquet")
BLOCK_ROWS = 1024  # rows tokenised and checked together: one tokenizer call, bounded memory
SPOOL_TOKENS = 1 << 20  # checked token ids buffered in memory before they go to the spool file
InputSource = str | Path | StoredObject | BinaryIO | HFDataset


def input_source(text: str) -> Path | HFDataset:
    """An input as a user writes it (``--data``, a job's ``server_path``): an ``hf://`` URL is a
    Hugging Face dataset, anything else a path, a directory or a glob."""
    return HFDataset.parse(text) if text.startswith(SCHEME) else Path(text)


def source_name(source: InputSource) -> str:
    """How messages and provenance name an input: its path, store object name, or stream name."""
    if isinstance(source, str | Path | StoredObject | HFDataset):
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
    if isinstance(source, HFDataset):
        raise TypeError(f"{source} is read by its rows (HFDataset.rows), not opened")
    return nullcontext(source)


def input_shards(source: InputSource) -> list[InputSource]:
    """The shards of an input in reading order: a directory's ``.jsonl`` and ``.parquet`` files
    (recursively, skipping names that start with ``.`` or ``_`` such as ``_SUCCESS``) or a glob's
    matches, sorted by name; a saved Hugging Face dataset's Arrow shards in its order; any other
    input (an ``hf://`` dataset too) is its own single shard."""
    if isinstance(source, str) and source.startswith(SCHEME):
        source = HFDataset.parse(source)
    if not isinstance(source, str | Path):
        return [source]
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir() and is_saved_dataset(path):
        return list(saved_dataset_shards(path))
    if path.is_dir():
        shards = sorted(
            (p for p in path.rglob("*") if p.is_file() and _is_shard(p.relative_to(path))),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not shards:
            raise NotFound(f"input directory {str(source)!r} holds no .jsonl or .parquet shards")
        return list(shards)
    if glob.has_magic(str(source)):
        matches = sorted(m for m in glob.glob(str(source), recursive=True) if Path(m).is_file())
        if not matches:
            raise NotFound(f"no input file matches {str(source)!r}")
        return [Path(m) for m in matches]
    return [path]  # missing: open_input names it


def describe_input(source: InputSource) -> dict:
    """The input's provenance: its name, sha256, and every shard's name, size and sha256.

    One shard's sha256 is the file's own; several shards' is the sha256 of their digests in
    reading order, so it names the content whatever the shards are called. A Hugging Face
    dataset lists its local files (none for a hub dataset, whose sha256 is then None) and what
    names it (``hf``: name, config, split, revision, data files)."""
    shards = [_digest(shard) for shard in _content_shards(source)]
    if not shards:
        sha256 = None
    elif len(shards) == 1:
        sha256 = shards[0]["sha256"]
    else:
        sha256 = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    described = {"path": source_name(source), "sha256": sha256, "shards": shards}
    dataset = _hf_dataset(source)
    return described if dataset is None else {**described, "hf": dataset.describe()}


def _hf_dataset(source: InputSource) -> HFDataset | None:
    if isinstance(source, str) and source.startswith(SCHEME):
        return HFDataset.parse(source)
    return source if isinstance(source, HFDataset) else None


def _content_shards(source: InputSource) -> list[InputSource]:
    """The files whose bytes are the input: its shards, or a Hugging Face dataset's local files."""
    dataset = _hf_dataset(source)
    return list(dataset.local_files()) if dataset is not None else input_shards(source)


@dataclass(frozen=True)
class InputSequence:
    input_ids: np.ndarray  # int32 [T]
    source: str  # "file:line" or "file:row N" of the row it came from


class Where(NamedTuple):
    """Where a row is: ``prefix`` ("file:" or "file:row ") and its 1-based number."""

    prefix: str
    number: int

    def __str__(self) -> str:
        return f"{self.prefix}{self.number}"


class SpooledSequences:
    """The checked sequences in input order, their token ids spooled to disk.

    ``add`` buffers ids and appends them to an unlinked temporary file every ``SPOOL_TOKENS``
    tokens; ``seal`` maps the file back read-only. Memory then holds an index per sequence (its
    start, length and source), not its tokens; the returned ``input_ids`` are read-only views.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="logitcache-input-")
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._ends = array("q")  # where each sequence's tokens end in the spool
        self._prefixes: dict[str, int] = {}  # a shard's "file:" or "file:row " -> its index
        self._names: list[str] = []  # the prefixes by index
        self._prefix_of = array("I")  # each sequence's prefix index and row number
        self._number_of = array("q")
        self._tokens: np.ndarray | None = None

    def add(self, ids: np.ndarray, where: Where) -> None:
        if self._tokens is not None:
            raise RuntimeError("sequences are sealed")
        self._pending.append(ids)
        self._pending_tokens += len(ids)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(ids))
        if where.prefix not in self._prefixes:
            self._prefixes[where.prefix] = len(self._names)
            self._names.append(where.prefix)
        self._prefix_of.append(self._prefixes[where.prefix])
        self._number_of.append(where.number)
        if self._pending_tokens >= SPOOL_TOKENS:
            self._flush()

    def seal(self) -> None:
        """Map the spooled tokens back; no more ``add``."""
        self._flush()
        self._file.flush()
        if self._ends:
            mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._tokens = np.frombuffer(mapped, dtype=np.int32)
        else:
            self._tokens = np.empty(0, dtype=np.int32)
        self._file.close()  # the mapping keeps the (unlinked) file's pages

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> InputSequence:
        if self._tokens is None:
            raise RuntimeError("sequences are not sealed yet")
        index = range(len(self._ends))[index]  # negative indexes, IndexError
        start = self._ends[index - 1] if index else 0
        source = f"{self._names[self._prefix_of[index]]}{self._number_of[index]}"
        return InputSequence(self._tokens[start : self._ends[index]], source)

    def __iter__(self) -> Iterator[InputSequence]:
        return (self[i] for i in range(len(self)))

    def _flush(self) -> None:
        if self._pending:
            self._file.write(np.concatenate(self._pending).astype("<i4", copy=False).tobytes())
            self._pending, self._pending_tokens = [], 0


@dataclass
class InputReport:
    sequences: SpooledSequences = field(default_factory=SpooledSequences)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows skipped
    truncated: int = 0
    split: int = 0
    loss_masks: ChatMasks | None = None  # with chat rows: every sequence's mask (server.chat)


class _RowError(Exception):
    """A bad row: ``category`` counts skips, the message tells the user what to fix."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category


Row = tuple[Where, object]  # (where, the parsed row or the _RowError it raised)


def load_sequences(
    source: InputSource,
    *,
    vocab_size: int,
    max_len: int,
    tokenize: Callable[[list[str]], list[list[int]]],
    overflow: str = "error",
    skip_invalid: bool = False,
    text_field: str = "text",
    ids_field: str = "input_ids",
    chat: ChatRenderer | None = None,
) -> InputReport:
    """Read, tokenise and check every row of every shard; InvalidArgument names the first bad one.

    ``overflow`` decides what happens to a sequence longer than ``max_len``: ``error``, keep the
    first ``max_len`` tokens (``truncate``), or cut it into consecutive pieces (``split``).
    ``skip_invalid`` skips bad rows instead of failing, counting them by reason. ``text_field``
    and ``ids_field`` name the columns (a row with both uses the ids). ``chat`` renders the rows
    that hold its messages field (before the others) and gives every sequence a loss mask
    (``report.loss_masks``; all ones for text and id rows).
    """
    if overflow not in OVERFLOW_POLICIES:
        raise InvalidArgument(f"overflow must be one of {OVERFLOW_POLICIES}, not {overflow!r}")
    reader = _Reader(
        vocab_size, max_len, tokenize, overflow, skip_invalid, text_field, ids_field, chat
    )
    if chat is not None:
        reader.report.loss_masks = ChatMasks(chat.provenance)
    block: list[Row] = []
    for shard in input_shards(source):
        for row in reader.rows(shard):
            block.append(row)
            if len(block) == BLOCK_ROWS:
                reader.check(block)
                block = []
    reader.check(block)
    reader.report.sequences.seal()
    if reader.report.loss_masks is not None:
        reader.report.loss_masks.seal()
    if not reader.report.sequences:
        raise InvalidArgument(f"{source_name(source)}: no usable sequences")
    return reader.report


@dataclass
class _Reader:
    """Checks blocks of rows in order, collecting the usable sequences in ``report``."""

    vocab_size: int
    max_len: int
    tokenize: Callable[[list[str]], list[list[int]]]
    overflow: str
    skip_invalid: bool
    text_field: str
    ids_field: str
    chat: ChatRenderer | None = None
    report: InputReport = field(default_factory=InputReport)

    def check(self, block: list[Row]) -> None:
        """Tokenise the block's texts in one call, then check its rows in order."""
        fields: list[tuple[str, object] | _RowError] = []
        for _, row in block:
            try:
                fields.append(self._field_of(row))
            except _RowError as e:
                fields.append(e)
        texts = [str(f[1]) for f in fields if isinstance(f, tuple) and f[0] == "text"]
        tokenized = iter(self.tokenize(texts) if texts else [])
        for (where, _), found in zip(block, fields, strict=True):
            try:
                if isinstance(found, _RowError):
                    raise found
                mask: np.ndarray | None = None
                raw: object  # a chat row's rendered ids, a text's or an ids row's list
                if found[0] == "messages":
                    raw, mask = self._render(found[1])
                else:
                    raw = next(tokenized) if found[0] == "text" else found[1]
                self._accept(where, _check_ids(raw, self.vocab_size), mask)
            except _RowError as e:
                self._fail_or_skip(where, e.category, str(e))

    @property
    def columns(self) -> tuple[str, ...]:
        """The fields a row may use, in order of preference: what columnar shards read."""
        chat = (self.chat.field,) if self.chat is not None else ()
        return (*chat, self.ids_field, self.text_field)

    def rows(self, shard: InputSource) -> Iterator[Row]:
        """The rows of one shard in reading order, by its kind."""
        name = source_name(shard)
        if isinstance(shard, HFDataset):
            yield from _numbered(f"{name}:row ", shard.rows(self.columns))
            return
        with open_input(shard) as stream:
            if name.endswith(".parquet"):
                yield from _numbered(f"{name}:row ", self.parquet_rows(stream, name))
            elif name.endswith(".arrow"):
                yield from _numbered(f"{name}:row ", arrow_rows(stream, name, self.columns))
            else:
                yield from _jsonl_rows(stream, name)

    def parquet_rows(self, stream: BinaryIO, name: str) -> Iterator[dict[str, object]]:
        """The rows of a Parquet shard, read one row batch at a time (only the columns used)."""
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(stream)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise InvalidArgument(f"{name}: not a readable Parquet file ({e})") from None
        names = parquet.schema_arrow.names
        present = [c for c in self.columns if c in names]
        if not present:
            raise InvalidArgument(
                f"{name}: needs a {self.text_field!r} or {self.ids_field!r} column, has {names}"
            )
        for batch in parquet.iter_batches(batch_size=BLOCK_ROWS, columns=present):
            yield from batch_rows({c: batch.column(c).to_pylist() for c in present}, present)

    def _field_of(self, row: object) -> tuple[str, object]:
        if isinstance(row, _RowError):
            raise row
        wanted = f"{self.text_field!r} or {self.ids_field!r}"
        if self.chat is not None:
            wanted = f"{self.chat.field!r}, {wanted}"
        if not isinstance(row, dict):
            raise _RowError("not an object", f"each row must be a JSON object with {wanted}")
        if self.chat is not None and row.get(self.chat.field) is not None:
            return "messages", row[self.chat.field]
        if self.ids_field in row:
            return "input_ids", row[self.ids_field]
        if self.text_field in row:
            text = row[self.text_field]
            if not isinstance(text, str):
                raise _RowError("bad text", f"{self.text_field!r} must be a string")
            if not text.strip():
                raise _RowError("empty text", "empty text")
            return "text", text
        raise _RowError("missing field", f"missing field {wanted} (found {sorted(row)[:5]})")

    def _render(self, messages: object) -> tuple[np.ndarray, np.ndarray]:
        assert self.chat is not None
        try:
            return self.chat.render(messages)
        except ChatError as e:
            raise _RowError("bad messages", f"{self.chat.field!r}: {e}") from None

    def _accept(self, where: Where, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        report, max_len = self.report, self.max_len
        if len(ids) <= max_len:
            self._add(where, ids, mask, slice(None))
        elif self.overflow == "truncate":
            report.truncated += 1
            self._add(where, ids, mask, slice(max_len))
        elif self.overflow == "split":
            report.split += 1
            for start in range(0, len(ids), max_len):
                self._add(where, ids, mask, slice(start, start + max_len))
        else:
            self._fail_or_skip(
                where,
                "too long",
                f"sequence of {len(ids)} tokens exceeds the maximum of {max_len} "
                "(use overflow truncate or overflow split, or a larger max_len)",
                fields=("overflow", "max_len"),
            )

    def _add(self, where: Where, ids: np.ndarray, mask: np.ndarray | None, piece: slice) -> None:
        """Keep ``piece`` of a sequence, and of its loss mask (a row without one: all ones)."""
        self.report.sequences.add(ids[piece], where)
        if self.report.loss_masks is not None:
            full = np.ones(len(ids), dtype=np.uint8) if mask is None else mask
            self.report.loss_masks.add(full[piece])

    def _fail_or_skip(
        self, where: Where, category: str, reason: str, fields: tuple[str, ...] = ()
    ) -> None:
        if not self.skip_invalid:
            raise InvalidArgument(f"{where}: {reason}", fields=fields)
        self.report.skipped[category] += 1


def _numbered(prefix: str, rows: Iterator[dict[str, object]]) -> Iterator[Row]:
    """Rows of a columnar shard with their places, ``prefix`` and 1-based row numbers."""
    for number, row in enumerate(rows, start=1):
        yield Where(prefix, number), row


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    """The stream's lines, read in blocks of about 4 MiB.

    Iterating a file line by line from a worker thread takes the GIL for every line and starves
    the server's event loop for the whole read (100-280 ms on a 100k-line input); block reads
    give it back between blocks.
    """
    while block := stream.readlines(1 << 22):
        yield from block


def _jsonl_rows(stream: BinaryIO, name: str) -> Iterator[Row]:
    """The parsed rows of a JSONL shard; a line that does not parse yields its _RowError."""
    for number, raw_line in enumerate(_lines(stream), start=1):
        where = Where(f"{name}:", number)
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            yield where, _RowError("malformed JSON", "not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, _RowError("malformed JSON", f"malformed JSON ({e.msg})")


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


def _is_shard(relative: Path) -> bool:
    hidden = any(part.startswith((".", "_")) for part in relative.parts)
    return relative.suffix in SHARD_SUFFIXES and not hidden


def _digest(shard: InputSource) -> dict:
    h, size = hashlib.sha256(), 0
    with open_input(shard) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"path": source_name(shard), "size": size, "sha256": h.hexdigest()}
