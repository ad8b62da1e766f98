"""A DistillKit-style compressed top-k format, as a reference point for benchmarks.

This is our re-implementation, from its public description, of the compressed top-k format
that DistillKit (arcee-ai) recommends for offline distillation. It is our reading of the
published scheme, not DistillKit's code, and its byte layout is not meant to be compatible with
files DistillKit writes; it exists so that benchmarks can set logitcache's codecs against the
same information content at the same size.

Per position, with vocabulary size V, k entries in descending order and ``exact_k`` (16):

- ids: the k token ids, ``b = ceil(log2 V)`` bits each (most significant bit first);
- exact values: the log-probs of ranks 1..exact_k as bfloat16 (round to nearest, ties to even),
  16 bits each;
- the rest: ranks r = exact_k+1..k (1-based) are approximated by the least-squares fit
  ``lp(r) ~ c0 + c1 r + c2 r^2 + c3 r^3 + c4 r^4 + c5 sqrt(r)``; the 6 coefficients are stored as
  float32, 32 bits each. With X the [k - exact_k, 6] design matrix of those terms and Y the
  [P, k - exact_k] log-probs, all positions are fitted at once in float64:
  ``C = Y @ pinv(X).T`` ([P, 6]), then rounded to float32.

The fields are concatenated in that order into one bit stream per position and packed into
``bytes_per_position = ceil((k b + 16 exact_k + 32 * 6) / 8)`` bytes (the last byte padded with
zero bits). Decoding gives back the ids, the bf16 values and the polynomial evaluated (in float64,
from the float32 coefficients) at ranks exact_k+1..k, clipped to <= 0. There is no stored tail:
a consumer takes ``1 - sum exp(lp)``. Target log-probs are not part of the format: decoded rows
have NaN targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from logitcache.client.codecs import TopKRows

N_TERMS = 6  # 1, r, r^2, r^3, r^4, sqrt(r)
VALUE_BITS = 16  # bfloat16
COEF_BITS = 32  # float32


def _terms(ranks: np.ndarray) -> np.ndarray:
    """Design matrix [len(ranks), 6] of the terms 1, r, r^2, r^3, r^4, sqrt(r), float64."""
    r = np.asarray(ranks, dtype=np.float64)[:, None]
    return np.concatenate([r**0, r, r**2, r**3, r**4, np.sqrt(r)], axis=1)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even.

    With u the float32 bits: ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``; adding just under half an
    upper-half ulp, plus the upper half's lowest bit, rounds ties to the even pattern, and a carry
    into the exponent is the correct rounding up (to infinity past the largest bf16). NaN maps to
    the quiet NaN 0x7FC0 (the addition could otherwise carry it into infinity).
    """
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact: the upper half of a float32)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _to_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Unsigned integers [P, n] (< 2^width, width <= 32) -> bits [P, n * width] (uint8), most
    significant first: the big-endian bytes of each value, unpacked, less the leading zeros."""
    P, n = values.shape
    be = np.ascontiguousarray(values.astype(">u4")).view(np.uint8).reshape(P, n, 4)
    return np.unpackbits(be, axis=2)[:, :, 32 - width :].reshape(P, n * width)


def _from_bits(bits: np.ndarray, width: int) -> np.ndarray:
    """Bits [P, n * width] -> unsigned integers [P, n] (uint32): the inverse of ``_to_bits``."""
    P = bits.shape[0]
    n = bits.shape[1] // width
    full = np.zeros((P, n, 32), dtype=np.uint8)
    full[:, :, 32 - width :] = bits.reshape(P, n, width)
    return np.packbits(full, axis=2).view(">u4").reshape(P, n).astype(np.uint32)


@dataclass(frozen=True)
class DistillKitStyleCodec:
    """Fixed-k top-k rows as bit-packed ids, bf16 head values and a polynomial tail fit.

    See the module doc for the layout (our reading of DistillKit's published scheme). Needs
    ``vocab_size >= 2`` and ``k > exact_k``; rows must be k wide, in descending order (rank r is
    column r - 1), with finite log-probs at ranks exact_k+1..k.
    """

    vocab_size: int
    k: int
    exact_k: int = 16
    name: str = "distillkit-style"

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError("vocab_size must be at least 2")
        if not 0 < self.exact_k < self.k:
            raise ValueError(f"need 0 < exact_k < k, got exact_k={self.exact_k}, k={self.k}")

    @property
    def id_bits(self) -> int:
        """``ceil(log2 V)``, in integer arithmetic."""
        return (self.vocab_size - 1).bit_length()

    @property
    def bits_per_position(self) -> int:
        return self.k * self.id_bits + self.exact_k * VALUE_BITS + N_TERMS * COEF_BITS

    @property
    def bytes_per_position(self) -> int:
        return -(-self.bits_per_position // 8)

    @cached_property
    def _design(self) -> tuple[np.ndarray, np.ndarray]:
        """(X [k - exact_k, 6], pinv(X).T [k - exact_k, 6]) over ranks exact_k+1..k."""
        X = _terms(np.arange(self.exact_k + 1, self.k + 1))
        return X, np.linalg.pinv(X).T

    def fit(self, logprobs: np.ndarray) -> np.ndarray:
        """Least-squares coefficients [P, 6] (float64) of ranks exact_k+1..k: ``Y @ pinv(X).T``."""
        Y = np.asarray(logprobs, dtype=np.float64)[:, self.exact_k :]
        return Y @ self._design[1]

    def encode(self, rows: TopKRows) -> np.ndarray:
        """Rows -> uint8 [P, bytes_per_position]."""
        ids = np.asarray(rows.token_ids)
        lp = np.asarray(rows.logprobs, dtype=np.float32)
        if ids.ndim != 2 or ids.shape != lp.shape or ids.shape[1] != self.k:
            raise ValueError(f"token_ids {ids.shape} and logprobs {lp.shape} must be [P, {self.k}]")
        if rows.counts is not None:
            raise ValueError(f"{self.name} stores top-k rows, not sampled rows")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id outside the vocabulary of size {self.vocab_size}")
        if np.isnan(lp).any() or not np.isfinite(lp[:, self.exact_k :]).all():
            raise ValueError(f"log-probs must be finite at ranks {self.exact_k + 1}..{self.k}")
        coefs = self.fit(lp).astype(np.float32)
        bits = np.concatenate(
            [
                _to_bits(ids, self.id_bits),
                _to_bits(to_bfloat16_bits(lp[:, : self.exact_k]), VALUE_BITS),
                _to_bits(coefs.view(np.uint32), COEF_BITS),
            ],
            axis=1,
        )
        return np.packbits(bits, axis=1)  # pads the last byte with zero bits

    def decode(self, buf: np.ndarray) -> TopKRows:
        """uint8 [P, bytes_per_position] -> rows (no tail, NaN targets)."""
        buf = np.asarray(buf, dtype=np.uint8)
        if buf.ndim != 2 or buf.shape[1] != self.bytes_per_position:
            raise ValueError(f"expected uint8 [P, {self.bytes_per_position}], got {buf.shape}")
        bits = np.unpackbits(buf, axis=1, count=self.bits_per_position)
        n_ids = self.k * self.id_bits
        n_values = n_ids + self.exact_k * VALUE_BITS
        ids = _from_bits(bits[:, :n_ids], self.id_bits).astype(np.int32)
        head = from_bfloat16_bits(_from_bits(bits[:, n_ids:n_values], VALUE_BITS))
        coefs = _from_bits(bits[:, n_values:], COEF_BITS).view(np.float32)
        rest = np.minimum(coefs.astype(np.float64) @ self._design[0].T, 0.0)
        P = buf.shape[0]
        return TopKRows(
            token_ids=ids.reshape(P, self.k),
            logprobs=np.concatenate([head.reshape(P, self.exact_k), rest.astype(np.float32)], 1),
            target_logprobs=np.full(P, np.nan, dtype=np.float32),
        )
