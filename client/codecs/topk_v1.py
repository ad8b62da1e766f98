"""``topk-q64-delta-v1``, the first codec: fixed k, codes on the uniform grid, no stored tail.

Ids are stored as they come, in the narrowest unsigned type; log-probability codes as gaps along
k (the first of a row is its code). Error bound: |decoded - exact| <= 1/128 nats for every entry
above -1023 nats. Kept so that stores written with it stay readable; new captures use
``topk-v2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from logitcache.client.codecs.base import Codec, Field
from logitcache.client.codecs.grid import (
    LOGPROB_SCALE,
    dequantize_uniform,
    quantize_targets,
    quantize_uniform,
)
from logitcache.client.codecs.rows import TopKRows


@dataclass(frozen=True)
class QuantizedTopKCodec(Codec):
    """Arrays: ``token_ids`` [P, k]; ``logprob_gaps`` uint16 [P, k]; ``target_q`` uint16 [P]."""

    name: ClassVar[str] = "topk-q64-delta-v1"

    @property
    def fields(self) -> tuple[Field, ...]:
        return (
            Field("token_ids", self.id_dtype, "position", per_k=True),
            Field("logprob_gaps", np.dtype(np.uint16), "position", per_k=True),
            Field("target_q", np.dtype(np.uint16), "position"),
        )

    def encode(self, rows: TopKRows) -> dict[str, np.ndarray]:
        token_ids = np.asarray(rows.token_ids)
        self.check_ids(token_ids, np.ones(token_ids.shape, dtype=bool))
        if rows.counts is not None:
            raise ValueError(f"{self.name} stores top-k rows, not sampled rows")
        q = quantize_uniform(rows.logprobs)
        gaps = np.diff(q, axis=1, prepend=np.zeros((q.shape[0], 1), dtype=np.int32))
        if gaps.size and gaps[:, 1:].min(initial=0) < 0:
            raise ValueError("log-probabilities must be sorted in descending order along k")
        return {
            "token_ids": token_ids.astype(self.id_dtype),
            "logprob_gaps": gaps.astype(np.uint16),
            "target_q": quantize_targets(rows.target_logprobs),
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        gaps = np.asarray(arrays["logprob_gaps"])
        logprobs = np.cumsum(gaps, axis=1, dtype=np.int32).astype(np.float32)
        logprobs *= np.float32(-1.0 / LOGPROB_SCALE)
        return TopKRows(
            token_ids=np.asarray(arrays["token_ids"]).astype(np.int32),
            logprobs=logprobs,
            target_logprobs=dequantize_uniform(arrays["target_q"]),
        )
