"""Read access to one sealed segment: its index arrays at once, its encoded arrays on demand.

Keys and offsets are read when the segment is opened (the store's index needs them). The encoded
arrays are read either one record at a time (zarr reads only the chunks it needs), or whole with
:meth:`SegmentReader.load` for batched reads; a ``SegmentCache`` keeps loaded segments.

A segment without its group metadata is not sealed (on object storage segments are written in
place and sealed by that metadata, written last): opening one is :class:`Unsealed`.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.errors import GroupNotFoundError

from logitcache.client.codecs import codec_for
from logitcache.client.errors import NotFound, Unavailable
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace
from logitcache.server.store.backend import StoreBackend
from logitcache.server.store.segments import (
    array_names,
    codec_fields,
    has_entries,
    segments_dir,
    zarr_array,
)
from logitcache.server.store.writer import CapturedRecord


class Unsealed(NotFound):
    """A segment that is still being written (or was left by a writer that died)."""


class SegmentReader:
    """One sealed segment (immutable, so a reader can be shared by threads)."""

    def __init__(self, backend: StoreBackend, space: CaptureSpace, segment_id: str) -> None:
        self.segment_id = segment_id
        self.space = space
        self.rel = f"{segments_dir(space.space_id)}/{segment_id}"
        self.cache_key = f"{backend.url}/{self.rel}"
        self._backend = backend
        self._codec = codec_for(space.codec, space.vocab_size, space.temperatures)
        self._fields = codec_fields(space)
        store = backend.zarr_store(self.rel, read_only=True)
        try:
            self._group = zarr.open_group(store=store, mode="r", zarr_format=3)
        except GroupNotFoundError:
            raise Unsealed(f"segment {segment_id} in {backend.url} is not sealed") from None
        self._arrays: dict[str, zarr.Array] = {}  # opened on first use (each reads metadata)
        self._tables: dict[str, np.ndarray] | None = None  # the codec's, read on first unseal
        self.keys = self._read("keys")
        self.offsets = self._read("offsets")
        self.entry_offsets = self._read("entry_offsets") if has_entries(self._fields) else None
        stored = self._group.attrs.get("stored_bytes")  # absent in segments of older stores
        self._stored_bytes = stored if isinstance(stored, int) else None
        sealed = self._group.attrs.get("sealed_ns")  # absent before segments sealed in place
        self.sealed_ns = sealed if isinstance(sealed, int) else int(segment_id.split("-", 1)[0])

    @property
    def order(self) -> tuple[int, str]:
        """How copies of one key rank: the first sealed copy (the smallest) is the answer."""
        return self.sealed_ns, self.segment_id

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def _read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None:
            array = self._arrays[name] = zarr_array(self._group, name)
        return np.asarray(array[start:stop])

    @property
    def positions(self) -> int:
        return int(self.offsets[-1])

    @property
    def stored_bytes(self) -> int:
        """Bytes of the segment's arrays: from its attributes, or measured once (older stores)."""
        if self._stored_bytes is None:
            self._stored_bytes = sum(
                self._backend.stored_bytes(f"{self.rel}/{name}") for name in array_names(self.space)
            )
        return self._stored_bytes

    @property
    def stored_bytes_known(self) -> bool:
        """Whether :attr:`stored_bytes` is free (no walk of the segment's objects)."""
        return self._stored_bytes is not None

    def load(self) -> dict[str, np.ndarray]:
        """Every encoded array of the segment (``input_ids`` and the codec's), read whole."""
        names = ("input_ids", *(f.name for f in self._fields))
        arrays = {name: self._read(name) for name in names}
        arrays = self._unseal(arrays, arrays["input_ids"])
        self._check_present()
        return arrays

    def _unseal(
        self, arrays: dict[str, np.ndarray], input_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The codec's encoding of arrays read from the segment (some codecs store a segment
        differently, with tables of their own)."""
        if not self._codec.segment_tables:
            return arrays
        tables = self._tables
        if tables is None:  # a sealed segment never changes: read its tables once, not per record
            tables = {name: self._read(name) for name in self._codec.segment_tables}
            for table in tables.values():
                table.flags.writeable = False  # shared by every later read of the segment
            self._tables = tables
        return self._codec.unseal(arrays, tables, input_ids)

    def _check_present(self) -> None:
        """zarr reads the chunks of a removed segment as zeros, not as an error: after a read,
        make sure the segment was still there (gc and retention remove unreferenced ones)."""
        if not self._backend.exists(f"{self.rel}/zarr.json"):
            raise Unavailable(
                f"segment {self.segment_id} was collected while it was read (it held no "
                "dataset's records); retry: the store's index drops it at its next refresh"
            )

    def span(self, i: int) -> tuple[int, int, int, int]:
        """Record ``i``'s positions and entries: (start, stop, entry start, entry stop)."""
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.entry_offsets is None:
            return start, stop, 0, 0
        return start, stop, int(self.entry_offsets[i]), int(self.entry_offsets[i + 1])

    def encoded(self, i: int) -> CapturedRecord:
        """Record ``i`` in the codec's encoding, read on its own (only the chunks it needs)."""
        start, stop, entry_start, entry_stop = self.span(i)
        input_ids = self._read("input_ids", start, stop).astype(np.int32, copy=False)
        arrays = self._unseal(
            {
                f.name: self._read(f.name, entry_start, entry_stop)
                if f.per == "entry"
                else self._read(f.name, start, stop)
                for f in self._fields
            },
            input_ids,
        )
        self._check_present()
        return CapturedRecord(bytes(self.keys[i]), input_ids, arrays)

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
            tempered_log_tails=rows.tempered_log_tails,
            temperatures=rows.temperatures,
        )
