"""The record: one token sequence and the teacher's top-k distribution at every position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Record:
    """Teacher distributions for one sequence of T tokens.

    Row t is the teacher's distribution over the token that follows position t, aligned with a
    student's ``logits[:, t]``. ``logprobs`` are normalised over the whole vocabulary at
    temperature 1, so the mass outside the stored top-k is ``1 - exp(logprobs).sum(-1)``.
    """

    key: str
    input_ids: np.ndarray  # int32 [T]
    token_ids: np.ndarray  # int32 [T, k], descending probability
    logprobs: np.ndarray  # float32 [T, k]
    target_logprobs: np.ndarray  # float32 [T]; log p(x[t+1]), NaN on the last row

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[1])

    @property
    def tail_mass(self) -> np.ndarray:
        """Probability mass outside the stored top-k at each position, float32 [T]."""
        mass = 1.0 - np.exp(self.logprobs.astype(np.float64)).sum(axis=-1)
        return np.clip(mass, 0.0, 1.0).astype(np.float32)

    def __repr__(self) -> str:
        return f"Record(key={self.key[:12]}..., T={len(self)}, k={self.k})"
