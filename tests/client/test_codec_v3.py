"""``topk-v3``: ``topk-v2``'s arrays on the contract grid. Exact ids, the storage contract's bounds
(1/104 nats where p >= 1e-3, 8.9e-5 in probability below), canonical ties, padding, tails and
targets, over generated and adversarial rows and over the real-text teacher's own rows; and
``topk-v2`` still writes the very bytes it wrote before."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import (
    SMALL_P,
    V2_SHAPES,
    check_v2_round_trip,
    distinct_ids,
    make_targets,
    v2_cases,
    v2_logprobs,
)

from logitcache.client.codecs import ContractGridTopKCodec, TopKCodec, TopKRows, codec_for
from logitcache.client.codecs.grid import CONTRACT_GRID, CONTRACT_NEG_INF, quantize_contract
from logitcache.client.fidelity import fidelity

V3_BOUND = 1.0 / 104 + 1e-6  # |decoded - exact| for p >= 1e-3, float32 rounding included
V3_PROB_BOUND = 8.9e-5  # |exp(decoded) - p| for p < 1e-3 (the contract allows 1e-4)
# Where the contract grid changes step (u = -log p): the last fine code's edge, ln 1000, and the
# edges of the sqrt(p) steps below.
SQRT_STEP = np.sqrt(1e-3) / 11
CONTRACT_EDGES = np.concatenate(
    [[359.5 / 52, np.log(1e3)], -2 * np.log(np.arange(1, 11) * SQRT_STEP)]
)


@settings(max_examples=200, deadline=None)
@given(v2_cases())
def test_v3_round_trip_keeps_ids_padding_and_bounds(case: tuple[TopKCodec, TopKRows]) -> None:
    """Flat, peaked, tied, spread and softmax rows; k 1..256; ragged; vocabularies on both
    sides of 65,536."""
    check_v2_round_trip(ContractGridTopKCodec(case[0].vocab_size), case[1], V3_BOUND)


@pytest.mark.parametrize("vocab_size", [300, 65536, 65537, 151_936])
@pytest.mark.parametrize("k", [1, 256])
def test_v3_round_trip_at_the_extremes_of_k_and_vocab(vocab_size: int, k: int) -> None:
    rng = np.random.default_rng(k + vocab_size)
    codec = ContractGridTopKCodec(vocab_size)
    for shape in V2_SHAPES:
        logprobs = v2_logprobs(rng, shape, 9, k)
        ids = distinct_ids(rng, vocab_size, 9, k)
        if not (ids[0] == vocab_size - 1).any():
            ids[0, 0] = vocab_size - 1  # the largest id survives the narrowest id type
        rows = TopKRows(ids, -np.sort(-logprobs, axis=1), make_targets(rng, logprobs))
        check_v2_round_trip(codec, rows, V3_BOUND)
        assert codec.encode(rows)["token_ids"].dtype == codec.id_dtype


def test_v3_bounds_hold_over_the_whole_grid() -> None:
    """Every p from 1 down to 1e-12, through both parts of the grid and at each step's edge."""
    u = np.concatenate(
        [
            np.linspace(0.0, 28.0, 200_001),
            CONTRACT_EDGES,
            CONTRACT_EDGES + 1e-9,
            CONTRACT_EDGES - 1e-9,
        ]
    )
    values = np.sort(-u)[::-1].astype(np.float32)
    values = values[: values.shape[0] // 256 * 256].reshape(-1, 256)
    rows = TopKRows(
        distinct_ids(np.random.default_rng(0), 1000, values.shape[0], 256),
        values,
        np.full(values.shape[0], np.nan, dtype=np.float32),
    )
    decoded = check_v2_round_trip(ContractGridTopKCodec(1000), rows, V3_BOUND)
    exact = values.astype(np.float64)
    p = np.exp(exact)
    got = decoded.logprobs.astype(np.float64)
    assert np.abs(np.exp(got) - p)[p < SMALL_P].max() <= V3_PROB_BOUND
    assert np.abs(got - exact)[p >= SMALL_P].max() <= V3_BOUND


def test_contract_grid_is_monotone_and_its_codes_are_its_own() -> None:
    """Codes never decrease as p falls, and every grid value quantises back to its own code."""
    codes = np.arange(CONTRACT_NEG_INF + 1)
    np.testing.assert_array_equal(quantize_contract(CONTRACT_GRID), codes)
    assert np.all(np.diff(CONTRACT_GRID[:-1]) < 0) and CONTRACT_GRID[-1] == -np.inf
    u = np.linspace(0.0, 40.0, 100_001)
    assert np.all(np.diff(quantize_contract(-u)) >= 0)
    assert quantize_contract(np.array([np.nan, -np.inf, 1e-7]))[:2].tolist() == [371, 371]
    assert quantize_contract(np.array([1e-7]))[0] == 0  # fp noise above 0 is 0


def test_v3_has_fewer_codes_than_v2_where_the_contract_allows() -> None:
    """The point of the grid: coarser than topk-v2, so more ties, and mean KL still small."""
    rng = np.random.default_rng(3)
    logprobs = v2_logprobs(rng, "softmax", 400, 64)
    rows = TopKRows(distinct_ids(rng, 2000, 400, 64), logprobs, make_targets(rng, logprobs))
    v2, v3 = TopKCodec(2000), ContractGridTopKCodec(2000)
    a2, a3 = v2.encode(rows), v3.encode(rows)
    assert (a3["logprob_gaps"] == 0).sum() > (a2["logprob_gaps"] == 0).sum()
    assert fidelity(rows, v3.decode(a3), 2000).summary()["kl_mean"] < 1e-4


def test_v3_round_trip_on_the_real_text_teachers_rows(real_text_rows: TopKRows) -> None:
    """The rows the storage benchmark is about: a small model of real text, top-64 with tail."""
    decoded = check_v2_round_trip(ContractGridTopKCodec(2000), real_text_rows, V3_BOUND)
    assert fidelity(real_text_rows, decoded, 2000).summary()["kl_mean"] < 1e-4


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_v3_round_trip_on_slices_of_real_text_rows(real_text_rows: TopKRows, data) -> None:
    """Any run of the real-text rows, cut to any k, made ragged or not, with or without tail."""
    start = data.draw(st.integers(0, len(real_text_rows) - 1))
    stop = data.draw(st.integers(start, len(real_text_rows)))
    k = data.draw(st.integers(1, 64))
    ids = real_text_rows.token_ids[start:stop, :k].copy()
    lp = real_text_rows.logprobs[start:stop, :k].copy()
    if data.draw(st.booleans()):
        lengths = np.asarray(
            data.draw(st.lists(st.integers(0, k), min_size=len(lp), max_size=len(lp)))
        )
        padding = np.arange(k) >= lengths[:, None]
        lp[padding], ids[padding] = -np.inf, 0
    tail = (
        real_text_rows.tail_logprobs[start:stop] if data.draw(st.booleans()) and k == 64 else None
    )
    rows = TopKRows(ids, lp, real_text_rows.target_logprobs[start:stop], tail)
    check_v2_round_trip(ContractGridTopKCodec(2000), rows, V3_BOUND)


def test_topk_v2_still_writes_the_bytes_it_wrote_before() -> None:
    """Old stores stay readable and new topk-v2 segments equal old ones: the grid refactoring
    changed no byte of topk-v2's arrays (digest taken before the change)."""
    rng = np.random.default_rng(12)
    logprobs = v2_logprobs(rng, "spread", 50, 64)
    rows = TopKRows(distinct_ids(rng, 70_000, 50, 64), logprobs, make_targets(rng, logprobs))
    arrays = codec_for("topk-v2", 70_000).encode(rows)
    digest = hashlib.sha256(b"".join(arrays[name].tobytes() for name in sorted(arrays)))
    assert digest.hexdigest()[:16] == V2_DIGEST


V2_DIGEST = "79841cf7718c6a15"
