"""Codecs that turn captured rows into compact integer arrays and back.

A codec is the numeric half of the storage encoding: it maps rows to small unsigned integer
arrays whose entropy is low, and the store's byte compressor (zstd) does the rest. The codec name
is part of the capture space, so a store written with one codec is always decoded with the same
one, and every codec ever shipped stays in :data:`CODECS` so old stores stay readable.

Each codec declares its arrays as :class:`Field`\\ s. A field is either per position (first
dimension P, one row per position) or per entry (one flat dimension E over all stored entries,
row after row). Arrays of several records concatenate along their first dimension, which is how
segments, wire batches and decoders handle many records at once.

Codecs:

``topk-v2`` (the default) - ragged top-k rows with an explicit tail.
    Quantised negative log-probability codes ``c`` on a piecewise grid (see :func:`quantize`):
    steps of 1/64 nat down to p = 1e-3, then 1/8 nat down to p = 1e-4, then 1 nat. Entries are
    stored in order of (code, id): descending probability, with ids ascending inside a run of
    equal codes. That order is canonical (equal codes decode to equal values) and it makes
    low-probability ids, which carry most of the bytes, sorted runs that zstd compresses well.
    Codes are stored as gaps along the row. The tail (the mass outside the stored entries) is
    computed from the engine's exact values at capture and stored as its own code, so it does not
    inherit the entries' rounding errors.
    Error bounds (tested): |decoded - exact| <= 1/128 nats for every entry with p >= 1e-3;
    |exp(decoded) - p| <= 1e-4 for every entry with p < 1e-3 (at most 6.5e-5 in fact);
    |log decoded tail - log exact tail| <= 1/128 nats; targets within 1/128 nats.

``topk-q64-delta-v1`` - the first codec: fixed k, 1/64-nat codes along k, no stored tail.

``sampled-v1`` - sampled rows: the distinct ids of U draws (ascending, stored as gaps), their
    counts, and the teacher's log-probabilities of those ids on the ``topk-v2`` grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- rows ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopKRows:
    """Rows of P positions, concatenated over records: a codec's input and output.

    Ragged rows are padded with id 0 and log-prob -inf. ``tail_logprobs`` is the log of the mass
    outside the stored entries (None: derive it from the entries). ``counts`` marks sampled rows.
    """

    token_ids: np.ndarray  # int32 [P, k]
    logprobs: np.ndarray  # float32 [P, k]
    target_logprobs: np.ndarray  # float32 [P], NaN where there is no next token
    tail_logprobs: np.ndarray | None = None  # float32 [P]
    counts: np.ndarray | None = None  # int32 [P, k], sampled rows only

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


def concat_rows(parts: list[TopKRows]) -> TopKRows:
    """Rows of several records as one TopKRows, narrower rows padded (id 0, -inf, count 0)."""
    width = max(p.token_ids.shape[1] for p in parts)

    def cat(name: str, fill) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        if any(a is None for a in arrays):
            return None
        if arrays[0].ndim == 1:
            return np.concatenate(arrays)
        out = [np.full((a.shape[0], width), fill, dtype=a.dtype) for a in arrays]
        for o, a in zip(out, arrays, strict=True):
            o[:, : a.shape[1]] = a
        return np.concatenate(out)

    return TopKRows(
        token_ids=cat("token_ids", 0),
        logprobs=cat("logprobs", -np.inf),
        target_logprobs=cat("target_logprobs", np.nan),
        tail_logprobs=cat("tail_logprobs", np.nan),
        counts=cat("counts", 0),
    )


@dataclass(frozen=True)
class Field:
    """One encoded array: its dtype, whether it runs over positions or entries, and a hint for
    the byte compressor (byte shuffling helps small integers, hurts id sequences)."""

    name: str
    dtype: np.dtype
    per: str  # "position" or "entry"
    shuffle: bool = True
    per_k: bool = False  # a per-position array of k columns ([P, k]; the fixed-k codec's)


# --- quantisation ----------------------------------------------------------------------------------

LOGPROB_SCALE = 64  # steps per nat on the uniform grid (v1; v2 down to p = 1e-3)
_MISSING = 0xFFFF  # the target of the last row; in tail_q, "no tail"
_MAX_Q = _MISSING - 1  # -1023.98 nats on the uniform grid: anything lower is clamped here

# The topk-v2 grid over u = -log p (codes are non-decreasing in u):
#   u <= _U0:        code = round(64 u)                        step 1/64 nat (p >= 1e-3 here)
#   _U0 < u <= _U1:  code = _C0 + round(8 (u - _U0))           step 1/8 nat
#   u > _U1:         code = _C0 + _C1 + round(u - _U1)         step 1 nat   (p < 1e-4 here)
_C0 = 443  # _U0 = 443/64 = 6.922 > ln 1000 = 6.908
_U0 = _C0 / 64
_C1 = 19  # _U1 = _U0 + 19/8 = 9.297 > ln 10^4 = 9.210
_U1 = _U0 + _C1 / 8
_GRID_MAX = 2047  # -inf; finite u beyond _U1 + 1584 nats clamps to the step before
_GRID = np.concatenate(
    [
        -np.arange(_C0 + 1) / 64,
        -(_U0 + np.arange(1, _C1 + 1) / 8),
        -(_U1 + np.arange(1, _GRID_MAX - _C0 - _C1) * 1.0),
        [-np.inf],
    ]
).astype(np.float32)
assert _GRID.shape == (_GRID_MAX + 1,)


def quantize(logprobs: np.ndarray) -> np.ndarray:
    """Codes on the topk-v2 grid, int32 in [0, 2047]; only -inf and NaN give 2047 (-inf)."""
    u = -np.asarray(logprobs, dtype=np.float64)
    u = np.nan_to_num(u, nan=np.inf, posinf=np.inf)
    u = np.maximum(u, 0.0)  # log-probs are <= 0; rounding noise above 0 is 0
    code = np.where(
        u <= _U0,
        np.rint(u * 64),
        np.where(u <= _U1, _C0 + np.rint((u - _U0) * 8), _C0 + _C1 + np.rint(u - _U1)),
    )
    # Finite values beyond the grid clamp to its last finite step; only -inf (and NaN) decode
    # to -inf, so a stored entry never turns into padding.
    return np.where(np.isinf(u), _GRID_MAX, np.minimum(code, _GRID_MAX - 1)).astype(np.int32)


def dequantize(codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize` (a table lookup), float32."""
    return _GRID[codes]


def _quantize_uniform(logprobs: np.ndarray) -> np.ndarray:
    """Negative log-probabilities in steps of 1/64 nats, as int32 in [0, _MAX_Q]."""
    neg = -np.asarray(logprobs, dtype=np.float64) * LOGPROB_SCALE
    neg = np.nan_to_num(neg, nan=_MAX_Q, posinf=_MAX_Q)
    return np.clip(np.rint(neg), 0, _MAX_Q).astype(np.int32)


_UNIFORM = np.concatenate([-np.arange(_MISSING) / LOGPROB_SCALE, [np.nan]]).astype(np.float32)


def _encode_target(target: np.ndarray) -> np.ndarray:
    target = np.asarray(target, dtype=np.float32)
    return np.where(np.isnan(target), _MISSING, _quantize_uniform(target)).astype(np.uint16)


def _decode_target(target_q: np.ndarray) -> np.ndarray:
    return _UNIFORM[np.asarray(target_q)]


# --- ragged helpers --------------------------------------------------------------------------------


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _check_ids(token_ids: np.ndarray, valid: np.ndarray, vocab_size: int) -> None:
    ids = token_ids[valid]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token id outside the vocabulary of size {vocab_size}")


def _row_lengths(valid: np.ndarray) -> np.ndarray:
    """Entries per row of a [P, k] mask whose True entries must form a prefix of each row."""
    n = valid.sum(axis=1)
    if not np.array_equal(valid, np.arange(valid.shape[1]) < n[:, None]):
        raise ValueError("padding (log-prob -inf) must come after every stored entry of a row")
    return n


def _pad(flat: np.ndarray, n: np.ndarray, fill, dtype) -> np.ndarray:
    """Entries E -> [P, max n], rows filled in order, the rest ``fill``."""
    width = int(n.max()) if n.size else 0
    if n.size and (n == width).all():
        return flat.reshape(n.shape[0], width).astype(dtype, copy=False)
    out = np.full((n.shape[0], width), fill, dtype=dtype)
    out[np.arange(width) < n[:, None]] = flat
    return out


_DECODE_BLOCK = 4096  # rows per block: a block's codes stay in the cache


def _gaps_to_logprobs(gaps: np.ndarray) -> np.ndarray:
    """[P, w] code gaps -> float32 log-probs: a running sum along rows, then the grid table.

    This is the decoder's hot path. ``np.cumsum`` along short rows is slow (no SIMD), so each
    block of rows is transposed and summed column after column: w vectorised adds over the block
    (a Python loop over k, not over positions), in uint16, which cannot overflow because a
    row's sum is its last code (<= 2047). Then one table lookup. About 1.5x faster than cumsum.
    """
    out = np.empty(gaps.shape, dtype=np.float32)
    for start in range(0, gaps.shape[0], _DECODE_BLOCK):
        # astype copies (always): the sums below must never write into the caller's array.
        codes = gaps[start : start + _DECODE_BLOCK].T.astype(np.uint16, order="C")
        for j in range(1, codes.shape[0]):
            np.add(codes[j - 1], codes[j], out=codes[j])
        # mode="clip": malformed input beyond the grid decodes as -inf instead of failing.
        out[start : start + _DECODE_BLOCK] = _GRID.take(codes, mode="clip").T
    return out


def _row_counts(arrays: dict[str, np.ndarray], entry_field: str) -> np.ndarray:
    n = np.asarray(arrays["n"]).astype(np.int64)
    if int(n.sum()) != np.asarray(arrays[entry_field]).shape[0]:
        raise ValueError("malformed encoding: row lengths do not add up to the entries")
    return n


# --- codecs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VocabCodec:
    """What every codec knows: the vocabulary size, which fixes the id dtype."""

    vocab_size: int

    @property
    def id_dtype(self) -> np.dtype:
        return _id_dtype(self.vocab_size)


@dataclass(frozen=True)
class QuantizedTopKCodec(_VocabCodec):
    """``topk-q64-delta-v1``: fixed k, ids in the narrowest unsigned type, codes as gaps along k.

    Error bound: |decoded - exact| <= 1/128 nats for every entry above -1023 nats. Kept so that
    stores written with it stay readable; new captures use :class:`TopKCodec`.
    """

    name: str = "topk-q64-delta-v1"

    @property
    def fields(self) -> tuple[Field, ...]:
        return (
            Field("token_ids", self.id_dtype, "position", per_k=True),
            Field("logprob_gaps", np.dtype(np.uint16), "position", per_k=True),
            Field("target_q", np.dtype(np.uint16), "position"),
        )

    def encode(self, rows: TopKRows) -> dict[str, np.ndarray]:
        token_ids = np.asarray(rows.token_ids)
        _check_ids(token_ids, np.ones(token_ids.shape, dtype=bool), self.vocab_size)
        if rows.counts is not None:
            raise ValueError(f"{self.name} stores top-k rows, not sampled rows")
        q = _quantize_uniform(rows.logprobs)
        gaps = np.diff(q, axis=1, prepend=np.zeros((q.shape[0], 1), dtype=np.int32))
        if gaps.size and gaps[:, 1:].min(initial=0) < 0:
            raise ValueError("log-probabilities must be sorted in descending order along k")
        return {
            "token_ids": token_ids.astype(self.id_dtype),
            "logprob_gaps": gaps.astype(np.uint16),
            "target_q": _encode_target(rows.target_logprobs),
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        gaps = np.asarray(arrays["logprob_gaps"])
        logprobs = np.cumsum(gaps, axis=1, dtype=np.int32).astype(np.float32)
        logprobs *= np.float32(-1.0 / LOGPROB_SCALE)
        return TopKRows(
            token_ids=np.asarray(arrays["token_ids"]).astype(np.int32),
            logprobs=logprobs,
            target_logprobs=_decode_target(arrays["target_q"]),
        )


@dataclass(frozen=True)
class TopKCodec(_VocabCodec):
    """``topk-v2``: ragged top-k rows on the piecewise grid, with an explicit tail (module doc).

    Arrays: ``n`` uint16 [P] entries per row; ``token_ids`` [E]; ``logprob_gaps`` uint16 [E]
    (the first of a row is its code, the rest are differences); ``tail_q`` uint16 [P] (1/64-nat
    steps of -log tail, 0xFFFF for no tail); ``target_q`` uint16 [P].
    """

    name: str = "topk-v2"

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
        n = _row_lengths(valid)
        _check_ids(ids, valid, self.vocab_size)
        if np.isnan(lp).any():
            raise ValueError("log-probabilities must not be NaN")
        codes = quantize(lp)
        if (np.diff(codes, axis=1)[valid[:, 1:]] < 0).any():
            raise ValueError("log-probabilities must be sorted in descending order along k")
        # Canonical order: by code, then by id (padding, code 2047 and id V, sorts last).
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
        tail_q = np.where(log_tail > -np.inf, _quantize_uniform(log_tail), _MISSING)
        return {
            "n": n.astype(np.uint16),
            "token_ids": ids[valid].astype(self.id_dtype),
            "logprob_gaps": gaps[valid].astype(np.uint16),
            "tail_q": tail_q.astype(np.uint16),
            "target_q": _encode_target(rows.target_logprobs),
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        n = _row_counts(arrays, "logprob_gaps")
        gaps = _pad(np.asarray(arrays["logprob_gaps"]), n, 0, np.uint16)
        logprobs = _gaps_to_logprobs(gaps)
        if gaps.shape[1] and not (n == gaps.shape[1]).all():
            logprobs[np.arange(gaps.shape[1]) >= n[:, None]] = -np.inf  # padding
        tail_q = np.asarray(arrays["tail_q"])
        tail = _UNIFORM[tail_q]
        tail[tail_q == _MISSING] = -np.inf
        return TopKRows(
            token_ids=_pad(np.asarray(arrays["token_ids"]), n, 0, np.int32),
            logprobs=logprobs,
            target_logprobs=_decode_target(arrays["target_q"]),
            tail_logprobs=tail,
        )


@dataclass(frozen=True)
class SampledCodec(_VocabCodec):
    """``sampled-v1``: per row the distinct sampled ids (ascending), their counts and log-probs.

    Arrays: ``n`` uint16 [P] distinct ids per row; ``id_gaps`` [E] (a row's first id, then the
    differences); ``counts`` uint8 [E]; ``logprob_q`` uint16 [E] (codes on the topk-v2 grid, so
    the same error bounds); ``target_q`` uint16 [P].
    """

    name: str = "sampled-v1"

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
        n = _row_lengths(valid)
        _check_ids(ids, valid, self.vocab_size)
        if counts.max(initial=0) > 255:
            raise ValueError("at most 255 draws of one id per row")
        gaps = np.diff(ids, axis=1, prepend=np.zeros((ids.shape[0], 1), dtype=np.int64))
        if (gaps[:, 1:][valid[:, 1:]] <= 0).any():
            raise ValueError("sampled ids must be distinct and ascending along a row")
        return {
            "n": n.astype(np.uint16),
            "id_gaps": gaps[valid].astype(self.id_dtype),
            "counts": counts[valid].astype(np.uint8),
            "logprob_q": quantize(np.asarray(rows.logprobs)[valid]).astype(np.uint16),
            "target_q": _encode_target(rows.target_logprobs),
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        n = _row_counts(arrays, "id_gaps")
        gaps = _pad(np.asarray(arrays["id_gaps"]), n, 0, np.int32)
        counts = _pad(np.asarray(arrays["counts"]), n, 0, np.int32)
        codes = _pad(np.asarray(arrays["logprob_q"]), n, _GRID_MAX, np.int32)
        return TopKRows(
            token_ids=np.where(counts > 0, np.cumsum(gaps, axis=1, dtype=np.int32), 0),
            logprobs=_GRID[codes],
            target_logprobs=_decode_target(arrays["target_q"]),
            counts=counts,
        )


Codec = QuantizedTopKCodec | TopKCodec | SampledCodec
CODECS = {c.name: c for c in (QuantizedTopKCodec, TopKCodec, SampledCodec)}
DEFAULT_CODEC = TopKCodec.name


def codec_for(name: str, vocab_size: int) -> Codec:
    """The codec a capture space names; old names stay here so old stores stay readable."""
    try:
        return CODECS[name](vocab_size=vocab_size)
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; this version reads {sorted(CODECS)}") from None
