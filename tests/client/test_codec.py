"""QuantizedTopKCodec: exact ids, log-probs within 1/128 nats, NaN targets kept, bad rows refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.client.codec import LOGPROB_SCALE, QuantizedTopKCodec, TopKRows, codec_for

BOUND = 1.0 / (2 * LOGPROB_SCALE)  # 1/128 nats: the documented error bound
FLOOR = -1023.0  # below this the codec clamps (including -inf)
SHAPES = ("random", "peaked", "flat", "extreme")


def sorted_rows(logprobs: np.ndarray) -> np.ndarray:
    """Sort each row descending and cast to float32 (the cast keeps the order, ties included)."""
    return (-np.sort(-logprobs, axis=1)).astype(np.float32)


def make_logprobs(rng: np.random.Generator, shape: str, positions: int, k: int) -> np.ndarray:
    """Rows of one of the shapes a teacher produces, as float32 [positions, k], descending."""
    size = (positions, k)
    if shape == "random":
        return sorted_rows(-rng.exponential(rng.uniform(0.1, 20.0), size=size))
    if shape == "peaked":
        # One entry at ~0 nats (sometimes +1e-7 of fp noise), the rest far below.
        rest = -rng.uniform(30.0, 1000.0, size=size)
        rest[:, 0] = rng.choice([1e-7, 0.0, -1e-6, -1e-3], size=positions)
        return sorted_rows(rest)
    if shape == "flat":
        # Every entry equal: ties all along k.
        level = -rng.uniform(0.0, 30.0, size=(positions, 1))
        return sorted_rows(np.repeat(level, k, axis=1))
    # "extreme": anything from fp noise above 0 down to -inf, including values the codec clamps.
    pool = np.array([1e-7, 0.0, -1e-3, -20.0, -1000.0, -1023.0, -1024.0, -5000.0, -np.inf])
    values = np.where(
        rng.random(size) < 0.5, rng.choice(pool, size=size), -rng.uniform(0, 1100, size=size)
    )
    return sorted_rows(values)


def make_targets(rng: np.random.Generator, logprobs: np.ndarray) -> np.ndarray:
    """Target log-probs: some inside the top-k, some below it, -inf, and NaN (no next token)."""
    positions, k = logprobs.shape
    inside = logprobs[np.arange(positions), rng.integers(0, k, size=positions)]
    below = logprobs[:, -1].astype(np.float64) - rng.exponential(5.0, size=positions)
    choice = rng.integers(0, 4, size=positions)
    target = np.where(choice == 0, inside, below)
    target = np.where(choice == 2, -np.inf, target)
    target = np.where(choice == 3, np.nan, target)
    if positions:
        target[-1] = np.nan  # the last row of a record never has a next token
    return target.astype(np.float32)


@st.composite
def topk_cases(draw: st.DrawFn) -> tuple[QuantizedTopKCodec, TopKRows]:
    seed = draw(st.integers(0, 2**32 - 1))
    positions = draw(st.integers(0, 48))
    k = draw(st.one_of(st.sampled_from([1, 256]), st.integers(1, 256)))
    vocab_size = draw(st.sampled_from([1, 7, 1000, 65536, 65537, 151_936, 1 << 20]))
    shape = draw(st.sampled_from(SHAPES))
    rng = np.random.default_rng(seed)
    logprobs = make_logprobs(rng, shape, positions, k)
    rows = TopKRows(
        token_ids=rng.integers(0, vocab_size, size=(positions, k)).astype(np.int32),
        logprobs=logprobs,
        target_logprobs=make_targets(rng, logprobs),
    )
    return QuantizedTopKCodec(vocab_size=vocab_size), rows


def assert_within_bound(decoded: np.ndarray, original: np.ndarray) -> None:
    """Entries at or above FLOOR are within BOUND; lower ones (and -inf) decode to <= FLOOR."""
    exact = original.astype(np.float64)
    kept = exact >= FLOOR
    error = np.abs(decoded.astype(np.float64)[kept] - exact[kept])
    assert error.max(initial=0.0) <= BOUND
    assert np.all(decoded[~kept] <= FLOOR)
    assert np.all(np.isfinite(decoded))


@settings(max_examples=150, deadline=None)
@given(topk_cases())
def test_round_trip_keeps_ids_and_bounds_logprobs(
    case: tuple[QuantizedTopKCodec, TopKRows],
) -> None:
    codec, rows = case
    decoded = codec.decode(codec.encode(rows))

    assert decoded.token_ids.dtype == np.int32
    np.testing.assert_array_equal(decoded.token_ids, rows.token_ids)

    assert decoded.logprobs.dtype == np.float32
    assert decoded.logprobs.shape == rows.logprobs.shape
    assert_within_bound(decoded.logprobs, rows.logprobs)
    above_20 = rows.logprobs > -20.0
    assert np.all(np.abs(decoded.logprobs[above_20] - rows.logprobs[above_20]) <= 0.01)
    assert np.all(np.diff(decoded.logprobs, axis=1) <= 0), "rows must stay sorted along k"
    assert np.all(decoded.logprobs <= 0.0), "fp noise above 0 nats decodes to 0"

    target, original = decoded.target_logprobs, rows.target_logprobs
    assert target.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(target), np.isnan(original))
    present = ~np.isnan(original)
    assert_within_bound(target[present], original[present])


@pytest.mark.parametrize(
    ("vocab_size", "id_dtype"),
    [(1000, np.uint16), (65536, np.uint16), (65537, np.uint32), (1 << 20, np.uint32)],
)
def test_encoded_arrays_have_documented_dtypes(vocab_size: int, id_dtype: type) -> None:
    rng = np.random.default_rng(0)
    logprobs = make_logprobs(rng, "random", 5, 3)
    rows = TopKRows(
        token_ids=np.full((5, 3), vocab_size - 1, dtype=np.int32),
        logprobs=logprobs,
        target_logprobs=make_targets(rng, logprobs),
    )
    encoded = QuantizedTopKCodec(vocab_size=vocab_size).encode(rows)

    assert set(encoded) == {"token_ids", "logprob_gaps", "target_q"}
    assert encoded["token_ids"].dtype == id_dtype
    assert encoded["logprob_gaps"].dtype == np.uint16
    assert encoded["target_q"].dtype == np.uint16
    assert encoded["token_ids"].shape == encoded["logprob_gaps"].shape == (5, 3)
    assert encoded["target_q"].shape == (5,)


def test_positive_fp_noise_and_minus_infinity() -> None:
    rows = TopKRows(
        token_ids=np.array([[3, 1, 2]], dtype=np.int32),
        logprobs=np.array([[1e-7, -1000.0, -np.inf]], dtype=np.float32),
        target_logprobs=np.array([-np.inf], dtype=np.float32),
    )
    decoded = QuantizedTopKCodec(vocab_size=4).decode(QuantizedTopKCodec(vocab_size=4).encode(rows))

    assert decoded.logprobs[0, 0] == 0.0
    assert decoded.logprobs[0, 1] == -1000.0
    assert -1024.0 < decoded.logprobs[0, 2] <= FLOOR
    assert -1024.0 < decoded.target_logprobs[0] <= FLOOR


@pytest.mark.parametrize("bad_id", [-1, 50, 1 << 20])
def test_encode_rejects_ids_outside_the_vocabulary(bad_id: int) -> None:
    rows = TopKRows(
        token_ids=np.array([[0, bad_id]], dtype=np.int64),
        logprobs=np.array([[-0.1, -2.0]], dtype=np.float32),
        target_logprobs=np.array([np.nan], dtype=np.float32),
    )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        QuantizedTopKCodec(vocab_size=50).encode(rows)


@pytest.mark.parametrize(
    "logprobs",
    [[[-2.0, -0.1]], [[-0.1, -3.0, -1.0]], [[-np.inf, -5.0]], [[-1.0, -1.0], [-9.0, -1.0]]],
)
def test_encode_rejects_rows_not_sorted_descending(logprobs: list[list[float]]) -> None:
    lp = np.array(logprobs, dtype=np.float32)
    rows = TopKRows(
        token_ids=np.zeros(lp.shape, dtype=np.int32),
        logprobs=lp,
        target_logprobs=np.full(lp.shape[0], np.nan, dtype=np.float32),
    )
    with pytest.raises(ValueError, match="descending"):
        QuantizedTopKCodec(vocab_size=10).encode(rows)


def test_codec_for_known_and_unknown_names() -> None:
    codec = codec_for("topk-q64-delta-v1", 1234)
    assert codec == QuantizedTopKCodec(vocab_size=1234)
    with pytest.raises(ValueError, match="unknown codec"):
        codec_for("topk-q32-nope", 1234)
