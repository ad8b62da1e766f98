"""Tail masses at other temperatures: per position, one small array per captured temperature.

Rows store log-probabilities at T = 1 for the kept ids. The tempered distribution
``p_T = softmax(log p / T)`` over the whole vocabulary needs one more number per position: its
normaliser, or equivalently the tempered mass outside the kept ids, ``t_T = 1 - sum_kept p_T(i)``.
Given ``t_T``, the kept entries at T are exact up to their own rounding, because the unknown
normaliser cancels inside the kept set:

    p_T(i) = (1 - t_T) * softmax_kept(lp / T)(i)        and the tail bucket is t_T.

A capture with temperatures stores ``log t_T`` per position for each T, as the T = 1 tail is
stored (``tail_q``: 1/64-nat steps of -log t, :data:`NO_VALUE` for no tail, so within 1/128 nats),
in arrays named by the temperature (``tail_q_t2``, ``tail_q_t0.5``). These arrays go beside any
codec's (top-k, top-p), per position: two bytes per position per temperature before
compression. The engine computes ``log Z_T`` on its device (``device_capture``); the tails come
from it and the exact kept values, before anything is rounded.

:class:`TemperedCodec` adds these arrays to any top-k codec's (``codec_for`` wraps the space's
codec when the space has temperatures): rows in carry ``TopKRows.tempered_log_tails``, rows out
get them back. A space without temperatures uses its codec unwrapped, so its segments are as
before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from logitcache.client.codecs.base import Codec, Field
from logitcache.client.codecs.grid import NO_VALUE, dequantize_uniform, quantize_uniform
from logitcache.client.codecs.rows import TopKRows

TAIL_PREFIX = "tail_q_t"


def tail_field_name(temperature: float) -> str:
    """The array of one temperature's log tails (``tail_q_t2`` for T = 2)."""
    return f"{TAIL_PREFIX}{float(temperature):g}"


def temperatures_of(names: Iterable[str]) -> tuple[float, ...]:
    """The temperatures whose tail arrays are among ``names`` (a wire batch's arrays), in order."""
    return tuple(float(n[len(TAIL_PREFIX) :]) for n in names if n.startswith(TAIL_PREFIX))


def tempered_fields(temperatures: Sequence[float]) -> tuple[Field, ...]:
    """The per-position arrays a capture with these temperatures adds to its codec's."""
    return tuple(Field(tail_field_name(t), np.dtype(np.uint16), "position")
                 for t in temperatures)  # fmt: skip


def tempered_log_tails(
    kept_logprobs: np.ndarray, log_normalisers: np.ndarray, temperatures: Sequence[float]
) -> np.ndarray:
    """float64 [P, m]: ``log t_T`` from the exact kept log-probs at T = 1 ([P, k], -inf padding)
    and the engine's ``log Z_T = log sum_V exp(lp / T)`` ([P, m]); -inf where nothing is left."""
    lp = np.asarray(kept_logprobs, dtype=np.float64)
    temps = np.asarray(temperatures, dtype=np.float64)
    with np.errstate(divide="ignore"):
        scaled = lp[:, None, :] / temps[None, :, None]  # [P, m, k]
        top = np.max(scaled, axis=2, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        kept = np.log(np.exp(scaled - top).sum(axis=2)) + top[..., 0]
        log_kept_mass = np.minimum(kept - np.asarray(log_normalisers, dtype=np.float64), 0.0)
        return np.log(-np.expm1(log_kept_mass))


def encode_tempered(log_tails: np.ndarray, temperatures: Sequence[float]) -> dict[str, np.ndarray]:
    """[P, m] log tails -> one uint16 array per temperature."""
    log_tails = np.asarray(log_tails, dtype=np.float64)
    if log_tails.ndim != 2 or log_tails.shape[1] != len(temperatures):
        raise ValueError(f"expected [P, {len(temperatures)}] log tails, got {log_tails.shape}")
    codes = np.where(log_tails > -np.inf, quantize_uniform(log_tails), NO_VALUE)
    return {tail_field_name(t): codes[:, i].astype(np.uint16) for i, t in enumerate(temperatures)}


def decode_tempered(arrays: dict[str, np.ndarray], temperatures: Sequence[float]) -> np.ndarray:
    """float32 [P, m] log tails (-inf: no tail) from the arrays of :func:`encode_tempered`."""
    columns = []
    for t in temperatures:
        codes = np.asarray(arrays[tail_field_name(t)])
        columns.append(np.where(codes == NO_VALUE, -np.inf, dequantize_uniform(codes)))
    if not columns:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(columns, axis=1).astype(np.float32)


@dataclass(frozen=True)
class TemperedCodec(Codec):
    """``inner``'s arrays plus one log-tail array per temperature; it takes ``inner``'s name and
    segment tables, so a segment says which codec it is as before."""

    inner: Codec
    temperatures: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.inner.name)
        object.__setattr__(self, "segment_tables", self.inner.segment_tables)

    @property
    def fields(self) -> tuple[Field, ...]:
        return (*self.inner.fields, *tempered_fields(self.temperatures))

    def encode(self, rows: TopKRows) -> dict[str, np.ndarray]:
        if rows.tempered_log_tails is None or rows.temperatures != self.temperatures:
            have = ", ".join(f"{t:g}" for t in rows.temperatures) or "none"
            want = ", ".join(f"{t:g}" for t in self.temperatures)
            raise ValueError(f"the space stores tails at temperatures {want}; rows have {have}")
        return {**self.inner.encode(rows), **encode_tempered(rows.tempered_log_tails,
                                                              self.temperatures)}  # fmt: skip

    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        rows = self.inner.decode(arrays)
        tails = decode_tempered(arrays, self.temperatures)
        return dataclasses.replace(rows, tempered_log_tails=tails, temperatures=self.temperatures)

    def seal(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.seal(arrays)

    def decoding_tables(self, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.decoding_tables(tables)

    def unseal(
        self, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray], input_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        return self.inner.unseal(arrays, tables, input_ids)

    def check_ids(self, token_ids: np.ndarray, valid: np.ndarray) -> None:
        self.inner.check_ids(token_ids, valid)
