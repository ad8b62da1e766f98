"""``topk-v4``: ``topk-v3``'s rows with ids stored by a per-segment frequency order. The codec's
own round trip keeps ids, padding, canonical ties and the storage contract's bounds (generated,
adversarial and real-text rows); a sealed segment, read whole or one record at a time, and read
again from a fresh backend as after a restart, gives back exactly the record's own encoding;
segments of the older codecs carry no table and read as before."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import (
    V2_SHAPES,
    check_v2_round_trip,
    distinct_ids,
    make_targets,
    v2_cases,
    v2_logprobs,
)
from test_codec_v3 import V3_BOUND

from logitcache.client.codecs import (
    ContractGridTopKCodec,
    FrequencyOrderTopKCodec,
    LevelSetTopKCodec,
    PredictedValueTopKCodec,
    TopKCodec,
    TopKRows,
    codec_for,
)
from logitcache.client.codecs.topk_v4 import (
    CONTEXT_IDS,
    CONTEXT_LENGTHS,
    CONTEXT_MIN,
    CONTEXT_TOKENS,
    ID_ORDER,
    context_pairs,
    lexsort_ints,
)
from logitcache.client.fidelity import fidelity
from logitcache.client.space import CaptureSpace
from logitcache.server.store.backend import LocalBackend
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.segments import array_names
from logitcache.server.store.writer import CapturedRecord, write_segment


def space_for(codec_name: str, vocab_size: int, k: int) -> CaptureSpace:
    return CaptureSpace("t" * 64, "z" * 64, vocab_size, "topk", k, "float32", codec_name)


def input_tokens(positions: int, seed: int) -> np.ndarray:
    """Input tokens of a record: two that recur (they get lists of their own once they reach
    CONTEXT_MIN positions in a segment) and rare ones (they fall back to the frequency order)."""
    place = np.arange(positions)
    tokens = np.where(place % 4 == 0, 5000 + 1000 * seed + place, place % 4 == 1)
    return tokens.astype(np.int32)


def write_and_reopen(tmp_path, codec, parts: list[TopKRows]) -> SegmentReader:
    space = space_for(codec.name, codec.vocab_size, max(p.token_ids.shape[1] for p in parts))
    records = [
        CapturedRecord.encode(i.to_bytes(16, "little"), input_tokens(len(p), i), p, space)
        for i, p in enumerate(parts)
    ]
    segment_id = write_segment(LocalBackend(tmp_path / "store"), space, records)
    reader = SegmentReader(LocalBackend(tmp_path / "store"), space, segment_id)
    for i, record in enumerate(records):
        got = reader.encoded(i)
        assert set(got.arrays) == set(record.arrays)
        for name, array in record.arrays.items():
            assert got.arrays[name].dtype == array.dtype, name
            np.testing.assert_array_equal(got.arrays[name], array, err_msg=name)
    whole = reader.load()
    for name in record.arrays:
        np.testing.assert_array_equal(
            whole[name], np.concatenate([r.arrays[name] for r in records]), err_msg=name
        )
    return reader


# The codecs whose sealed segments carry tables (topk-v4 and the ones built on it).
TABLE_CODECS = [FrequencyOrderTopKCodec, PredictedValueTopKCodec, LevelSetTopKCodec]


@pytest.mark.parametrize("codec_type", TABLE_CODECS)
@settings(max_examples=40, deadline=None)
@given(case=v2_cases())
def test_round_trip_keeps_ids_padding_and_bounds(codec_type, case) -> None:
    """Flat, peaked, tied, spread and softmax rows; k 1..256; ragged; vocabularies on both
    sides of 65,536: the per-entry bounds of the contract hold for every stored entry."""
    check_v2_round_trip(codec_type(case[0].vocab_size), case[1], V3_BOUND)


@pytest.mark.parametrize("codec_type", TABLE_CODECS)
@settings(max_examples=8, deadline=None)
@given(case=v2_cases(), pieces=st.integers(1, 4))
def test_sealed_segments_read_back_exactly(tmp_path_factory, codec_type, case, pieces) -> None:
    """Any rows cut into records, sealed and read back after a restart: the same encodings."""
    codec = codec_type(case[0].vocab_size)
    cut_sealed_and_reopened(tmp_path_factory.mktemp(codec.name), codec, case[1], pieces)


def cut_sealed_and_reopened(tmp_path, codec: TopKCodec, rows: TopKRows, pieces: int) -> None:
    """``rows`` cut into up to ``pieces`` records and checked by :func:`write_and_reopen`."""
    bounds = np.linspace(0, len(rows), pieces + 1).astype(int)
    parts = [
        TopKRows(rows.token_ids[a:b], rows.logprobs[a:b], rows.target_logprobs[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        if b > a
    ]
    if parts:
        write_and_reopen(tmp_path, codec, parts)


@pytest.mark.parametrize("vocab_size", [300, 65536, 65537, 151_936])
@pytest.mark.parametrize("k", [1, 256])
def test_v4_at_the_extremes_of_k_and_vocab(tmp_path, vocab_size: int, k: int) -> None:
    rng = np.random.default_rng(k + vocab_size)
    codec = FrequencyOrderTopKCodec(vocab_size)
    parts = []
    for shape in V2_SHAPES:
        logprobs = v2_logprobs(rng, shape, 9, k)
        ids = distinct_ids(rng, vocab_size, 9, k)
        if not (ids[0] == vocab_size - 1).any():
            ids[0, 0] = vocab_size - 1  # the largest id survives both parts and the remap
        rows = TopKRows(ids, -np.sort(-logprobs, axis=1), make_targets(rng, logprobs))
        check_v2_round_trip(codec, rows, V3_BOUND)
        parts.append(rows)
    reader = write_and_reopen(tmp_path, codec, parts)
    assert reader._read(CONTEXT_TOKENS).tolist() == [0]  # 18 of the 36 positions: listed
    assert reader.load()["id_hi"].dtype == (np.uint8 if vocab_size <= 1 << 16 else np.uint16)


def test_v4_decodes_like_v3(real_text_rows: TopKRows) -> None:
    """The same rows as topk-v3 (entries, order, values, tail and targets): only ids' storage
    differs."""
    v3, v4 = ContractGridTopKCodec(2000), FrequencyOrderTopKCodec(2000)
    a, b = v3.decode(v3.encode(real_text_rows)), v4.decode(v4.encode(real_text_rows))
    for name in ("token_ids", "logprobs", "target_logprobs", "tail_logprobs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_v4_on_the_real_text_teachers_rows(tmp_path, real_text_rows: TopKRows) -> None:
    """Bounds and KL on the rows the storage benchmark is about, and their segment's tables:
    the frequency order is the segment's distinct ids, most frequent first; each recurring
    input token's list is exactly the ids of its rows, most frequent first; the stored numbers
    are small."""
    codec = FrequencyOrderTopKCodec(2000)
    decoded = check_v2_round_trip(codec, real_text_rows, V3_BOUND)
    assert fidelity(real_text_rows, decoded, 2000).summary()["kl_mean"] < 1e-4
    columns = (real_text_rows.token_ids, real_text_rows.logprobs,
               real_text_rows.target_logprobs, real_text_rows.tail_logprobs)  # fmt: skip
    parts = [TopKRows(*(a[i * 128 : (i + 1) * 128] for a in columns)) for i in range(8)]
    reader = write_and_reopen(tmp_path, codec, parts)

    order = reader._read(ID_ORDER)
    ids, counts = np.unique(real_text_rows.token_ids, return_counts=True)
    assert sorted(order.tolist()) == ids.tolist()
    count_of = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    assert all(count_of[a] >= count_of[b] for a, b in zip(order[:-1], order[1:], strict=True))

    tokens, lengths = reader._read(CONTEXT_TOKENS), reader._read(CONTEXT_LENGTHS)
    lists = np.split(reader._read(CONTEXT_IDS), np.cumsum(lengths)[:-1])
    inputs = np.concatenate([input_tokens(128, i) for i in range(8)])
    used, uses = np.unique(inputs, return_counts=True)
    assert tokens.tolist() == used[uses >= CONTEXT_MIN].tolist() == [0, 1]
    for token, ranks in zip(tokens, lists, strict=True):
        rows_ids, rows_counts = np.unique(
            real_text_rows.token_ids[inputs == token], return_counts=True
        )
        assert sorted(order[ranks].tolist()) == rows_ids.tolist()
        in_list = dict(zip(rows_ids.tolist(), rows_counts.tolist(), strict=True))
        listed = order[ranks].tolist()
        assert all(in_list[a] >= in_list[b] for a, b in zip(listed, listed[1:], strict=False))
    stored = reader._read("id_lo").astype(np.int64) | reader._read("id_hi").astype(np.int64) << 8
    assert np.median(stored) < np.median(real_text_rows.token_ids)


@pytest.mark.parametrize("codec_name", ["topk-v2", "topk-v3", "topk-q64-delta-v1"])
def test_older_codecs_segments_have_no_table_and_read_as_before(tmp_path, codec_name) -> None:
    rng = np.random.default_rng(5)
    logprobs = v2_logprobs(rng, "softmax", 20, 16)
    rows = TopKRows(distinct_ids(rng, 2000, 20, 16), logprobs, make_targets(rng, logprobs))
    codec = codec_for(codec_name, 2000)
    assert codec.segment_tables == () and codec.seal({"x": logprobs})["x"] is logprobs
    assert codec.unseal({"x": logprobs}, {}, np.zeros(20, np.int32))["x"] is logprobs
    reader = write_and_reopen(tmp_path, codec, [rows])
    assert ID_ORDER not in array_names(reader.space)
    assert ID_ORDER in array_names(space_for("topk-v4", 2000, 16))


def test_v4_refuses_vocabularies_beyond_24_bits() -> None:
    rows = TopKRows(
        np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32), np.zeros(1, np.float32)
    )
    with pytest.raises(ValueError, match="2\\*\\*24"):
        FrequencyOrderTopKCodec(1 << 25).encode(rows)


@pytest.mark.parametrize("largest", [0, 3, 2000, (1 << 16) - 1, 1 << 16, 1 << 20])
def test_context_pairs_are_numpys_unique_of_the_packed_pairs(largest: int) -> None:
    """The count over a small grid (up to 2,000 places here), the radix path (a larger grid,
    both below 2**16) and the fallback give np.unique's pairs, order, inverse and counts;
    nothing in, nothing out."""
    rng = np.random.default_rng(largest)
    for size in (0, 1, 5_000):
        context = rng.integers(0, min(largest, 300) + 1, size)
        place = rng.integers(0, largest + 1, size)
        places = largest + 1
        pairs, inverse, counts = np.unique(
            context * places + place, return_inverse=True, return_counts=True
        )
        got = context_pairs(context, place, places)
        want = (*np.divmod(pairs, places), inverse.reshape(-1), counts)
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g, w)


@pytest.mark.parametrize("largest", [0, 7, 1 << 20, 1 << 40])
def test_lexsort_ints_is_numpys_lexsort(largest: int) -> None:
    """Packed (columns whose ranges fit 63 bits, negative ones included) or not (two columns
    of 2**40 do not fit), ties kept in input order as lexsort keeps them; nothing in."""
    rng = np.random.default_rng(largest)
    for size in (0, 1, 3_000):
        columns = (
            rng.integers(-largest, largest + 1, size),
            rng.integers(0, 4, size),  # many ties
            rng.integers(0, largest + 1, size),
        )
        assert np.array_equal(lexsort_ints(columns), np.lexsort(columns))
