"""Reverse KL on the student's own support, with the teacher scored online through the service.

A cache of the teacher's top-k holds the teacher's mass where the teacher puts it; reverse KL
(mode-seeking, MiniLLM) weights by the student's mass instead, so what it needs is the teacher's
log-probs at the ids the *student* finds likely, and those change every step. Each step takes the
student's top-m ids per position, asks the service for the teacher's log-probs of exactly those
ids (``Client.score_ids``: the teacher's full log-softmax, computed next to its logits, at the
ids asked for), and evaluates

    KL(q || p) over the m ids plus one tail bucket,
    = sum_{i in S} q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail)

with ``q = softmax(z)`` over the whole vocabulary, ``S`` the student's top-m, ``q_tail = 1 -
sum_S q_i`` and ``p_tail = 1 - sum_S p_i`` (exact: the scored p_i are the teacher's own
normalised values). This is :func:`logitcache.trainer.losses.reverse_kl` on the student's ids
(the tail bucket, its floor and its exact student tail are documented there): the tail keeps
the estimate a divergence between two distributions, so it is never above the dense reverse KL
(data-processing inequality) and equals it at m = V; a renormalised top-m would instead reward
a student that moves mass out of its own top-m. It is differentiable in the student's logits;
the chosen ids are not (a top-k's indices carry no gradient), and the teacher is a constant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from logitcache.trainer.losses import reverse_kl

# Scores ids: per sequence (token ids [T]) an int [T, m] array of ids (< 0: none), answered with
# per sequence float [T, m] teacher log-probs (-inf where no id).
Scorer = Callable[[list[np.ndarray], list[np.ndarray]], list[np.ndarray]]


def service_scorer(client: Any, *, teacher: str | None = None, use: Any = None) -> Scorer:
    """A :data:`Scorer` over a :class:`~logitcache.client.Client` (its ``score_ids``)."""

    def score(sequences: list[np.ndarray], ids: list[np.ndarray]) -> list[np.ndarray]:
        return [s.logprobs for s in client.score_ids(sequences, ids, teacher=teacher, use=use)]

    return score


def student_top_ids(student_logits: Tensor, m: int) -> Tensor:
    """int64 [B, T, m]: the student's m most probable ids per position (no gradient)."""
    return torch.topk(student_logits.detach(), m, dim=-1).indices


def teacher_logprobs_at(
    score: Scorer, input_ids: Tensor, attention_mask: Tensor, ids: Tensor
) -> Tensor:
    """float32 [B, T, m]: the teacher's log-probs of ``ids`` [B, T, m] after each position of
    the right-padded rows of ``input_ids`` [B, T] (``attention_mask`` 1 on real tokens); -inf
    on padding positions."""
    lengths = attention_mask.sum(dim=1).tolist()
    tokens, chosen = input_ids.cpu().numpy(), ids.cpu().numpy()
    sequences = [tokens[b, :n] for b, n in enumerate(lengths)]
    scored = score(sequences, [chosen[b, :n] for b, n in enumerate(lengths)])
    out = np.full(chosen.shape, -np.inf, dtype=np.float32)
    for b, (n, lp) in enumerate(zip(lengths, scored, strict=True)):
        out[b, :n] = lp
    return torch.from_numpy(out).to(ids.device)


def online_reverse_kl(
    student_logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    score: Scorer,
    *,
    m: int = 64,
    mask: Tensor | None = None,
    chunk_size: int | None = 4096,
) -> Tensor:
    """Reverse KL(student || teacher) over the student's top-``m`` ids plus a tail bucket, the
    teacher scored by ``score`` (:func:`service_scorer`); mean over the positions of ``mask``
    [B, T] (default: the real tokens of ``attention_mask``). ``m`` is at most the server's
    bound on ids per position (256)."""
    ids = student_top_ids(student_logits, m)
    teacher = teacher_logprobs_at(score, input_ids, attention_mask, ids)
    counted = attention_mask.bool() if mask is None else mask.bool() & attention_mask.bool()
    return reverse_kl(student_logits, ids, teacher, counted, chunk_size=chunk_size)
