"""Capture modes: which numbers a capture space stores, and how engine rows become them.

    topk       the k most probable tokens per position (codec topk-v2; k <= 256)
    top_p:P    adaptive k: per position, the shortest prefix of the top k (k = --max-k) whose
               probability reaches P (at least one entry), plus the exact tail mass
    sampled    U = k draws per position from the teacher's full distribution (codec sampled-v1)

Sampling needs the whole distribution, so sampled captures ask vLLM for log-probs over the full
vocabulary (``prompt_logprobs=-1``). That is exact, and it is the only exact way vLLM offers: a
top-K request cannot produce draws from the tail, and vLLM has no hook that samples prompt
positions inside the engine. Its cost is the O(V) lists vLLM builds per position (for the demo
teacher, V = 1785, about 8x slower than k = 64); teachers with vocabularies of 100k+ pay
proportionally, which is the price of unbiased draws and why top-k stays the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitcache.client.codecs import CODECS, DEFAULT_CODEC, SampledCodec, TopKRows
from logitcache.client.errors import InvalidArgument
from logitcache.client.space import CaptureMode, CaptureSpace
from logitcache.server.engine.sampling import MAX_SAMPLES, rng_for_key, sample_rows

MAX_TOP_K = 256  # the most log-probs per position a top-k or top-p capture keeps
FULL_VOCAB = -1  # an engine width: every token of the vocabulary


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture: the mode, k (top-k, the most entries for top_p, or draws for sampled).

    Errors name these fields as they are spelled here (``mode``, ``k``, ``top_p``, ``codec``);
    a front end words them its own way (see ``LogitCacheError.worded``).
    """

    mode: CaptureMode = CaptureMode.TOPK
    k: int = 64
    top_p: float | None = None
    codec: str | None = None  # None: the mode's default

    def __post_init__(self) -> None:
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
        """Log-probs to ask the engine for per position."""
        return FULL_VOCAB if self.mode is CaptureMode.SAMPLED else self.k

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
        )

    @classmethod
    def of_space(cls, space: CaptureSpace) -> CaptureConfig:
        return cls(space.capture_mode, space.k, space.top_p, space.codec)


def stored_rows(config: CaptureConfig, rows: TopKRows, key: bytes) -> TopKRows:
    """Engine rows (top-k, or the full vocabulary for sampled) -> the rows a space stores."""
    if config.mode is CaptureMode.TOPK:
        return rows
    if config.mode is CaptureMode.SAMPLED:
        return sample_rows(rows, config.k, rng_for_key(key))
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
