"""Sampled capture: U draws per position from the teacher's full distribution.

Sparse logit sampling (Anshumann et al., ACL 2025): instead of the top-k, store a few tokens drawn
from the teacher's distribution p with their counts. For any function f of the token,
``mean over draws of f(x_j)`` is an unbiased estimate of ``E_p[f]``, so with f = log p - log q the
forward KL and its gradient are estimated without bias (the top-k's dropped tail biases them).

Captures draw on the engine's device (``device_capture``): draw j of row t is the inverse CDF, in
id order, at a uniform hashed from (record key, t, j), so the same sequence gets the same draws in
every run, on every machine, whatever the batch it was captured in. :func:`group_draws` turns
those draws into stored rows; ``device_capture.draw_rows_for_key`` repeats the engine's draws on
the host from a full distribution (what a fidelity check compares a store with).

:func:`sample_rows` draws on the host from full rows with any numpy generator (``rng_for_key``:
PCG64 seeded by the key, the scheme of captures before the engine-side path); tests and storage
benchmarks use it to make sampled rows without an engine.
"""

from __future__ import annotations

import numpy as np

from logitcache.client.codecs import TopKRows

MAX_SAMPLES = 255


def rng_for_key(key: bytes) -> np.random.Generator:
    """The generator of one record's draws (PCG64 seeded by the key's bytes)."""
    return np.random.Generator(np.random.PCG64(np.frombuffer(key, dtype="<u4").tolist()))


def sample_rows(full: TopKRows, samples: int, rng: np.random.Generator) -> TopKRows:
    """Draw ``samples`` tokens per row of ``full`` (every token with its log-prob, any order).

    Returns sampled rows: ascending distinct ids, their counts (summing to ``samples``) and
    log-probs, padded to the largest number of distinct ids. Vectorised: one inverse-CDF search
    over all rows at once.
    """
    if not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    lp = np.asarray(full.logprobs, dtype=np.float64)
    rows, width = lp.shape
    cdf = np.cumsum(np.exp(lp), axis=1)
    cdf /= cdf[:, -1:]  # the engine's float32 values sum to 1 only up to rounding
    offset = np.arange(rows, dtype=np.float64)[:, None]
    draws = rng.random((rows, samples))
    flat = np.searchsorted((cdf + offset).ravel(), (draws + offset).ravel(), side="right")
    col = np.minimum(flat.reshape(rows, samples) - np.arange(rows)[:, None] * width, width - 1)
    ids = np.take_along_axis(np.asarray(full.token_ids), col, axis=1)
    return group_draws(ids, np.take_along_axis(lp, col, axis=1), full.target_logprobs)


def group_draws(
    draw_ids: np.ndarray, draw_logprobs: np.ndarray, target_logprobs: np.ndarray
) -> TopKRows:
    """[P, U] draws (ids and their log-probs, in draw order) -> sampled rows: ascending distinct
    ids, their counts (summing to U) and log-probs, padded to the most distinct ids of a row."""
    ids = np.asarray(draw_ids).astype(np.int64)
    rows, samples = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    lps = np.take_along_axis(np.asarray(draw_logprobs), order, axis=1)
    first = np.ones_like(ids, dtype=bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = np.cumsum(first, axis=1) - 1  # index of each draw's distinct id within its row
    n = first.sum(axis=1)
    keep = int(n.max()) if rows else 0
    row_index = np.repeat(np.arange(rows), samples)
    counts = np.zeros((rows, keep), dtype=np.int32)
    np.add.at(counts, (row_index, slot.ravel()), 1)
    out_ids = np.zeros((rows, keep), dtype=np.int32)
    out_lp = np.full((rows, keep), -np.inf, dtype=np.float32)
    out_ids[row_index[first.ravel()], slot[first]] = ids[first]
    out_lp[row_index[first.ravel()], slot[first]] = lps[first]
    return TopKRows(
        token_ids=out_ids,
        logprobs=out_lp,
        target_logprobs=np.asarray(target_logprobs, dtype=np.float32),
        counts=counts,
    )
