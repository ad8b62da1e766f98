"""fidelity(): zero for identical rows, hand-checked values on tiny rows (V=6, k=3), prefixes and
foreign ids handled as documented, order-free, and the threshold checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from logitcache.client.codecs import TopKCodec, TopKRows
from logitcache.client.fidelity import Fidelity, fidelity

V = 6


def rows(ids, probs, tail=None) -> TopKRows:
    """Rows from lists of ids and probabilities (None: padding); ``tail`` a list of masses."""
    ids = np.array(ids, dtype=np.int32)
    with np.errstate(divide="ignore"):
        lp = np.log(np.array(probs, dtype=np.float64)).astype(np.float32)
    t = None if tail is None else np.log(np.array(tail, dtype=np.float64)).astype(np.float32)
    return TopKRows(ids, lp, np.full(len(ids), np.nan, np.float32), tail_logprobs=t)


def random_rows(rng: np.random.Generator, positions: int, vocab: int, k: int) -> TopKRows:
    """Exact top-k of softmax(random logits), descending, with the exact tail."""
    logits = rng.normal(0.0, rng.uniform(0.5, 4.0, size=(positions, 1)), size=(positions, vocab))
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, ids, axis=1)
    tail = np.log1p(-np.exp(top).sum(axis=1))
    return TopKRows(
        ids.astype(np.int32),
        top.astype(np.float32),
        np.full(positions, np.nan, np.float32),
        tail_logprobs=tail.astype(np.float32),
    )


def permuted(r: TopKRows, rng: np.random.Generator) -> TopKRows:
    """The same rows with every row's entries shuffled (padding included)."""
    order = np.argsort(rng.random(r.token_ids.shape), axis=1)
    return TopKRows(
        np.take_along_axis(r.token_ids, order, axis=1),
        np.take_along_axis(r.logprobs, order, axis=1),
        r.target_logprobs,
        tail_logprobs=r.tail_logprobs,
    )


def assert_same(a: Fidelity, b: Fidelity, atol: float = 1e-12) -> None:
    for name in ("kl", "max_abs_err", "mean_abs_err", "tail_err"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=atol)


def test_identical_rows_give_zero() -> None:
    rng = np.random.default_rng(0)
    exact = random_rows(rng, 40, 500, 8)
    f = fidelity(exact, exact, 500)
    assert f.kl.dtype == np.float64 and f.kl.shape == (40,)
    np.testing.assert_allclose(f.kl, 0.0, atol=1e-14)
    for arr in (f.max_abs_err, f.mean_abs_err):
        np.testing.assert_array_equal(arr, 0.0)
    np.testing.assert_allclose(f.tail_err, 0.0, atol=1e-6)  # the stored float32 tail vs itself
    no_tail = TopKRows(exact.token_ids, exact.logprobs, exact.target_logprobs)
    g = fidelity(no_tail, no_tail, 500)
    for arr in (g.kl, g.max_abs_err, g.mean_abs_err, g.tail_err):
        np.testing.assert_array_equal(arr, 0.0)
    assert g.max_err_p_ge() == 0.0 and g.max_prob_err_p_lt() == 0.0


def test_known_perturbation() -> None:
    exact = rows([[2, 0, 5]], [[0.5, 0.3, 0.1]])  # tail 0.1 over ids 1, 3, 4
    decoded = rows([[2, 0, 5]], [[0.45, 0.35, 0.1]], tail=[0.12])
    f = fidelity(exact, decoded, V)
    # The explicit decoded tail is the tail bucket, renormalised with the entries (as the
    # trainer's losses read it): Q = (0.45, 0.35, 0.1, 0.12) / 1.02.
    p = np.array([0.5, 0.3, 0.1, 0.1])
    q = np.array([0.45, 0.35, 0.1, 0.12]) / 1.02
    kl = float((p * np.log(p / q)).sum())
    errs = [math.log(0.5 / 0.45), math.log(0.35 / 0.3), 0.0]
    assert f.kl[0] == pytest.approx(kl, rel=1e-5)
    assert f.max_abs_err[0] == pytest.approx(max(errs), abs=1e-6)
    assert f.mean_abs_err[0] == pytest.approx(sum(errs) / 3, abs=1e-6)
    assert f.tail_err[0] == pytest.approx(0.02, abs=1e-6)  # |0.12 - 0.1|


def test_adaptive_prefix() -> None:
    exact = rows([[4, 1, 2]], [[0.5, 0.3, 0.1]])  # tail 0.1
    # Two entries, padded; implied tail 0.2 = exact's 0.1 + the dropped 0.1: no tail error.
    prefix = rows([[4, 1, 0]], [[0.5, 0.3, 0.0]])
    f = fidelity(exact, prefix, V)
    # Id 2 gets the decoded tail spread over the V - 2 unlisted ids: 0.2 / 4 = 0.05;
    # the decoded tail bucket is 1 - (0.5 + 0.3 + 0.05) = 0.15.
    assert f.kl[0] == pytest.approx(0.1 * math.log(0.1 / 0.05) + 0.1 * math.log(0.1 / 0.15), 1e-5)
    assert f.kl[0] == pytest.approx(0.1 * math.log(4 / 3), rel=1e-5)
    assert f.max_abs_err[0] == pytest.approx(0.0, abs=1e-6)
    assert f.mean_abs_err[0] == pytest.approx(0.0, abs=1e-6)
    assert f.tail_err[0] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_array_equal(np.isnan(f.entry_decoded), [[False, False, True]])

    # The same prefix with an explicit (off) tail of 0.16: id 2 gets 0.04, the tail bucket the
    # remaining 0.12, and Q is renormalised: (0.5, 0.3, 0.04, 0.12) / 0.96.
    off = rows([[4, 1, 0]], [[0.5, 0.3, 0.0]], tail=[0.16])
    g = fidelity(exact, off, V)
    p = np.array([0.5, 0.3, 0.1, 0.1])
    q = np.array([0.5, 0.3, 0.04, 0.12]) / 0.96
    assert g.kl[0] == pytest.approx(float((p * np.log(p / q)).sum()), 1e-5)
    assert g.tail_err[0] == pytest.approx(0.04, abs=1e-6)


def test_decoded_id_that_exact_does_not_list() -> None:
    exact = rows([[4, 1, 2]], [[0.5, 0.3, 0.1]])  # tail 0.1: 1/30 for each of ids 0, 3, 5
    decoded = rows([[4, 3]], [[0.5, 0.04]])  # tail 0.46, 0.115 for each of the 4 unlisted
    f = fidelity(exact, decoded, V)
    err = math.log(0.04 * 30)  # id 3 against exact's tail share 1/30
    assert f.max_abs_err[0] == pytest.approx(err, rel=1e-5)
    assert f.mean_abs_err[0] == pytest.approx(err / 2, rel=1e-5)
    outside = 0.1 * 2 / 3 + 0.3 + 0.1  # exact tail less id 3's share, plus ids 1 and 2
    assert f.tail_err[0] == pytest.approx(abs(0.46 - outside), abs=1e-6)
    p = np.array([0.5, 0.3, 0.1, 0.1])
    q = np.array([0.5, 0.115, 0.115, 1 - 0.73])
    assert f.kl[0] == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-5)


def test_order_does_not_matter() -> None:
    rng = np.random.default_rng(1)
    exact = random_rows(rng, 60, 300, 12)
    # A realistic decoded side: topk-v2's round trip (quantised values, stored tail).
    codec = TopKCodec(vocab_size=300)
    decoded = codec.decode(codec.encode(exact))
    base = fidelity(exact, decoded, 300)
    assert base.kl.max() > 0
    assert_same(fidelity(exact, permuted(decoded, rng), 300), base)
    assert_same(fidelity(permuted(exact, rng), decoded, 300), base)
    assert_same(fidelity(exact, permuted(exact, rng), 300), fidelity(exact, exact, 300))
    # topk-v2's documented bounds, through the threshold checks.
    assert 0 < base.max_err_p_ge() <= 1 / 128 + 1e-6
    assert base.max_prob_err_p_lt() <= 1e-4


def test_prefix_of_random_rows_matches_dropped_mass() -> None:
    rng = np.random.default_rng(2)
    exact = random_rows(rng, 30, 200, 10)
    n = rng.integers(1, 11, size=30)
    keep = np.arange(10) < n[:, None]
    prefix = TopKRows(
        np.where(keep, exact.token_ids, 0),
        np.where(keep, exact.logprobs, -np.inf).astype(np.float32),
        exact.target_logprobs,
    )
    f = fidelity(exact, prefix, 200)
    np.testing.assert_array_equal(f.max_abs_err, 0.0)
    np.testing.assert_allclose(f.tail_err, 0.0, atol=1e-6)
    assert (f.kl[n < 10] > 0).all()
    np.testing.assert_allclose(f.kl[n == 10], 0.0, atol=1e-12)


def test_threshold_checks_and_summary() -> None:
    exact = rows([[0, 1, 2]], [[0.5, 0.3, 5e-4]])
    decoded = rows([[0, 1, 2]], [[0.5, 0.31, 6e-4]])
    f = fidelity(exact, decoded, V)
    assert f.max_err_p_ge() == pytest.approx(math.log(0.31 / 0.3), rel=1e-5)
    assert f.max_prob_err_p_lt() == pytest.approx(1e-4, rel=1e-4)
    assert f.max_err_p_ge(0.4) == pytest.approx(0.0, abs=1e-6)
    assert f.max_prob_err_p_lt(0.4) == pytest.approx(0.01, rel=1e-4)
    assert f.max_err_p_ge(0.9) == 0.0  # no entry qualifies
    s = f.summary()
    assert s["kl_mean"] == pytest.approx(f.kl[0])
    assert s["abs_err_max"] == pytest.approx(math.log(6 / 5), rel=1e-5)
    assert s["max_err_p_ge_0.001"] == f.max_err_p_ge()
    assert s["max_prob_err_p_lt_0.001"] == f.max_prob_err_p_lt()
    assert {"abs_err_mean", "tail_err_mean", "kl_max", "tail_err_max"} <= set(s)


def test_empty_and_invalid_inputs() -> None:
    empty = TopKRows(
        np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32), np.zeros(0, np.float32)
    )
    f = fidelity(empty, empty, V)
    assert len(f) == 0 and f.summary()["kl_mean"] == 0.0
    exact = rows([[0, 1, 2]], [[0.5, 0.3, 0.1]])
    nothing = TopKRows(np.zeros((1, 0), np.int32), np.zeros((1, 0), np.float32), np.zeros(1))
    g = fidelity(exact, nothing, V)  # an empty row: everything in its tail, 1/6 per id
    assert g.tail_err[0] == pytest.approx(0.0, abs=1e-6) and g.max_abs_err[0] == 0.0
    p, q = np.array([0.5, 0.3, 0.1, 0.1]), np.array([1 / 6, 1 / 6, 1 / 6, 0.5])
    assert g.kl[0] == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="positions"):
        fidelity(exact, empty, V)
    with pytest.raises(ValueError, match="vocabulary"):
        fidelity(exact, rows([[0, 7, 2]], [[0.5, 0.3, 0.1]]), V)
