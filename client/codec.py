"""Codecs that turn top-k rows into compact integer arrays and back.

A codec is the numeric half of the storage encoding: it maps rows to small unsigned integer
arrays whose entropy is low, and the store's byte compressor (shuffle + zstd) does the rest. The
codec name is part of the capture space, so a store written with one codec is always decoded with
the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Log-probabilities are stored as multiples of 1/LOGPROB_SCALE nats: rounding to the nearest step
# keeps every value within 1/(2*LOGPROB_SCALE) = 0.0078 nats of the engine's value.
LOGPROB_SCALE = 64
_MISSING = np.uint16(0xFFFF)  # the target log-probability of the last row
_MAX_Q = int(_MISSING) - 1  # -1023.98 nats: anything lower (including -inf) is clamped here


@dataclass(frozen=True)
class TopKRows:
    """Rows of P positions, concatenated over records: the codec's input and output."""

    token_ids: np.ndarray  # int32 [P, k], descending probability
    logprobs: np.ndarray  # float32 [P, k]
    target_logprobs: np.ndarray  # float32 [P], NaN where there is no next token


@dataclass(frozen=True)
class QuantizedTopKCodec:
    """``topk-q64-delta-v1``: ids in the narrowest unsigned type, log-probs as quantised gaps.

    Rows are sorted by descending probability, so the quantised negative log-probabilities are
    non-decreasing along k; storing the first value and then the gaps gives mostly tiny numbers
    that compress well. Quantisation happens before differencing, so errors never accumulate.
    Error bound: |decoded - exact| <= 1/128 nats for every entry above -1023 nats.
    """

    vocab_size: int
    name: str = "topk-q64-delta-v1"

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    def encode(self, rows: TopKRows) -> dict[str, np.ndarray]:
        """Encode rows into named integer arrays (``token_ids``, ``logprob_gaps``, ``target_q``)."""
        token_ids = np.asarray(rows.token_ids)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.vocab_size):
            raise ValueError(f"token id outside the vocabulary of size {self.vocab_size}")
        q = _quantize(rows.logprobs)
        gaps = np.diff(q, axis=1, prepend=np.zeros((q.shape[0], 1), dtype=np.int32))
        if gaps.size and gaps[:, 1:].min(initial=0) < 0:
            raise ValueError("log-probabilities must be sorted in descending order along k")
        target = np.asarray(rows.target_logprobs, dtype=np.float32)
        target_q = np.where(np.isnan(target), int(_MISSING), _quantize(target)).astype(np.uint16)
        return {
            "token_ids": token_ids.astype(self.id_dtype),
            "logprob_gaps": gaps.astype(np.uint16),
            "target_q": target_q,
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        """Inverse of :meth:`encode` (up to the quantisation error)."""
        gaps = np.asarray(arrays["logprob_gaps"])
        logprobs = np.cumsum(gaps, axis=1, dtype=np.int32).astype(np.float32)
        logprobs *= np.float32(-1.0 / LOGPROB_SCALE)
        target_q = np.asarray(arrays["target_q"])
        target = target_q.astype(np.float32) * np.float32(-1.0 / LOGPROB_SCALE)
        target[target_q == _MISSING] = np.nan
        return TopKRows(
            token_ids=np.asarray(arrays["token_ids"]).astype(np.int32),
            logprobs=logprobs,
            target_logprobs=target,
        )


def _quantize(logprobs: np.ndarray) -> np.ndarray:
    """Negative log-probabilities in steps of 1/LOGPROB_SCALE nats, as int32 in [0, _MAX_Q]."""
    neg = -np.asarray(logprobs, dtype=np.float64) * LOGPROB_SCALE
    neg = np.nan_to_num(neg, nan=_MAX_Q, posinf=_MAX_Q)
    return np.clip(np.rint(neg), 0, _MAX_Q).astype(np.int32)


CODECS = {QuantizedTopKCodec.name: QuantizedTopKCodec}


def codec_for(name: str, vocab_size: int) -> QuantizedTopKCodec:
    """The codec a capture space names; old names stay here so old stores stay readable."""
    try:
        return CODECS[name](vocab_size=vocab_size)
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; this version reads {sorted(CODECS)}") from None
