"""Exact tempered distillation from top-k rows plus the tail captured at T: equal to the dense
tempered divergence at k = V, the dense coarse-bucket one below, and a clear refusal (or the
documented approximation, when asked) at a temperature that was not captured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.client.codecs.tempered import (
    decode_tempered,
    encode_tempered,
    tempered_fields,
    tempered_log_tails,
)
from logitcache.client.errors import FailedPrecondition
from logitcache.server.engine.columns import CapturedColumns, CaptureRequest
from logitcache.server.engine.device_capture import capture_columns, seed_tensor
from logitcache.trainer.losses import DIVERGENCES, forward_kl
from logitcache.trainer.tempered import tempered_distillation_loss, tempered_kd

N, V = 48, 120
TEMPS = (1.0, 2.0, 4.0)


def teacher_and_student(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=gen) * 3, torch.randn(N, V, generator=gen) * 2


def engine_columns(teacher: torch.Tensor, k: int) -> CapturedColumns:
    """What the engine returns for these teacher logits: top-k and log Z at the temperatures."""
    request = CaptureRequest(top_k=k, temperatures=TEMPS)
    targets = torch.full((N,), -1)
    out = capture_columns(teacher, targets, torch.arange(N), seed_tensor(0, N), request)
    return CapturedColumns.split(out.numpy(), request)


def stored_tails(cols: CapturedColumns) -> torch.Tensor:
    """Log tails at each temperature as a store gives them back (encoded and decoded)."""
    exact = tempered_log_tails(cols.top_logprobs, cols.log_normalisers, TEMPS)
    return torch.from_numpy(decode_tempered(encode_tempered(exact, TEMPS), TEMPS))


def dense(teacher: torch.Tensor, student: torch.Tensor, t: float, kind: str) -> torch.Tensor:
    p = torch.log_softmax(teacher.double() / t, -1)
    q = torch.log_softmax(student.double() / t, -1)
    return DIVERGENCES[kind](p, q, 0.5).mean() * t**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("t", [2.0, 4.0])
def test_tempered_loss_at_full_vocabulary_is_the_dense_one(kind: str, t: float) -> None:
    teacher, student = teacher_and_student()
    cols = engine_columns(teacher, V)
    tails = stored_tails(cols)
    assert (tails < -15).all()  # nothing is left outside at k = V but float32 rounding
    student.requires_grad_(True)
    got = tempered_distillation_loss(student, torch.from_numpy(cols.top_ids),
                                     torch.from_numpy(cols.top_logprobs), t, captured=TEMPS,
                                     tempered_log_tails=tails, kind=kind)  # fmt: skip
    want = dense(teacher, student, t, kind)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got, student)
    (g_want,) = torch.autograd.grad(dense(teacher, student, t, kind), student)
    torch.testing.assert_close(g_got.double(), g_want.double(), atol=1e-6, rtol=1e-4)


def test_top_k_plus_captured_tail_is_the_dense_coarse_bucket_divergence() -> None:
    """At k < V: the stored tail is the dense tempered mass outside the top-k (within the
    codec's 1/128 nats), and the loss is the dense tempered KL with everything outside the top-k
    pooled into one bucket on both sides; the renormalised top-k (tail dropped) is not."""
    k, t = 8, 2.0
    teacher, student = teacher_and_student(1)
    cols = engine_columns(teacher, k)
    tails = stored_tails(cols)
    p = torch.softmax(teacher.double() / t, -1)
    ids = torch.from_numpy(cols.top_ids).long()
    outside = 1 - p.gather(1, ids).sum(1)
    assert (tails[:, 1].double() - outside.log()).abs().max() <= 1 / 128 + 1e-6
    got = tempered_kd(student, ids, torch.from_numpy(cols.top_logprobs), tails[:, 1], t)
    q = torch.softmax(student.double() / t, -1)
    p_b = torch.cat([p.gather(1, ids), outside[:, None]], 1)
    q_b = torch.cat([q.gather(1, ids), (1 - q.gather(1, ids).sum(1))[:, None]], 1)
    want = (p_b * (p_b.log() - q_b.log())).sum(1).mean() * t**2
    assert abs(got.item() - want.item()) <= 0.01 * want.item()
    dropped = forward_kl(student, ids, torch.from_numpy(cols.top_logprobs), None, temperature=t)
    assert abs(dropped.item() - want.item()) > 0.05 * want.item()


def test_a_temperature_not_captured_is_refused_or_approximated_on_request() -> None:
    teacher, student = teacher_and_student(2)
    cols = engine_columns(teacher, 8)
    ids, lp = torch.from_numpy(cols.top_ids), torch.from_numpy(cols.top_logprobs)
    with pytest.raises(FailedPrecondition, match="temperature 3 was not captured"):
        tempered_distillation_loss(student, ids, lp, 3.0, captured=TEMPS,
                                   tempered_log_tails=stored_tails(cols))  # fmt: skip
    approx = tempered_distillation_loss(student, ids, lp, 3.0, captured=TEMPS, approximate=True)
    torch.testing.assert_close(approx, forward_kl(student, ids, lp, None, temperature=3.0))


def test_tempered_tail_arrays_round_trip() -> None:
    tails = np.array([[-0.0, -np.inf, -3.2], [-12.5, -1e-9, -700.0]])
    fields = tempered_fields((0.5, 2.0, 4.0))
    assert [f.name for f in fields] == ["tail_q_t0.5", "tail_q_t2", "tail_q_t4"]
    arrays = encode_tempered(tails, (0.5, 2.0, 4.0))
    assert all(a.dtype == np.uint16 and a.shape == (2,) for a in arrays.values())
    back = decode_tempered(arrays, (0.5, 2.0, 4.0))
    assert np.isneginf(back[0, 1])
    finite = np.isfinite(tails)
    assert np.abs(back[finite] - tails[finite]).max() <= 1 / 128 + 1e-6
