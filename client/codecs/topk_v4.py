"""``topk-v4``: ``topk-v3``'s rows with ids stored by what predicts them, learned per segment.

On a teacher of real text the ids are most of the bytes, and zstd finds little to remove from
them as they come (about 10.7 bits per id at a vocabulary of 2,000). Two things predict them:
frequency (a few thousand ids fill nearly every top-k row, some of them most rows) and the
position's input token (the rows after one token draw on a small set of ids). So a sealed
segment stores each id as a small number: for a position whose input token occurs at least
:data:`CONTEXT_MIN` times in the segment, the id's place in that token's list (the ids seen in
its rows, most frequent first); otherwise the id's rank in the segment's frequency order. The
tables are segment arrays beside the others (the order, and the tokens' lists as ranks in it),
so a segment decodes alone and a table fits its segment exactly, where one learned from the
first segments of a capture space would age. The numbers are split into a low and a high byte,
each compressed on its own: the high bytes are then mostly 0, the low ones skewed toward 0.

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

# The segment tables (see the module doc).
ID_ORDER = "id_order"  # the segment's distinct ids, most frequent first
CONTEXT_TOKENS = "context_tokens"  # int32: input tokens with a list of their own, ascending
CONTEXT_LENGTHS = "context_lengths"  # uint32: each one's list length
CONTEXT_IDS = "context_ids"  # the lists, one after the other, as ranks in ``id_order``
CONTEXT_MIN = 16  # positions an input token needs in a segment to have a list of its own


@dataclass(frozen=True)
class FrequencyOrderTopKCodec(ContractGridTopKCodec):
    """The arrays of ``topk-v3`` with ``token_ids`` split into ``id_lo`` uint8 [E] (the low byte)
    and ``id_hi`` [E] (the rest: uint8 up to 65,536 ids, else uint16). In a sealed segment both
    hold the id's rank in the segment's ``id_order`` table instead of the id."""

    name: ClassVar[str] = "topk-v4"
    segment_tables: ClassVar[tuple[str, ...]] = (
        ID_ORDER,
        CONTEXT_TOKENS,
        CONTEXT_LENGTHS,
        CONTEXT_IDS,
    )

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
        """A segment's arrays (``input_ids`` among them) with each id as its rank in its input
        token's list, or in the segment's frequency order, and the tables that undo it."""
        n = arrays["n"].astype(np.int64)
        ids = _join(arrays["id_lo"], arrays["id_hi"])
        counts = np.bincount(ids, minlength=self.vocab_size)
        order = np.argsort(-counts, kind="stable")[: int(np.count_nonzero(counts))]
        rank = np.zeros(self.vocab_size, dtype=np.int64)
        rank[order] = np.arange(order.shape[0])
        value = rank[ids]
        tokens, listed, context, kept = token_contexts(arrays["input_ids"], n, CONTEXT_MIN)
        # Every (token, id) pair of the listed tokens; a token's list: by count, then rank.
        pair_token, pair_rank, pair_of, pair_count = context_pairs(
            context[kept], value[kept], order.shape[0]
        )
        by_list = lexsort_ints((pair_rank, -pair_count, pair_token))
        value[kept] = places_in_lists(pair_token, by_list)[pair_of]
        return {
            **arrays,
            **self._split(value),
            ID_ORDER: order.astype(self.id_dtype),
            CONTEXT_TOKENS: tokens[listed].astype(np.int32),
            CONTEXT_LENGTHS: np.bincount(pair_token, minlength=tokens.shape[0])[listed].astype(
                np.uint32
            ),
            CONTEXT_IDS: pair_rank[by_list].astype(self.id_dtype),
        }

    def unseal(
        self, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray], input_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Arrays read from a segment (all of it, or a record's slice, with its input tokens)
        with the ids back."""
        value = _join(np.asarray(arrays["id_lo"]), np.asarray(arrays["id_hi"]))
        tokens, lengths = tables[CONTEXT_TOKENS], tables[CONTEXT_LENGTHS].astype(np.int32)
        if tokens.shape[0]:
            # Looked up per position, then spread over the position's entries (-1: no list).
            at = np.minimum(np.searchsorted(tokens, input_ids), tokens.shape[0] - 1)
            starts = np.cumsum(lengths, dtype=np.int32) - lengths
            start = np.repeat(np.where(tokens[at] == input_ids, starts[at], -1), arrays["n"])
            listed = tables[CONTEXT_IDS].astype(np.int32).take(start + value, mode="clip")
            value = np.where(start >= 0, listed, value)
        return {**arrays, **self._split(tables[ID_ORDER].astype(np.int32).take(value))}

    def _split(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "id_lo": (ids & 0xFF).astype(np.uint8),
            "id_hi": (ids >> 8).astype(self.hi_dtype),
        }


def token_contexts(
    input_ids: np.ndarray, n: np.ndarray, minimum: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A segment's input tokens, whether each has a list of its own (it occurs ``minimum`` times
    or more), each entry's token (an index into the tokens; ``n`` entries per position) and
    whether that token has a list."""
    tokens, token_of, uses = np.unique(
        np.asarray(input_ids), return_inverse=True, return_counts=True
    )
    listed = uses >= minimum
    context = np.repeat(token_of.reshape(-1), n)
    return tokens, listed, context, listed[context]


def context_pairs(
    context: np.ndarray, place: np.ndarray, places: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (context, place) pairs of some entries, in (context, place) order: each
    pair's context and place, each entry's pair, and each pair's count (``np.unique`` of the
    packed pairs, which it equals).

    A segment's pairs nearly always span a small grid (a few thousand input tokens by the ids
    of their lists), and then one count over the grid finds them with no sort, 3-9x cheaper
    than the sorts on the real-text and demo teachers' segments. Where the grid is large beside
    the entries but both fit 16 bits, two stable radix sorts order the entries, about 3x
    cheaper than sorting their packed keys; else ``np.unique``."""
    width = max(1, places)
    if context.size and (int(context.max()) + 1) * width <= 2 * context.size + (1 << 20):
        key = context.astype(np.int64) * width + place
        counts = np.bincount(key)
        present = counts > 0
        pairs = np.flatnonzero(present)
        pair_context, pair_place = np.divmod(pairs, width)
        return pair_context, pair_place, (np.cumsum(present) - 1)[key], counts[pairs]
    if context.size == 0 or max(int(context.max()), int(place.max())) >= 1 << 16:
        pairs, pair_of, pair_count = np.unique(
            context * width + place, return_inverse=True, return_counts=True
        )
        pair_context, pair_place = np.divmod(pairs, width)
        return pair_context, pair_place, pair_of.reshape(-1), pair_count
    by_place = np.argsort(place.astype(np.uint16), kind="stable")
    order = by_place[np.argsort(context.astype(np.uint16)[by_place], kind="stable")]
    sorted_context, sorted_place = context[order], place[order]
    first = np.empty(order.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(sorted_context[1:], sorted_context[:-1], out=first[1:])
    first[1:] |= sorted_place[1:] != sorted_place[:-1]
    group = np.cumsum(first) - 1
    pair_of = np.empty_like(group)
    pair_of[order] = group
    return sorted_context[first], sorted_place[first], pair_of, np.bincount(group)


def lexsort_ints(columns: tuple[np.ndarray, ...]) -> np.ndarray:
    """``np.lexsort(columns)`` of integer columns (the last is the primary key), as one stable
    sort of the columns packed into int64 keys where their ranges fit 63 bits, else by
    ``np.lexsort``. On a segment's 190,000 (token, id) pairs the packed sort takes 5 ms, the
    lexsort of four columns 37 ms."""
    if columns[0].size == 0:
        return np.zeros(0, dtype=np.intp)
    shifted = [np.asarray(c, dtype=np.int64) - int(np.min(c)) for c in columns]
    bits = [max(1, int(c.max()).bit_length()) for c in shifted]
    if sum(bits) > 63:
        return np.lexsort(columns)
    key = shifted[-1].copy()
    for column, width in zip(shifted[-2::-1], bits[-2::-1], strict=True):
        key <<= width
        key |= column
    return np.argsort(key, kind="stable")


def places_in_lists(pair_token: np.ndarray, by_list: np.ndarray) -> np.ndarray:
    """Each (token, id) pair's place in its token's list, given the pairs in list order
    (``by_list``, sorted by token first)."""
    in_list = np.empty_like(by_list)
    in_list[by_list] = np.arange(by_list.shape[0])
    listed_token = pair_token[by_list]
    within = np.arange(by_list.shape[0]) - np.searchsorted(listed_token, listed_token)
    return within[in_list]


def _join(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """int32 ids (or ranks) from their low byte and high part."""
    ids = hi.astype(np.int32)
    ids <<= 8
    ids |= lo
    return ids
