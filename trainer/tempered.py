"""Exact distillation at temperature T from top-k rows plus the tail mass captured at T.

``losses`` compares teacher and student at T != 1 on the teacher's k ids only, renormalised,
because rows stored at T = 1 cannot say how much tempered mass lies outside them. A capture with
temperatures stores exactly that, ``log t_T`` per position (``client.codecs.tempered``). Then the
teacher's k + 1 buckets at T are exact (the normaliser cancels inside the kept set):

    teacher  p_T = ((1 - t_T) * softmax_kept(lp / T),  t_T)
    student  q_T = (softmax(z / T)[ids],  1 - sum_ids softmax(z / T))
    loss     = T^2 * D(p_T, q_T)

which is the dense tempered divergence coarsened to the kept ids and one tail bucket, and equal to
the dense one when nothing is left outside (k = V). :func:`tempered_distillation_loss` refuses a
temperature that was not captured unless the caller asks for ``approximate=True``: then it is the
documented renormalised top-k objective of ``losses`` (tail dropped). :func:`tempered_batch_loss`
takes a collated batch (``trainer.collate``), whose ``teacher_tempered_log_tails`` and
``teacher_temperatures`` say which temperatures were captured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from logitcache.client.errors import FailedPrecondition
from logitcache.trainer.losses import (
    DIVERGENCES,
    TAIL_FLOOR,
    forward_kl,
    jsd,
    log1mexp,
    reverse_kl,
)

_NEG_INF = float("-inf")


def tempered_teacher_buckets(logprobs: Tensor, log_tail: Tensor, temperature: float) -> Tensor:
    """[..., k + 1] teacher log-probs at T: the kept entries (-inf padding stays -inf) and the
    tail bucket, from log-probs at T = 1 and the captured ``log t_T`` [...] (-inf: no tail)."""
    valid = logprobs > _NEG_INF
    scaled = torch.where(valid, logprobs / temperature, _NEG_INF)
    norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    norm = torch.where(torch.isfinite(norm), norm, 0.0)
    kept = scaled - norm + log1mexp(log_tail.clamp(max=0.0)).unsqueeze(-1)
    tail = torch.logaddexp(log_tail, torch.full_like(log_tail, TAIL_FLOOR).log())
    return torch.cat([kept, tail.unsqueeze(-1)], dim=-1)


def student_buckets(logits: Tensor, ids: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """[..., k + 1] student log-probs at T on the same buckets: softmax(z / T) at the ids, and
    the mass outside them (``logsumexp`` outside minus over all, exact for tiny tails)."""
    z = logits.float() / temperature
    total = torch.logsumexp(z, dim=-1, keepdim=True)
    safe_ids = ids.long().clamp(0, z.shape[-1] - 1)
    at_ids = torch.where(valid, z.gather(-1, safe_ids) - total, _NEG_INF)
    listed = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, safe_ids, valid)
    outside = torch.logsumexp(z.masked_fill(listed, _NEG_INF), dim=-1, keepdim=True) - total
    tail = torch.logaddexp(outside, torch.full_like(outside, TAIL_FLOOR).log())
    return torch.cat([at_ids, tail], dim=-1)


def tempered_kd(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_log_tail: Tensor,
    temperature: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> Tensor:
    """Mean over positions of ``T^2 * D(p_T, q_T)`` on the kept ids plus the tail bucket.

    ``student_logits`` [N, V]; ``teacher_ids``/``teacher_logprobs`` [N, k] (log-probs at T = 1,
    -inf padding); ``teacher_log_tail`` [N], the captured log tail at ``temperature``.
    """
    valid = teacher_logprobs > _NEG_INF
    teacher = tempered_teacher_buckets(teacher_logprobs.float(), teacher_log_tail.float(),
                                       temperature)  # fmt: skip
    student = student_buckets(student_logits, teacher_ids, valid, temperature)
    per_row = DIVERGENCES[kind](teacher, student, beta)
    return per_row.mean() * temperature**2


def tempered_distillation_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    temperature: float,
    *,
    captured: Sequence[float] = (),
    tempered_log_tails: Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    approximate: bool = False,
) -> Tensor:
    """Distillation at ``temperature``: exact over top-k plus tail where the capture stored the
    tail at that temperature (``captured``, ``tempered_log_tails`` [N, len(captured)]).

    A temperature that was not captured raises FailedPrecondition, unless ``approximate``: then
    the loss compares the renormalised top-k at T (the tail dropped; ``losses``' T != 1 rule).
    """
    temps = [float(t) for t in captured]
    if float(temperature) in temps and tempered_log_tails is not None:
        column = tempered_log_tails[..., temps.index(float(temperature))]
        return tempered_kd(student_logits, teacher_ids, teacher_logprobs, column, temperature,
                           kind, beta)  # fmt: skip
    if not approximate:
        have = ", ".join(f"{t:g}" for t in temps) or "none"
        raise FailedPrecondition(
            f"temperature {temperature:g} was not captured (captured: {have}); capture it with "
            "--temperatures, or pass approximate=True for the renormalised top-k at this "
            "temperature (its tail dropped)"
        )
    if kind == "jsd":
        return jsd(student_logits, teacher_ids, teacher_logprobs, None, beta=beta,
                   temperature=temperature)  # fmt: skip
    approximation = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}[kind]
    return approximation(student_logits, teacher_ids, teacher_logprobs, None,
                         temperature=temperature)  # fmt: skip


def tempered_batch_loss(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    temperature: float,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    approximate: bool = False,
) -> Tensor:
    """:func:`tempered_distillation_loss` over the teacher positions of a collated ``batch``
    (``teacher_mask``), with the captured temperatures and tails the batch carries
    (``teacher_temperatures``, ``teacher_tempered_log_tails``; absent: none were captured).
    ``student_logits`` [B, T, V], aligned with the batch."""
    mask = batch["teacher_mask"]
    tails = batch.get("teacher_tempered_log_tails")
    captured = batch.get("teacher_temperatures")
    return tempered_distillation_loss(
        student_logits[mask],
        batch["teacher_token_ids"][mask],
        batch["teacher_logprobs"][mask],
        temperature,
        # float32 in the batch: each back to the shortest decimal, as the capture space has it
        captured=() if captured is None else [float(str(t)) for t in captured.numpy()],
        tempered_log_tails=None if tails is None else tails[mask],
        kind=kind,
        beta=beta,
        approximate=approximate,
    )
