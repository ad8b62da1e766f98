"""The one batched read path: keys in, the encoded records as concatenated arrays out.

Streaming, read-through hits and a trainer reading a store directly all come here. Each key is
looked up in the store's index, its segment is taken whole from a :class:`SegmentCache`, and the
records are cut out with slices and concatenated once per array, in the order asked for. The
result is what the wire carries and what a codec decodes in one call, with no per-record objects
and no decoding on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from logitcache.client.codecs import codec_for
from logitcache.client.errors import FailedPrecondition
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace
from logitcache.client.wire import split_records
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.segments import codec_fields
from logitcache.server.store.writer import CapturedRecord

if TYPE_CHECKING:
    from logitcache.server.store.store import Store


@dataclass(frozen=True)
class RecordSlice:
    """Where one record's encoding lies in arrays of concatenated records (a segment's, or its own)."""

    key: bytes
    source: Mapping[str, np.ndarray]  # "input_ids" and the codec's arrays
    start: int  # positions start:stop
    stop: int
    entry_start: int  # entries entry_start:entry_stop (codecs with per-entry arrays)
    entry_stop: int


def record_slice(record: CapturedRecord, space: CaptureSpace) -> RecordSlice:
    """A record held in memory (computed, not sealed yet) as a slice of its own arrays."""
    per_entry = [f.name for f in codec_fields(space) if f.per == "entry"]
    entries = len(record.arrays[per_entry[0]]) if per_entry else 0
    source = {"input_ids": record.input_ids, **record.arrays}
    return RecordSlice(record.key, source, 0, len(record), 0, entries)


@dataclass(frozen=True)
class EncodedBatch:
    """Records of one capture space, concatenated: what the wire carries, undecoded."""

    space: CaptureSpace
    keys: list[bytes]
    lengths: np.ndarray  # int64 [n]
    input_ids: np.ndarray  # int32 [P]
    arrays: dict[str, np.ndarray]  # the codec's arrays over all P positions (or E entries)
    entries: np.ndarray  # int64 [n]: entries of each record (0 for codecs without entries)
    found: np.ndarray  # int64 [n]: for each record, its index in the keys that were asked for

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def positions(self) -> int:
        return int(self.input_ids.shape[0])

    def decode(self) -> list[Record]:
        """Every record, decoded with the space's codec in one call for the whole batch."""
        if not self.keys:
            return []
        space = self.space
        rows = codec_for(space.codec, space.vocab_size, space.temperatures).decode(self.arrays)
        keys = [k.hex() for k in self.keys]
        return split_records(keys, self.input_ids, self.lengths, rows, self.arrays.get("n"))

    def records(self) -> list[CapturedRecord]:
        """Every record on its own, still encoded (views into the batch's arrays)."""
        if not self.keys:
            return []
        position_bounds = np.cumsum(self.lengths)[:-1]
        entry_bounds = np.cumsum(self.entries)[:-1]
        ids = np.split(self.input_ids, position_bounds)
        per_record: list[dict[str, np.ndarray]] = [{} for _ in self.keys]
        for f in codec_fields(self.space):
            bounds = entry_bounds if f.per == "entry" else position_bounds
            for arrays, part in zip(per_record, np.split(self.arrays[f.name], bounds), strict=True):
                arrays[f.name] = part
        return [
            CapturedRecord(key, part, arrays)
            for key, part, arrays in zip(self.keys, ids, per_record, strict=True)
        ]


def gather(
    space: CaptureSpace, slices: Sequence[RecordSlice], found: np.ndarray | None = None
) -> EncodedBatch:
    """Concatenate records given as slices, in order (neighbouring slices are copied as one)."""
    runs: list[list] = []  # [source, start, stop, entry_start, entry_stop]
    for s in slices:
        last = runs[-1] if runs else None
        if last is not None and last[0] is s.source and last[2] == s.start:
            last[2], last[4] = s.stop, s.entry_stop
        else:
            runs.append([s.source, s.start, s.stop, s.entry_start, s.entry_stop])

    def cat(name: str, per_entry: bool, empty: np.ndarray) -> np.ndarray:
        if not runs:
            return empty
        lo, hi = (3, 4) if per_entry else (1, 2)
        return np.concatenate([r[0][name][r[lo] : r[hi]] for r in runs])

    arrays = {
        f.name: cat(f.name, f.per == "entry", np.empty((0, space.k) if f.per_k else (0,), f.dtype))
        for f in codec_fields(space)
    }
    return EncodedBatch(
        space=space,
        keys=[s.key for s in slices],
        lengths=np.array([s.stop - s.start for s in slices], dtype=np.int64),
        entries=np.array([s.entry_stop - s.entry_start for s in slices], dtype=np.int64),
        input_ids=cat("input_ids", False, np.empty(0, np.int32)).astype(np.int32, copy=False),
        arrays=arrays,
        found=np.arange(len(slices), dtype=np.int64) if found is None else found,
    )


def locate(store: Store, cache: SegmentCache, keys: Sequence[bytes]) -> list[RecordSlice | None]:
    """Each key's record in its (cached) sealed segment, or None where it is not sealed."""
    out: list[RecordSlice | None] = []
    segments: dict[int, Mapping[str, np.ndarray]] = {}
    for key in keys:
        location = store.find(key)
        if location is None:
            out.append(None)
            continue
        segment = location.segment
        source = segments.get(id(segment))
        if source is None:
            source = segments[id(segment)] = cache.arrays(segment)
        out.append(RecordSlice(key, source, *segment.span(location.index)))
    return out


def read_batch(
    store: Store,
    cache: SegmentCache,
    space: CaptureSpace,
    keys: Sequence[bytes],
    *,
    allow_missing: bool = False,
    label: Callable[[int], str] | None = None,
) -> EncodedBatch:
    """The records of ``keys`` in order; ``found`` says which of them were there.

    Keys not in the index are looked for once more after a refresh (another writer may have
    sealed them). Without ``allow_missing`` a missing key is FailedPrecondition, named by
    ``label(i)`` (default: its hex key).
    """
    keys = [bytes(k) for k in keys]
    slices = locate(store, cache, keys)
    missing = [i for i, s in enumerate(slices) if s is None]
    if missing:
        store.refresh()
        for i, s in zip(missing, locate(store, cache, [keys[i] for i in missing]), strict=True):
            slices[i] = s
    found = [i for i, s in enumerate(slices) if s is not None]
    if len(found) < len(keys) and not allow_missing:
        first = next(i for i, s in enumerate(slices) if s is None)
        name = label(first) if label is not None else f"record {keys[first].hex()}"
        raise FailedPrecondition(f"{name} is missing from store {store.url}")
    present = [s for s in slices if s is not None]
    return gather(space, present, np.asarray(found, dtype=np.int64))
