"""The record: one token sequence and the teacher's distribution at every position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Record:
    """Teacher distributions for one sequence of T tokens.

    Row t is the teacher's distribution over the token that follows position t, aligned with a
    student's ``logits[:, t]``. ``logprobs`` are normalised over the whole vocabulary at
    temperature 1.

    Rows may be ragged (adaptive k): a row with n < k entries is padded with id 0 and log-prob
    -inf, which holds no mass. ``tail_logprobs``, when present, is the log of the teacher's mass
    outside the row's stored entries, computed from the engine's exact values at capture time
    (-inf where there is none); without it the tail is ``1 - exp(logprobs).sum(-1)``.

    Sampled captures (mode ``sampled``) set ``counts``: the row's entries are the distinct ids of
    U draws from the teacher's full distribution, ``counts`` how often each was drawn (0 on
    padding) and ``logprobs`` the teacher's log-probabilities of those ids. They are an unbiased
    sample, not a top-k, so they have no tail.

    ``loss_mask`` (uint8 [T]) comes with records of a chat dataset: 1 where row t counts, i.e.
    where its target, token t + 1, belongs to an assistant turn (0 on the last row, which has no
    target). It belongs to the dataset entry, not to the record: the same record in another
    dataset may have another mask, or none. None: every position counts.

    ``tempered_log_tails`` (float32 [T, m]) come with records of a space captured at
    ``temperatures`` (``--temperatures``): column j is the log of the teacher's mass outside the
    row's entries at temperature ``temperatures[j]``, i.e. under ``softmax(log p / T)`` over the
    whole vocabulary (-inf where there is none; within 1/128 nats). None: not captured.
    """

    key: str
    input_ids: np.ndarray  # int32 [T]
    token_ids: np.ndarray  # int32 [T, k], descending probability (sampled: ascending id)
    logprobs: np.ndarray  # float32 [T, k]; -inf on padding
    target_logprobs: np.ndarray  # float32 [T]; log p(x[t+1]), NaN on the last row
    tail_logprobs: np.ndarray | None = None  # float32 [T]; log mass outside the stored entries
    counts: np.ndarray | None = None  # int32 [T, k]; sampled mode only
    loss_mask: np.ndarray | None = None  # uint8 [T]; chat datasets only
    tempered_log_tails: np.ndarray | None = None  # float32 [T, m]; captures with temperatures
    temperatures: tuple[float, ...] = ()  # the temperature of each column of tempered_log_tails

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def k(self) -> int:
        """Width of the rows (the largest number of entries in any row)."""
        return int(self.token_ids.shape[1])

    @property
    def sampled(self) -> bool:
        return self.counts is not None

    @property
    def row_lengths(self) -> np.ndarray:
        """Number of stored entries in each row, int32 [T]."""
        present = self.counts > 0 if self.counts is not None else self.logprobs > -np.inf
        return present.sum(axis=-1, dtype=np.int32)

    @property
    def tail_mass(self) -> np.ndarray:
        """Probability mass outside the stored entries at each position, float32 [T]."""
        if self.counts is not None:
            raise ValueError("a sampled record has no top-k tail")
        if self.tail_logprobs is not None:
            return np.exp(self.tail_logprobs.astype(np.float64)).astype(np.float32)
        mass = 1.0 - np.exp(self.logprobs.astype(np.float64)).sum(axis=-1)
        return np.clip(mass, 0.0, 1.0).astype(np.float32)

    def __repr__(self) -> str:
        kind = "sampled" if self.sampled else "top-k"
        return f"Record(key={self.key[:12]}..., T={len(self)}, k={self.k}, {kind})"
