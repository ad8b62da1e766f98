"""``topk-v6``: ``topk-v5``'s sealed segment with its lists stored as sets, on coarse mean levels.

``topk-v5`` stores each input token's list in its own order (by mean code, then count) as
places in the segment's list: on a teacher of real text that is about 9 of its 97 bytes per
position, because an order of ~200 places out of ~1,800 is nearly incompressible. Here a list
is stored as the set it is (ascending places, as gaps) with two small numbers per id beside
it, from which the decoder sorts it back into the order rows are coded in:

- its mean level (:data:`LEVELS`: one level per 32 codes where p >= 1e-3, one per code
  below), as the difference from the id's level in the segment's list;
- its count class (floor(log2 count), at most 15): within a level, ids that fill more of the
  token's rows come first, so a row's set is a few small gaps at its list's head.

Coarse levels cost few bits in the lists and, as an order, sort ids by how often they appear
as much as by their value; a value's residual grows a little (its spread, ~0.7 nats, is far
wider than a level). Below p = 1e-3 the contract grid is already coarse and the residuals
tiny (the demo language's repeated tails), so there every code is a level. Measured on the
storage benchmark's rows (32,768 positions a segment; real text / demo language): 96.9 ->
92.8 and 53.4 -> 53.1 bytes per position.

Everything else is ``topk-v5``'s: per position the row's ids as ascending gaps between places
in its list (the input token's, when the token occurs at least :data:`CONTEXT_MIN` times in
the segment, else the segment's), and each id's code minus its level's code, zigzagged; the
decoder sorts the row by (code, id), ``topk-v3``'s order, which a record's arrays have in
memory and on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from logitcache.client.codecs.grid import CONTRACT_GRID, CONTRACT_NEG_INF
from logitcache.client.codecs.topk_v4 import context_pairs, places_in_lists, token_contexts
from logitcache.client.codecs.topk_v5 import (
    CONTEXT_LISTS,
    CONTEXT_TOKENS,
    ID_TABLE,
    PredictedValueTopKCodec,
    _list_starts,
    _sorted_within_rows,
    _within_rows_cumsum,
    _within_rows_diff,
    halves,
    unzigzag,
    zigzag,
)

# The tables keep topk-v5's names and its first two layouts:
# ID_TABLE: the segment's distinct ids by level, then count (descending); then each one's level.
# CONTEXT_TOKENS: int32, the input tokens with a list of their own, ascending; then list lengths.
# CONTEXT_LISTS (three columns): each list's places in the segment's list, ascending, as gaps;
# each listed id's level minus its segment level, zigzagged; its count class.
_TAIL = int(np.argmax(CONTRACT_GRID < np.log(1e-3)))  # the first contract code below p = 1e-3
LEVEL_STEP = 32  # codes per mean level where p >= 1e-3 (0.62 nats)
# The codes a stored mean can take: measured, steps of 24 / 32 / 40 codes gave 93.1 / 92.8 /
# 92.6 B/pos on real text and 52.9 / 53.1 / 53.3 on the demo language (topk-v5's 4, with
# these sets but no count classes: 95.1 and 55.5).
LEVELS = np.concatenate(
    [np.arange(0, _TAIL, LEVEL_STEP), np.arange(_TAIL, CONTRACT_NEG_INF + 1)]
).astype(np.int64)
_LEVEL_EDGES = (LEVELS[1:] + LEVELS[:-1]) / 2
COUNT_CLASSES = 16  # count classes 0..15: floor(log2 count), capped
# Positions an input token needs in a segment to have a list of its own (measured at step 32:
# 4 gave 92.8 B/pos on real text, 5 gave 92.9; topk-v5's lists, dearer, paid from 6).
CONTEXT_MIN = 4


@dataclass(frozen=True)
class LevelSetTopKCodec(PredictedValueTopKCodec):
    """The arrays of ``topk-v4``; a sealed segment is ``topk-v5``'s, with each input token's
    list stored as a set and sorted back by (mean level, count class, place)."""

    name: ClassVar[str] = "topk-v6"

    def seal(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A segment's arrays (``input_ids`` among them) as sets and predicted values, with the
        tables that undo it."""
        n, ids, codes, counts, present = self.entries(arrays)
        sums = np.bincount(ids, weights=codes, minlength=self.vocab_size)[present]
        id_levels = _level_of(sums / counts[present])
        by_level = np.lexsort((-counts[present], id_levels))
        order, order_levels = present[by_level], id_levels[by_level]
        size = max(1, order.shape[0])
        place = np.zeros(self.vocab_size, dtype=np.int64)
        place[order] = np.arange(order.shape[0])
        place_of = place[ids]  # the place in the segment's list, the fallback
        pred = LEVELS[order_levels][place_of]

        tokens, listed, context, kept = token_contexts(arrays["input_ids"], n, CONTEXT_MIN)
        # Every (token, id) pair of the listed tokens, in (token, place) order: the lists as sets.
        pair_token, pair_place, pair_of, pair_count = context_pairs(
            context[kept], place_of[kept], size
        )
        pair_levels = _level_of(np.bincount(pair_of, weights=codes[kept]) / pair_count)
        classes = np.minimum(np.log2(pair_count).astype(np.int64), COUNT_CLASSES - 1)
        lengths = np.bincount(pair_token, minlength=tokens.shape[0])[listed]
        by_list = _list_order(lengths, pair_levels, classes)
        place_of[kept] = places_in_lists(pair_token, by_list)[pair_of]
        pred[kept] = LEVELS[pair_levels][pair_of]

        # Each row by place: its set as gaps, and each id's residual code beside it.
        key = _sorted_within_rows(place_of << 10 | zigzag(codes - pred), n)
        return {
            **arrays,
            **self._split(_within_rows_diff(key >> 10, n)),
            "logprob_gaps": (key & 0x3FF).astype(np.uint16),
            ID_TABLE: np.concatenate([order, order_levels]).astype(self.id_dtype),
            CONTEXT_TOKENS: np.concatenate([tokens[listed], lengths]).astype(np.int32),
            CONTEXT_LISTS: np.concatenate(
                [
                    _within_rows_diff(pair_place, lengths),
                    zigzag(pair_levels - order_levels[pair_place]),
                    classes,
                ]
            ).astype(self.id_dtype),
        }

    def decoding_tables(self, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The lists sorted back once per segment (~5 ms at 190,000 listed ids, which a
        one-record read would otherwise pay each time)."""
        packed = _packed_lists(tables, self.key_shift, self.key_dtype)
        size = tables[CONTEXT_LISTS].shape[0] // 3
        return {CONTEXT_TOKENS: tables[CONTEXT_TOKENS], PACKED: packed,
                SEGMENT_START: np.array(size)}  # fmt: skip

    def unseal(
        self, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray], input_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Arrays read from a segment (all of it, or a record's slice, with its input tokens)
        back in ``topk-v3``'s order: ids, and code gaps along each row."""
        if PACKED not in tables:  # the stored tables, not decoding_tables' (a reader's)
            tables = self.decoding_tables(tables)
        start = _list_starts(tables[CONTEXT_TOKENS], input_ids, int(tables[SEGMENT_START]))
        return self._unseal_against(arrays, np.asarray(arrays["n"]).astype(np.int64),
                                    tables[PACKED], start)  # fmt: skip


# The decoding tables' own names (LevelSetTopKCodec.decoding_tables; never stored): the lists
# sorted back and packed as v5's unseal reads them, and where the segment's list starts.
PACKED, SEGMENT_START = "packed", "segment_start"


def _packed_lists(tables: dict[str, np.ndarray], shift: int, dtype: np.dtype) -> np.ndarray:
    """A segment's lists as the decoder reads rows against them: one table over every list
    (the segment's own last) of (level code << shift | id), in the order rows are coded in."""
    order, order_levels = halves(tables[ID_TABLE].astype(np.int64))
    lengths = halves(tables[CONTEXT_TOKENS].astype(np.int64))[1]
    listed = tables[CONTEXT_LISTS].astype(np.int64)
    size = listed.shape[0] // 3
    places = _within_rows_cumsum(listed[:size], lengths).astype(np.int64)
    levels = order_levels.take(places, mode="clip") + unzigzag(listed[size : 2 * size])
    by_list = _list_order(lengths, levels, listed[2 * size :])
    codes = LEVELS.take(np.concatenate([levels[by_list], order_levels]), mode="clip")
    ids = np.concatenate([order.take(places[by_list], mode="clip"), order])
    return ((codes << shift) + ids).astype(dtype)


def _level_of(means: np.ndarray) -> np.ndarray:
    """int64 index of the nearest of :data:`LEVELS` to each mean code."""
    return np.searchsorted(_LEVEL_EDGES, means).astype(np.int64)


def _list_order(lengths: np.ndarray, levels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The order rows are coded in, of lists given one after the other (``lengths``), each in
    ascending place: within each list by level, then count class (descending), then place.
    Two stable sorts of small keys (radix sorts while they fit 16 bits), which keep the
    places' order within a tie: sealing and reading agree without comparing places."""
    within = (levels * COUNT_CLASSES + (COUNT_CLASSES - 1 - classes)).astype(np.uint16)
    by_key = np.argsort(within, kind="stable")
    lists = np.repeat(np.arange(lengths.shape[0]), lengths)[by_key]
    small = np.uint16 if lengths.shape[0] <= 1 << 16 else np.int64
    return by_key[np.argsort(lists.astype(small), kind="stable")]
