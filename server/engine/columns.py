"""What a capture computes per position, and what comes back: the request, its column layout,
one record's columns, and the start-up check of an engine-side path against the engine's own
prompt log-probs.

Free of torch, so that the parts of the server that only describe captures (config, the engine
protocol, the CLI's parsers) start without it; the kernels that compute the columns are in
``device_capture``.

Columns of one row (float32; ids are int32 bit patterns in float32 columns, exact for any id):
``target | top-k ids | top-k log-probs | draw ids | draw log-probs | log Z(T) per temperature |
log-probs of the requested ids``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import FailedPrecondition, InvalidArgument

# The key of a capture request in vLLM's SamplingParams.extra_args (see ``vllm_worker``).
EXTRA_ARGS_KEY = "logitcache_capture"


@dataclass(frozen=True)
class CaptureRequest:
    """What to compute per position: ``top_k`` most probable ids (0: none), ``samples`` draws
    at T = 1 seeded by ``seed`` (the record's, :func:`seed_of_key`), the log-normaliser
    ``log sum_i p_i^(1/T)`` at each of ``temperatures``, and the log-probs of ``score_width``
    requested ids per position (``scored``: int32 bytes of a [T, score_width] array, -1 for
    none; see :meth:`scoring`)."""

    top_k: int = 0
    samples: int = 0
    seed: int = 0
    temperatures: tuple[float, ...] = ()
    score_width: int = 0
    scored: bytes = b""

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.samples < 0:
            raise InvalidArgument("top_k and samples must not be negative")
        if not 0 <= self.seed < 1 << 64:
            raise InvalidArgument("the seed is a 64-bit unsigned integer")
        if any(not t > 0 for t in self.temperatures):
            raise InvalidArgument("temperatures must be positive")
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        if self.score_width < 0 or len(self.scored) % (4 * max(self.score_width, 1)):
            raise InvalidArgument("scored ids must be a [T, score_width] int32 array")

    def scoring(self, ids: np.ndarray) -> CaptureRequest:
        """This request, also scoring ``ids`` [T, m] (any int dtype; < 0: none) per position."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise InvalidArgument("ids to score must be a [T, m] array")
        return dataclasses.replace(self, score_width=ids.shape[1],
                                   scored=ids.astype("<i4").tobytes())  # fmt: skip

    def scored_ids(self) -> np.ndarray:
        """int32 [T, score_width]: the ids to score."""
        return np.frombuffer(self.scored, dtype="<i4").reshape(-1, max(self.score_width, 1))

    @property
    def columns(self) -> int:
        return 1 + 2 * self.top_k + 2 * self.samples + len(self.temperatures) + self.score_width

    def to_args(self) -> dict[str, Any]:
        """Plain values that travel in vLLM's ``SamplingParams.extra_args`` (msgpack)."""
        return {"top_k": self.top_k, "samples": self.samples, "seed": str(self.seed),
                "temperatures": list(self.temperatures), "score_width": self.score_width,
                "scored": self.scored}  # fmt: skip

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> CaptureRequest:
        return cls(int(args["top_k"]), int(args["samples"]), int(args["seed"]),
                   tuple(args["temperatures"]), int(args["score_width"]),
                   bytes(args["scored"]))  # fmt: skip


def seed_of_key(key: bytes) -> int:
    """A record's draw seed: the first 8 bytes of its key (a hash), little-endian."""
    return int.from_bytes(key[:8], "little")


def without_seed(request: CaptureRequest) -> CaptureRequest:
    """The request's column layout: records that share it are computed in one call."""
    return CaptureRequest(request.top_k, request.samples, 0, request.temperatures,
                          request.score_width)  # fmt: skip


@dataclass(frozen=True)
class CapturedColumns:
    """One record's columns, split by meaning (numpy views; [T, ...] each)."""

    target_logprobs: np.ndarray  # float32 [T], nan in the last row
    top_ids: np.ndarray  # int32 [T, top_k]
    top_logprobs: np.ndarray  # float32 [T, top_k]
    draw_ids: np.ndarray  # int32 [T, samples], in draw order
    draw_logprobs: np.ndarray  # float32 [T, samples]
    log_normalisers: np.ndarray  # float32 [T, len(temperatures)]
    scored_logprobs: np.ndarray  # float32 [T, score_width], -inf for ids < 0

    @classmethod
    def split(cls, columns: np.ndarray, request: CaptureRequest) -> CapturedColumns:
        columns = np.ascontiguousarray(columns, dtype=np.float32)
        if columns.ndim != 2 or columns.shape[1] != request.columns:
            raise RuntimeError(
                f"engine-side capture returned {columns.shape}; expected [T, {request.columns}]"
            )
        k, u = request.top_k, request.samples
        cuts = np.cumsum([1, k, k, u, u, len(request.temperatures)])
        target, top_ids, top_lps, draw_ids, draw_lps, norms, scored = np.split(columns, cuts, 1)
        return cls(target[:, 0], top_ids.view(np.int32), top_lps, draw_ids.view(np.int32),
                   draw_lps, norms, scored)  # fmt: skip

    def top_rows(self) -> TopKRows:
        return TopKRows(self.top_ids, self.top_logprobs, self.target_logprobs)


# The self-check's tolerance against vLLM's own values: the same logits, one log-softmax.
CHECK_TOLERANCE = 1e-4


def self_check_sequences(vocab_size: int, max_len: int) -> list[np.ndarray]:
    """A few fixed token sequences (1 token, a short one, a long one) that the start-up check
    captures both ways."""
    rng = np.random.default_rng(20260101)
    lengths = sorted({1, min(7, max_len), min(300, max_len)})
    return [rng.integers(0, vocab_size, n).astype(np.int32) for n in lengths]


def _error_where_shown(ids: np.ndarray, logprobs: np.ndarray, expected: TopKRows) -> float:
    """The largest |log-prob - the engine's| over ``ids`` [T, m] that its top-k rows show."""
    shown = ids[..., None] == np.asarray(expected.token_ids)[:, None, :]
    got = np.broadcast_to(logprobs[..., None].astype(np.float64), shown.shape)
    want = np.broadcast_to(np.asarray(expected.logprobs, np.float64)[:, None, :], shown.shape)
    return float(np.abs(got - want)[shown].max(initial=0))


def check_agreement(expected: TopKRows, got: CapturedColumns) -> None:
    """FailedPrecondition unless engine-side columns agree with the engine's own top-k rows
    (vLLM's prompt log-probs): the same top-k (up to ties) and values, targets, a normaliser of
    0 at T = 1 (so the softmax ran over the whole vocabulary), and drawn ids whose log-probs
    are the engine's where the top-k shows them."""
    problems = []
    want_lp = np.asarray(expected.logprobs, dtype=np.float64)
    got_lp = got.top_logprobs.astype(np.float64)
    if want_lp.shape != got_lp.shape:
        raise FailedPrecondition(
            f"engine-side capture has rows {got_lp.shape}, vLLM {want_lp.shape}"
        )
    worst = float(np.abs(got_lp - want_lp).max(initial=0))
    if not worst <= CHECK_TOLERANCE:
        problems.append(f"top-k log-probs differ by up to {worst:.3g} nats")
    after = np.abs(np.diff(want_lp, axis=1, append=-np.inf))
    before = np.abs(np.diff(want_lp, axis=1, prepend=np.inf))
    untied = (after > CHECK_TOLERANCE) & (before > CHECK_TOLERANCE)
    if (got.top_ids != np.asarray(expected.token_ids))[untied].any():
        problems.append("top-k ids differ")
    targets = np.asarray(expected.target_logprobs, dtype=np.float64)
    target_err = np.abs(got.target_logprobs[:-1] - targets[:-1]).max(initial=0)
    if not target_err <= CHECK_TOLERANCE or not np.isnan(got.target_logprobs[-1]):
        problems.append(f"next-token log-probs differ by up to {target_err:.3g} nats")
    if got.log_normalisers.size:
        norm_err = float(np.abs(got.log_normalisers[:, 0]).max(initial=0))
        if not norm_err <= 1e-3:
            problems.append(f"log Z at T=1 is {norm_err:.3g}, not 0")
    draw_err = _error_where_shown(got.draw_ids, got.draw_logprobs, expected)
    if not draw_err <= CHECK_TOLERANCE:
        problems.append(f"log-probs of drawn ids differ by up to {draw_err:.3g} nats")
    if got.scored_logprobs.size:
        # The check scores the top-k ids themselves (see VLLMEngine._self_check).
        score_err = _error_where_shown(got.top_ids, got.scored_logprobs, expected)
        if not score_err <= CHECK_TOLERANCE:
            problems.append(f"log-probs of scored ids differ by up to {score_err:.3g} nats")
    if problems:
        raise FailedPrecondition(
            "the engine-side capture disagrees with vLLM's own prompt log-probs ("
            + "; ".join(problems)
            + "); refusing to capture: this vLLM version or this model's logit processing is "
            "not what logitcache's worker hook expects"
        )
