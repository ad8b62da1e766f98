"""Sparse distillation losses: a student's full logits against a teacher's cached rows.

Row t of the cache is the teacher's distribution over the token after position t, aligned with the
student's ``logits[:, t]`` (ARCHITECTURE.md, "Rows"): the top-k token ids in descending order and
their log-probabilities normalised over the *whole* vocabulary at temperature 1. Every function
here takes

    student_logits     [B, T, V]  float (fp32/bf16/fp16; computed in fp32, fp64 stays fp64)
    teacher_token_ids  [B, T, k]  int
    teacher_logprobs   [B, T, k]  float, descending along k; -inf marks padding (ragged rows)
    mask               [B, T]     bool, True = the position counts

and returns the mean over the unmasked positions (0.0, still differentiable, if there are none).
The teacher is a constant: it gets no gradient. No dense [B, T, V] teacher tensor is ever built.
Optionally (collate's ``teacher_tail_logprobs`` and ``teacher_counts``)

    teacher_tail_logprobs  [B, T]     float, log of the teacher's mass outside the stored entries;
                                      NaN = derive it from the entries (see "Explicit tail")
    teacher_counts         [B, T, k]  int, sampled rows only (see "Sampled rows")

Tail bucket (temperature 1)
---------------------------
The k stored entries cover P_k = sum_i exp(lp_i) of the teacher's mass. The rest belongs to tokens
we know nothing about one by one, so it becomes one extra bucket, and each loss is a divergence
between two distributions over k + 1 buckets, the k ids plus "everything else":

    teacher  p = (exp(lp_1), ..., exp(lp_k), p_tail)   p_tail = 1 - P_k = exp(log1mexp(lse(lp)))
    student  q = (q(id_1),   ..., q(id_k),   q_tail)   q = softmax(z),  q_tail = 1 - sum_i q(id_i)

    forward_kl = KL(p || q) = sum_b p_b (log p_b - log q_b)
    reverse_kl = KL(q || p) = sum_b q_b (log q_b - log p_b)
    jsd        = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

Merging tokens into one bucket can only lose information, so each bucketed divergence is <= the
dense one over the full vocabulary (data-processing inequality); with k = V the tail is empty on
both sides and they are equal. Details:

- ``0 log 0 = 0``: a bucket with zero mass on the weighting side contributes exactly 0, and its
  gradient is 0 (masked before the exp/log, so no NaN leaks through ``where``).
- Teacher tail: ``log1mexp(logsumexp(lp))``, the only way to get it from the top-k alone. If the
  stored mass exceeds 1 (fp32 rounding, or the codec's 1/256-nat quantisation), the k entries are
  rescaled to sum to 1 and the tail is 0.
- Student tail: computed as ``logsumexp(z outside the ids) - logsumexp(z)``, not as
  ``log1mexp(logsumexp(log q(ids)))``. Both are the same number in exact arithmetic, but ``1 - Q_k``
  cancels: in fp32 every tail below ~1e-7 comes out as 0, and an over-confident student would get
  no gradient toward the tail exactly when the teacher puts real mass there. The complement sum has
  full relative precision and is exactly empty (-inf) when the ids cover the vocabulary. Cost: one
  masked copy of the chunk's logits.
- Floors: both tail buckets get ``TAIL_FLOOR`` (1e-12) added. Without it, p_tail = 0 with
  q_tail > 0 makes reverse KL (and q_tail = 0 with a rounding-noise p_tail makes forward KL) +inf.
  The added floor keeps the value finite and the gradient nonzero; where both tails are well above
  it, it moves the result by ~1e-11.
- Padding along k: entries whose log-prob is -inf (or NaN) are absent on both sides: they hold no
  teacher mass, the student's mass on their id stays in its tail, and their ids (any value, 0 or -1)
  are clamped into [0, V) before any gather. Valid ids are assumed distinct, as in a top-k.
- JSD convention: the generalised JSD of GKD (Agarwal et al., 2024) as in TRL's
  ``generalized_jsd_loss``: beta weights the teacher's side and the mixture, beta = 0.5 is the
  symmetric JSD (at most log 2). At beta = 0 (m = q) and beta = 1 (m = p) the value is identically 0
  (for small beta it behaves like beta * KL(p || q)); use forward_kl / reverse_kl for the endpoints.

Explicit tail
-------------
Deriving the tail as ``1 - P_k`` inherits the rounding of every stored entry (the codec's 1/64-nat
steps move P_k by up to ~1.6%, which is all of a small tail). Captures that store the tail computed
from the engine's exact values pass it as ``teacher_tail_logprobs`` (log t; -inf = no tail). Where
it is given (not NaN), the teacher's k + 1 buckets are the stored entries and that tail,
renormalised to sum to 1 (they agree only up to the same rounding):

    log p = log_softmax([lp_1, ..., lp_k, log t])       (valid entries only; -inf stays empty)

and the tail bucket then gets ``TAIL_FLOOR`` like a derived one. Where it is NaN, or not given at
all, the tail is derived as above. Passing the derived tail itself gives the same result as not
passing it (up to rounding). An all-padding row with a -inf tail has no teacher mass at all: its
teacher side is empty and its forward KL is 0. At T != 1 the tail is dropped (next section), so
``teacher_tail_logprobs`` has no effect there.

Temperature
-----------
The stored log-probs are at temperature 1; tempering the teacher's *tail* needs the individual tail
probabilities, which are gone. What *is* exact: the tempered distribution restricted to the
teacher's k ids and renormalised, ``softmax(lp / T)`` over the valid entries, because the unknown
normaliser cancels. So for T != 1 both sides are compared on the k ids only, tail dropped:

    p_T = softmax(lp / T)  over the k entries,   q_T = softmax(z[ids] / T)  over the same ids,
    loss = T^2 * D(p_T, q_T)        (Hinton et al.: T^2 keeps gradient scale comparable across T)

T = 1 keeps the tail bucket. The two formulas are different objectives, so the value is not
continuous as T -> 1; pick one temperature for a run. The cross-entropy term of
``distillation_loss`` always uses the untempered logits.

Sampled rows
------------
A sampled capture (``client.sampling``) stores, per position, the distinct ids x_j of U draws from
the teacher's full distribution p, how often each was drawn (c_j, U = sum_j c_j) and log p(x_j).
:func:`sampled_kl` is the Monte-Carlo estimate of the dense forward KL

    KL_hat = (1 / U) * sum_j c_j * (log p(x_j) - log q(x_j)),      q = softmax(z) over all of V

Each draw x ~ p contributes log p(x) - log q(x), whose expectation is KL(p || q) over the *whole*
vocabulary, so E[KL_hat] = KL(p || q) exactly: no bucket, no tail, no bias. Its gradient
``softmax(z) - (c / U scattered onto V)`` has expectation ``softmax(z) - p``, the dense gradient.
Only forward KL has such an estimate (reverse KL and JSD need q-weighted teacher values at
tokens that were never drawn), and only at T = 1 (tempering p needs its normaliser). A single
estimate can be negative; only its mean is a KL. Entries with count 0 are padding (any id, any
log-prob); a position with no draws at all contributes 0.

Memory
------
Only the unmasked positions are processed, ``chunk_size`` of them at a time; within a chunk the
student's log-softmax over V is computed in fp32. Autograd never holds more than one chunk's
[chunk, V] intermediates: a custom ``torch.autograd.Function`` computes each chunk's gradient during
the forward pass (a local ``torch.autograd.grad``, after which the chunk's graph is freed) and
writes it into one buffer shaped like the student logits. ``backward`` only scales that buffer.
This was preferred to ``torch.utils.checkpoint`` per chunk because the backward of a chunk selected
out of [B*T, V] would build a dense [B*T, V] gradient for every chunk, and checkpointing runs each
chunk's forward twice. The price: the loss is differentiable once (no double backward), and the
gradient is computed eagerly whenever the student logits require grad and grad mode is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "TAIL_FLOOR",
    "Kind",
    "distillation_loss",
    "forward_kl",
    "jsd",
    "log1mexp",
    "reverse_kl",
    "sampled_kl",
]

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")

TAIL_FLOOR = 1e-12
"""Probability added to both tail buckets so that a zero tail on one side stays finite."""

_LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)
_NEG_INF = float("-inf")
_LN_HALF = -math.log(2.0)


# --- numerics -------------------------------------------------------------------------------------


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range (Maechler, 2012).

    Near 0, ``1 - exp(x)`` cancels, so ``log(-expm1(x))`` is used there and ``log1p(-exp(x))``
    below -log 2. Each branch only sees inputs where it is finite, so ``where`` leaks no NaN into
    the gradient. Slightly positive inputs (rounding noise in a log-mass) are clamped to 0, which
    gives -inf (an empty remainder) rather than NaN.
    """
    x = x.clamp(max=0.0)
    near_zero = x > _LN_HALF
    near = torch.log(-torch.expm1(torch.where(near_zero, x, _LN_HALF)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, _LN_HALF, x)))
    return torch.where(near_zero, near, far)


def _masked_logsumexp(x: Tensor, keep: Tensor) -> Tensor:
    """logsumexp over the last dim's kept entries; -inf (with zero gradient) for rows with none."""
    any_kept = keep.any(-1)
    safe = torch.where(keep, x, _NEG_INF)
    safe = torch.where(any_kept.unsqueeze(-1), safe, 0.0)  # an all -inf row has a NaN gradient
    return torch.where(any_kept, torch.logsumexp(safe, -1), _NEG_INF)


def _masked_log_softmax(x: Tensor, keep: Tensor) -> Tensor:
    """log_softmax over the kept entries of the last dim; dropped entries are -inf (zero mass)."""
    lse = _masked_logsumexp(x, keep)
    return torch.where(keep, x - lse.unsqueeze(-1), _NEG_INF)


def _floored(log_mass: Tensor) -> Tensor:
    """log(mass + TAIL_FLOOR): a smooth floor that keeps a (small) gradient below it."""
    return torch.logaddexp(log_mass, torch.full_like(log_mass, _LOG_TAIL_FLOOR))


def _weighted_log_ratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise ``a * (log a - log b)``, exactly 0 where a == 0 and with a zero gradient there."""
    present = log_a > _NEG_INF
    log_a = torch.where(present, log_a, 0.0)
    log_b = torch.where(present, log_b, 0.0)
    return torch.where(present, log_a.exp() * (log_a - log_b), 0.0)


# --- the two sides as bucket distributions ---------------------------------------------------------


def _teacher_buckets(lp: Tensor, valid: Tensor, tail: Tensor | None = None) -> Tensor:
    """[n, k+1] log-probs: the stored entries (padding -> -inf), then the teacher's tail bucket.

    ``tail`` [n]: an explicit log tail per row (-inf = none), NaN where it is to be derived.
    """
    lp = torch.where(valid, lp, _NEG_INF)
    log_mass = _masked_logsumexp(lp, valid)  # log P_k; -inf for an all-padding row
    excess = log_mass.clamp(min=0.0)  # P_k > 1 is rounding/quantisation: rescale to sum to 1
    buckets = torch.cat([lp - excess.unsqueeze(-1), log1mexp(log_mass - excess).unsqueeze(-1)], -1)
    if tail is not None:
        given = ~torch.isnan(tail)
        explicit = torch.where(given, tail, _NEG_INF).unsqueeze(-1)
        keep = torch.cat([valid, explicit > _NEG_INF], -1)
        renormalised = _masked_log_softmax(torch.cat([lp, explicit], -1), keep)
        buckets = torch.where(given.unsqueeze(-1), renormalised, buckets)
    return torch.cat([buckets[:, :-1], _floored(buckets[:, -1:])], -1)


def _student_buckets(z: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """[n, k+1] log-probs of softmax(z) on the teacher's ids, then the student's remaining mass."""
    n, vocab = z.shape
    lse = torch.logsumexp(z, -1)
    log_q = torch.where(valid, z.gather(-1, ids) - lse.unsqueeze(-1), _NEG_INF)
    # Which vocabulary entries the teacher listed; padding entries write to a spare column V.
    listed = torch.zeros((n, vocab + 1), dtype=torch.bool, device=z.device)
    listed.scatter_(-1, torch.where(valid, ids, vocab), True)
    outside = z.masked_fill(listed[:, :vocab], _NEG_INF)
    # Rows with nothing left (k = V, or -inf logits) get a finite dummy: logsumexp of an all -inf
    # row has a NaN gradient, which where() would turn into NaN * 0 = NaN.
    has_tail = (outside > _NEG_INF).any(-1)
    outside.masked_fill_(~has_tail.unsqueeze(-1), 0.0)
    log_tail = torch.where(has_tail, torch.logsumexp(outside, -1) - lse, _NEG_INF)
    return torch.cat([log_q, _floored(log_tail).unsqueeze(-1)], -1)


def _divergence(log_p: Tensor, log_q: Tensor, kind: str, beta: float) -> Tensor:
    """Per-row divergence between teacher p and student q, given as log-probs over the last dim."""
    if kind == "forward_kl":
        return _weighted_log_ratio(log_p, log_q).sum(-1)
    if kind == "reverse_kl":
        return _weighted_log_ratio(log_q, log_p).sum(-1)
    if beta in (0.0, 1.0):  # the mixture is one of the two sides: identically 0
        return log_q.new_zeros(log_q.shape[:-1])
    # log m = log(beta p + (1 - beta) q); entries empty on both sides stay empty (and NaN-free).
    empty = (log_p == _NEG_INF) & (log_q == _NEG_INF)
    a = torch.where(empty, 0.0, log_p + math.log(beta))
    b = torch.where(empty, 0.0, log_q + math.log1p(-beta))
    log_m = torch.where(empty, _NEG_INF, torch.logaddexp(a, b))
    kl_pm = _weighted_log_ratio(log_p, log_m).sum(-1)
    kl_qm = _weighted_log_ratio(log_q, log_m).sum(-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def _per_position(
    z: Tensor,
    ids: Tensor,
    lp: Tensor,
    kind: str,
    beta: float,
    temperature: float,
    tail: Tensor | None = None,
) -> Tensor:
    """The divergence for each row of a chunk: z [c, V] student logits, ids/lp [c, k] teacher,
    tail [c] the teacher's explicit log tail (NaN: derive it) or None."""
    valid = lp > _NEG_INF  # False for -inf padding (and NaN)
    ids = ids.clamp(0, z.shape[-1] - 1)  # padding may hold any id; it is masked out below
    if temperature == 1.0:
        log_p = _teacher_buckets(lp, valid, tail)
        log_q = _student_buckets(z, ids, valid)
        return _divergence(log_p, log_q, kind, beta)
    log_p = _masked_log_softmax(lp / temperature, valid)
    log_q = _masked_log_softmax(z.gather(-1, ids) / temperature, valid)
    return _divergence(log_p, log_q, kind, beta) * temperature**2


def _sampled_per_position(z: Tensor, ids: Tensor, counts: Tensor, lp: Tensor) -> Tensor:
    """(1 / U) sum_j c_j (lp_j - log q(id_j)) for each row: z [c, V], ids/counts/lp [c, k]."""
    present = counts > 0
    ids = ids.clamp(0, z.shape[-1] - 1)  # padding may hold any id; it is masked out below
    log_q = z.gather(-1, ids) - torch.logsumexp(z, -1, keepdim=True)
    weight = counts.to(z.dtype)
    weight = weight / weight.sum(-1, keepdim=True).clamp(min=1.0)
    lp = torch.where(present, lp, 0.0)  # padding's -inf (or NaN) never meets the arithmetic
    return torch.where(present, weight * (lp - log_q), 0.0).sum(-1)


# --- chunked evaluation with the gradient computed in forward -------------------------------------

# fn(z_chunk, rows_chunk) -> per-row losses; z_chunk is [c, V] in the compute dtype.
ChunkFn = Callable[[Tensor, Tensor], Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(rows: Tensor, chunk_size: int | None) -> Sequence[Tensor]:
    if rows.numel() == 0:
        return ()
    return (rows,) if chunk_size is None else rows.split(chunk_size)


class _ChunkedSum(torch.autograd.Function):
    """sum over row chunks of fn(logits[rows]); each chunk's gradient is taken during forward."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, rows: Tensor, fn: ChunkFn, chunk_size: int | None
    ) -> Tensor:
        dtype = _compute_dtype(logits.dtype)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        grad = torch.zeros_like(logits)  # the only [B*T, V] tensor: the logits' own gradient
        for idx in _chunks(rows, chunk_size):
            z = logits.index_select(0, idx).to(dtype)  # a fresh leaf: grad mode is off in forward
            with torch.enable_grad():
                z.requires_grad_(True)
                loss = fn(z, idx).sum()
                if loss.requires_grad:
                    (g,) = torch.autograd.grad(loss, z, allow_unused=True)
                    if g is not None:
                        grad.index_copy_(0, idx, g.to(grad.dtype))
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad_total.item() == 1.0:  # the usual loss.backward(): no second [B*T, V] tensor
            return grad, None, None, None
        return grad * grad_total.to(grad.dtype), None, None, None


def _chunked_sum(logits: Tensor, rows: Tensor, fn: ChunkFn, chunk_size: int | None) -> Tensor:
    """sum_i fn(logits[rows])_i over chunks of ``chunk_size`` rows, differentiable w.r.t. logits."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedSum.apply(logits, rows, fn, chunk_size)
    with torch.no_grad():
        dtype = _compute_dtype(logits.dtype)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        for idx in _chunks(rows, chunk_size):
            total += fn(logits.index_select(0, idx).to(dtype), idx).sum()
        return total


# --- argument handling ----------------------------------------------------------------------------


def _check_options(temperature: float, chunk_size: int | None, beta: float) -> None:
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def _flatten(
    student_logits: Tensor, teacher_token_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check shapes; return logits [N, V], ids [N, k] int64, logprobs [N, k], mask [N] bool."""
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be [..., V], got shape {tuple(student_logits.shape)}"
        )
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if teacher_token_ids.shape != teacher_logprobs.shape or teacher_logprobs.shape[:-1] != lead:
        raise ValueError(
            f"teacher_token_ids {tuple(teacher_token_ids.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must both be {(*lead, 'k')} for student_logits "
            f"{tuple(student_logits.shape)}"
        )
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask must be {tuple(lead)}, got {tuple(mask.shape)}")
    k = teacher_logprobs.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    ids = teacher_token_ids.reshape(-1, k).long()
    lp = teacher_logprobs.detach().reshape(-1, k).to(_compute_dtype(student_logits.dtype))
    counts = (
        torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if mask is None
        else mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
    )
    return logits, ids, lp, counts


def _flatten_tail(tail: Tensor | None, student_logits: Tensor) -> Tensor | None:
    """teacher_tail_logprobs [B, T] as [N] in the compute dtype (None stays None)."""
    if tail is None:
        return None
    lead = student_logits.shape[:-1]
    if tail.shape != lead:
        raise ValueError(f"teacher_tail_logprobs must be {tuple(lead)}, got {tuple(tail.shape)}")
    dtype = _compute_dtype(student_logits.dtype)
    return tail.detach().reshape(-1).to(device=student_logits.device, dtype=dtype)


def _flatten_counts(counts: Tensor, teacher_token_ids: Tensor, student_logits: Tensor) -> Tensor:
    """teacher_counts [B, T, k] as [N, k] int64, after checking it matches the ids."""
    if counts.shape != teacher_token_ids.shape:
        raise ValueError(
            f"teacher_counts {tuple(counts.shape)} must match teacher_token_ids "
            f"{tuple(teacher_token_ids.shape)}"
        )
    if counts.is_floating_point() or counts.is_complex():
        raise ValueError(f"teacher_counts must be integers, got {counts.dtype}")
    return counts.reshape(-1, counts.shape[-1]).to(device=student_logits.device, dtype=torch.long)


def _check_ids(sel_ids: Tensor, listed: Tensor, vocab: int, padding: str) -> None:
    out_of_range = listed & ((sel_ids < 0) | (sel_ids >= vocab))
    if bool(out_of_range.any()):
        raise ValueError(
            f"teacher_token_ids holds ids outside [0, {vocab}) at non-padding entries "
            f"(only entries whose {padding} may hold arbitrary ids)"
        )


def _kd_chunk_fn(
    ids: Tensor,
    lp: Tensor,
    vocab: int,
    rows: Tensor,
    kind: str,
    beta: float,
    temperature: float,
    tail: Tensor | None = None,
) -> ChunkFn:
    """The per-row KD loss for chunks of ``rows``; refuses listed ids outside the vocabulary."""
    sel_ids, sel_lp = ids[rows], lp[rows]
    _check_ids(sel_ids, sel_lp > _NEG_INF, vocab, "teacher_logprobs is -inf")
    if temperature != 1.0:
        tail = None  # the tail is dropped at T != 1
    if tail is not None and bool((tail[rows] == math.inf).any()):
        raise ValueError("teacher_tail_logprobs must be a log-probability, -inf or NaN, not +inf")

    def fn(z: Tensor, idx: Tensor) -> Tensor:
        row_tail = None if tail is None else tail[idx]
        return _per_position(z, ids[idx], lp[idx], kind, beta, temperature, row_tail)

    return fn


def _sampled_chunk_fn(ids: Tensor, counts: Tensor, lp: Tensor, vocab: int, rows: Tensor) -> ChunkFn:
    """The per-row sampled KL for chunks of ``rows``; refuses inconsistent sampled entries."""
    sel_counts = counts[rows]
    if bool((sel_counts < 0).any()):
        raise ValueError("teacher_counts must be >= 0 (0 marks padding)")
    drawn = sel_counts > 0
    _check_ids(ids[rows], drawn, vocab, "teacher_counts is 0")
    if not bool(torch.isfinite(lp[rows][drawn]).all()):
        raise ValueError(
            "teacher_logprobs must be finite at drawn entries (teacher_counts > 0): the teacher "
            "cannot have drawn a token it gives no probability"
        )

    def fn(z: Tensor, idx: Tensor) -> Tensor:
        return _sampled_per_position(z, ids[idx], counts[idx], lp[idx])

    return fn


def _kd_loss(
    kind: str,
    student_logits: Tensor,
    teacher_token_ids: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None,
    beta: float,
    temperature: float,
    chunk_size: int | None,
    teacher_tail_logprobs: Tensor | None = None,
) -> Tensor:
    _check_options(temperature, chunk_size, beta)
    logits, ids, lp, counts = _flatten(student_logits, teacher_token_ids, teacher_logprobs, mask)
    tail = _flatten_tail(teacher_tail_logprobs, student_logits)
    rows = counts.nonzero().squeeze(1)
    per_row = _kd_chunk_fn(ids, lp, logits.shape[-1], rows, kind, beta, temperature, tail)
    n = max(rows.numel(), 1)
    return _chunked_sum(logits, rows, lambda z, idx: per_row(z, idx) / n, chunk_size)


# --- public losses --------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    teacher_token_ids: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = 4096,
    teacher_tail_logprobs: Tensor | None = None,
) -> Tensor:
    """KL(teacher || student) over the k ids plus a tail bucket, mean over unmasked positions.

    Mass-covering: the student is pushed to cover everything the teacher considers likely. The
    standard KD loss (Hinton et al., 2015). With k = V it equals the dense KL exactly.
    """
    return _kd_loss(
        "forward_kl",
        student_logits,
        teacher_token_ids,
        teacher_logprobs,
        mask,
        0.5,
        temperature,
        chunk_size,
        teacher_tail_logprobs,
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_token_ids: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = 4096,
    teacher_tail_logprobs: Tensor | None = None,
) -> Tensor:
    """KL(student || teacher) over the k ids plus a tail bucket, mean over unmasked positions.

    Mode-seeking: the student is penalised for mass where the teacher has little (MiniLLM, Gu et
    al., 2024). Student mass in the tail where the teacher has none costs ``q_tail * log(q_tail /
    TAIL_FLOOR)``: large but finite.
    """
    return _kd_loss(
        "reverse_kl",
        student_logits,
        teacher_token_ids,
        teacher_logprobs,
        mask,
        0.5,
        temperature,
        chunk_size,
        teacher_tail_logprobs,
    )


def jsd(
    student_logits: Tensor,
    teacher_token_ids: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None,
    beta: float = 0.5,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = 4096,
    teacher_tail_logprobs: Tensor | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD convention), mean over unmasked positions.

    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``;
    bounded, so one bad position cannot dominate a batch. beta in [0, 1]; 0 and 1 give 0.
    """
    return _kd_loss(
        "jsd",
        student_logits,
        teacher_token_ids,
        teacher_logprobs,
        mask,
        beta,
        temperature,
        chunk_size,
        teacher_tail_logprobs,
    )


def sampled_kl(
    logits: Tensor,
    teacher_token_ids: Tensor,
    teacher_counts: Tensor,
    teacher_logprobs: Tensor,
    teacher_mask: Tensor | None,
    *,
    chunk_size: int | None = 4096,
) -> Tensor:
    """Unbiased estimate of the dense forward KL(teacher || student) from sampled rows, mean over
    unmasked positions.

    Per position ``(1 / U) * sum_j c_j * (teacher_logprobs_j - log_softmax(logits)[id_j])`` with
    ``U = sum_j c_j`` (module docstring, "Sampled rows"): over the teacher's draws its expectation
    is the forward KL over the full vocabulary, and its gradient w.r.t. ``logits`` is an unbiased
    estimate of the dense gradient. ``teacher_counts`` [B, T, k] are the draw counts, 0 on
    padding; ids and log-probs of padding entries may be anything. Same chunking (and memory) as
    :func:`forward_kl`.
    """
    _check_options(1.0, chunk_size, 0.5)
    flat_logits, ids, lp, keep = _flatten(logits, teacher_token_ids, teacher_logprobs, teacher_mask)
    counts = _flatten_counts(teacher_counts, teacher_token_ids, logits)
    rows = keep.nonzero().squeeze(1)
    per_row = _sampled_chunk_fn(ids, counts, lp, flat_logits.shape[-1], rows)
    n = max(rows.numel(), 1)
    return _chunked_sum(flat_logits, rows, lambda z, idx: per_row(z, idx) / n, chunk_size)


def _check_sampled(kind: str, temperature: float, tail: Tensor | None) -> None:
    """Sampled rows support forward KL at T = 1 only, and carry no tail."""
    if kind != "forward_kl":
        raise ValueError(
            f"teacher_counts (sampled rows) estimate the forward KL only, got kind={kind!r}: "
            "reverse KL and JSD have no unbiased estimate from teacher samples"
        )
    if temperature != 1.0:
        raise ValueError(
            f"teacher_counts (sampled rows) need temperature 1, got {temperature!r}: the samples "
            "come from the untempered teacher"
        )
    if tail is not None and not bool(torch.isnan(tail).all()):
        raise ValueError(
            "teacher_tail_logprobs must be None or all NaN with teacher_counts: sampled rows "
            "have no tail"
        )


def distillation_loss(
    student_logits: Tensor,
    teacher_token_ids: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None,
    labels: Tensor | None = None,
    *,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = 4096,
    teacher_tail_logprobs: Tensor | None = None,
    teacher_counts: Tensor | None = None,
) -> Tensor:
    """``(1 - alpha) * KD + alpha * CE``: a distillation loss mixed with the hard-label loss.

    KD is ``kind`` (forward_kl, reverse_kl or jsd with ``beta``), averaged over ``mask``. CE is the
    ordinary next-token cross-entropy of the untempered logits against ``labels`` [B, T], already
    aligned with the logits' positions, averaged over labels != ``ignore_index`` (0 if there are
    none, where ``F.cross_entropy`` would give NaN). Both terms share one chunked pass over V.

    ``teacher_tail_logprobs`` [B, T]: the teacher's explicit tail (NaN: derive it), as in
    :func:`forward_kl`. ``teacher_counts`` [B, T, k]: the rows are sampled, and KD is
    :func:`sampled_kl`; that needs ``kind="forward_kl"`` and ``temperature=1`` (ValueError
    otherwise), and a tail that is None or all NaN.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if teacher_counts is not None:
        _check_sampled(kind, temperature, teacher_tail_logprobs)
    if alpha == 0.0:
        if teacher_counts is not None:
            return sampled_kl(
                student_logits,
                teacher_token_ids,
                teacher_counts,
                teacher_logprobs,
                mask,
                chunk_size=chunk_size,
            )
        return _kd_loss(
            kind,
            student_logits,
            teacher_token_ids,
            teacher_logprobs,
            mask,
            beta,
            temperature,
            chunk_size,
            teacher_tail_logprobs,
        )
    if labels is None:
        raise ValueError("alpha > 0 mixes in cross-entropy on labels: pass labels")
    _check_options(temperature, chunk_size, beta)
    logits, ids, lp, kd_counts = _flatten(student_logits, teacher_token_ids, teacher_logprobs, mask)
    tail = _flatten_tail(teacher_tail_logprobs, student_logits)
    counts = (
        None
        if teacher_counts is None
        else _flatten_counts(teacher_counts, teacher_token_ids, student_logits)
    )
    vocab = logits.shape[-1]
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels must be {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    targets = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
    ce_counts = targets != ignore_index
    if bool((ce_counts & ((targets < 0) | (targets >= vocab))).any()):
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index ({ignore_index})")
    if alpha == 1.0:
        kd_counts = torch.zeros_like(kd_counts)  # no KD term: skip its work entirely

    rows = (kd_counts | ce_counts).nonzero().squeeze(1)
    kd_rows = kd_counts.nonzero().squeeze(1)
    kd_per_row = (
        _kd_chunk_fn(ids, lp, vocab, kd_rows, kind, beta, temperature, tail)
        if counts is None
        else _sampled_chunk_fn(ids, counts, lp, vocab, kd_rows)
    )
    kd_scale = (1.0 - alpha) / max(kd_rows.numel(), 1)
    ce_scale = alpha / max(int(ce_counts.sum()), 1)

    def fn(z: Tensor, idx: Tensor) -> Tensor:
        # Each term runs on its own rows of the chunk, so no garbage row can leak a NaN into it.
        ce_sel = ce_counts[idx]
        loss = F.cross_entropy(z[ce_sel], targets[idx[ce_sel]], reduction="sum") * ce_scale
        if alpha < 1.0:
            kd_sel = kd_counts[idx]
            loss = loss + kd_per_row(z[kd_sel], idx[kd_sel]).sum() * kd_scale
        return loss

    return _chunked_sum(logits, rows, fn, chunk_size)
