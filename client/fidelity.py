"""How faithfully an encoding reproduces the engine's exact top-k rows.

:func:`fidelity` compares, position by position, the engine's exact rows (``exact``: fixed k,
full precision) with what an encoding gives back for the same positions (``decoded``: possibly
fewer entries per row, e.g. an adaptive prefix; possibly another order among equal values;
possibly an explicit tail). Notation for one position, with vocabulary size V:

- exact: ids ``e_1..e_k`` with probabilities ``p_i = exp(lp_i)`` and tail mass ``T_e``
  (``exp(tail_logprobs)`` if given, else ``clip(1 - sum_i p_i, 0, 1)``). The tail is read as
  spread uniformly over the V - k ids the row does not list: each has ``u_e = T_e / (V - k)``.
- decoded: ``n_d`` stored entries, ids ``d_j`` with log-probs ``dlp_j`` (padding, log-prob -inf,
  is not an entry), and tail mass ``T_d`` (``exp(tail_logprobs)`` if given, else
  ``clip(1 - sum_j exp(dlp_j), 0, 1)``), read as ``u_d = T_d / (V - n_d)`` per unlisted id.

Measures (float64 arrays [P], see :class:`Fidelity`):

- ``max_abs_err``, ``mean_abs_err``: over the decoded entries j, ``|dlp_j - ref_j|`` where
  ``ref_j`` is exact's log-prob of ``d_j`` if exact lists it, else ``log u_e`` (exact's uniform
  tail share). A row without entries gives 0.
- ``tail_err``: ``|T_d - M|`` where M is the exact mass outside the decoded ids:
  ``M = T_e (V - k - x) / (V - k) + sum_{i: e_i not decoded} p_i`` with x the number of decoded
  ids that exact does not list. For the usual case (decoded ids a subset of exact's, x = 0) this
  is ``T_e + sum`` of the exact probabilities the decoded row dropped; for x > 0 the x ids'
  uniform tail shares are taken out of the tail, the same reading as ``ref_j = log u_e``.
- ``kl``: ``KL(P || Q)`` over k + 1 buckets, exact's k ids and one tail bucket:
  ``P = (p_1..p_k, T_e)``; ``Q = (q_1..q_k, 1 - sum_i q_i)`` with ``q_i = exp(dlp_j)`` if
  ``d_j = e_i`` for some j, else ``u_d``. Negative buckets are clipped to 0, every bucket of both
  sides is floored at 1e-12 (so the value is finite when one side has an empty tail), and both
  sides are normalised to sum 1 (the floors, the clip, and a stored exact tail that does not add
  up to exactly ``1 - sum p_i`` can leave a side off 1). ``Q``'s tail bucket is what a reader
  of the decoded rows puts there, as the trainer's losses do: with an explicit decoded tail,
  the decoded mass off exact's ids (``T_d`` less the ``u_d`` shares handed to exact's missing
  ids, plus decoded entries exact does not list), then normalised with the entries; without
  one, the complement ``1 - sum_i q_i``. Identical rows give 0.

Ids are matched between the rows without Python loops: every entry gets the key ``row * V + id``,
one side's keys are sorted once, and the other side's are looked up with ``np.searchsorted``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from logitcache.client.codecs import TopKRows

FLOOR = 1e-12
"""Floor of every KL bucket, on both sides, before normalising."""

DEFAULT_THRESHOLD = 1e-3
"""Exact probability that separates the log-error check from the probability-error check."""


@dataclass(frozen=True, eq=False)
class Fidelity:
    """Per-position fidelity of decoded rows against exact rows (module doc for the maths).

    ``entry_exact`` and ``entry_decoded`` are per decoded entry, [P, m] with m the decoded rows'
    width: the exact reference log-prob ``ref_j`` of each decoded entry's id and the decoded
    log-prob ``dlp_j``, both NaN on padding. The threshold checks are computed from them.
    """

    kl: np.ndarray  # float64 [P]
    max_abs_err: np.ndarray  # float64 [P]
    mean_abs_err: np.ndarray  # float64 [P]
    tail_err: np.ndarray  # float64 [P]
    entry_exact: np.ndarray = field(repr=False)  # float64 [P, m]
    entry_decoded: np.ndarray = field(repr=False)  # float64 [P, m]

    def __len__(self) -> int:
        return int(self.kl.shape[0])

    def _entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(stored-entry mask, exact probability exp(ref_j)) over [P, m]."""
        present = ~np.isnan(self.entry_decoded)
        return present, np.exp(np.where(present, self.entry_exact, -np.inf))

    def max_err_p_ge(self, threshold: float = DEFAULT_THRESHOLD) -> float:
        """``max |dlp_j - ref_j|`` over decoded entries with exact probability ``exp(ref_j) >=
        threshold``; 0 if there is none."""
        present, p = self._entries()
        mask = present & (p >= threshold)
        err = np.abs(np.where(mask, self.entry_decoded - self.entry_exact, 0.0))
        return float(err.max(initial=0.0))

    def max_prob_err_p_lt(self, threshold: float = DEFAULT_THRESHOLD) -> float:
        """``max |exp(dlp_j) - exp(ref_j)|`` over decoded entries with exact probability
        ``exp(ref_j) < threshold``; 0 if there is none."""
        present, p = self._entries()
        mask = present & (p < threshold)
        q = np.exp(np.where(mask, self.entry_decoded, -np.inf))
        return float(np.abs(np.where(mask, q - p, 0.0)).max(initial=0.0))

    def summary(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
        """Means and maxima over positions. ``abs_err_mean`` is the mean over all decoded entries
        (not the mean of the per-position means); empty inputs give 0 throughout."""
        present, _ = self._entries()
        n = int(present.sum())
        err = np.abs(np.where(present, self.entry_decoded - self.entry_exact, 0.0))
        return {
            "positions": float(len(self)),
            "kl_mean": _mean(self.kl),
            "kl_max": float(self.kl.max(initial=0.0)),
            "abs_err_mean": float(err.sum() / n) if n else 0.0,
            "abs_err_max": float(self.max_abs_err.max(initial=0.0)),
            "tail_err_mean": _mean(self.tail_err),
            "tail_err_max": float(self.tail_err.max(initial=0.0)),
            f"max_err_p_ge_{threshold:g}": self.max_err_p_ge(threshold),
            f"max_prob_err_p_lt_{threshold:g}": self.max_prob_err_p_lt(threshold),
        }


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else 0.0


def _tail_mass(rows: TopKRows, lp: np.ndarray) -> np.ndarray:
    """``exp(tail_logprobs)`` if the rows carry it, else ``clip(1 - sum exp(lp), 0, 1)``."""
    if rows.tail_logprobs is not None:
        return np.exp(np.asarray(rows.tail_logprobs, dtype=np.float64))
    return np.clip(1.0 - np.exp(lp).sum(axis=1), 0.0, 1.0)


def _rows(rows: TopKRows, vocab_size: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64, log-probs float64, stored-entry mask), all [P, width], checked."""
    if rows.counts is not None:
        raise ValueError(f"{what} rows are sampled rows; fidelity compares top-k rows")
    ids = np.asarray(rows.token_ids).astype(np.int64)
    lp = np.asarray(rows.logprobs, dtype=np.float64)
    if ids.ndim != 2 or ids.shape != lp.shape:
        raise ValueError(f"{what}: token_ids {ids.shape} and logprobs {lp.shape} must be [P, k]")
    if np.isnan(lp).any():
        raise ValueError(f"{what}: log-probabilities must not be NaN")
    valid = lp > -np.inf
    used = ids[valid]
    if used.size and (used.min() < 0 or used.max() >= vocab_size):
        raise ValueError(f"{what}: token id outside the vocabulary of size {vocab_size}")
    return ids, lp, valid


def _match(
    ids: np.ndarray, valid: np.ndarray, other_ids: np.ndarray, other_valid: np.ndarray, vocab: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each entry of ``ids`` [P, a]: whether the same row of ``other_ids`` [P, b] lists its id
    (bool [P, a]) and where (flat index into [P, b]; meaningless where not found).

    Keys ``row * V + id`` are unique across rows, so one global sort and one ``searchsorted``
    match every row at once. Padding gets key -1 on the searched side (never matched).
    """
    rows = np.arange(ids.shape[0], dtype=np.int64)[:, None] * vocab
    other_keys = np.where(other_valid, rows + other_ids, -1).ravel()
    if other_keys.size == 0:
        return np.zeros(ids.shape, dtype=bool), np.zeros(ids.shape, dtype=np.int64)
    order = np.argsort(other_keys, kind="stable")
    sorted_keys = other_keys[order]
    keys = rows + ids
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    found = valid & (sorted_keys[pos] == keys)
    return found, order[pos]


def _gather(values: np.ndarray, at: np.ndarray, found: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """``values.ravel()[at]`` where ``found``, else ``fill`` (broadcast); safe when ``values``
    is empty (then nothing is found)."""
    if values.size == 0:
        return np.broadcast_to(fill, at.shape).astype(np.float64)
    return np.where(found, values.ravel()[at], fill)


def fidelity(exact: TopKRows, decoded: TopKRows, vocab_size: int) -> Fidelity:
    """Compare ``decoded`` rows with the engine's ``exact`` rows, position by position.

    Both are :class:`TopKRows` of the same P positions; widths may differ and rows may be ragged
    (padding: id 0, log-prob -inf). The measures are defined in the module doc.
    """
    V = int(vocab_size)
    e_ids, e_lp, e_valid = _rows(exact, V, "exact")
    d_ids, d_lp, d_valid = _rows(decoded, V, "decoded")
    if e_ids.shape[0] != d_ids.shape[0]:
        raise ValueError(f"exact has {e_ids.shape[0]} positions, decoded {d_ids.shape[0]}")
    n_e = e_valid.sum(axis=1)
    n_d = d_valid.sum(axis=1)
    if (n_e >= V).any() or (n_d > V).any():
        raise ValueError(f"rows list more ids than the vocabulary of size {V} leaves a tail for")

    with np.errstate(divide="ignore"):
        p_e = np.exp(e_lp)  # 0 on padding
        t_e = _tail_mass(exact, e_lp)
        u_e = t_e / (V - n_e)  # exact's uniform tail share per unlisted id
        log_u_e = np.log(u_e)
        t_d = _tail_mass(decoded, d_lp)
        u_d = np.where(n_d < V, t_d / np.maximum(V - n_d, 1), 0.0)

    # Decoded entries against exact's value of the same id (or exact's uniform tail share).
    d_found, d_at = _match(d_ids, d_valid, e_ids, e_valid, V)
    ref = _gather(e_lp, d_at, d_found, log_u_e[:, None])
    entry_exact = np.where(d_valid, ref, np.nan)
    entry_decoded = np.where(d_valid, d_lp, np.nan)
    err = np.abs(np.where(d_valid, d_lp - ref, 0.0))
    max_abs_err = err.max(axis=1, initial=0.0)
    mean_abs_err = err.sum(axis=1) / np.maximum(n_d, 1)

    # Exact entries against the decoded row: its value of the id, or its uniform tail share.
    e_found, e_at = _match(e_ids, e_valid, d_ids, d_valid, V)
    dropped = np.where(e_valid & ~e_found, p_e, 0.0).sum(axis=1)
    extra = (d_valid & ~d_found).sum(axis=1)
    outside = t_e - u_e * extra + dropped  # T_e (V - k - x) / (V - k) + dropped
    tail_err = np.abs(t_d - outside)

    q = _gather(np.exp(d_lp), e_at, e_found, u_d[:, None])
    q = np.where(e_valid, q, 0.0)
    if decoded.tail_logprobs is not None:
        # The decoded rows carry their own tail, which readers (the trainer's losses) use with
        # the entries, renormalised: Q's tail bucket is the decoded mass off exact's ids.
        missing = (e_valid & ~e_found).sum(axis=1)
        off_exact = np.where(d_valid & ~d_found, np.exp(d_lp), 0.0).sum(axis=1)
        q_tail = off_exact + np.maximum(t_d - u_d * missing, 0.0)
    else:
        q_tail = np.maximum(1.0 - q.sum(axis=1), 0.0)
    P = np.concatenate([np.where(e_valid, p_e, 0.0), t_e[:, None]], axis=1)
    Q = np.concatenate([q, q_tail[:, None]], axis=1)
    buckets = np.concatenate([e_valid, np.ones((e_valid.shape[0], 1), dtype=bool)], axis=1)
    P = np.where(buckets, np.maximum(P, FLOOR), 0.0)
    Q = np.where(buckets, np.maximum(Q, FLOOR), 0.0)
    P /= P.sum(axis=1, keepdims=True)
    Q /= Q.sum(axis=1, keepdims=True)
    ratio = np.divide(P, Q, out=np.ones_like(P), where=buckets)  # 1 (log 0) off the buckets
    kl = np.maximum((P * np.log(ratio)).sum(axis=1), 0.0)  # >= 0 up to rounding

    return Fidelity(
        kl=kl,
        max_abs_err=max_abs_err,
        mean_abs_err=mean_abs_err,
        tail_err=tail_err,
        entry_exact=entry_exact,
        entry_decoded=entry_decoded,
    )
