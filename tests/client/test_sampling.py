"""sample_rows and rng_for_key: U draws per row from the full distribution, reproducible per key.

Structure (counts, ids, log-probs) is checked over generated rows; the draws themselves with a
chi-square test of pooled frequencies against p at a fixed seed, which the same draws fail
against a slightly wrong distribution.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.client.codecs import TopKRows
from logitcache.server.engine.sampling import MAX_SAMPLES, rng_for_key, sample_rows

Z_999 = 3.090232  # standard normal quantile of 0.999


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Upper quantile of chi-square(df) (Wilson-Hilferty; within 1% for df >= 3)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(observed: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the bins with positive expectation, and its degrees of freedom."""
    positive = expected > 0
    assert observed[~positive].sum() == 0, "draws in a bin of probability 0"
    o, e = observed[positive].astype(np.float64), expected[positive]
    return float(((o - e) ** 2 / e).sum()), int(positive.sum()) - 1


def key_of(name: str) -> bytes:
    """A 16-byte record key (what record_key returns)."""
    return hashlib.blake2b(name.encode(), digest_size=16).digest()


def full_rows(
    rng: np.random.Generator,
    positions: int,
    vocab: int,
    zero_share: float,
    width: int | None = None,
) -> TopKRows:
    """Full-distribution rows: every id of a vocabulary once, in any order per row, some with
    probability 0 (-inf), and optionally padded (id 0, -inf) to ``width`` entries."""
    logits = rng.normal(0.0, rng.uniform(0.2, 6.0, size=(positions, 1)), size=(positions, vocab))
    zero = rng.random((positions, vocab)) < zero_share
    zero[np.arange(positions), rng.integers(0, vocab, size=positions)] = False  # one survives
    logits = np.where(zero, -np.inf, logits)
    lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    lp -= logits.max(1, keepdims=True)
    order = np.argsort(rng.random((positions, vocab)), axis=1)  # ids in any order per row
    ids = order.astype(np.int32)
    lp = np.take_along_axis(lp, order, axis=1)
    width = vocab if width is None else width
    pad = width - vocab
    return TopKRows(
        np.pad(ids, ((0, 0), (0, pad))),
        np.pad(lp, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32),
        rng.normal(-3.0, 1.0, size=positions).astype(np.float32),
    )


def probabilities(full: TopKRows, vocab: int) -> np.ndarray:
    """[P, vocab] probabilities by id (padding ignored)."""
    p = np.zeros((len(full), vocab))
    real = full.logprobs > -np.inf
    rows = np.nonzero(real)[0]
    p[rows, full.token_ids[real]] = np.exp(full.logprobs[real].astype(np.float64))
    return p / p.sum(axis=1, keepdims=True)


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    positions=st.integers(1, 30),
    vocab=st.sampled_from([1, 2, 5, 50, 1785]),
    samples=st.one_of(st.sampled_from([1, 12, MAX_SAMPLES]), st.integers(1, MAX_SAMPLES)),
    zero_share=st.sampled_from([0.0, 0.5, 0.95]),
    padded=st.booleans(),
)
def test_sampled_rows_are_distinct_ascending_ids_with_counts_summing_to_u(
    seed: int, positions: int, vocab: int, samples: int, zero_share: float, padded: bool
) -> None:
    rng = np.random.default_rng(seed)
    full = full_rows(rng, positions, vocab, zero_share, vocab + 7 if padded else None)
    rows = sample_rows(full, samples, rng_for_key(key_of(str(seed))))

    assert rows.counts is not None and rows.tail_logprobs is None
    assert rows.token_ids.dtype == np.int32 and rows.counts.dtype == np.int32
    assert rows.logprobs.dtype == np.float32
    assert rows.token_ids.shape == rows.logprobs.shape == rows.counts.shape
    assert rows.token_ids.shape[0] == positions
    np.testing.assert_array_equal(rows.target_logprobs, full.target_logprobs)

    present = rows.counts > 0
    distinct = present.sum(axis=1)
    assert rows.counts.shape[1] == distinct.max()  # padded to the most distinct ids of a row
    np.testing.assert_array_equal(present, np.arange(present.shape[1]) < distinct[:, None])
    np.testing.assert_array_equal(rows.counts.sum(axis=1), samples)
    assert np.all(rows.token_ids[~present] == 0) and np.all(rows.logprobs[~present] == -np.inf)
    both = present[:, 1:] & present[:, :-1]
    assert np.all(rows.token_ids[:, 1:][both] > rows.token_ids[:, :-1][both]), "ascending"

    # Every drawn id is one of the row's tokens with positive probability, and carries that
    # token's log-prob exactly.
    by_id = np.full((positions, vocab), -np.inf, dtype=np.float32)
    real = full.logprobs > -np.inf
    by_id[np.nonzero(real)[0], full.token_ids[real]] = full.logprobs[real]
    r, j = np.nonzero(present)
    drawn = by_id[r, rows.token_ids[r, j]]
    assert np.all(drawn > -np.inf), "a token of probability 0 was drawn"
    np.testing.assert_array_equal(rows.logprobs[r, j], drawn)


def test_one_certain_token_gets_every_draw() -> None:
    lp = np.full((3, 6), -np.inf, dtype=np.float32)
    lp[:, 2] = 0.0
    full = TopKRows(
        np.tile(np.arange(6, dtype=np.int32)[::-1], (3, 1)), lp, np.zeros(3, np.float32)
    )
    rows = sample_rows(full, MAX_SAMPLES, rng_for_key(key_of("certain")))
    np.testing.assert_array_equal(rows.token_ids, [[3], [3], [3]])
    np.testing.assert_array_equal(rows.counts, [[MAX_SAMPLES]] * 3)
    np.testing.assert_array_equal(rows.logprobs, [[0.0]] * 3)


def test_same_key_same_draws_other_key_other_draws() -> None:
    full = full_rows(np.random.default_rng(5), 40, 1785, 0.0)
    key = key_of("record-a")
    first = sample_rows(full, 12, rng_for_key(key))
    again = sample_rows(full, 12, rng_for_key(bytes(key)))  # a fresh generator from equal bytes
    for name in ("token_ids", "logprobs", "counts", "target_logprobs"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name), err_msg=name)
    other = sample_rows(full, 12, rng_for_key(key_of("record-b")))
    differ = [
        not np.array_equal(first.token_ids[t][first.counts[t] > 0],
                           other.token_ids[t][other.counts[t] > 0])
        or not np.array_equal(first.counts[t], other.counts[t])
        for t in range(len(full))
    ]  # fmt: skip
    assert sum(differ) >= 30, f"only {sum(differ)} of 40 rows differ under another key"
    # Keys differing in one bit give unrelated draws too.
    flipped = bytes([key[0] ^ 1]) + key[1:]
    assert not np.array_equal(rng_for_key(key).random(8), rng_for_key(flipped).random(8))


def test_a_rows_draws_do_not_depend_on_the_other_rows_padding() -> None:
    """Rows padded to a wider batch draw exactly as unpadded (padding has no mass)."""
    full = full_rows(np.random.default_rng(8), 25, 300, 0.3)
    padded = full_rows(np.random.default_rng(8), 25, 300, 0.3, width=420)
    a = sample_rows(full, 12, rng_for_key(key_of("pad")))
    b = sample_rows(padded, 12, rng_for_key(key_of("pad")))
    for name in ("token_ids", "logprobs", "counts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("samples", [0, -1, MAX_SAMPLES + 1])
def test_samples_outside_1_to_255_are_refused(samples: int) -> None:
    full = full_rows(np.random.default_rng(0), 2, 5, 0.0)
    with pytest.raises(ValueError, match="between 1 and 255"):
        sample_rows(full, samples, rng_for_key(key_of("x")))


# --- the draws follow p ----------------------------------------------------------------------------

KINDS = 3  # distinct distributions, interleaved row by row in one call
VOCAB = 40
ROWS_PER_KIND = 1500
U = 12


@pytest.fixture(scope="module")
def frequency_run() -> tuple[np.ndarray, np.ndarray]:
    """Pooled draw counts per (distribution, id) and their p, from one sample_rows call over
    interleaved rows of three distributions (flat-ish, peaked, and one with zero-mass ids), each
    row listing its ids in another order and padded to a different width."""
    rng = np.random.default_rng(20240)
    temps = np.array([0.3, 2.5, 1.0])[:, None]
    logits = rng.normal(size=(KINDS, VOCAB)) * temps
    logits[2, ::3] = -np.inf  # a third of the ids of the last distribution have no mass
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)

    positions = KINDS * ROWS_PER_KIND
    kind = np.arange(positions) % KINDS
    order = np.argsort(rng.random((positions, VOCAB)), axis=1)
    width = VOCAB + 5
    ids = np.zeros((positions, width), dtype=np.int32)
    lp = np.full((positions, width), -np.inf, dtype=np.float32)
    ids[:, :VOCAB] = order
    with np.errstate(divide="ignore"):
        lp[:, :VOCAB] = np.log(p[kind[:, None], order]).astype(np.float32)
    full = TopKRows(ids, lp, np.zeros(positions, dtype=np.float32))
    rows = sample_rows(full, U, rng_for_key(key_of("frequencies")))

    observed = np.zeros((KINDS, VOCAB), dtype=np.int64)
    r, j = np.nonzero(rows.counts)
    np.add.at(observed, (kind[r], rows.token_ids[r, j]), rows.counts[r, j])
    return observed, p


def test_draw_frequencies_match_p(frequency_run: tuple[np.ndarray, np.ndarray]) -> None:
    observed, p = frequency_run
    assert observed.sum() == KINDS * ROWS_PER_KIND * U
    for d in range(KINDS):
        stat, df = chi2_statistic(observed[d], p[d] * ROWS_PER_KIND * U)
        assert stat < chi2_critical(df), f"distribution {d}: chi2 {stat:.1f} with {df} dof"


def test_the_frequency_check_rejects_a_wrong_distribution(
    frequency_run: tuple[np.ndarray, np.ndarray],
) -> None:
    """The same counts fail against distributions a little off p: the check has power."""
    observed, p = frequency_run
    n = ROWS_PER_KIND * U
    for d in range(KINDS):
        swapped = p[d].copy()
        top = np.argsort(-p[d])[:2]
        swapped[top] = p[d][top[::-1]]  # the two likeliest ids trade places
        wrongs = [p[d] ** e / (p[d] ** e).sum() for e in (1.3, 0.7)]  # other temperatures
        if np.abs(swapped - p[d]).max() > 0.01:
            wrongs.append(swapped)
        for wrong in wrongs:
            assert np.abs(wrong - p[d]).max() < 0.1  # a little off, no more
            stat, df = chi2_statistic(observed[d], wrong * n)
            assert stat > chi2_critical(df), f"distribution {d}: chi2 {stat:.1f} ({df} dof)"
    # And draws of another distribution, tested against p, fail.
    uniform_counts = np.random.default_rng(1).multinomial(n, np.full(VOCAB, 1.0 / VOCAB))
    stat, df = chi2_statistic(uniform_counts, p[1] * n)
    assert stat > chi2_critical(df)
