"""Per-position loss masks of a dataset: which positions of each sequence a student is scored on.

A mask belongs to a dataset entry, not to the content-addressed record: two datasets may hold
the same record (the same key) with different masks, so masks live beside the dataset's key
list, in its group, written into the staging folder before the dataset is published and so
sealed with it by the same create-only operation (ARCHITECTURE.md, "Segments" and "Datasets"):
a reader sees a dataset with all its masks or no dataset. Datasets without masks (text and
token-id inputs, and every dataset written before masks existed) have neither array, and every
position counts.

Two arrays in ``datasets/<name>/`` (zstd-compressed chunks, zarr's default):
    loss_mask          uint8 [ceil(P / 8)]   the masks of every sequence in dataset order, one
                                             bit a position (numpy's big-endian packbits)
    loss_mask_offsets  int64 [n + 1]         where sequence i's bits start (and n's end: P)

Masks are about targets (see ``server.chat``): bit t of a sequence is 1 when row t (whose
target is token t + 1) counts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import zarr

from logitcache.client.errors import FailedPrecondition
from logitcache.server.store.backend import StoreBackend
from logitcache.server.store.segments import zarr_array

MASK_ARRAY = "loss_mask"
OFFSETS_ARRAY = "loss_mask_offsets"
_CHUNK_BYTES = 1 << 16  # packed mask bytes a chunk: 524,288 positions
_CHUNK_OFFSETS = 1 << 16
# Masks up to this many packed bytes (134M positions) are read whole on first use and then cut
# in memory: zarr costs about a millisecond a chunk read, a batch of shuffled records touches a
# chunk each, and reading a whole 16 MiB array costs about what 64 chunk reads do.
_WHOLE_BYTES = 1 << 24
_PACK_POSITIONS = 1 << 23  # positions packed at a time while writing (a megabyte of bits)


class Masks(Protocol):
    """The masks of a dataset's sequences in order: a list of arrays, or ``chat.ChatMasks``."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[np.ndarray]: ...


def write_masks(group: zarr.Group, masks: Masks, sequences: int) -> None:
    """Write ``masks`` (one uint8 or bool [T_i] array for each of the dataset's ``sequences``,
    in dataset order) into its staging group; memory holds the packed bits, an eighth of a byte
    a position."""
    if len(masks) != sequences:
        raise ValueError(f"{len(masks)} loss masks for a dataset of {sequences} sequences")
    lengths = np.fromiter((len(m) for m in masks), dtype=np.int64, count=len(masks))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    packed = np.zeros(-(-int(offsets[-1]) // 8), dtype=np.uint8)
    pending: list[np.ndarray] = []
    done = held = 0  # positions packed, positions pending (done is a multiple of 8)
    for mask in masks:
        pending.append(np.asarray(mask, dtype=np.bool_))
        held += len(mask)
        if held >= _PACK_POSITIONS:
            done, pending, held = _pack(packed, done, pending, final=False)
    _pack(packed, done, pending, final=True)
    group.create_array(MASK_ARRAY, data=packed, chunks=(max(1, min(len(packed), _CHUNK_BYTES)),))
    group.create_array(OFFSETS_ARRAY, data=offsets, chunks=(min(len(offsets), _CHUNK_OFFSETS),))


def _pack(
    packed: np.ndarray, done: int, pending: list[np.ndarray], *, final: bool
) -> tuple[int, list[np.ndarray], int]:
    """Pack the pending bits after position ``done`` into ``packed``, whole bytes only unless
    ``final``; returns the new ``done`` and what is left pending."""
    bits = np.concatenate(pending) if pending else np.zeros(0, dtype=np.bool_)
    whole = len(bits) if final else len(bits) - len(bits) % 8
    chunk = np.packbits(bits[:whole])
    packed[done // 8 : done // 8 + len(chunk)] = chunk
    rest = bits[whole:]
    return done + whole, [rest] if len(rest) else [], len(rest)


class DatasetMasks:
    """The loss masks of one dataset, read a batch of sequences at a time."""

    def __init__(self, bits: zarr.Array, offsets: np.ndarray, label: str) -> None:
        self._bits = bits
        self._offsets = offsets
        self._label = label
        self._whole: np.ndarray | None = None  # all the packed bits, once read (small masks)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def lengths(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions of the sequences at ``indices`` (int64)."""
        at = np.asarray(indices, dtype=np.int64)
        return self._offsets[at + 1] - self._offsets[at]

    def read(self, indices: Sequence[int] | np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The masks of the sequences at ``indices``, concatenated (uint8 [sum of lengths]).

        ``lengths`` are the records' own lengths: a mask of another length means the store is
        damaged, and is FailedPrecondition rather than a silently shifted mask."""
        at = np.asarray(indices, dtype=np.int64)
        own = self.lengths(at)
        if not np.array_equal(own, np.asarray(lengths, dtype=np.int64)):
            bad = int(np.flatnonzero(own != lengths)[0])
            raise FailedPrecondition(
                f"{self._label}: the loss mask of sequence {int(at[bad])} has {int(own[bad])} "
                f"positions, its record {int(lengths[bad])}; the dataset's masks are damaged"
            )
        total = int(own.sum())
        if total == 0:
            return np.zeros(0, dtype=np.uint8)
        starts = self._offsets[at]
        first = np.concatenate([[0], np.cumsum(own)[:-1]])
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - first, own)
        needed, where = np.unique(positions >> 3, return_inverse=True)
        data = self._packed(needed)
        return ((data[where] >> (7 - (positions & 7))) & 1).astype(np.uint8)

    def _packed(self, needed: np.ndarray) -> np.ndarray:
        """The packed bytes at ``needed`` (sorted, distinct)."""
        if self._whole is None and self._bits.nbytes <= _WHOLE_BYTES:
            self._whole = np.asarray(self._bits[:], dtype=np.uint8)
        if self._whole is not None:
            return self._whole[needed]
        return np.asarray(self._bits.get_orthogonal_selection(needed), dtype=np.uint8)

    def __getitem__(self, index: int) -> np.ndarray:
        at = [range(len(self))[index]]
        return self.read(at, self.lengths(at))


def open_masks(backend: StoreBackend, rel: str) -> DatasetMasks | None:
    """The masks of the dataset in ``rel`` (``datasets/<name>``); None if it has none."""
    group = zarr.open_group(store=backend.zarr_store(rel, read_only=True), mode="r")
    if MASK_ARRAY not in group:
        return None
    offsets = np.asarray(zarr_array(group, OFFSETS_ARRAY)[:], dtype=np.int64)
    name = rel.rsplit("/", 1)[-1]
    return DatasetMasks(zarr_array(group, MASK_ARRAY), offsets, f"dataset {name!r}")
