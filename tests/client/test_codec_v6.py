"""``topk-v6``: ``topk-v5``'s sealed segment with each input token's list stored as a set (with
each id's mean level and count class) and sorted back by the decoder. The codec's own round trip
keeps ids, padding, canonical ties and the storage contract's bounds (generated, adversarial and
real-text rows); a sealed segment, read whole or one record at a time from a fresh backend as
after a restart, gives back exactly each record's own encoding; the tables are the sets, levels
and classes they claim to be."""

from __future__ import annotations

import numpy as np
import pytest
from test_codec_v4 import input_tokens
from test_codec_v5 import sealed_real_text_rows

from logitcache.client.codecs import (
    LevelSetTopKCodec,
    TopKRows,
    codec_for,
)
from logitcache.client.codecs.topk_v5 import CONTEXT_LISTS, CONTEXT_TOKENS, ID_TABLE, halves
from logitcache.client.codecs.topk_v6 import CONTEXT_MIN, LEVELS, _list_order


def test_v6_on_the_real_text_teachers_rows(tmp_path, real_text_rows: TopKRows) -> None:
    """Bounds and KL on the rows the storage benchmark is about, encoded as topk-v4 encodes
    them; their segment's tables: the segment's list is its distinct ids by mean level, and
    each recurring input token's list exactly the set of ids of its rows, in ascending place,
    with each id's mean level and count class there."""
    codec = LevelSetTopKCodec(2000)
    reader, codes, ids = sealed_real_text_rows(tmp_path, codec, real_text_rows)

    def levels_and_counts(where: np.ndarray) -> dict[int, tuple[int, int]]:
        """Each id's nearest level to its mean code over the rows where ``where``, and count."""
        return {
            int(i): (int(np.abs(LEVELS - codes[where][ids[where] == i].mean()).argmin()),
                     int((ids[where] == i).sum()))
            for i in np.unique(ids[where])
        }  # fmt: skip

    order, levels = halves(reader._read(ID_TABLE))
    segment = levels_and_counts(ids >= 0)
    assert dict(zip(order.tolist(), levels.tolist(), strict=True)) == {
        i: level for i, (level, _) in segment.items()
    }
    assert np.all(np.diff(levels.astype(int)) >= 0)

    tokens, lengths = halves(reader._read(CONTEXT_TOKENS))
    listed = reader._read(CONTEXT_LISTS).astype(int)
    size = lengths.sum()
    assert listed.shape[0] == 3 * size
    ends = np.cumsum(lengths)[:-1]
    gaps, diffs, classes = (np.split(listed[i * size : (i + 1) * size], ends) for i in range(3))
    inputs = np.concatenate([input_tokens(128, i) for i in range(8)])
    used, uses = np.unique(inputs, return_counts=True)
    assert tokens.tolist() == used[uses >= CONTEXT_MIN].tolist() == [0, 1]
    for token, gap, diff, count_class in zip(tokens, gaps, diffs, classes, strict=True):
        places = np.cumsum(gap)
        assert np.all(np.diff(places) > 0)  # a set: ascending places
        after = np.repeat((inputs == token)[:, None], 64, axis=1)
        level = levels[places].astype(int) + ((diff >> 1) ^ -(diff & 1))
        pairs = zip(level.tolist(), count_class.tolist(), strict=True)
        got = dict(zip(order[places].tolist(), pairs, strict=True))
        assert got == {
            i: (lv, min(15, int(np.log2(n)))) for i, (lv, n) in levels_and_counts(after).items()
        }
    assert np.median(reader._read("logprob_gaps")) < np.median(codes)


@pytest.mark.parametrize("lists", [3, (1 << 16) + 1])
def test_list_order_sorts_each_list_by_level_class_then_place(lists: int) -> None:
    """The decoder's order of the lists (both ways of sorting: list numbers in 16 bits, and
    beyond) is a sort by (list, level, class descending, place)."""
    rng = np.random.default_rng(lists)
    lengths = rng.integers(1, 4, lists)
    levels = rng.integers(0, LEVELS.shape[0], lengths.sum())
    classes = rng.integers(0, 16, lengths.sum())
    place = np.arange(lengths.sum())  # ascending within each list, as stored
    expected = np.lexsort((place, -classes, levels, np.repeat(np.arange(lists), lengths)))
    np.testing.assert_array_equal(_list_order(lengths, levels, classes), expected)


def test_v6_is_registered_and_refuses_vocabularies_beyond_24_bits() -> None:
    assert isinstance(codec_for("topk-v6", 2000), LevelSetTopKCodec)
    rows = TopKRows(
        np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32), np.zeros(1, np.float32)
    )
    with pytest.raises(ValueError, match="2\\*\\*24"):
        LevelSetTopKCodec(1 << 25).encode(rows)
