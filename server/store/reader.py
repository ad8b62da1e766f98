"""Read access to one sealed segment: its index arrays at once, its encoded arrays on demand.

Keys and offsets are read when the segment is opened (the store's index needs them). The encoded
arrays are read either one record at a time (zarr reads only the chunks it needs), or whole with
:meth:`SegmentReader.load` for batched reads; a ``SegmentCache`` keeps loaded segments. Each of
these is one read of all the arrays it needs (``arrays.GroupArrays``), not one per array.

A segment without its group metadata is not sealed (on object storage segments are written in
place and sealed by that metadata, written last): opening one is :class:`Unsealed`.
"""

from __future__ import annotations

import numpy as np
from zarr.errors import ArrayNotFoundError, GroupNotFoundError

from logitcache.client.codecs import codec_for
from logitcache.client.errors import NotFound, Unavailable
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace
from logitcache.server.store.arrays import GroupArrays
from logitcache.server.store.backend import StoreBackend
from logitcache.server.store.segments import (
    INDEX_ARRAYS,
    array_names,
    codec_fields,
    has_entries,
    segments_dir,
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
        self._arrays = GroupArrays(backend.zarr_store(self.rel, read_only=True))
        # The codec's tables as its unseal reads them, read (and prepared) with the first arrays.
        self._tables: dict[str, np.ndarray] | None = None
        index = INDEX_ARRAYS if has_entries(self._fields) else INDEX_ARRAYS[:2]
        try:
            attributes, arrays = self._arrays.open(index)
        except GroupNotFoundError:
            raise Unsealed(f"segment {segment_id} in {backend.url} is not sealed") from None
        self.keys = arrays["keys"]
        self.offsets = arrays["offsets"]
        self.entry_offsets = arrays.get("entry_offsets")
        stored = attributes.get("stored_bytes")  # absent in segments of older stores
        self._stored_bytes = stored if isinstance(stored, int) else None
        sealed = attributes.get("sealed_ns")  # absent before segments sealed in place
        self.sealed_ns = sealed if isinstance(sealed, int) else int(segment_id.split("-", 1)[0])

    @property
    def order(self) -> tuple[int, str]:
        """How copies of one key rank: the first sealed copy (the smallest) is the answer."""
        return self.sealed_ns, self.segment_id

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def _read(self, name: str) -> np.ndarray:
        """One array as the segment stores it, whole (what a codec's seal wrote)."""
        return self._arrays.read((name,))[name]

    def _read_all(
        self, whole: tuple[str, ...], rows: dict[str, tuple[int, int]] | None = None
    ) -> dict[str, np.ndarray]:
        """Arrays whole and rows of others in one read, the codec's tables with them on the
        first (a sealed segment never changes: they are read once, not per record)."""
        tables = self._codec.segment_tables if self._tables is None else ()
        try:
            arrays = self._arrays.read((*whole, *tables), rows)
        except ArrayNotFoundError:
            self._check_present()  # a segment collected before its first read of them
            raise
        if tables:
            for name in tables:
                arrays[name].flags.writeable = False  # shared by every later read
            self._tables = self._codec.decoding_tables({name: arrays.pop(name) for name in tables})
        return arrays

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
        arrays = self._read_all(("input_ids", *(f.name for f in self._fields)))
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
        assert self._tables is not None  # read with the first arrays (see _read_all)
        return self._codec.unseal(arrays, self._tables, input_ids)

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
        rows = {"input_ids": (start, stop)}
        for f in self._fields:
            rows[f.name] = (entry_start, entry_stop) if f.per == "entry" else (start, stop)
        arrays = self._read_all((), rows)
        input_ids = arrays.pop("input_ids").astype(np.int32, copy=False)
        arrays = self._unseal(arrays, input_ids)
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
