"""``topk-v6``: ``topk-v5``'s sealed segment with each input token's list stored as a set (with
each id's mean level and count class) and sorted back by the decoder. The codec's own round trip
keeps ids, padding, canonical ties and the storage contract's bounds (generated, adversarial and
real-text rows); a sealed segment, read whole or one record at a time from a fresh backend as
after a restart, gives back exactly each record's own encoding; the tables are the sets, levels
and classes they claim to be."""

from __future__ import annotations

import numpy as np
import pytest
from test_codec import (
    V2_SHAPES,
    check_v2_round_trip,
    distinct_ids,
    make_targets,
    v2_logprobs,
)
from test_codec_v3 import V3_BOUND
from test_codec_v4 import input_tokens, write_and_reopen

from logitcache.client.codecs import (
    FrequencyOrderTopKCodec,
    LevelSetTopKCodec,
    TopKRows,
    codec_for,
)
from logitcache.client.codecs.grid import quantize_contract
from logitcache.client.codecs.topk_v5 import CONTEXT_LISTS, CONTEXT_TOKENS, ID_TABLE, halves
from logitcache.client.codecs.topk_v6 import CONTEXT_MIN, LEVELS, _list_order
from logitcache.client.fidelity import fidelity


@pytest.mark.parametrize("vocab_size", [300, 65537, (1 << 22) + 1])
@pytest.mark.parametrize("k", [1, 256])
def test_v6_at_the_extremes_of_k_and_vocab(tmp_path, vocab_size: int, k: int) -> None:
    """k = 1 and 256, ids past 16 bits and past the int32 decoding key (2**22 ids), with
    lists of their own (tokens 0 and 1 recur) beside the segment's list."""
    rng = np.random.default_rng(k + vocab_size)
    codec = LevelSetTopKCodec(vocab_size)
    parts = []
    for shape in V2_SHAPES:
        logprobs = v2_logprobs(rng, shape, 9, k)
        ids = distinct_ids(rng, vocab_size, 9, k)
        if not (ids[0] == vocab_size - 1).any():
            ids[0, 0] = vocab_size - 1  # the largest id survives the sets and the sort
        rows = TopKRows(ids, -np.sort(-logprobs, axis=1), make_targets(rng, logprobs))
        check_v2_round_trip(codec, rows, V3_BOUND)
        parts.append(rows)
    reader = write_and_reopen(tmp_path, codec, parts)
    # input_tokens: token 0 on 20 of the 45 positions, token 1 on 10, the rest once each.
    assert halves(reader._read(CONTEXT_TOKENS))[0].tolist() == [0, 1]


def test_v6_on_the_real_text_teachers_rows(tmp_path, real_text_rows: TopKRows) -> None:
    """Bounds and KL on the rows the storage benchmark is about, encoded as topk-v4 encodes
    them; their segment's tables: the segment's list is its distinct ids by mean level, and
    each recurring input token's list exactly the set of ids of its rows, in ascending place,
    with each id's mean level and count class there."""
    v4, codec = FrequencyOrderTopKCodec(2000), LevelSetTopKCodec(2000)
    decoded = check_v2_round_trip(codec, real_text_rows, V3_BOUND)
    assert fidelity(real_text_rows, decoded, 2000).summary()["kl_mean"] < 1e-4
    ours, theirs = codec.encode(real_text_rows), v4.encode(real_text_rows)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)
    columns = (real_text_rows.token_ids, real_text_rows.logprobs,
               real_text_rows.target_logprobs, real_text_rows.tail_logprobs)  # fmt: skip
    parts = [TopKRows(*(a[i * 128 : (i + 1) * 128] for a in columns)) for i in range(8)]
    reader = write_and_reopen(tmp_path, codec, parts)

    codes = quantize_contract(real_text_rows.logprobs)
    ids = real_text_rows.token_ids

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
