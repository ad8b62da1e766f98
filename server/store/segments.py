"""Segments: the unit of writing. One writer fills a segment, then seals it atomically.

A segment is a zarr group holding a batch of records of one capture space, concatenated along
positions. It is written completely under a temporary name by exactly one writer, then published
by one atomic seal. Readers list only sealed segments, so a crash leaves at most an unsealed
directory that nobody reads, and sealed segments are never modified.

Layout of a segment group (P positions and E entries over n records):
    keys            uint8  [n, 16]  record keys, in write order
    offsets         int64  [n + 1]  record i spans positions offsets[i]:offsets[i+1]
    entry_offsets   int64  [n + 1]  and entries entry_offsets[i]:entry_offsets[i+1] (codecs
                                    with per-entry arrays only)
    input_ids       int32  [P]
    one array per field of the space's codec (logitcache.client.codecs), [P, ...] or [E]

Per-entry arrays of ids are compressed with plain zstd (byte shuffling breaks the repeated id
runs that zstd finds); every other array with byte shuffle + zstd.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from logitcache.client.codecs import Field, TopKRows, codec_for
from logitcache.client.record import Record
from logitcache.client.space import KEY_BYTES, CaptureSpace
from logitcache.server.store.backend import LocalStorage

SEGMENT_FORMAT = "logitcache-segment-v1"
CHUNK_POSITIONS = 8192
ENTRY_CHUNK = 1 << 21  # entries per chunk of a per-entry array (32,768 positions at k = 64)
_SHUFFLED = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
_PLAIN = ZstdCodec(level=7)


def segments_dir(space_id: str) -> str:
    return f"spaces/{space_id}/segments"


def unsealed_dir(space_id: str) -> str:
    return f"spaces/{space_id}/unsealed"


def codec_fields(space: CaptureSpace) -> tuple[Field, ...]:
    return codec_for(space.codec, space.vocab_size).fields


def field_names(space: CaptureSpace) -> tuple[str, ...]:
    return tuple(f.name for f in codec_fields(space))


def concat_arrays(space: CaptureSpace, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The codec arrays of several records, concatenated (per field, along the first axis)."""
    return {name: np.concatenate([p[name] for p in parts]) for name in field_names(space)}


@dataclass
class CapturedRecord:
    """One sequence and its rows in the codec's encoding, waiting to be written (or sent)."""

    key: bytes
    input_ids: np.ndarray  # int32 [T]
    arrays: dict[str, np.ndarray]  # the codec's arrays for T rows

    @classmethod
    def encode(cls, key: bytes, input_ids: np.ndarray, rows: TopKRows, space: CaptureSpace):
        codec = codec_for(space.codec, space.vocab_size)
        return cls(key, np.asarray(input_ids, dtype=np.int32), codec.encode(rows))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class SegmentBuilder:
    """Accumulates records in memory for one segment; :meth:`seal` writes and publishes them."""

    storage: LocalStorage
    space: CaptureSpace
    records: list[CapturedRecord] = field(default_factory=list)
    positions: int = 0

    def add(self, record: CapturedRecord) -> None:
        self.records.append(record)
        self.positions += len(record.input_ids)

    def seal(self) -> str:
        """Write under a temporary name, then publish atomically. Returns the segment id."""
        if not self.records:
            raise ValueError("refusing to seal an empty segment")
        space = self.space
        lengths = np.array([len(r.input_ids) for r in self.records], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        fields = codec_fields(space)
        arrays: dict[str, np.ndarray] = {
            "keys": np.frombuffer(b"".join(r.key for r in self.records), dtype=np.uint8).reshape(
                -1, KEY_BYTES
            ),
            "offsets": offsets,
            "input_ids": np.concatenate([r.input_ids for r in self.records]).astype(np.int32),
            **concat_arrays(space, [r.arrays for r in self.records]),
        }
        per_entry = [f.name for f in fields if f.per == "entry"]
        if per_entry:
            entries = np.array([len(r.arrays[per_entry[0]]) for r in self.records], dtype=np.int64)
            arrays["entry_offsets"] = np.concatenate([[0], np.cumsum(entries)])
        plain = {f.name for f in fields if not f.shuffle}
        writer_id = uuid.uuid4().hex[:12]
        tmp_rel = f"{unsealed_dir(space.space_id)}/{writer_id}"
        group = zarr.open_group(store=self.storage.zarr_store(tmp_rel, read_only=False), mode="w")
        self.storage.write_json(
            f"{tmp_rel}/writer.json",
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()},
        )
        group.attrs.update(
            {
                "format": SEGMENT_FORMAT,
                "space_id": space.space_id,
                "codec": space.codec,
                "records": len(self.records),
                "positions": int(offsets[-1]),
            }
        )
        for name, data in arrays.items():
            rows = ENTRY_CHUNK if name in per_entry else CHUNK_POSITIONS
            chunks = (min(rows, max(1, data.shape[0])),) + data.shape[1:]
            compressor = _PLAIN if name in plain else _SHUFFLED
            group.create_array(name, data=data, chunks=chunks, compressors=compressor)
        # Named at seal time, so the sorted order of segment ids is (per clock) the seal order.
        segment_id = f"{time.time_ns():020d}-{writer_id}"
        self.storage.seal(tmp_rel, f"{segments_dir(space.space_id)}/{segment_id}")
        return segment_id


class SegmentReader:
    """Read access to one sealed segment.

    Keys and offsets are loaded when the segment is opened (the store's index needs them). The
    encoded arrays are read on demand, either one record at a time (zarr reads only the chunks it
    needs) or all at once into memory with :meth:`load` for fast batched access when streaming.
    """

    def __init__(self, storage: LocalStorage, space: CaptureSpace, segment_id: str) -> None:
        self.segment_id = segment_id
        self.space = space
        self._codec = codec_for(space.codec, space.vocab_size)
        rel = f"{segments_dir(space.space_id)}/{segment_id}"
        self._group = zarr.open_group(store=storage.zarr_store(rel, read_only=True), mode="r")
        self.keys = np.asarray(self._group["keys"][:])
        self.offsets = np.asarray(self._group["offsets"][:])
        self._fields = codec_fields(space)
        if any(f.per == "entry" for f in self._fields):
            self.entry_offsets = np.asarray(self._group["entry_offsets"][:])
        self._loaded: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def positions(self) -> int:
        return int(self.offsets[-1])

    def load(self) -> int:
        """Read every encoded array into memory (idempotent); returns the bytes held."""
        if self._loaded is None:
            names = ("input_ids", *(f.name for f in self._fields))
            self._loaded = {name: np.asarray(self._group[name][:]) for name in names}
        return self.loaded_bytes

    @property
    def loaded_bytes(self) -> int:
        return sum(a.nbytes for a in self._loaded.values()) if self._loaded is not None else 0

    def arrays(self) -> dict[str, np.ndarray]:
        """The codec's arrays of the whole segment, all records concatenated (loads it)."""
        self.load()
        assert self._loaded is not None
        return {f.name: self._loaded[f.name] for f in self._fields}

    def unload(self) -> None:
        self._loaded = None

    def encoded(self, i: int) -> CapturedRecord:
        """Record ``i`` in the codec's encoding, without decoding it."""
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        source = self._loaded if self._loaded is not None else self._group
        arrays = {}
        for f in self._fields:
            if f.per == "entry":
                lo, hi = int(self.entry_offsets[i]), int(self.entry_offsets[i + 1])
                arrays[f.name] = np.asarray(source[f.name][lo:hi])
            else:
                arrays[f.name] = np.asarray(source[f.name][start:stop])
        return CapturedRecord(
            key=bytes(self.keys[i]),
            input_ids=np.asarray(source["input_ids"][start:stop], dtype=np.int32),
            arrays=arrays,
        )

    def record(self, i: int) -> Record:
        encoded = self.encoded(i)
        rows = self._codec.decode(encoded.arrays)
        return Record(
            key=encoded.key.hex(),
            input_ids=encoded.input_ids,
            token_ids=rows.token_ids,
            logprobs=rows.logprobs,
            target_logprobs=rows.target_logprobs,
            tail_logprobs=rows.tail_logprobs,
            counts=rows.counts,
        )
