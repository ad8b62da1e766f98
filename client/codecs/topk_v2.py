"""``topk-v2`` (default before ``topk-v5``): ragged top-k rows on the piecewise grid, with a tail.

Log-probabilities become codes on the piecewise grid (``grid.py``). Entries are stored in order
of (code, id): descending probability, with ids ascending inside a run of equal codes. That order
is canonical (equal codes decode to equal values) and it makes low-probability ids, which carry
most of the bytes, sorted runs that zstd compresses well. Codes are stored as gaps along the row.
The tail (the mass outside the stored entries) is computed from the engine's exact values at
capture and stored as its own code, so it does not inherit the entries' rounding errors.

Error bounds (tested): |decoded - exact| <= 1/128 nats for every entry with p >= 1e-3;
|exp(decoded) - p| <= 1e-4 for every entry with p < 1e-3 (at most 6.5e-5 in fact);
|log decoded tail - log exact tail| <= 1/128 nats; targets within 1/128 nats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from logitcache.client.codecs.base import Codec, Field, pad_rows, row_lengths, stored_row_lengths
from logitcache.client.codecs.grid import (
    NO_VALUE,
    PIECEWISE_GRID,
    dequantize_gaps,
    dequantize_uniform,
    quantize,
    quantize_targets,
    quantize_uniform,
)
from logitcache.client.codecs.rows import TopKRows


@dataclass(frozen=True)
class TopKCodec(Codec):
    """Arrays: ``n`` uint16 [P] entries per row; ``token_ids`` [E]; ``logprob_gaps`` uint16 [E]
    (the first of a row is its code, the rest are differences); ``tail_q`` uint16 [P] (1/64-nat
    steps of -log tail, 0xFFFF for no tail); ``target_q`` uint16 [P].
    """

    name: ClassVar[str] = "topk-v2"
    grid: ClassVar[np.ndarray] = PIECEWISE_GRID  # the entries' grid (``topk-v3``: the contract one)

    def quantize_entries(self, logprobs: np.ndarray) -> np.ndarray:
        """Codes of the entries on :attr:`grid`."""
        return quantize(logprobs)

    @property
    def fields(self) -> tuple[Field, ...]:
        u16 = np.dtype(np.uint16)
        return (
            Field("n", u16, "position"),
            Field("token_ids", self.id_dtype, "entry", shuffle=False),
            Field("logprob_gaps", u16, "entry"),
            Field("tail_q", u16, "position"),
            Field("target_q", u16, "position"),
        )

    def encode(self, rows: TopKRows) -> dict[str, np.ndarray]:
        if rows.counts is not None:
            raise ValueError(f"{self.name} stores top-k rows, not sampled rows")
        lp = np.asarray(rows.logprobs, dtype=np.float64)
        ids = np.asarray(rows.token_ids).astype(np.int64)
        if lp.shape != ids.shape or lp.ndim != 2:
            raise ValueError(f"token_ids {ids.shape} and logprobs {lp.shape} must be equal [P, k]")
        valid = lp > -np.inf
        n = row_lengths(valid)
        self.check_ids(ids, valid)
        if np.isnan(lp).any():
            raise ValueError("log-probabilities must not be NaN")
        codes = self.quantize_entries(lp)
        if (np.diff(codes, axis=1)[valid[:, 1:]] < 0).any():
            raise ValueError("log-probabilities must be sorted in descending order along k")
        # Canonical order: by code, then by id (padding, code -inf and id V, sorts last).
        order = np.argsort(codes * np.int64(self.vocab_size + 1) + np.where(valid, ids, self.vocab_size),
                           axis=1, kind="stable")  # fmt: skip
        codes = np.take_along_axis(codes, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
        gaps = np.diff(codes, axis=1, prepend=np.zeros((codes.shape[0], 1), dtype=np.int32))
        if rows.tail_logprobs is not None:
            log_tail = np.asarray(rows.tail_logprobs, dtype=np.float64)
        else:
            with np.errstate(divide="ignore"):
                log_tail = np.log(np.maximum(1.0 - np.exp(lp).sum(axis=1), 0.0))
        tail_q = np.where(log_tail > -np.inf, quantize_uniform(log_tail), NO_VALUE)
        return {
            "n": n.astype(np.uint16),
            "token_ids": ids[valid].astype(self.id_dtype),
            "logprob_gaps": gaps[valid].astype(np.uint16),
            "tail_q": tail_q.astype(np.uint16),
            "target_q": quantize_targets(rows.target_logprobs),
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        n = stored_row_lengths(arrays, "logprob_gaps")
        gaps = pad_rows(np.asarray(arrays["logprob_gaps"]), n, 0, np.uint16)
        logprobs = dequantize_gaps(gaps, self.grid)
        if gaps.shape[1] and not (n == gaps.shape[1]).all():
            logprobs[np.arange(gaps.shape[1]) >= n[:, None]] = -np.inf  # padding
        tail_q = np.asarray(arrays["tail_q"])
        tail = dequantize_uniform(tail_q)
        tail[tail_q == NO_VALUE] = -np.inf
        return TopKRows(
            token_ids=pad_rows(np.asarray(arrays["token_ids"]), n, 0, np.int32),
            logprobs=logprobs,
            target_logprobs=dequantize_uniform(arrays["target_q"]),
            tail_logprobs=tail,
        )
