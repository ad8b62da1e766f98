"""``topk-v5``: in a sealed segment, each row's ids as a set of places in its input token's list
and each id's code as the difference from its mean there. The codec's own round trip keeps ids,
padding, canonical ties and the storage contract's bounds (generated, adversarial and
real-text rows); a sealed segment, read whole or one record at a time and again from a fresh
backend as after a restart, gives back exactly each record's own encoding; the tables are the
lists and means they claim to be; an old segment of every older codec still reads."""

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
from test_codec_v4 import input_tokens, space_for, write_and_reopen

from logitcache.client.codecs import (
    FrequencyOrderTopKCodec,
    LevelSetTopKCodec,
    PredictedValueTopKCodec,
    TopKCodec,
    TopKRows,
    codec_for,
)
from logitcache.client.codecs.grid import quantize_contract
from logitcache.client.codecs.topk_v5 import (
    CONTEXT_LISTS,
    CONTEXT_MIN,
    CONTEXT_TOKENS,
    ID_TABLE,
    MEAN_STEP,
    halves,
)
from logitcache.client.fidelity import fidelity
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.segments import array_names


@pytest.mark.parametrize("codec_type", [PredictedValueTopKCodec, LevelSetTopKCodec])
@pytest.mark.parametrize("vocab_size", [300, 65537, 1 << 22, (1 << 22) + 1])
@pytest.mark.parametrize("k", [1, 256])
def test_at_the_extremes_of_k_and_vocab(tmp_path, codec_type, vocab_size: int, k: int) -> None:
    """topk-v5 and v6: k = 1 and 256, ids past 16 bits, and the decoding key at its int32 edge
    (2**22 ids), with lists of their own (tokens 0 and 1 recur) beside the segment's list."""
    rng = np.random.default_rng(k + vocab_size)
    codec = codec_type(vocab_size)
    assert codec.key_dtype == (np.int32 if vocab_size <= 1 << 22 else np.int64)
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


def sealed_real_text_rows(
    tmp_path, codec: TopKCodec, real_text_rows: TopKRows
) -> tuple[SegmentReader, np.ndarray, np.ndarray]:
    """The real-text rows through ``codec``: within the contract's bounds, KL below 1e-4, encoded
    as topk-v4 encodes them, and sealed in one segment; its reader, the rows' codes and ids."""
    v4 = FrequencyOrderTopKCodec(2000)
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
    return reader, codes, ids


def test_v5_on_the_real_text_teachers_rows(tmp_path, real_text_rows: TopKRows) -> None:
    """Bounds and KL on the rows the storage benchmark is about, decoded as topk-v4 decodes
    them; their segment's tables: the segment's list is its distinct ids by mean code, each
    recurring input token's list exactly the ids of its rows by their mean code there, with
    those means; the stored residuals are small."""
    codec = PredictedValueTopKCodec(2000)
    reader, codes, ids = sealed_real_text_rows(tmp_path, codec, real_text_rows)

    def mean_steps(where: np.ndarray) -> dict[int, int]:
        """Each id's mean code over the rows where ``where``, in MEAN_STEP steps."""
        return {int(i): int(np.rint(codes[where][ids[where] == i].mean() / MEAN_STEP))
                for i in np.unique(ids[where])}  # fmt: skip

    order, means = halves(reader._read(ID_TABLE))
    assert dict(zip(order.tolist(), means.tolist(), strict=True)) == mean_steps(ids >= 0)
    assert np.all(np.diff(means.astype(int)) >= 0)

    tokens, lengths = halves(reader._read(CONTEXT_TOKENS))
    places, steps = halves(reader._read(CONTEXT_LISTS))
    lists, list_means = (
        np.split(places, np.cumsum(lengths)[:-1]),
        np.split(steps, np.cumsum(lengths)[:-1]),
    )
    inputs = np.concatenate([input_tokens(128, i) for i in range(8)])
    used, uses = np.unique(inputs, return_counts=True)
    assert tokens.tolist() == used[uses >= CONTEXT_MIN].tolist() == [0, 1]
    for token, listed, listed_steps in zip(tokens, lists, list_means, strict=True):
        after = np.repeat((inputs == token)[:, None], 64, axis=1)
        got = dict(zip(order[listed].tolist(), listed_steps.tolist(), strict=True))
        assert got == mean_steps(after)
        assert np.all(np.diff(listed_steps.astype(int)) >= 0)
    zigzag = reader._read("logprob_gaps")
    assert np.median(zigzag) < np.median(codes)


@pytest.mark.parametrize("codec_name", ["topk-v2", "topk-v3", "topk-v4", "topk-q64-delta-v1"])
def test_older_codecs_segments_read_as_before(tmp_path, codec_name: str) -> None:
    """Stores written with the older codecs keep their arrays and tables, and read back."""
    rng = np.random.default_rng(5)
    logprobs = v2_logprobs(rng, "softmax", 20, 16)
    rows = TopKRows(distinct_ids(rng, 2000, 20, 16), logprobs, make_targets(rng, logprobs))
    reader = write_and_reopen(tmp_path, codec_for(codec_name, 2000), [rows])
    assert CONTEXT_LISTS not in array_names(reader.space)
    assert CONTEXT_LISTS in array_names(space_for("topk-v5", 2000, 16))


def test_v5_refuses_vocabularies_beyond_24_bits() -> None:
    rows = TopKRows(
        np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32), np.zeros(1, np.float32)
    )
    with pytest.raises(ValueError, match="2\\*\\*24"):
        PredictedValueTopKCodec(1 << 25).encode(rows)
