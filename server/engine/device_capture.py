"""Full-distribution work on the engine's device: from a chunk of logits [n, V] to a few columns.

Every capture mode needs the whole distribution of a position once (its softmax), and then only
a handful of numbers: the top-k, U draws at T = 1, log-normalisers at other temperatures, the
log-prob of the actual next token. :func:`capture_columns` computes them where the logits are
(the GPU, or vLLM's CPU worker), so nothing of size V ever leaves the device, and no Python object
is made per position. The vLLM engine runs it inside vLLM's worker (``vllm_worker``); the
transformers reference engine runs the same function on its own logits, which is what tests hold
the two engines' draws and normalisers against.

Draws are reproducible by key: draw j of row t of a record is the inverse CDF at a uniform that is
a hash of (record seed, t, j), a counter-based generator, so it does not depend on the batch,
the chunking of the prefill, the device or the run.

Columns of one row (float32; ids are int32 bit patterns in float32 columns, exact for any id):
``target | top-k ids | top-k log-probs | draw ids | draw log-probs | log Z(T) per temperature |
log-probs of the requested ids``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import FailedPrecondition, InvalidArgument

# The key of a capture request in vLLM's SamplingParams.extra_args (see ``vllm_worker``).
EXTRA_ARGS_KEY = "logitcache_capture"
# Rows of float64 CDF work per step: bounds the device memory of sampling to 8 * this bytes.
_CDF_ELEMENTS = 1 << 24
_MASK32 = 0xFFFFFFFF


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


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for x in [0, 2**32) held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (xor-shift-multiply), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_tensor(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [n] holding a 64-bit seed (two's complement), as :func:`uniforms` takes it."""
    signed = seed - (1 << 64) if seed >= 1 << 63 else seed
    return torch.full((n,), signed, dtype=torch.int64, device=device)


def uniforms(seeds: torch.Tensor, rows: torch.Tensor, samples: int) -> torch.Tensor:
    """float64 [n, samples] in (0, 1): the uniforms of draws 0..samples-1 of rows ``rows`` of
    the records seeded ``seeds`` (int64 [n] each)."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    base = _mix32(hi) ^ lo
    h = _mix32(_mix32(base) ^ rows.to(torch.int64))[:, None]
    j = torch.arange(samples, dtype=torch.int64, device=rows.device)
    h = _mix32(h ^ _mix32(j + 0x9E3779B9 & _MASK32)[None, :])
    # A second, independent word gives 53-bit uniforms (tokens below 2**-32 stay reachable).
    h2 = _mix32(h ^ 0x5BD1E995)
    return ((h >> 11).double() * 2.0**21 + (h2 >> 11).double() + 0.5) / 2.0**42


def draw(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int64 [n, U]: the inverse CDF of each row's distribution at the uniforms ``u``."""
    n, vocab = logprobs.shape
    out = torch.empty(u.shape, dtype=torch.int64, device=logprobs.device)
    step = max(1, _CDF_ELEMENTS // vocab)
    for a in range(0, n, step):
        cdf = torch.cumsum(logprobs[a : a + step].double().exp(), dim=1)
        points = (u[a : a + step] * cdf[:, -1:]).contiguous()
        idx = torch.searchsorted(cdf, points, right=True)
        out[a : a + step] = idx.clamp_(max=vocab - 1)
    return out


def capture_columns(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    seeds: torch.Tensor,
    request: CaptureRequest,
    scored_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 [n, request.columns] for ``n`` positions, on ``logits``' device; positions of
    several records may share a call (their seeds differ; ``request.seed`` is not read).

    ``logits`` [n, V] are the engine's final logits; ``targets`` [n] the actual next tokens
    (-1 where there is none, the last row); ``rows`` [n] each position's index in its record
    and ``seeds`` [n] its record's seed (:func:`seed_tensor`), which fix its draws;
    ``scored_ids`` [n, request.score_width] the ids to score (< 0: none, -inf).
    """
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    parts = [
        logprobs.gather(1, targets.clamp(min=0)[:, None]).masked_fill_(
            targets[:, None] < 0, float("nan")
        )
    ]
    if request.top_k:
        top = torch.topk(logprobs, request.top_k, dim=-1)
        parts += [top.indices.to(torch.int32).view(torch.float32), top.values]
    if request.samples:
        ids = draw(logprobs, uniforms(seeds, rows, request.samples))
        parts += [ids.to(torch.int32).view(torch.float32), logprobs.gather(1, ids)]
    if request.temperatures:
        # log sum exp(lp / T), shifted by the row's largest lp: one exp pass per temperature.
        peak = logprobs.amax(dim=1, keepdim=True)
        shifted = logprobs - peak
        parts.append(torch.cat([(shifted / t).exp_().sum(1, keepdim=True).log_() + peak / t
                                for t in request.temperatures], dim=1))  # fmt: skip
    if request.score_width:
        if scored_ids is None or scored_ids.shape != (logits.shape[0], request.score_width):
            raise ValueError(f"expected [{logits.shape[0]}, {request.score_width}] ids to score")
        ids = scored_ids.to(torch.int64)
        outside = (ids < 0) | (ids >= logprobs.shape[1])
        at = logprobs.gather(1, ids.clamp(0, logprobs.shape[1] - 1))
        parts.append(at.masked_fill_(outside, float("-inf")))
    return torch.cat(parts, dim=1)


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
