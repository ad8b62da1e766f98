"""Capture modes: which numbers a capture space stores, and how engine rows become them.

    topk       the k most probable tokens per position (codec topk-v5; k <= 256)
    top_p:P    adaptive k: per position, the shortest prefix of the top k (k = --max-k) whose
               probability reaches P (at least one entry), plus the exact tail mass
    sampled    U = k draws per position from the teacher's full distribution (codec sampled-v1)

A top-k or top-p capture with ``temperatures`` also stores, per position and temperature, the
log of the tempered mass outside the kept entries (``client.codecs.tempered``), from the
engine's log-normalisers at those temperatures and the exact kept values.

Every mode is computed on the engine's device (``device_capture``): the engine returns a few
columns per position (top-k, draws, normalisers), never the whole vocabulary, so sampling from
the full distribution costs about what a top-k capture does at any vocabulary size.
:meth:`CaptureConfig.engine_request` says what to ask the engine for, :func:`stored_rows` turns
the answer into the rows the space stores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from logitcache.client.codecs import CODECS, DEFAULT_CODEC, SampledCodec, TopKRows
from logitcache.client.codecs.tempered import tempered_log_tails
from logitcache.client.errors import InvalidArgument
from logitcache.client.space import CaptureMode, CaptureSpace, canonical_temperatures
from logitcache.server.engine.columns import CapturedColumns, CaptureRequest, seed_of_key
from logitcache.server.engine.sampling import MAX_SAMPLES, group_draws

if TYPE_CHECKING:
    from logitcache.server.engine.protocol import TeacherEngine

MAX_TOP_K = 256  # the most log-probs per position a top-k or top-p capture keeps
FULL_VOCAB = -1  # an engine width: every token of the vocabulary


def parse_mode(mode: str) -> tuple[CaptureMode, float | None]:
    """A mode as a capture space spells it ("topk", "top_p:0.95", "sampled"; "" is "topk") ->
    the mode and its top-p threshold; INVALID_ARGUMENT naming ``mode`` for one this version
    lacks (the threshold's range is CaptureConfig's to check)."""
    name, colon, parameter = (mode or str(CaptureMode.TOPK)).partition(":")
    try:
        capture_mode = CaptureMode(name)
        if bool(colon) == (capture_mode is CaptureMode.TOP_P):
            return capture_mode, float(parameter) if colon else None
    except ValueError:
        pass
    raise InvalidArgument(
        f"mode {mode!r} is not one of topk, top_p:P (0 < P <= 1), sampled", fields=["mode"]
    )


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture: the mode, k (top-k, the most entries for top_p, or draws for sampled),
    and the temperatures whose tails are stored too (top-k and top-p only).

    Errors name these fields as they are spelled here (``mode``, ``k``, ``top_p``, ``codec``,
    ``temperatures``);
    a front end words them its own way (see ``LogitCacheError.worded``).
    """

    mode: CaptureMode = CaptureMode.TOPK
    k: int = 64
    top_p: float | None = None
    codec: str | None = None  # None: the mode's default
    temperatures: tuple[float, ...] = ()  # sorted and distinct, as the space holds them

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "temperatures", canonical_temperatures(self.temperatures))
        except ValueError as e:
            raise InvalidArgument(str(e), fields=["temperatures"]) from None
        try:
            object.__setattr__(self, "mode", CaptureMode(self.mode))
        except ValueError:
            modes = ", ".join(CaptureMode)
            raise InvalidArgument(f"mode must be one of {modes}", fields=["mode"]) from None
        if self.mode is CaptureMode.TOP_P:
            if self.top_p is None or not 0.0 < self.top_p <= 1.0:
                raise InvalidArgument("top_p must be in (0, 1]", fields=["top_p"])
        elif self.top_p is not None:
            raise InvalidArgument(
                f"top_p is for adaptive top-k captures only (not mode {self.mode})",
                fields=["top_p", "mode"],
            )
        if self.mode is CaptureMode.SAMPLED and not 1 <= self.k <= MAX_SAMPLES:
            raise InvalidArgument(
                f"k (draws per position) must be between 1 and {MAX_SAMPLES}", fields=["k"]
            )
        if self.mode is not CaptureMode.SAMPLED and not 1 <= self.k <= MAX_TOP_K:
            raise InvalidArgument(f"k must be between 1 and {MAX_TOP_K}", fields=["k"])
        if self.codec is not None and self.codec not in CODECS:
            raise InvalidArgument(f"unknown codec {self.codec!r}; known: {', '.join(CODECS)}")
        sampled_codec = self.codec == SampledCodec.name
        if self.codec is not None and sampled_codec != (self.mode is CaptureMode.SAMPLED):
            raise InvalidArgument(f"codec {self.codec} does not store {self.mode} captures")
        if self.temperatures and self.mode is CaptureMode.SAMPLED:
            raise InvalidArgument(
                "temperatures are for top-k and top-p captures (sampled rows have no tail)",
                fields=["temperatures", "mode"],
            )
        if self.codec == "topk-q64-delta-v1" and self.mode is not CaptureMode.TOPK:
            raise InvalidArgument("codec topk-q64-delta-v1 stores fixed-k rows only")

    @property
    def space_mode(self) -> str:
        """The mode string of the capture space ("topk", "top_p:0.95", "sampled")."""
        return f"top_p:{self.top_p:g}" if self.mode is CaptureMode.TOP_P else str(self.mode)

    @property
    def codec_name(self) -> str:
        if self.codec is not None:
            return self.codec
        return SampledCodec.name if self.mode is CaptureMode.SAMPLED else DEFAULT_CODEC

    @property
    def engine_width(self) -> int:
        """Log-probs per position of the engine's list path (``TeacherEngine.capture``): the
        full vocabulary for sampled captures, which a host-side re-derivation of the draws
        (``device_capture.draw_rows_for_key``) needs."""
        return FULL_VOCAB if self.mode is CaptureMode.SAMPLED else self.k

    def engine_request(self, key: bytes) -> CaptureRequest:
        """What the engine computes per position of the record ``key``."""
        if self.mode is CaptureMode.SAMPLED:
            return CaptureRequest(samples=self.k, seed=seed_of_key(key))
        return CaptureRequest(top_k=self.k, temperatures=self.temperatures)

    def space(self, teacher_fingerprint: str, tokenizer_fingerprint: str, vocab_size: int,
              engine_dtype: str) -> CaptureSpace:  # fmt: skip
        return CaptureSpace(
            teacher_fingerprint=teacher_fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint,
            vocab_size=vocab_size,
            mode=self.space_mode,
            k=self.k,
            engine_dtype=engine_dtype,
            codec=self.codec_name,
            temperatures=self.temperatures,
        )

    @classmethod
    def of_space(cls, space: CaptureSpace) -> CaptureConfig:
        return cls(space.capture_mode, space.k, space.top_p, space.codec, space.temperatures)


async def capture_record(
    engine: TeacherEngine, config: CaptureConfig, ids: np.ndarray, key: bytes, priority: int = 0
) -> TopKRows | CapturedColumns:
    """The engine's answer for one record of a space: its top-k rows (``engine.capture``, which
    the vLLM engine computes engine-side), or for sampled captures and captures with
    temperatures the engine-side columns of :meth:`CaptureConfig.engine_request`;
    :func:`stored_rows` makes the stored rows of either."""
    if config.mode is CaptureMode.SAMPLED or config.temperatures:
        return await engine.capture_columns(ids, config.engine_request(key), priority)
    return await engine.capture(ids, config.k, priority)


def stored_rows(config: CaptureConfig, answer: TopKRows | CapturedColumns) -> TopKRows:
    """The engine's answer (:func:`capture_record`) -> the rows a space stores."""
    if isinstance(answer, CapturedColumns):
        if config.mode is CaptureMode.SAMPLED:
            return group_draws(answer.draw_ids, answer.draw_logprobs, answer.target_logprobs)
        rows = stored_rows(dataclasses.replace(config, temperatures=()), answer.top_rows())
        if not config.temperatures:
            return rows
        if answer.log_normalisers.shape[1] != len(config.temperatures):
            raise ValueError("the engine's answer has no normalisers at the space's temperatures")
        # The kept entries (a top-p prefix, or all k), exact: the tails are what they leave out.
        tails = tempered_log_tails(rows.logprobs, answer.log_normalisers, config.temperatures)
        return dataclasses.replace(rows, tempered_log_tails=tails.astype(np.float32),
                                   temperatures=config.temperatures)  # fmt: skip
    if config.temperatures:
        raise ValueError("tails at temperatures come from the engine's columns (capture_columns)")
    rows = answer
    if config.mode is CaptureMode.SAMPLED:
        raise ValueError("sampled rows come from the engine's draws (capture_columns)")
    if config.mode is CaptureMode.TOPK:
        return rows
    assert config.top_p is not None
    return top_p_rows(rows, config.top_p)


def top_p_rows(rows: TopKRows, top_p: float) -> TopKRows:
    """Per row the shortest prefix whose probability reaches ``top_p`` (at least one entry; all
    k if they never do). The kept entries are the engine's exact values, so the codec derives
    the tail (the mass outside the prefix) exactly from them before it rounds anything."""
    p = np.exp(np.asarray(rows.logprobs, dtype=np.float64))
    covered = np.cumsum(p, axis=1)
    # Entries needed: 1 + how many prefixes still fall short of top_p (with float slack).
    n = np.minimum(1 + (covered < top_p - 1e-12).sum(axis=1), p.shape[1])
    keep = np.arange(p.shape[1]) < n[:, None]
    width = int(n.max()) if n.size else 0
    return TopKRows(
        token_ids=np.where(keep, rows.token_ids, 0)[:, :width].astype(np.int32),
        logprobs=np.where(keep, rows.logprobs, -np.inf)[:, :width].astype(np.float32),
        target_logprobs=rows.target_logprobs,
    )
