"""``sampled-v1``: sampled rows, the distinct ids of U draws per position with their counts.

Ids are stored ascending, as gaps; each id's teacher log-probability is a code on the piecewise
grid (``grid.py``), so the entries keep ``topk-v2``'s error bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from logitcache.client.codecs.base import Codec, Field, pad_rows, row_lengths, stored_row_lengths
from logitcache.client.codecs.grid import (
    NEG_INF_CODE,
    dequantize,
    dequantize_uniform,
    quantize,
    quantize_targets,
)
from logitcache.client.codecs.rows import TopKRows

MAX_COUNT = 255  # draws of one id per row that a uint8 count holds


@dataclass(frozen=True)
class SampledCodec(Codec):
    """Arrays: ``n`` uint16 [P] distinct ids per row; ``id_gaps`` [E] (a row's first id, then
    the differences); ``counts`` uint8 [E]; ``logprob_q`` uint16 [E]; ``target_q`` uint16 [P].
    """

    name: ClassVar[str] = "sampled-v1"

    @property
    def fields(self) -> tuple[Field, ...]:
        u16 = np.dtype(np.uint16)
        return (
            Field("n", u16, "position"),
            Field("id_gaps", self.id_dtype, "entry"),
            Field("counts", np.dtype(np.uint8), "entry"),
            Field("logprob_q", u16, "entry"),
            Field("target_q", u16, "position"),
        )

    def encode(self, rows: TopKRows) -> dict[str, np.ndarray]:
        if rows.counts is None:
            raise ValueError(f"{self.name} stores sampled rows (with counts)")
        counts = np.asarray(rows.counts)
        ids = np.asarray(rows.token_ids).astype(np.int64)
        valid = counts > 0
        n = row_lengths(valid)
        self.check_ids(ids, valid)
        if counts.max(initial=0) > MAX_COUNT:
            raise ValueError(f"at most {MAX_COUNT} draws of one id per row")
        gaps = np.diff(ids, axis=1, prepend=np.zeros((ids.shape[0], 1), dtype=np.int64))
        if (gaps[:, 1:][valid[:, 1:]] <= 0).any():
            raise ValueError("sampled ids must be distinct and ascending along a row")
        return {
            "n": n.astype(np.uint16),
            "id_gaps": gaps[valid].astype(self.id_dtype),
            "counts": counts[valid].astype(np.uint8),
            "logprob_q": quantize(np.asarray(rows.logprobs)[valid]).astype(np.uint16),
            "target_q": quantize_targets(rows.target_logprobs),
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        n = stored_row_lengths(arrays, "id_gaps")
        gaps = pad_rows(np.asarray(arrays["id_gaps"]), n, 0, np.int32)
        counts = pad_rows(np.asarray(arrays["counts"]), n, 0, np.int32)
        codes = pad_rows(np.asarray(arrays["logprob_q"]), n, NEG_INF_CODE, np.int32)
        return TopKRows(
            token_ids=np.where(counts > 0, np.cumsum(gaps, axis=1, dtype=np.int32), 0),
            logprobs=dequantize(codes),
            target_logprobs=dequantize_uniform(arrays["target_q"]),
            counts=counts,
        )
