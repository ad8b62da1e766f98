"""Captured rows as arrays: what a codec takes in and gives back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TopKRows:
    """Rows of P positions, concatenated over records: a codec's input and output.

    Ragged rows are padded with id 0 and log-prob -inf. ``tail_logprobs`` is the log of the mass
    outside the stored entries (None: derive it from the entries). ``counts`` marks sampled rows.
    ``tempered_log_tails`` is the log tempered mass outside the stored entries at each of
    ``temperatures`` (``client.codecs.tempered``; -inf: none), None where it was not captured.
    """

    token_ids: np.ndarray  # int32 [P, k]
    logprobs: np.ndarray  # float32 [P, k]
    target_logprobs: np.ndarray  # float32 [P], NaN where there is no next token
    tail_logprobs: np.ndarray | None = None  # float32 [P]
    counts: np.ndarray | None = None  # int32 [P, k], sampled rows only
    tempered_log_tails: np.ndarray | None = None  # float32 [P, m], m = len(temperatures)
    temperatures: tuple[float, ...] = ()

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


def concat_rows(parts: list[TopKRows]) -> TopKRows:
    """Rows of several records as one TopKRows, narrower rows padded (id 0, -inf, count 0)."""
    width = max(p.token_ids.shape[1] for p in parts)

    def cat(arrays: list[np.ndarray], fill: float) -> np.ndarray:
        if arrays[0].ndim == 1:
            return np.concatenate(arrays)
        out = [np.full((a.shape[0], width), fill, dtype=a.dtype) for a in arrays]
        for o, a in zip(out, arrays, strict=True):
            o[:, : a.shape[1]] = a
        return np.concatenate(out)

    def cat_optional(arrays: list[np.ndarray | None], fill: float) -> np.ndarray | None:
        present = [a for a in arrays if a is not None]
        return cat(present, fill) if len(present) == len(arrays) else None

    temperatures = {p.temperatures for p in parts}
    if len(temperatures) > 1:
        raise ValueError(f"rows with tails at different temperatures: {sorted(temperatures)}")
    tails = [p.tempered_log_tails for p in parts if p.tempered_log_tails is not None]
    return TopKRows(
        token_ids=cat([p.token_ids for p in parts], 0),
        logprobs=cat([p.logprobs for p in parts], -np.inf),
        target_logprobs=cat([p.target_logprobs for p in parts], np.nan),
        tail_logprobs=cat_optional([p.tail_logprobs for p in parts], np.nan),
        counts=cat_optional([p.counts for p in parts], 0),
        tempered_log_tails=np.concatenate(tails) if len(tails) == len(parts) else None,
        temperatures=parts[0].temperatures,
    )
