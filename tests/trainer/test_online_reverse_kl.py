"""The online reverse KL on the student's top-m, with the demo teacher scored on the reference
engine's engine-side path (``CaptureRequest.scoring``): at m = V it is the dense reverse KL, value
and gradient; below V it is a lower bound (the tail bucket). Through the service: see
tests/server/test_score_ids.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.server.engine.columns import CaptureRequest
from logitcache.server.engine.reference import TransformersReference
from logitcache.trainer.online import Scorer, online_reverse_kl, student_top_ids

VOCAB = 1785


@pytest.fixture(scope="module")
def reference(demo_teacher: Path) -> TransformersReference:
    return TransformersReference(demo_teacher)


def engine_scorer(reference: TransformersReference) -> Scorer:
    """Scores ids as the server does, on the engine's path, without its bound on ids."""

    def score(sequences: list[np.ndarray], ids: list[np.ndarray]) -> list[np.ndarray]:
        return [
            reference.capture_columns(s, CaptureRequest().scoring(i)).scored_logprobs
            for s, i in zip(sequences, ids, strict=True)
        ]

    return score


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded sequences (lengths 9 and 5) and a student's logits on them."""
    rng = np.random.default_rng(seed)
    input_ids = torch.from_numpy(rng.integers(4, VOCAB, (2, 9)))
    attention_mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    input_ids[1, 5:] = 0
    logits = torch.randn(2, 9, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    return input_ids, attention_mask, logits.requires_grad_()


def dense_reverse_kl(reference, input_ids, attention_mask, logits) -> torch.Tensor:
    log_q = logits.float().log_softmax(-1)
    log_p = torch.stack([reference.full_logprobs(ids.numpy()) for ids in input_ids])
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)
    mask = attention_mask.bool()
    return per_position[mask].mean()


def test_at_m_equal_v_it_is_the_dense_reverse_kl(reference) -> None:
    input_ids, attention_mask, logits = batch(0)
    loss = online_reverse_kl(logits, input_ids, attention_mask, engine_scorer(reference), m=VOCAB)
    (grad,) = torch.autograd.grad(loss, logits)
    dense = dense_reverse_kl(reference, input_ids, attention_mask, logits)
    (dense_grad,) = torch.autograd.grad(dense, logits)
    torch.testing.assert_close(loss, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-3, atol=1e-7)
    assert float(grad[1, 5:].abs().sum()) == 0  # padding positions do not count


def test_below_v_it_bounds_the_dense_reverse_kl_from_below(reference) -> None:
    input_ids, attention_mask, logits = batch(1)
    score = engine_scorer(reference)
    with torch.no_grad():
        dense = dense_reverse_kl(reference, input_ids, attention_mask, logits)
        losses = [float(online_reverse_kl(logits, input_ids, attention_mask, score, m=m))
                  for m in (4, 64, 256)]  # fmt: skip
    assert all(0 < loss <= float(dense) + 1e-5 for loss in losses)
    assert losses[-1] > losses[0]  # more of the student's support: closer to the dense value


def test_the_ids_are_the_students_top_m() -> None:
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0]]])
    assert student_top_ids(logits, 2).tolist() == [[[1, 3]]]
