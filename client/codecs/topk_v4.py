"""``topk-v4``: ``topk-v3``'s rows with ids stored by frequency order, learned per segment.

On a teacher of real text the ids are most of the bytes, and zstd finds little to remove from
them as they come (about 10.7 bits per id at a vocabulary of 2,000). Most of that is frequency:
a few thousand ids fill nearly every top-k row, and some of them fill most rows. So a sealed
segment stores each id as its rank in the segment's own frequency order (the most frequent id
is 0), and the order itself (``id_order``, the segment's distinct ids, most frequent first) as a
segment table beside the arrays: a segment still decodes alone, and a table learned from the
segment fits it exactly, where one learned from the first segments of a capture space would
age. Ids are split into a low and a high byte, each compressed on its own: after the remap the
high bytes are mostly 0 and the low bytes are skewed toward the frequent ids.

The remap is a segment's business only (:meth:`seal` when a segment is written, :meth:`unseal`
when it is read): a record's arrays, in memory and on the wire, hold the ids themselves.
Entries, order, grid, tail and targets are ``topk-v3``'s, and so are its error bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from logitcache.client.codecs.base import Field
from logitcache.client.codecs.rows import TopKRows
from logitcache.client.codecs.topk_v3 import ContractGridTopKCodec

ID_ORDER = "id_order"  # the segment table: distinct ids of the segment, most frequent first


@dataclass(frozen=True)
class FrequencyOrderTopKCodec(ContractGridTopKCodec):
    """The arrays of ``topk-v3`` with ``token_ids`` split into ``id_lo`` uint8 [E] (the low byte)
    and ``id_hi`` [E] (the rest: uint8 up to 65,536 ids, else uint16). In a sealed segment both
    hold the id's rank in the segment's ``id_order`` table instead of the id."""

    name: ClassVar[str] = "topk-v4"
    segment_tables: ClassVar[tuple[str, ...]] = (ID_ORDER,)

    @property
    def hi_dtype(self) -> np.dtype:
        """The high part's type: one byte while ids fit 16 bits, else two (ids < 2**24)."""
        return np.dtype(np.uint8) if self.vocab_size <= 1 << 16 else np.dtype(np.uint16)

    @property
    def fields(self) -> tuple[Field, ...]:
        n, _, gaps, tail, target = super().fields
        lo = Field("id_lo", np.dtype(np.uint8), "entry", shuffle=False)
        return (n, lo, Field("id_hi", self.hi_dtype, "entry", shuffle=False), gaps, tail, target)

    def encode(self, rows: TopKRows) -> dict[str, np.ndarray]:
        if self.vocab_size > 1 << 24:
            raise ValueError(f"{self.name} stores ids below 2**24")
        arrays = super().encode(rows)
        ids = arrays.pop("token_ids")
        return {"n": arrays.pop("n"), **self._split(ids), **arrays}

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        ids = _join(np.asarray(arrays["id_lo"]), np.asarray(arrays["id_hi"]))
        return super().decode({**arrays, "token_ids": ids})

    def seal(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A segment's arrays with ids as ranks in the segment's frequency order, and the order
        (``id_order``) as a table."""
        ids = _join(arrays["id_lo"], arrays["id_hi"])
        counts = np.bincount(ids, minlength=self.vocab_size)
        order = np.argsort(-counts, kind="stable")[: int(np.count_nonzero(counts))]
        rank = np.zeros(self.vocab_size, dtype=np.int32)
        rank[order] = np.arange(order.shape[0], dtype=np.int32)
        return {**arrays, **self._split(rank[ids]), ID_ORDER: order.astype(self.id_dtype)}

    def unseal(
        self, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Arrays read from a segment (all of it, or a record's slice) with the ids back."""
        ranks = _join(np.asarray(arrays["id_lo"]), np.asarray(arrays["id_hi"]))
        return {**arrays, **self._split(tables[ID_ORDER].astype(np.int32).take(ranks))}

    def _split(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "id_lo": (ids & 0xFF).astype(np.uint8),
            "id_hi": (ids >> 8).astype(self.hi_dtype),
        }


def _join(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """int32 ids (or ranks) from their low byte and high part."""
    ids = hi.astype(np.int32)
    ids <<= 8
    ids |= lo
    return ids
