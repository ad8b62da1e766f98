"""Sampled capture: U draws per position from the teacher's full distribution.

Sparse logit sampling (Anshumann et al., ACL 2025): instead of the top-k, store a few tokens drawn
from the teacher's distribution p with their counts. For any function f of the token,
``mean over draws of f(x_j)`` is an unbiased estimate of ``E_p[f]``, so with f = log p - log q the
forward KL and its gradient are estimated without bias (the top-k's dropped tail biases them).

Draws are reproducible: each record's generator is seeded from its key (a hash of the capture
space and the token ids), so the same sequence gets the same draws in every run and on every
machine, whatever the batch it was captured in.
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
    ids = np.take_along_axis(np.asarray(full.token_ids), col, axis=1).astype(np.int64)
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    lps = np.take_along_axis(lp, np.take_along_axis(col, order, axis=1), axis=1)
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
        target_logprobs=np.asarray(full.target_logprobs, dtype=np.float32),
        counts=counts,
    )
