"""``topk-v5``, the default codec: ``topk-v4``'s rows stored in a segment as a set and values.

``topk-v4`` stores each entry's id in rank order. On a teacher of real text that costs both the
set of ids and their order, and the order (which of 64 close log-probs belongs to which id) is
nearly unpredictable from the input token: about 4.6 bits per entry on top of the set. Storing
the log-prob per id instead makes the order free, because the decoder sorts by value.
So a sealed segment stores, for each position:

- the set of its ids, as places in a list of the segment's ids (the input token's list when
  the token occurs at least :data:`CONTEXT_MIN` times in the segment, else the segment's list),
  in ascending order and as gaps (``id_lo``/``id_hi``, small numbers: a row's ids crowd the
  head of its list);
- each id's log-prob code as the difference from the mean code of that id in that list
  (``logprob_gaps``, zigzagged: small numbers of both signs).

Each list is ordered by that mean code, most probable first, and stored with it (in steps of
:data:`MEAN_STEP` codes), so the segment decodes alone and reads back exactly after a restart.
Decoding adds each id's mean back and sorts the row by (code, id): the order of ``topk-v3``,
whose arrays a record has in memory and on the wire (the remap is a segment's business only:
:meth:`seal` when a segment is written, :meth:`unseal` when it is read). Entries, grid, tail,
targets and error bounds are ``topk-v3``'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from logitcache.client.codecs.base import pad_rows
from logitcache.client.codecs.topk_v4 import (
    FrequencyOrderTopKCodec,
    _join,
    context_pairs,
    lexsort_ints,
    places_in_lists,
    token_contexts,
)

# The segment tables (see the module doc), each two columns one after the other (a reader pays
# per array, so three arrays, not six):
# the segment's distinct ids by mean code, then count (descending); then each one's mean code
# over the segment in MEAN_STEP steps.
ID_TABLE = "id_table"
# int32: the input tokens with a list of their own, ascending; then each one's list length.
CONTEXT_TOKENS = "context_tokens"
# The lists, one after the other, as places in the segment's list; then each listed id's mean
# code after its token, in MEAN_STEP steps.
CONTEXT_LISTS = "context_lists"
MEAN_STEP = 4  # codes per step of a stored mean (1/13 nat above p = 1e-3; codes <= 371)
# Positions an input token needs in a segment to have a list of its own. Measured on the
# real-text teacher's rows (32,768 positions a segment): 97.0 B/pos at 5, 97.5 at 12, 98.0 at
# 16, 98.9 at 24; a list costs its ids and means, so fewer and longer lists lose.
CONTEXT_MIN = 6


@dataclass(frozen=True)
class PredictedValueTopKCodec(FrequencyOrderTopKCodec):
    """The arrays of ``topk-v4``. In a sealed segment ``id_lo``/``id_hi`` hold each row's ids
    as ascending gaps between places in its list, and ``logprob_gaps`` each id's code minus its
    list mean, zigzagged (0, -1, 1, -2, ... as 0, 1, 2, 3, ...), in the same order."""

    name: ClassVar[str] = "topk-v5"
    segment_tables: ClassVar[tuple[str, ...]] = (ID_TABLE, CONTEXT_TOKENS, CONTEXT_LISTS)

    def entries(
        self, arrays: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A segment's entries as sealing sees them: entries per position, each entry's id and
        code, each id's count, and the ids present (ascending)."""
        n = np.asarray(arrays["n"]).astype(np.int64)
        ids = _join(arrays["id_lo"], arrays["id_hi"]).astype(np.int64)
        codes = _within_rows_cumsum(np.asarray(arrays["logprob_gaps"]), n).astype(np.int64)
        counts = np.bincount(ids, minlength=self.vocab_size)
        return n, ids, codes, counts, np.flatnonzero(counts)

    def seal(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A segment's arrays (``input_ids`` among them) as sets and predicted values, with the
        tables that undo it."""
        n, ids, codes, counts, present = self.entries(arrays)
        id_means = _mean_steps(np.bincount(ids, weights=codes, minlength=self.vocab_size)[present],
                               counts[present])  # fmt: skip
        by_mean = np.lexsort((-counts[present], id_means))
        order = present[by_mean]
        size = max(1, order.shape[0])
        place = np.zeros(self.vocab_size, dtype=np.int64)
        place[order] = np.arange(order.shape[0])
        place_of = place[ids]  # the place in the segment's list, the fallback
        pred = id_means[by_mean][place_of] * MEAN_STEP

        tokens, listed, context, kept = token_contexts(arrays["input_ids"], n, CONTEXT_MIN)
        # Every (token, id) pair of the listed tokens; a token's list: by mean code, then count.
        pair_token, pair_place, pair_of, pair_count = context_pairs(
            context[kept], place_of[kept], size
        )
        pair_means = _mean_steps(np.bincount(pair_of, weights=codes[kept]), pair_count)
        by_list = lexsort_ints((pair_place, -pair_count, pair_means, pair_token))
        place_of[kept] = places_in_lists(pair_token, by_list)[pair_of]
        pred[kept] = pair_means[pair_of] * MEAN_STEP

        # Each row by place: its set as gaps, and each id's residual code beside it.
        key = _sorted_within_rows(place_of << 10 | zigzag(codes - pred), n)
        place_sorted = key >> 10
        return {
            **arrays,
            **self._split(_within_rows_diff(place_sorted, n)),
            "logprob_gaps": (key & 0x3FF).astype(np.uint16),
            ID_TABLE: np.concatenate([order, id_means[by_mean]]).astype(self.id_dtype),
            CONTEXT_TOKENS: np.concatenate(
                [tokens[listed], np.bincount(pair_token, minlength=tokens.shape[0])[listed]]
            ).astype(np.int32),
            CONTEXT_LISTS: np.concatenate([pair_place[by_list], pair_means[by_list]]).astype(
                self.id_dtype
            ),
        }

    def unseal(
        self, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray], input_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Arrays read from a segment (all of it, or a record's slice, with its input tokens)
        back in ``topk-v3``'s order: ids, and code gaps along each row."""
        n = np.asarray(arrays["n"]).astype(np.int64)
        shift, dtype = self.key_shift, self.key_dtype
        order, order_means = halves(tables[ID_TABLE])
        listed_places, listed_means = halves(tables[CONTEXT_LISTS])
        # One table over every list (the segment's own last) of (mean code, id) packed as the
        # sort key below: a position's list starts at ``start``.
        packed = np.concatenate([order.take(listed_places, mode="clip"), order]).astype(dtype)
        means = np.concatenate([listed_means, order_means]).astype(dtype)
        packed += means * dtype.type(MEAN_STEP << shift)
        start = _list_starts(tables[CONTEXT_TOKENS], input_ids, listed_places.shape[0])
        return self._unseal_against(arrays, n, packed, start)

    def _unseal_against(
        self, arrays: dict[str, np.ndarray], n: np.ndarray, packed: np.ndarray, start: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The rows of ``arrays`` decoded against the table of lists ``packed`` ((mean code <<
        shift | id), the form v5 and v6 both unpack their tables into), each position's list
        starting at ``start``: ids and code gaps in ``topk-v3``'s order."""
        shift, dtype = self.key_shift, self.key_dtype
        gaps = _join(np.asarray(arrays["id_lo"]), np.asarray(arrays["id_hi"]))
        places = _within_rows_cumsum(gaps, n, start, in_place=True).astype(np.intp)
        key = packed.take(places, mode="clip")  # intp: take converts any other index type
        # Key (code << shift | id): sorting it gives the canonical order, by code, then id.
        key += _residual_keys(shift, dtype).take(np.asarray(arrays["logprob_gaps"]))
        key = _sorted_within_rows(key, n)
        # The id's bytes: the casts keep the low bits, the masks drop the code's among them.
        id_lo = key.astype(np.uint8)
        id_lo &= np.uint8((1 << min(8, shift)) - 1)
        id_hi = (key >> 8).astype(self.hi_dtype)
        id_hi &= self.hi_dtype.type((1 << max(0, shift - 8)) - 1)
        return {
            **arrays,
            "id_lo": id_lo,
            "id_hi": id_hi,
            "logprob_gaps": _within_rows_diff((key >> shift).astype(np.uint16), n),
        }

    @property
    def key_shift(self) -> int:
        """Bits of an id in a decoding key."""
        return max(1, int(self.vocab_size - 1).bit_length())

    @property
    def key_dtype(self) -> np.dtype:
        """int32 while (code << shift | id) fits it (codes < 512: ids below 2**22)."""
        return np.dtype(np.int32) if self.key_shift <= 22 else np.dtype(np.int64)


def halves(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A two-column segment table's columns."""
    half = table.shape[0] // 2
    return table[:half], table[half:]


def _mean_steps(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int64 means of codes in :data:`MEAN_STEP` steps."""
    return np.rint(sums / np.maximum(counts, 1) / MEAN_STEP).astype(np.int64)


def _row_starts(n: np.ndarray) -> np.ndarray:
    return np.cumsum(n) - n


def _within_rows_cumsum(
    values: np.ndarray,
    n: np.ndarray,
    row_offsets: np.ndarray | None = None,
    *,
    in_place: bool = False,
) -> np.ndarray:
    """int32 running sums of flat entries, restarting at each row of ``n`` entries (from the
    row's ``row_offsets``, else 0). One cumsum over the whole array, whose entry at a row's
    start is corrected for what came before: the sums wrap in int32, but each row's are
    differences, so they are exact while a row's own sums fit int32. ``in_place``: into
    ``values`` (int32), which the caller gives up."""
    out = values if in_place else values.astype(np.int32)
    nonempty = n > 0
    starts = _row_starts(n)[nonempty]
    if starts.shape[0] == 0:
        return out
    ends = np.add.reduceat(out, starts, dtype=np.int32)
    if row_offsets is not None:
        begins = row_offsets[nonempty].astype(np.int32)
        ends += begins
        out[starts] += begins
    out[starts[1:]] -= ends[:-1]
    return np.cumsum(out, dtype=np.int32, out=out)


def _list_starts(context_tokens: np.ndarray, input_ids: np.ndarray, segment: int) -> np.ndarray:
    """Where each position's list starts in the table of lists: its input token's, else the
    segment's (at ``segment``, after the tokens' lists). Looked up in a table over the tokens'
    range where that is small beside the positions (a binary search per position cost more
    than the rest of this), else searched."""
    tokens, lengths = halves(context_tokens.astype(np.int64))
    starts = np.append(np.cumsum(lengths) - lengths, segment)  # the last: no list of its own
    if tokens.shape[0] == 0:
        return np.full(input_ids.shape[0], segment, dtype=np.int64)
    first, span = int(tokens[0]), int(tokens[-1] - tokens[0]) + 1
    if span > 8 * input_ids.shape[0] + 4096:
        at = np.minimum(np.searchsorted(tokens, input_ids), tokens.shape[0] - 1)
        return np.where(tokens[at] == input_ids, starts[at], segment)
    token_list = np.full(span + 1, tokens.shape[0], dtype=np.int32)  # the last: outside
    token_list[tokens - first] = np.arange(tokens.shape[0], dtype=np.int32)
    at = np.asarray(input_ids, dtype=np.int64) - first
    at[(at < 0) | (at >= span)] = span
    return starts[token_list[at]]


def zigzag(values: np.ndarray) -> np.ndarray:
    """Signed integers as 0, -1, 1, -2, ... -> 0, 1, 2, 3, ... (small numbers of both signs as
    small non-negative ones)."""
    return (values << 1) ^ (values >> (8 * values.dtype.itemsize - 1))


def unzigzag(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag`."""
    return (values >> 1) ^ -(values & 1)


def _within_rows_diff(values: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_within_rows_cumsum`: each row's first value, then differences."""
    out = np.empty_like(values)
    np.subtract(values[1:], values[:-1], out=out[1:])
    starts = _row_starts(n)[n > 0]
    out[starts] = values[starts]
    return out


@functools.cache
def _residual_keys(shift: int, dtype: np.dtype) -> np.ndarray:
    """Every stored (zigzagged, uint16) residual's value, shifted into a decoding key."""
    return (unzigzag(np.arange(1 << 16, dtype=np.int64)) << shift).astype(dtype)


def _sorted_within_rows(keys: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Flat entries sorted within each row of ``n`` entries."""
    dtype = keys.dtype.type
    rows = np.sort(pad_rows(keys, n, np.iinfo(dtype).max, dtype), axis=1)
    if rows.size == keys.shape[0]:
        return rows.reshape(-1)
    return rows[np.arange(rows.shape[1]) < n[:, None]]
