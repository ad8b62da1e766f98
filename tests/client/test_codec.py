"""The codecs: exact ids, values within the documented bounds, padding, tails, targets, bad rows.

``topk-q64-delta-v1`` (fixed k, 1/64-nat codes), ``topk-v2`` (ragged rows on the piecewise grid,
canonical (code, id) order, explicit tail) and ``sampled-v1`` (distinct ids, counts, log-probs),
each round-tripped over generated rows; arrays of several encodings concatenated field by field
(as segments and wire batches hold them) decode as each encoding alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.client.codecs import (
    CODECS,
    DEFAULT_CODEC,
    LOGPROB_SCALE,
    Codec,
    ContractGridTopKCodec,
    FrequencyOrderTopKCodec,
    LevelSetTopKCodec,
    PredictedValueTopKCodec,
    QuantizedTopKCodec,
    SampledCodec,
    TopKCodec,
    TopKRows,
    codec_for,
)
from logitcache.client.space import CaptureSpace, record_key
from logitcache.client.wire import decode_batch, encode_batch
from logitcache.server.engine.sampling import sample_rows

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


# === topk-v2 ======================================================================================

V2_BOUND = 1.0 / 128  # |decoded - exact| for p >= SMALL_P, the tail and the targets
SMALL_P = 1e-3  # below this probability the bound is on probabilities
SMALL_P_ERR = 1e-4  # |exp(decoded) - p| for p < SMALL_P
V2_SHAPES = ("softmax", "peaked", "flat", "ties", "spread")
TAILS = ("derived", "explicit", "zero", "one")
# Points where the topk-v2 grid changes step (u = -log p): ln 1000, u0 = 443/64, ln 1e4, u1.
GRID_EDGES = np.array([np.log(1e3), 443 / 64, np.log(1e4), 443 / 64 + 19 / 8])


def distinct_ids(rng: np.random.Generator, vocab_size: int, positions: int, k: int) -> np.ndarray:
    """[positions, k] ids, distinct within each row (as an engine's top-k rows are)."""
    if positions == 0:
        return np.zeros((0, k), dtype=np.int32)
    return np.stack(
        [rng.choice(vocab_size, size=k, replace=False) for _ in range(positions)]
    ).astype(np.int32)


def v2_logprobs(rng: np.random.Generator, shape: str, positions: int, k: int) -> np.ndarray:
    """float32 [positions, k] descending log-probs of one of the shapes a teacher produces."""
    if shape == "softmax":
        # The top k of softmax(logits) over m >= k tokens, from flat to peaked rows.
        m = k + int(rng.integers(0, 300))
        scale = rng.uniform(0.1, 12.0, size=(positions, 1))
        logits = rng.normal(0.0, 1.0, size=(positions, m)) * scale
        lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        lp -= logits.max(1, keepdims=True)
        values = -np.sort(-lp, axis=1)[:, :k]
    elif shape == "peaked":
        # One entry at ~0 nats (exactly 0, fp noise above it, or just below), the rest tiny.
        values = np.log(rng.uniform(1e-12, 1e-5, size=(positions, k)))
        values[:, 0] = rng.choice([1e-7, 0.0, -1e-7, -1e-3, -0.05], size=positions)
    elif shape == "flat":
        # Every entry 1/m for m >= k: ties all along the row (m = k: no tail at all).
        m = k + rng.choice([0, 0, 1, 37, 5000], size=(positions, 1))
        values = np.repeat(-np.log(m.astype(np.float64)), k, axis=1)
    elif shape == "ties":
        # A few levels, each repeated: exact ties inside rows, at most 1/k each.
        levels = -np.log(k) - rng.uniform(0.0, 12.0, size=(positions, 3))
        values = np.take_along_axis(levels, rng.integers(0, 3, size=(positions, k)), axis=1)
    else:
        # "spread": every part of the grid, its step edges, and far below it (down to -1500).
        pool = np.concatenate([-GRID_EDGES, -GRID_EDGES - 1e-6, -GRID_EDGES + 1e-6, [-1500.0]])
        values = np.where(
            rng.random((positions, k)) < 0.3,
            rng.choice(pool, size=(positions, k)),
            -rng.exponential(rng.choice([0.5, 5.0, 50.0]), size=(positions, k)) - np.log(k),
        )
    return (-np.sort(-values, axis=1)).astype(np.float32)


V2_VOCABS = [1, 7, 300, 1785, 65535, 65536, 65537, 151_936, 1 << 20]


@st.composite
def v2_cases(draw: st.DrawFn, vocab_size: int | None = None) -> tuple[TopKCodec, TopKRows]:
    """topk-v2 input rows: any shape, k 1..256, ragged rows padded with -inf, any tail kind."""
    seed = draw(st.integers(0, 2**32 - 1))
    positions = draw(st.integers(0, 40))
    if vocab_size is None:
        vocab_size = draw(st.sampled_from(V2_VOCABS))
    k = min(vocab_size, draw(st.one_of(st.sampled_from([1, 256]), st.integers(1, 256))))
    shape = draw(st.sampled_from(V2_SHAPES))
    ragged = draw(st.sampled_from(["full", "ragged", "with_empty_rows"]))
    tail = draw(st.sampled_from(TAILS))
    rng = np.random.default_rng(seed)
    logprobs = v2_logprobs(rng, shape, positions, k)
    token_ids = distinct_ids(rng, vocab_size, positions, k)
    if ragged != "full":
        lengths = rng.integers(0 if ragged == "with_empty_rows" else 1, k + 1, size=positions)
        pad = np.arange(k) >= lengths[:, None]
        logprobs[pad] = -np.inf
        token_ids[pad] = 0
    tail_logprobs = None
    if tail == "explicit":
        tail_logprobs = np.log(rng.uniform(1e-30, 1.0, size=positions)).astype(np.float32)
    elif tail == "zero":
        tail_logprobs = np.full(positions, -np.inf, dtype=np.float32)
    elif tail == "one":
        tail_logprobs = np.zeros(positions, dtype=np.float32)
    rows = TopKRows(token_ids, logprobs, make_targets(rng, logprobs), tail_logprobs)
    return TopKCodec(vocab_size=vocab_size), rows


def row_lengths(logprobs: np.ndarray) -> np.ndarray:
    return (logprobs > -np.inf).sum(axis=1)


def by_id(token_ids: np.ndarray, values: np.ndarray, sentinel: int) -> tuple[np.ndarray, ...]:
    """Each row's entries sorted by id (padding, value -inf, last as ``sentinel``): rows as sets."""
    keys = np.where(values > -np.inf, token_ids.astype(np.int64), sentinel)
    order = np.argsort(keys, axis=1, kind="stable")
    return np.take_along_axis(keys, order, axis=1), np.take_along_axis(values, order, axis=1)


def assert_entry_bounds(decoded: np.ndarray, exact: np.ndarray, bound: float = V2_BOUND) -> None:
    """The documented bounds: ``bound`` nats where p >= 1e-3, 1e-4 in probability below."""
    decoded, exact = decoded.astype(np.float64), exact.astype(np.float64)
    p = np.exp(exact)
    big = p >= SMALL_P
    log_err = np.abs(decoded[big] - exact[big])
    assert log_err.max(initial=0.0) <= bound, f"log error {log_err.max()} at p >= 1e-3"
    prob_err = np.abs(np.exp(decoded[~big]) - p[~big])
    assert prob_err.max(initial=0.0) <= SMALL_P_ERR, f"probability error {prob_err.max()}"


def assert_log_within(decoded: np.ndarray, exact: np.ndarray, bound: float = V2_BOUND) -> None:
    """-inf stays -inf; finite values >= FLOOR within ``bound`` nats, lower ones <= FLOOR."""
    decoded, exact = decoded.astype(np.float64), exact.astype(np.float64)
    np.testing.assert_array_equal(decoded == -np.inf, exact == -np.inf)
    kept = exact >= FLOOR
    assert np.abs(decoded[kept] - exact[kept]).max(initial=0.0) <= bound
    low = np.isfinite(exact) & ~kept
    assert np.all(decoded[low] <= FLOOR)


def exact_log_tail(rows: TopKRows) -> np.ndarray:
    """The tail a topk-v2 encoding should hold: the given one, else log(1 - sum p), -inf at 0."""
    if rows.tail_logprobs is not None:
        return rows.tail_logprobs.astype(np.float64)
    mass = 1.0 - np.exp(rows.logprobs.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(mass, 0.0))


def assert_targets(decoded: np.ndarray, original: np.ndarray) -> None:
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(original))
    present = ~np.isnan(original)
    exact = original[present].astype(np.float64)
    got = decoded[present].astype(np.float64)
    kept = exact >= FLOOR
    assert np.abs(got[kept] - exact[kept]).max(initial=0.0) <= V2_BOUND
    assert np.all(got[~kept] <= FLOOR)  # -inf and clamped targets


def copied(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: a.copy() for name, a in arrays.items()}


def check_v2_round_trip(codec: TopKCodec, rows: TopKRows, bound: float = V2_BOUND) -> TopKRows:
    encoded = codec.encode(rows)
    lengths = row_lengths(rows.logprobs)
    positions = len(rows)

    # The arrays are the documented ones, and the per-entry ones hold exactly the stored entries.
    assert set(encoded) == {f.name for f in codec.fields}
    for f in codec.fields:
        assert encoded[f.name].dtype == f.dtype
        expected = int(lengths.sum()) if f.per == "entry" else positions
        assert encoded[f.name].shape == (expected,), f.name
    np.testing.assert_array_equal(encoded["n"], lengths)

    decoded = codec.decode(copied(encoded))  # decode must not write to its input: see below
    assert decoded.counts is None
    assert decoded.token_ids.dtype == np.int32 and decoded.logprobs.dtype == np.float32
    width = int(lengths.max()) if positions else 0
    assert decoded.token_ids.shape == decoded.logprobs.shape == (positions, width)

    # Padding is kept: the same row lengths, padding at the end as id 0 and -inf.
    np.testing.assert_array_equal(row_lengths(decoded.logprobs), lengths)
    padding = np.arange(width) >= lengths[:, None]
    assert np.all(decoded.logprobs[padding] == -np.inf)
    assert np.all(decoded.token_ids[padding] == 0)

    # Every row holds the same ids, each with its own value within the bounds.
    sentinel = codec.vocab_size
    ids_in, lp_in = by_id(rows.token_ids, rows.logprobs, sentinel)
    ids_out, lp_out = by_id(decoded.token_ids, decoded.logprobs, sentinel)
    np.testing.assert_array_equal(ids_out, ids_in[:, :width])
    valid = ids_out < sentinel
    assert_entry_bounds(lp_out[valid], lp_in[:, :width][valid], bound)

    # Rows are non-increasing, and in canonical order: ids ascend inside a run of equal values.
    lp = decoded.logprobs
    assert np.all(lp[:, 1:] <= lp[:, :-1])
    run = (lp[:, 1:] == lp[:, :-1]) & ~padding[:, 1:]
    assert np.all(decoded.token_ids[:, 1:][run] > decoded.token_ids[:, :-1][run])

    assert decoded.tail_logprobs is not None and decoded.tail_logprobs.dtype == np.float32
    assert_log_within(decoded.tail_logprobs, exact_log_tail(rows))
    assert_targets(decoded.target_logprobs, rows.target_logprobs)

    # Decoded rows are on the grid: encoding them again gives the very same arrays.
    again = codec.encode(
        TopKRows(decoded.token_ids, decoded.logprobs, decoded.target_logprobs,
                 decoded.tail_logprobs)
    )  # fmt: skip
    for name, array in encoded.items():
        np.testing.assert_array_equal(again[name], array, err_msg=name)
    return decoded


@settings(max_examples=200, deadline=None)
@given(v2_cases())
def test_v2_round_trip_keeps_ids_padding_and_bounds(case: tuple[TopKCodec, TopKRows]) -> None:
    check_v2_round_trip(*case)


@pytest.mark.parametrize("vocab_size", [300, 65536, 65537, 1 << 20])
@pytest.mark.parametrize("k", [1, 256])
def test_v2_round_trip_at_the_extremes_of_k_and_vocab(vocab_size: int, k: int) -> None:
    rng = np.random.default_rng(k + vocab_size)
    for shape in V2_SHAPES:
        logprobs = v2_logprobs(rng, shape, 9, k)
        ids = distinct_ids(rng, vocab_size, 9, k)
        if not (ids[0] == vocab_size - 1).any():
            ids[0, 0] = vocab_size - 1  # the largest id survives the narrowest id type
        rows = TopKRows(ids, logprobs, make_targets(rng, logprobs))
        check_v2_round_trip(TopKCodec(vocab_size=vocab_size), rows)
        assert TopKCodec(vocab_size=vocab_size).encode(rows)["token_ids"].dtype == (
            np.uint16 if vocab_size <= 65536 else np.uint32
        )


def test_v2_bounds_hold_over_the_whole_grid() -> None:
    """Every p from 1 down to 1e-12 (through all three grid steps): the documented bounds."""
    u = np.concatenate([np.linspace(0.0, 28.0, 200_001), GRID_EDGES, GRID_EDGES + 1e-9])
    logprobs = np.sort(-u).astype(np.float32)[::-1][None, :]
    # One row per 256 values (k <= 256), in descending order.
    values = logprobs[0, : logprobs.shape[1] // 256 * 256].reshape(-1, 256)
    rows = TopKRows(
        distinct_ids(np.random.default_rng(0), 1000, values.shape[0], 256),
        values,
        np.full(values.shape[0], np.nan, dtype=np.float32),
    )
    decoded = check_v2_round_trip(TopKCodec(vocab_size=1000), rows)
    # The rows are already in canonical order (ids distinct, values strictly descending).
    p = np.exp(values.astype(np.float64))
    err = np.abs(np.exp(decoded.logprobs.astype(np.float64)) - p)
    assert err[p < SMALL_P].max() <= 6.5e-5  # "at most 6.5e-5 in fact"
    log_err = np.abs(decoded.logprobs.astype(np.float64) - values)[p >= SMALL_P]
    assert log_err.max() <= V2_BOUND


def test_v2_ties_are_stored_in_canonical_order() -> None:
    """Equal values in any id order give the same arrays: ids ascending within a tie."""
    lp = np.log(np.array([[0.4, 0.2, 0.2, 0.2, 1e-3]])).astype(np.float32)
    lp[0, 4] = -np.inf
    target = np.array([np.nan], dtype=np.float32)
    codec = TopKCodec(vocab_size=50)
    a = codec.encode(TopKRows(np.array([[7, 30, 2, 11, 0]], dtype=np.int32), lp, target))
    b = codec.encode(TopKRows(np.array([[7, 11, 30, 2, 0]], dtype=np.int32), lp, target))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    decoded = codec.decode(a)
    np.testing.assert_array_equal(decoded.token_ids, [[7, 2, 11, 30]])
    assert decoded.logprobs[0, 1] == decoded.logprobs[0, 2] == decoded.logprobs[0, 3]


def test_v2_tail_is_the_given_one_or_the_exact_rest() -> None:
    codec = TopKCodec(vocab_size=10)
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.5, 0.25], [1.0, 0.0], [0.9, 0.0], [0.0, 0.0], [0.7, 0.6]]))
    rows = TopKRows(
        np.array([[1, 2], [3, 0], [5, 0], [0, 0], [4, 6]], dtype=np.int32),
        lp.astype(np.float32),
        np.array([-0.7, -0.1, np.nan, np.nan, -2.0], dtype=np.float32),
    )
    derived = codec.decode(codec.encode(rows)).tail_logprobs
    np.testing.assert_allclose(derived[[0, 2]], np.log([0.25, 0.1]), atol=V2_BOUND)
    assert derived[1] == -np.inf  # p = 1: no tail
    assert derived[3] == 0.0  # an empty row: everything is tail
    assert derived[4] == -np.inf  # entries over 1 (rounding): no tail, not a NaN
    given = np.log(np.array([0.01, 0.3, 1e-20, 0.5, 0.2])).astype(np.float32)
    given[1] = -np.inf
    explicit = TopKRows(rows.token_ids, rows.logprobs, rows.target_logprobs, given)
    decoded = codec.decode(codec.encode(explicit)).tail_logprobs
    assert decoded[1] == -np.inf  # an explicit zero tail
    np.testing.assert_allclose(decoded[[0, 2, 3, 4]], given[[0, 2, 3, 4]], atol=V2_BOUND)


def test_v2_entries_beyond_the_grid_clamp_to_its_last_step() -> None:
    """p below e^-1593 clamps to the grid's last finite step: the entry stays an entry."""
    rows = TopKRows(
        np.array([[4, 9, 2]], dtype=np.int32),
        np.array([[1e-7, -1500.0, -5000.0]], dtype=np.float32),
        np.array([-np.inf], dtype=np.float32),
    )
    codec = TopKCodec(vocab_size=10)
    encoded = codec.encode(rows)
    assert encoded["n"][0] == 3
    decoded = codec.decode(encoded)
    np.testing.assert_array_equal(decoded.token_ids, [[4, 9, 2]])
    assert decoded.logprobs[0, 0] == 0.0 and np.isfinite(decoded.logprobs[0, 2])
    assert decoded.logprobs[0, 2] < -1500.0
    assert abs(decoded.logprobs[0, 1] + 1500.0) <= 0.5
    assert decoded.tail_logprobs[0] == -np.inf  # p sums to >= 1 with the fp noise: no tail
    assert decoded.target_logprobs[0] <= FLOOR


V2_REJECTED = [
    # (token_ids, logprobs, message)
    ([[1, 2]], [[-2.0, -0.1]], "descending"),
    ([[1, 2, 3]], [[-0.1, -3.0, -1.0]], "descending"),
    ([[1, 2]], [[-np.inf, -5.0]], "padding"),
    ([[1, 2, 3]], [[-0.5, -np.inf, -2.0]], "padding"),
    ([[1, 2, 3]], [[-0.5, -1.0, np.nan]], "NaN"),
    ([[1, 50]], [[-0.5, -1.0]], "outside the vocabulary"),
    ([[-1, 2]], [[-0.5, -1.0]], "outside the vocabulary"),
    ([[1, 2, 3]], [[-0.5, -1.0]], "must be equal"),
]


@pytest.mark.parametrize(("ids", "logprobs", "message"), V2_REJECTED)
def test_v2_encode_rejects_malformed_rows(ids: list, logprobs: list, message: str) -> None:
    rows = TopKRows(
        np.array(ids, dtype=np.int64),
        np.array(logprobs, dtype=np.float32),
        np.full(len(ids), np.nan, dtype=np.float32),
    )
    with pytest.raises(ValueError, match=message):
        TopKCodec(vocab_size=50).encode(rows)


def test_padding_ids_are_not_checked_against_the_vocabulary() -> None:
    rows = TopKRows(
        np.array([[3, 999]], dtype=np.int32),
        np.array([[-0.1, -np.inf]], dtype=np.float32),
        np.array([np.nan], dtype=np.float32),
    )
    decoded = TopKCodec(vocab_size=10).decode(TopKCodec(vocab_size=10).encode(rows))
    np.testing.assert_array_equal(decoded.token_ids, [[3]])


def test_topk_codecs_refuse_sampled_rows_and_sampled_codec_refuses_topk_rows() -> None:
    sampled = TopKRows(
        np.array([[1, 4]], dtype=np.int32),
        np.array([[-1.0, -2.0]], dtype=np.float32),
        np.array([np.nan], dtype=np.float32),
        counts=np.array([[3, 1]], dtype=np.int32),
    )
    for codec in (TopKCodec(vocab_size=10), QuantizedTopKCodec(vocab_size=10)):
        with pytest.raises(ValueError, match="not sampled rows"):
            codec.encode(sampled)
    topk = TopKRows(sampled.token_ids, sampled.logprobs, sampled.target_logprobs)
    with pytest.raises(ValueError, match="with counts"):
        SampledCodec(vocab_size=10).encode(topk)


def test_decode_rejects_row_lengths_that_do_not_add_up() -> None:
    codec = TopKCodec(vocab_size=10)
    rows = TopKRows(
        np.array([[1, 2], [3, 0]], dtype=np.int32),
        np.array([[-0.5, -1.0], [-0.1, -np.inf]], dtype=np.float32),
        np.array([-1.0, np.nan], dtype=np.float32),
    )
    encoded = codec.encode(rows)
    with pytest.raises(ValueError, match="malformed"):
        codec.decode({**encoded, "n": np.array([2, 2], dtype=np.uint16)})
    sampled = SampledCodec(vocab_size=10)
    encoded = sampled.encode(
        TopKRows(rows.token_ids, rows.logprobs, rows.target_logprobs,
                 counts=np.array([[1, 1], [2, 0]], dtype=np.int32))
    )  # fmt: skip
    with pytest.raises(ValueError, match="malformed"):
        sampled.decode({**encoded, "n": np.array([1, 1], dtype=np.uint16)})


# === sampled-v1 ===================================================================================


@st.composite
def sampled_cases(draw: st.DrawFn, vocab_size: int | None = None) -> tuple[SampledCodec, TopKRows]:
    """Sampled rows: per row m distinct ascending ids, counts >= 1 summing to U, any log-probs."""
    seed = draw(st.integers(0, 2**32 - 1))
    positions = draw(st.integers(0, 40))
    if vocab_size is None:
        vocab_size = draw(st.sampled_from([1, 7, 1785, 65536, 65537, 1 << 20]))
    samples = draw(st.one_of(st.sampled_from([1, 12, 255]), st.integers(1, 255)))
    rng = np.random.default_rng(seed)
    distinct = rng.integers(1, min(samples, vocab_size) + 1, size=positions)
    if positions and draw(st.booleans()):
        distinct[rng.integers(0, positions)] = 1  # all U draws on one id (a count of up to 255)
    width = int(distinct.max()) if positions else 0
    ids = np.zeros((positions, width), dtype=np.int32)
    counts = np.zeros((positions, width), dtype=np.int32)
    logprobs = np.full((positions, width), -np.inf, dtype=np.float32)
    for r, m in enumerate(distinct):
        ids[r, :m] = np.sort(rng.choice(vocab_size, size=m, replace=False))
        counts[r, :m] = 1 + rng.multinomial(samples - m, np.full(m, 1.0 / m))
        pool = np.concatenate([-GRID_EDGES, [0.0, 1e-7, -1500.0]])
        logprobs[r, :m] = np.where(
            rng.random(m) < 0.2, rng.choice(pool, size=m), -rng.exponential(4.0, size=m)
        )
    targets = make_targets(rng, logprobs) if width else np.zeros(0, dtype=np.float32)
    rows = TopKRows(ids, logprobs, targets, counts=counts)
    return SampledCodec(vocab_size=vocab_size), rows


def check_sampled_round_trip(codec: SampledCodec, rows: TopKRows) -> TopKRows:
    encoded = codec.encode(rows)
    present = rows.counts > 0
    assert set(encoded) == {f.name for f in codec.fields}
    for f in codec.fields:
        assert encoded[f.name].dtype == f.dtype
        expected = int(present.sum()) if f.per == "entry" else len(rows)
        assert encoded[f.name].shape == (expected,), f.name

    decoded = codec.decode(copied(encoded))
    assert decoded.tail_logprobs is None and decoded.counts is not None
    assert decoded.counts.dtype == np.int32 and decoded.token_ids.dtype == np.int32
    np.testing.assert_array_equal(decoded.token_ids, rows.token_ids)  # padding id 0 included
    np.testing.assert_array_equal(decoded.counts, rows.counts)
    if len(rows):
        assert np.all(decoded.counts.sum(axis=1) == rows.counts.sum(axis=1))
    both = present[:, 1:] & present[:, :-1]  # padding only after the last present entry
    assert np.all(decoded.token_ids[:, 1:][both] > decoded.token_ids[:, :-1][both])
    np.testing.assert_array_equal(present, np.arange(present.shape[1]) < present.sum(1)[:, None])
    assert np.all(decoded.logprobs[~present] == -np.inf)
    exact = np.minimum(rows.logprobs[present], 0.0)  # fp noise above 0 decodes to 0
    assert_entry_bounds(decoded.logprobs[present], exact)
    assert_targets(decoded.target_logprobs, rows.target_logprobs)
    return decoded


@settings(max_examples=150, deadline=None)
@given(sampled_cases())
def test_sampled_round_trip_keeps_ids_and_counts_exactly(
    case: tuple[SampledCodec, TopKRows],
) -> None:
    check_sampled_round_trip(*case)


def test_sampled_round_trip_of_real_draws() -> None:
    """sample_rows' output (12 draws from a softmax over 1785 tokens) survives the codec."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, size=(50, 1785))
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    full = TopKRows(
        np.tile(np.arange(1785, dtype=np.int32), (50, 1)),
        lp.astype(np.float32),
        np.full(50, np.nan, dtype=np.float32),
    )
    rows = sample_rows(full, 12, np.random.default_rng(4))
    decoded = check_sampled_round_trip(SampledCodec(vocab_size=1785), rows)
    assert np.all(decoded.counts.sum(axis=1) == 12)


SAMPLED_REJECTED = [
    # (token_ids, counts, message)
    ([[4, 2]], [[1, 1]], "distinct and ascending"),
    ([[4, 4]], [[1, 1]], "distinct and ascending"),
    ([[2, 4, 9]], [[1, 0, 1]], "padding"),
    ([[2, 10]], [[1, 1]], "outside the vocabulary"),
    ([[2, 4]], [[256, 1]], "255"),
]


@pytest.mark.parametrize(("ids", "counts", "message"), SAMPLED_REJECTED)
def test_sampled_encode_rejects_malformed_rows(ids: list, counts: list, message: str) -> None:
    rows = TopKRows(
        np.array(ids, dtype=np.int32),
        np.full(np.shape(ids), -1.0, dtype=np.float32),
        np.array([np.nan], dtype=np.float32),
        counts=np.array(counts, dtype=np.int32),
    )
    with pytest.raises(ValueError, match=message):
        SampledCodec(vocab_size=10).encode(rows)


# === all codecs: concatenation, the wire, names ===================================================


ROW_FIELDS = ("token_ids", "logprobs", "target_logprobs", "tail_logprobs", "counts")


def pad_rows(rows: TopKRows, width: int) -> TopKRows:
    """Rows padded on the right to ``width`` entries (id 0, -inf, count 0)."""
    extra = width - rows.token_ids.shape[1]

    def pad(a: np.ndarray | None, fill) -> np.ndarray | None:
        return None if a is None else np.pad(a, ((0, 0), (0, extra)), constant_values=fill)

    return TopKRows(
        pad(rows.token_ids, 0), pad(rows.logprobs, -np.inf), rows.target_logprobs,
        rows.tail_logprobs, pad(rows.counts, 0),
    )  # fmt: skip


def concat_rows(a: TopKRows, b: TopKRows) -> TopKRows:
    width = max(a.token_ids.shape[1], b.token_ids.shape[1])
    a, b = pad_rows(a, width), pad_rows(b, width)

    def cat(x: np.ndarray | None, y: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else np.concatenate([x, y])

    return TopKRows(*(cat(getattr(a, f), getattr(b, f)) for f in ROW_FIELDS))


def assert_same_rows(got: TopKRows, want: TopKRows) -> None:
    for name in ROW_FIELDS:
        x, y = getattr(got, name), getattr(want, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)  # NaN equals NaN here


def split_case(draw: st.DrawFn, case) -> tuple[Codec, TopKRows, TopKRows]:
    codec, rows = case
    cut = draw(st.integers(0, len(rows)))

    def part(sl: slice) -> TopKRows:
        return TopKRows(*(None if getattr(rows, f) is None else getattr(rows, f)[sl]
                          for f in ROW_FIELDS))  # fmt: skip

    return codec, part(slice(0, cut)), part(slice(cut, None))


@st.composite
def two_encodings(draw: st.DrawFn) -> tuple[Codec, TopKRows, TopKRows]:
    """Two batches of rows for one codec (v1's share k; the others may differ in width)."""
    kind = draw(st.sampled_from(["v1", "v2", "sampled"]))
    if kind == "v1":
        return split_case(draw, draw(topk_cases()))
    cases = v2_cases if kind == "v2" else sampled_cases
    codec, a = draw(cases())
    _, b = draw(cases(codec.vocab_size))
    return codec, a, b


@settings(max_examples=120, deadline=None)
@given(two_encodings())
def test_concatenated_encodings_decode_as_each_one(case: tuple[Codec, TopKRows, TopKRows]) -> None:
    """Segments and wire batches concatenate the arrays of records field by field."""
    codec, a, b = case
    enc_a, enc_b = codec.encode(a), codec.encode(b)
    joined = {f.name: np.concatenate([enc_a[f.name], enc_b[f.name]]) for f in codec.fields}
    decoded = codec.decode(joined)
    each = concat_rows(codec.decode(enc_a), codec.decode(enc_b))
    assert_same_rows(decoded, each)
    if (a.tail_logprobs is None) != (b.tail_logprobs is None):
        return  # one explicit and one derived tail: no single TopKRows holds both
    # Encoding is per row: the concatenation is also the encoding of all rows at once.
    together = codec.encode(concat_rows(a, b))
    for f in codec.fields:
        np.testing.assert_array_equal(joined[f.name], together[f.name], err_msg=f.name)


def wire_rows(codec_name: str, k: int, rng: np.random.Generator, positions: int,
              ragged: bool = True) -> TopKRows:  # fmt: skip
    """Rows of the kind a codec stores (vocab 1785): topk-v2 rows ragged (as top_p captures are)
    unless ``ragged`` is False, sampled rows from 12 draws of a random distribution."""
    if codec_name == SampledCodec.name:
        with np.errstate(divide="ignore"):
            full_lp = np.log(rng.dirichlet(np.full(1785, 0.05), size=positions))
        full = TopKRows(
            np.tile(np.arange(1785, dtype=np.int32), (positions, 1)),
            full_lp.astype(np.float32),
            np.full(positions, np.nan, dtype=np.float32),
        )
        return sample_rows(full, k, rng)
    logprobs = v2_logprobs(rng, "softmax", positions, k)
    if codec_name == TopKCodec.name and ragged:
        logprobs[np.arange(k) >= rng.integers(1, k + 1, size=positions)[:, None]] = -np.inf
    ids = np.where(logprobs > -np.inf, distinct_ids(rng, 1785, positions, k), 0)
    return TopKRows(ids.astype(np.int32), logprobs, make_targets(rng, logprobs))


WIRE_CASES = [
    ("topk-q64-delta-v1", 16),
    ("topk-q64-delta-v1", 1),
        ("topk-v2", 1),
    ("topk-v2", 64),
    ("sampled-v1", 12),
]  # fmt: skip


@pytest.mark.parametrize(("codec_name", "k"), WIRE_CASES)
def test_wire_batches_carry_concatenated_codec_arrays(codec_name: str, k: int) -> None:
    """encode_batch / decode_batch: the records a RecordBatch of several records decodes to."""
    rng = np.random.default_rng(k)
    space = CaptureSpace("t" * 64, "z" * 64, 1785, "topk", k, "float32", codec_name)
    codec = codec_for(codec_name, 1785)
    lengths = [3, 1, 7]
    sequences = [rng.integers(4, 1785, size=n).astype(np.int32) for n in lengths]
    parts = [wire_rows(codec_name, k, rng, n) for n in lengths]
    encoded = [codec.encode(p) for p in parts]
    batch = encode_batch(
        space,
        [record_key(space.space_id, s) for s in sequences],
        np.concatenate(sequences),
        np.array(lengths),
        {f.name: np.concatenate([e[f.name] for e in encoded]) for f in codec.fields},
    )
    records = decode_batch(batch)
    assert [len(r) for r in records] == lengths
    for rec, seq, enc in zip(records, sequences, encoded, strict=True):
        np.testing.assert_array_equal(rec.input_ids, seq)
        want = codec.decode(enc)
        width = want.token_ids.shape[1]
        # A batch decodes at its widest row; the extra columns are padding.
        assert np.all(rec.logprobs[:, width:] == -np.inf) and np.all(rec.token_ids[:, width:] == 0)
        got = TopKRows(
            rec.token_ids[:, :width], rec.logprobs[:, :width], rec.target_logprobs,
            rec.tail_logprobs, None if rec.counts is None else rec.counts[:, :width],
        )  # fmt: skip
        assert_same_rows(got, want)


def test_codec_for_knows_every_shipped_codec() -> None:
    assert set(CODECS) == {
        "topk-q64-delta-v1", "topk-v2", "topk-v3", "topk-v4", "topk-v5", "topk-v6", "sampled-v1"
    }  # fmt: skip
    assert DEFAULT_CODEC == "topk-v5"
    for name, cls in [
        ("topk-q64-delta-v1", QuantizedTopKCodec),
        ("topk-v2", TopKCodec),
        ("topk-v3", ContractGridTopKCodec),
        ("topk-v4", FrequencyOrderTopKCodec),
        ("topk-v5", PredictedValueTopKCodec),
        ("topk-v6", LevelSetTopKCodec),
        ("sampled-v1", SampledCodec),
    ]:
        codec = codec_for(name, 70_000)
        assert type(codec) is cls and codec.name == name and codec.vocab_size == 70_000
        assert codec.id_dtype == np.uint32 and codec_for(name, 1785).id_dtype == np.uint16
    with pytest.raises(ValueError, match="unknown codec") as info:
        codec_for("topk-v9", 10)
    for name in CODECS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("codec_name", "positions"),
    [
        ("topk-v2", 1),
        ("topk-v2", 2),
        ("topk-v2", 4097),
        ("topk-q64-delta-v1", 1),
        ("sampled-v1", 1),
    ],
)
def test_decode_leaves_its_input_arrays_alone(codec_name: str, positions: int) -> None:
    """Segments hand decode views of their loaded arrays: decoding must not change them."""
    rng = np.random.default_rng(positions)
    codec = codec_for(codec_name, 1785)
    k = 12 if codec_name == SampledCodec.name else 8
    rows = wire_rows(codec_name, k, rng, positions, ragged=False)
    encoded = codec.encode(rows)
    before = copied(encoded)
    first = codec.decode(encoded)
    for name, array in before.items():
        np.testing.assert_array_equal(encoded[name], array, err_msg=name)
    assert_same_rows(codec.decode(encoded), first)


@pytest.mark.parametrize(
    "codec_name",
    [
        "topk-q64-delta-v1",
        "topk-v2",
        "sampled-v1",
    ],
)
def test_a_wire_batch_of_one_position_decodes(codec_name: str) -> None:
    """A read-through answer for a single one-token sequence is a batch of one position."""
    rng = np.random.default_rng(11)
    k = 12 if codec_name == SampledCodec.name else 8
    space = CaptureSpace("t" * 64, "z" * 64, 1785, "topk", k, "float32", codec_name)
    codec = codec_for(codec_name, 1785)
    rows = wire_rows(codec_name, k, rng, 1, ragged=False)
    ids = np.array([42], dtype=np.int32)
    batch = encode_batch(space, [record_key(space.space_id, ids)], ids, np.array([1]),
                         codec.encode(rows))  # fmt: skip
    (rec,) = decode_batch(batch)
    want = codec.decode(codec.encode(rows))
    np.testing.assert_array_equal(rec.token_ids, want.token_ids)
    np.testing.assert_array_equal(rec.logprobs, want.logprobs)
