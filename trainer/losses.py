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
  full relative precision and is exactly empty (-inf) when the ids cover the vocabulary. It is
  summed in the chunk's own buffer (no masked copy, see "Memory").
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

Memory and the chunked engine
-----------------------------
Every loss here runs through one engine, :class:`_ChunkedLoss`, in the manner of Liger-Kernel's
fused linear losses. Only the positions that count (KD or CE) are processed, ``chunk_size`` of
them at a time. For each chunk the engine

1. takes the chunk's teacher rows (indexed, cast and masked per chunk: the caller's [N, k]
   tensors are never copied whole) and turns them into the teacher's side of the divergence
   (buckets, tempered entries or draw weights) before the chunk's logits exist;
2. computes its logits ``z [c, V]``: a slice of the given logits (:func:`distillation_loss`), or
   ``hidden[chunk] @ W.T`` (:func:`fused_distillation_loss`), so [N, V] logits never exist;
3. turns z, in place, into what the loss needs from it: the student's log-probabilities at the
   teacher's ids and at the label, and its log-mass outside the teacher's ids (the tail), with
   exact sums of positive terms (no ``1 - Q_k`` cancellation);
4. evaluates the divergence (a row of :data:`DIVERGENCES`) and the CE term on those [c, k + 2]
   numbers, with autograd on that small graph only;
5. turns z's buffer, in place, into dL/dz in closed form (one pass: ``softmax(z)`` scaled per
   row, plus k + 1 scattered entries), and from it the chunk's gradient of the logits, or of
   ``hidden`` and ``W`` (two matmuls), which is accumulated; then the chunk's buffer is dropped.

``backward`` only scales the accumulated gradients. So a training step holds one [c, V] buffer
at a time (each chunk runs in a call of its own, so its buffers are freed before the next
chunk's are made) and, beside it, a few [c, k] tensors; the teacher's side costs memory in k,
not V. The gradient is computed eagerly whenever an input requires grad and grad mode is on,
and the loss is differentiable once (no double backward). With ``W`` in half precision its
gradient is accumulated in fp32 and cast at the end. A chunk's cost is a few passes over its
[c, V] buffer, the same as a cross-entropy's (:func:`fused_cross_entropy` is this engine with
CE only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from logitcache.trainer.collate import IGNORE_INDEX, TeacherTargets

__all__ = [
    "DIVERGENCES",
    "KINDS",
    "TAIL_FLOOR",
    "ItemCounts",
    "Kind",
    "TeacherTargets",
    "check_options",
    "distillation_loss",
    "forward_kl",
    "fused_cross_entropy",
    "fused_distillation_loss",
    "item_counts",
    "jsd",
    "log1mexp",
    "reverse_kl",
    "sampled_kl",
]

Kind = Literal["forward_kl", "reverse_kl", "jsd"]

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
    # One expression: each temporary is freed as soon as the next one is made (a chunk's memory).
    return torch.where(present, log_a.exp() * (log_a - torch.where(present, log_b, 0.0)), 0.0)


# --- the divergences: teacher p, student q as log-probs over the last dim -> one value per row ----


def _forward_kl(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return _weighted_log_ratio(log_p, log_q).sum(-1)


def _reverse_kl(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return _weighted_log_ratio(log_q, log_p).sum(-1)


def _jsd(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
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


Divergence = Callable[[Tensor, Tensor, float], Tensor]
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
}
KINDS: tuple[str, ...] = tuple(DIVERGENCES)


# --- the teacher's side as buckets ------------------------------------------------------------------


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


# --- the student's side: a chunk's logits to the numbers the losses need, and back ----------------


def _zero_listed(buf: Tensor, ids: Tensor, listed: Tensor) -> None:
    """``buf[r, ids[r, j]] = 0`` where ``listed``; every other entry stays as it is.

    A min-reduction with 0 at the listed slots and +inf at the others, so an unlisted slot
    (padding, the label) that names a listed column, or any column, changes nothing whatever the
    order of the collisions, and no [c, m] index or gathered copy of ``buf`` is needed.
    """
    keep = torch.full(ids.shape, math.inf, dtype=buf.dtype, device=buf.device)
    buf.scatter_reduce_(1, ids, keep.masked_fill_(listed, 0.0), "amin")


@dataclass
class _StudentSide:
    """One chunk after :func:`_student_side`: what its closed-form gradient needs."""

    buffer: Tensor  # [c, V] exp(z - max), 0 at the listed ids (the chunk's logits, reused)
    ids: Tensor  # [c, m] the gathered columns
    listed: Tensor  # [c, m] which of them are the teacher's bucket ids
    total: Tensor  # [c] sum of exp(z - max) over the vocabulary
    outside: Tensor  # [c] ... over the columns not listed


def _student_side(z: Tensor, ids: Tensor, listed: Tensor) -> tuple[_StudentSide, Tensor, Tensor]:
    """(side, log q at ``ids`` [c, m], log of q's mass outside the listed ids [c]).

    ``z`` [c, V] is consumed: it becomes the side's buffer. Both sums are of positive terms, so
    the tail keeps full relative precision (and is -inf exactly when nothing is outside).
    """
    top = z.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    shifted_ids = z.gather(1, ids).sub_(top)
    buffer = z.sub_(top).exp_()
    total = buffer.sum(-1)
    _zero_listed(buffer, ids, listed)
    outside = buffer.sum(-1)
    log_total = total.log()
    side = _StudentSide(buffer, ids, listed, total, outside)
    return side, shifted_ids.sub_(log_total.unsqueeze(-1)), outside.log() - log_total


def _student_grad(side: _StudentSide, log_q: Tensor, grad_q: Tensor, grad_tail: Tensor) -> Tensor:
    """dL/dz [c, V], written into the side's buffer, from dL/d(log q at ids) and dL/d(log tail).

    With s = softmax(z), G = sum(grad_q) + grad_tail: dz = scatter(grad_q) - G s
    + grad_tail * s / q_tail outside the listed ids. The buffer is 0 at the listed ids, so their
    ``- G s`` (s there is exp(log q)) is added by the same ``scatter_add_`` as ``grad_q``.
    """
    g = (grad_q.sum(-1) + grad_tail).unsqueeze(-1)
    per_outside = torch.where(side.outside > 0, grad_tail / side.outside, 0.0)
    dz = side.buffer.mul_(per_outside.unsqueeze(-1) - g / side.total.unsqueeze(-1))
    at_ids = log_q.detach().exp().mul_(g).neg_().masked_fill_(~side.listed, 0.0).add_(grad_q)
    return dz.scatter_add_(1, side.ids, at_ids)


# --- what each position is scored against -----------------------------------------------------------


class ItemCounts(NamedTuple):
    """Divisors of the two terms: the KD positions and the CE labels a mean is taken over.

    The default is this batch's own counts. For gradient accumulation pass the counts of all the
    micro-batches of the step (and of all ranks, times the world size, where gradients are
    averaged), so that every position weighs the same (transformers' ``num_items_in_batch``).
    """

    kd: int | Tensor
    ce: int | Tensor


def item_counts(targets: TeacherTargets, ignore_index: int = IGNORE_INDEX) -> ItemCounts:
    """The positions with a teacher row and the labels of ``targets`` (sum these over batches)."""
    kd = targets.token_ids[..., 0].numel() if targets.mask is None else targets.mask.sum()
    ce = 0 if targets.labels is None else (targets.labels != ignore_index).sum()
    return ItemCounts(kd, ce)


class _Chunk(NamedTuple):
    """A chunk's rows of a :class:`_Plan`, gathered once: everything its loss reads.

    The teacher's side is final here (buckets, tempered, or draw weights), computed before the
    chunk's [c, V] logits exist, and the raw rows it came from are already dropped.
    """

    idx: Tensor  # [c] the rows
    columns: Tensor  # [c, m] int64 in [0, V): the teacher's ids (padding clamped), then the label
    listed: Tensor  # [c, m] which columns are the teacher's bucket ids
    valid: Tensor | None  # [c, k] the entries holding teacher mass (drawn ones for sampled rows)
    teacher: Tensor | None  # log p: [c, k + 1] buckets (T = 1), [c, k] tempered (T != 1), or
    #                         [c, k] at the draws, 0 elsewhere (sampled); None: no KD
    draws: Tensor | None  # [c, k] c_j / U, sampled rows only


@dataclass(frozen=True)
class _Plan:
    """The targets flattened to N rows, checked, and weighted; scores one chunk at a time.

    The teacher's [N, k] tensors are the caller's (no whole-batch copy, cast or mask): each chunk
    takes its rows, casts and masks them (:meth:`chunk`), so their memory is a chunk's.
    """

    ids: Tensor  # [N, k] the caller's ids, any integer dtype (padding may be out of range)
    logprobs: Tensor  # [N, k] the caller's log-probs, any float dtype
    kd_rows: Tensor  # [N] bool: the rows whose teacher counts (all False without KD)
    tail: Tensor | None  # [N] explicit log tail, NaN: derive it (and off KD rows); only at T = 1
    counts: Tensor | None  # [N, k] the caller's draw counts (sampled rows)
    labels: Tensor | None  # [N] int64 in [0, V); present when CE is mixed in
    kd_weight: Tensor | None  # [N] (1 - alpha) / n_kd on KD rows, 0 elsewhere; None: no KD
    ce_weight: Tensor | None  # [N] alpha / n_ce on labelled rows, 0 elsewhere; None: no CE
    rows: Tensor  # the rows with a nonzero weight
    dtype: torch.dtype  # the compute dtype
    vocab: int
    kind: str
    beta: float
    temperature: float

    def chunk(self, idx: Tensor) -> _Chunk:
        """Rows ``idx`` of the targets; rows without KD get an empty teacher (NaN-free terms)."""
        parts, listed = [], []
        valid = teacher = draws = None
        if self.kd_weight is not None:
            # Indexing copies, so the in-place clamp and masks leave the caller's tensors intact.
            parts.append(self.ids[idx].to(torch.long).clamp_(0, self.vocab - 1))
            without = ~self.kd_rows[idx].unsqueeze(-1)
            lp = self.logprobs[idx].to(self.dtype).masked_fill_(without, _NEG_INF)
            if self.counts is not None:  # (1 / U) sum_j c_j (lp_j - log q(id_j))
                counts = self.counts[idx].masked_fill_(without, 0)
                valid = counts > 0
                draws = counts.to(self.dtype)
                draws = draws / draws.sum(-1, keepdim=True).clamp(min=1.0)
                teacher = lp.masked_fill_(~valid, 0.0)  # padding's -inf (or NaN) stays out
            else:
                valid = lp > _NEG_INF  # False for -inf padding (and NaN)
                if self.temperature == 1.0:
                    tail = None if self.tail is None else self.tail[idx]
                    teacher = _teacher_buckets(lp, valid, tail)
                else:
                    teacher = _masked_log_softmax(lp / self.temperature, valid)
            buckets = draws is None and self.temperature == 1.0
            listed.append(valid if buckets else torch.zeros_like(valid))
        if self.labels is not None:
            labels = self.labels[idx].unsqueeze(-1)
            parts.append(labels)
            listed.append(torch.zeros_like(labels, dtype=torch.bool))
        columns, bucket_ids = (
            (parts[0], listed[0])
            if len(parts) == 1
            else (torch.cat(parts, -1), torch.cat(listed, -1))
        )
        return _Chunk(idx, columns, bucket_ids, valid, teacher, draws)

    def chunk_loss(self, chunk: _Chunk, log_q: Tensor, log_tail: Tensor) -> Tensor:
        """The chunk's weighted sum of KD and CE terms, from :func:`_student_side`'s outputs."""
        loss = log_q.new_zeros(())
        if self.kd_weight is not None:
            per_row = self._kd_rows(chunk, log_q[:, : self.ids.shape[-1]], log_tail)
            loss = loss + (per_row * self.kd_weight[chunk.idx]).sum()
        if self.ce_weight is not None:
            loss = loss - (log_q[:, -1] * self.ce_weight[chunk.idx]).sum()
        return loss

    def _kd_rows(self, chunk: _Chunk, log_q: Tensor, log_tail: Tensor) -> Tensor:
        valid, teacher = chunk.valid, chunk.teacher
        assert valid is not None and teacher is not None
        if chunk.draws is not None:
            return torch.where(valid, chunk.draws * (teacher - log_q), 0.0).sum(-1)
        divergence = DIVERGENCES[self.kind]
        if self.temperature == 1.0:
            student = torch.cat(
                [torch.where(valid, log_q, _NEG_INF), _floored(log_tail).unsqueeze(-1)], -1
            )
            return divergence(teacher, student, self.beta)
        # log q is z - lse per row: its softmax over the ids at T is z's, the lse cancels.
        t = self.temperature
        return divergence(teacher, _masked_log_softmax(log_q / t, valid), self.beta) * t**2


# --- the chunked engine ------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(rows: Tensor, chunk_size: int | None) -> Sequence[Tensor]:
    if rows.numel() == 0:
        return ()
    return (rows,) if chunk_size is None else rows.split(chunk_size)


class _Gradients:
    """Buffers for the gradients the engine accumulates chunk by chunk during forward."""

    def __init__(self, inputs: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
        def buffer(t: Tensor | None) -> Tensor | None:
            if t is None or not t.requires_grad:
                return None
            half = t.dtype in (torch.float16, torch.bfloat16) and t is not inputs
            return torch.zeros(t.shape, dtype=torch.float32 if half else t.dtype, device=t.device)

        self.weight_in = weight
        self.inputs, self.weight, self.bias = buffer(inputs), buffer(weight), buffer(bias)

    def add(self, idx: Tensor, x: Tensor, dz: Tensor) -> None:
        """Chunk ``idx`` with inputs ``x`` and logits gradient ``dz``."""
        w = self.weight_in
        if w is None:  # the inputs are the logits
            if self.inputs is not None:
                self.inputs.index_copy_(0, idx, dz.to(self.inputs.dtype))
            return
        dz_w = dz.to(w.dtype)
        if self.inputs is not None:
            self.inputs.index_copy_(0, idx, (dz_w @ w).to(self.inputs.dtype))
        if self.weight is not None:
            x_w = x.to(w.dtype)
            if self.weight.dtype == w.dtype:
                self.weight.addmm_(dz_w.t(), x_w)
            else:
                self.weight.add_(dz_w.t() @ x_w)
        if self.bias is not None:
            self.bias.add_(dz.sum(0))

    def results(self, weight: Tensor | None, bias: Tensor | None) -> list[Tensor | None]:
        def cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
            return g if g is None or like is None else g.to(like.dtype)

        return [self.inputs, cast(self.weight, weight), cast(self.bias, bias)]


def _run_chunks(
    inputs: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    plan: _Plan,
    chunk_size: int | None,
    gradients: _Gradients | None,
) -> Tensor:
    """The summed loss over ``plan.rows``, chunk by chunk; accumulates into ``gradients``."""
    total = torch.zeros((), dtype=plan.dtype, device=inputs.device)
    for idx in _chunks(plan.rows, chunk_size):
        # One call per chunk: its [c, V] buffer is freed before the next chunk allocates its own.
        total += _run_chunk(inputs, weight, bias, plan, plan.chunk(idx), gradients)
    return total


def _run_chunk(
    inputs: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    plan: _Plan,
    chunk: _Chunk,
    gradients: _Gradients | None,
) -> Tensor:
    """The chunk's loss (no graph); adds its gradients to ``gradients``."""
    x = inputs.index_select(0, chunk.idx)
    # index_select copied x: consuming it as the chunk's buffer leaves the caller's intact.
    z = (x if weight is None else F.linear(x, weight, bias)).to(plan.dtype)
    side, log_q, log_tail = _student_side(z, chunk.columns, chunk.listed)
    if gradients is None:
        return plan.chunk_loss(chunk, log_q, log_tail)
    with torch.enable_grad():
        log_q.requires_grad_(True)
        log_tail.requires_grad_(True)
        loss = plan.chunk_loss(chunk, log_q, log_tail)
    if loss.requires_grad:
        grad_q, grad_tail = torch.autograd.grad(
            loss, (log_q, log_tail), allow_unused=True, materialize_grads=True
        )
    else:  # a term that is constant in the student (jsd at beta 0 or 1)
        grad_q, grad_tail = torch.zeros_like(log_q), torch.zeros_like(log_tail)
    gradients.add(chunk.idx, x, _student_grad(side, log_q, grad_q, grad_tail))
    return loss.detach()


class _ChunkedLoss(torch.autograd.Function):
    """The engine as one autograd node: forward computes the gradients, backward scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        inputs: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        plan: _Plan,
        chunk_size: int | None,
    ) -> Tensor:
        gradients = _Gradients(inputs, weight, bias)
        total = _run_chunks(inputs, weight, bias, plan, chunk_size, gradients)
        results = gradients.results(weight, bias)
        ctx.present = [g is not None for g in results]
        ctx.save_for_backward(*[g for g in results if g is not None])
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        if grad_total.item() != 1.0:  # the usual loss.backward() needs no second buffer
            grads = [None if g is None else g * grad_total.to(g.dtype) for g in grads]
        return (*grads, None, None)


def _evaluate(
    inputs: Tensor, weight: Tensor | None, bias: Tensor | None, plan: _Plan, chunk_size: int | None
) -> Tensor:
    tracked = [t for t in (inputs, weight, bias) if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and tracked:
        return _ChunkedLoss.apply(inputs, weight, bias, plan, chunk_size)
    with torch.no_grad():
        return _run_chunks(inputs, weight, bias, plan, chunk_size, None)


# --- argument handling ----------------------------------------------------------------------------


def check_options(
    kind: str = "forward_kl",
    alpha: float = 0.0,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> None:
    """ValueError for options no loss accepts (callers check them when a job is set up)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def _check_ids(ids: Tensor, listed: Tensor, vocab: int, padding: str) -> None:
    out_of_range = listed & ((ids < 0) | (ids >= vocab))
    if bool(out_of_range.any()):
        raise ValueError(
            f"teacher_token_ids holds ids outside [0, {vocab}) at non-padding entries "
            f"(only entries whose {padding} may hold arbitrary ids)"
        )


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


def _flat_rows(
    t: Tensor | None, lead: torch.Size, name: str, device: torch.device
) -> Tensor | None:
    if t is None:
        return None
    if t.shape != lead:
        raise ValueError(f"{name} must be {tuple(lead)}, got {tuple(t.shape)}")
    return t.detach().reshape(-1).to(device)


def _divisor(given: int | Tensor | None, counted: Tensor, dtype: torch.dtype) -> Tensor:
    n = counted.sum() if given is None else torch.as_tensor(given, device=counted.device)
    return n.to(dtype).clamp(min=1.0)


def _plan(
    targets: TeacherTargets,
    lead: torch.Size,
    vocab: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
    ignore_index: int,
    num_items: ItemCounts | None,
) -> _Plan:
    """Check ``targets`` against the student's [*lead, V]; flatten them into a :class:`_Plan`."""
    ids_in, lp_in = targets.token_ids, targets.logprobs
    if ids_in.shape != lp_in.shape or lp_in.shape[:-1] != lead:
        raise ValueError(
            f"teacher_token_ids {tuple(ids_in.shape)} and teacher_logprobs "
            f"{tuple(lp_in.shape)} must both be {(*lead, 'k')} for student positions {tuple(lead)}"
        )
    k, n = lp_in.shape[-1], lead.numel()
    # No cast here: each chunk casts its own rows (_Plan.chunk), so no [N, k] copy is made.
    ids = ids_in.reshape(n, k).to(device=device)
    lp = lp_in.detach().reshape(n, k).to(device=device)
    mask = _flat_rows(targets.mask, lead, "mask", device)
    kd_rows = torch.ones(ids.shape[0], dtype=torch.bool, device=device) if mask is None else (
        mask.to(torch.bool)
    )  # fmt: skip
    tail = _flat_rows(targets.tail_logprobs, lead, "teacher_tail_logprobs", device)
    counts = None
    if targets.counts is not None:
        if targets.counts.shape != ids_in.shape:
            raise ValueError(
                f"teacher_counts {tuple(targets.counts.shape)} must match teacher_token_ids "
                f"{tuple(ids_in.shape)}"
            )
        if targets.counts.is_floating_point() or targets.counts.is_complex():
            raise ValueError(f"teacher_counts must be integers, got {targets.counts.dtype}")
        counts = targets.counts.reshape(n, k).to(device=device)
        _check_sampled(kind, temperature, tail)
        tail = None
    if tail is not None:
        tail = tail.to(dtype) if temperature == 1.0 else None  # the tail is dropped at T != 1

    labels = ce_weight = None
    if alpha > 0.0:
        if targets.labels is None:
            raise ValueError("alpha > 0 mixes in cross-entropy on labels: pass labels")
        flat = _flat_rows(targets.labels, lead, "labels", device)
        assert flat is not None
        labels = flat.to(torch.long)
        ce_rows = labels != ignore_index
        if bool((ce_rows & ((labels < 0) | (labels >= vocab))).any()):
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index ({ignore_index})")
        labels = torch.where(ce_rows, labels, 0)
        n_ce = _divisor(None if num_items is None else num_items.ce, ce_rows, dtype)
        ce_weight = ce_rows.to(dtype) * (alpha / n_ce)
    else:
        ce_rows = torch.zeros_like(kd_rows)
    kd_weight = None
    if alpha < 1.0:
        _check_kd_rows(ids, lp, tail, counts, kd_rows, vocab)
        n_kd = _divisor(None if num_items is None else num_items.kd, kd_rows, dtype)
        kd_weight = kd_rows.to(dtype) * ((1.0 - alpha) / n_kd)
        if tail is not None:  # no explicit tail off the KD rows (their teacher is empty)
            tail = torch.where(kd_rows, tail, math.nan)
    else:
        kd_rows = torch.zeros_like(kd_rows)
    return _Plan(
        ids=ids, logprobs=lp, kd_rows=kd_rows, tail=tail, counts=counts, labels=labels,
        kd_weight=kd_weight, ce_weight=ce_weight, rows=(kd_rows | ce_rows).nonzero().squeeze(1),
        dtype=dtype, vocab=vocab, kind=kind, beta=beta, temperature=temperature,
    )  # fmt: skip


def _check_kd_rows(
    ids: Tensor,
    lp: Tensor,
    tail: Tensor | None,
    counts: Tensor | None,
    kd_rows: Tensor,
    vocab: int,
) -> None:
    """Refuse teacher values that no padding convention explains, at the rows that count."""
    sel_ids, sel_lp = ids[kd_rows], lp[kd_rows]
    if counts is None:
        _check_ids(sel_ids, sel_lp > _NEG_INF, vocab, "teacher_logprobs is -inf")
        if tail is not None and bool((tail[kd_rows] == math.inf).any()):
            raise ValueError(
                "teacher_tail_logprobs must be a log-probability, -inf or NaN, not +inf"
            )
        return
    sel_counts = counts[kd_rows]
    if bool((sel_counts < 0).any()):
        raise ValueError("teacher_counts must be >= 0 (0 marks padding)")
    drawn = sel_counts > 0
    _check_ids(sel_ids, drawn, vocab, "teacher_counts is 0")
    if not bool(torch.isfinite(sel_lp[drawn]).all()):
        raise ValueError(
            "teacher_logprobs must be finite at drawn entries (teacher_counts > 0): the teacher "
            "cannot have drawn a token it gives no probability"
        )


# --- public losses --------------------------------------------------------------------------------


def distillation_loss(
    student_logits: Tensor,
    teacher_token_ids: Tensor | TeacherTargets,
    teacher_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = 4096,
    teacher_tail_logprobs: Tensor | None = None,
    teacher_counts: Tensor | None = None,
    num_items: ItemCounts | None = None,
) -> Tensor:
    """``(1 - alpha) * KD + alpha * CE`` from the student's logits [..., V].

    ``distillation_loss(logits, TeacherTargets.from_batch(batch), alpha=0.1)``, or with the
    tensors one by one (``teacher_token_ids, teacher_logprobs, mask, labels``, and
    ``teacher_tail_logprobs`` / ``teacher_counts``). KD is ``kind`` (forward_kl, reverse_kl or jsd
    with ``beta``), averaged over the masked positions; with counts the rows are sampled and KD is
    :func:`sampled_kl` (``kind="forward_kl"``, ``temperature=1`` and no tail, ValueError
    otherwise). CE is the next-token cross-entropy of the untempered logits against ``labels``
    (already aligned with the logits' positions), averaged over labels != ``ignore_index`` (0 if
    there are none, where ``F.cross_entropy`` would give NaN). ``num_items``: see
    :class:`ItemCounts`. Both terms share one chunked pass over V.
    """
    if isinstance(teacher_token_ids, TeacherTargets):
        given = (teacher_logprobs, mask, labels, teacher_tail_logprobs, teacher_counts)
        if any(t is not None for t in given):
            raise ValueError("pass either TeacherTargets or the teacher tensors, not both")
        targets = teacher_token_ids
    else:
        if teacher_logprobs is None:
            raise ValueError("teacher_logprobs is required with teacher_token_ids")
        targets = TeacherTargets(
            teacher_token_ids, teacher_logprobs, mask, labels, teacher_tail_logprobs,
            teacher_counts,
        )  # fmt: skip
    check_options(kind, alpha, beta, temperature, chunk_size)
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be [..., V], got shape {tuple(student_logits.shape)}"
        )
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    plan = _plan(
        targets, lead, vocab, student_logits.device, _compute_dtype(student_logits.dtype),
        kind=kind, beta=beta, alpha=alpha, temperature=temperature, ignore_index=ignore_index,
        num_items=num_items,
    )  # fmt: skip
    return _evaluate(student_logits.reshape(-1, vocab), None, None, plan, chunk_size)


def fused_distillation_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: TeacherTargets,
    *,
    lm_head_bias: Tensor | None = None,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = 1024,
    num_items: ItemCounts | None = None,
) -> Tensor:
    """:func:`distillation_loss` of the logits ``hidden @ lm_head_weight.T (+ bias)``, which are
    never built: each chunk's logits exist only while that chunk is scored.

    ``hidden`` [..., H] are the student's last hidden states (after its final norm),
    ``lm_head_weight`` [V, H] its output layer. Gradients reach ``hidden``, the weight and the
    bias. The result equals :func:`distillation_loss` on the full logits up to rounding.
    """
    check_options(kind, alpha, beta, temperature, chunk_size)
    if not hidden.is_floating_point() or hidden.dim() < 2:
        raise ValueError(f"hidden must be floating point [..., H], got {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, {hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}"
        )
    lead, vocab = hidden.shape[:-1], lm_head_weight.shape[0]
    plan = _plan(
        targets, lead, vocab, hidden.device, _compute_dtype(hidden.dtype),
        kind=kind, beta=beta, alpha=alpha, temperature=temperature, ignore_index=ignore_index,
        num_items=num_items,
    )  # fmt: skip
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _evaluate(flat, lm_head_weight, lm_head_bias, plan, chunk_size)


def fused_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = 1024,
    num_items: int | Tensor | None = None,
) -> Tensor:
    """Next-token cross-entropy of ``hidden @ lm_head_weight.T`` against ``labels``, chunked like
    :func:`fused_distillation_loss` (the same engine with CE only): its baseline."""
    empty = labels.new_zeros((*labels.shape, 0))
    targets = TeacherTargets(empty, empty.float(), labels=labels)
    counts = None if num_items is None else ItemCounts(0, num_items)
    return fused_distillation_loss(
        hidden, lm_head_weight, targets, lm_head_bias=lm_head_bias, alpha=1.0,
        ignore_index=ignore_index, chunk_size=chunk_size, num_items=counts,
    )  # fmt: skip


def _kd(
    kind: Kind,
    student_logits: Tensor,
    targets: TeacherTargets,
    beta: float,
    temperature: float,
    chunk_size: int | None,
) -> Tensor:
    return distillation_loss(
        student_logits, targets, kind=kind, beta=beta, temperature=temperature,
        chunk_size=chunk_size,
    )  # fmt: skip


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
    targets = TeacherTargets(
        teacher_token_ids, teacher_logprobs, mask, tail_logprobs=teacher_tail_logprobs
    )
    return _kd("forward_kl", student_logits, targets, 0.5, temperature, chunk_size)


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
    targets = TeacherTargets(
        teacher_token_ids, teacher_logprobs, mask, tail_logprobs=teacher_tail_logprobs
    )
    return _kd("reverse_kl", student_logits, targets, 0.5, temperature, chunk_size)


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
    targets = TeacherTargets(
        teacher_token_ids, teacher_logprobs, mask, tail_logprobs=teacher_tail_logprobs
    )
    return _kd("jsd", student_logits, targets, beta, temperature, chunk_size)


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
    targets = TeacherTargets(
        teacher_token_ids, teacher_logprobs, teacher_mask, counts=teacher_counts
    )
    return _kd("forward_kl", logits, targets, 0.5, 1.0, chunk_size)
