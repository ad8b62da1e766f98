"""The fused loss from hidden states: the same values and gradients as the logits path, and the
dense formula at k = V, without ever holding [N, V] logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from logitcache.trainer import losses
from logitcache.trainer.collate import TeacherTargets

KINDS = ("forward_kl", "reverse_kl", "jsd")
B, T, H, V = 2, 5, 8, 23


def case(seed: int, k: int, dtype: torch.dtype = torch.float32, sampled: bool = False):
    """hidden [B, T, H], weight [V, H], bias [V], targets (top-k with a tail, or sampled)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.7).to(dtype)
    bias = (torch.randn(V, generator=gen) * 0.1).to(dtype)
    full = (torch.randn(B, T, V, generator=gen) * 2.0).log_softmax(-1)
    lp, ids = full.sort(-1, descending=True)
    lp, ids = lp[..., :k].clone(), ids[..., :k].clone()
    lp[0, 1, k - 1] = -math.inf  # a ragged row
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[0, 0] = True
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[1, -1] = -100
    tail = torch.full((B, T), math.nan)
    tail[1, :2] = torch.log1p(-lp[1, :2].exp().sum(-1)).float()  # an explicit tail on some rows
    counts = None
    if sampled:
        counts = torch.randint(0, 4, (B, T, k), generator=gen)
        counts[..., 0] += 1
        counts[lp == -math.inf] = 0  # the padded entry was never drawn
        tail = None
    targets = TeacherTargets(ids, lp, mask, labels, tail, counts)
    return hidden, weight, bias, targets, full


def grads(fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    return value.detach(), list(torch.autograd.grad(value, leaves))


def unfused(targets: TeacherTargets, **options):
    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return losses.distillation_loss(F.linear(h, w, b), targets, **options)

    return fn


def fused(targets: TeacherTargets, **options):
    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return losses.fused_distillation_loss(h, w, targets, lm_head_bias=b, **options)

    return fn


def assert_close(got, want, tol: float) -> None:
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_equals_the_logits_path(kind: str, alpha: float, temperature: float) -> None:
    hidden, weight, bias, targets, _ = case(0, 6)
    options = dict(kind=kind, alpha=alpha, temperature=temperature, chunk_size=3)
    want, want_grads = grads(unfused(targets, **options), hidden, weight, bias)
    got, got_grads = grads(fused(targets, **options), hidden, weight, bias)
    assert_close(got, want, 1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, 1e-5)
    assert want.item() > 0


def test_fused_sampled_equals_the_logits_path() -> None:
    hidden, weight, _, targets, _ = case(1, 5, sampled=True)
    for alpha in (0.0, 0.4):
        want, want_grads = grads(unfused(targets, alpha=alpha), hidden, weight)
        got, got_grads = grads(fused(targets, alpha=alpha, chunk_size=4), hidden, weight)
        assert_close(got, want, 1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert_close(g, w, 1e-5)


def dense(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_at_full_vocabulary_is_the_dense_divergence(
    kind: str, dtype: torch.dtype, tol: float
) -> None:
    hidden, weight, _, _, full = case(2, V, dtype)
    lp, ids = full.sort(-1, descending=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    targets = TeacherTargets(ids, lp, mask)

    def reference(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # the dense formula on the same (rounded) logits, in fp64
        log_q = torch.log_softmax((h @ w.t()).double(), -1)
        return dense(full.double(), log_q, kind).mean()

    want, want_grads = grads(reference, hidden, weight)
    got, got_grads = grads(fused(targets, kind=kind, chunk_size=4), hidden, weight)
    assert got_grads[0].dtype == dtype and got_grads[1].dtype == dtype
    assert_close(got, want, tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w.double(), atol=tol, rtol=10 * tol)


def test_bf16_fused_matches_bf16_logits_path() -> None:
    hidden, weight, _, targets, _ = case(3, 6, torch.bfloat16)
    want, want_grads = grads(unfused(targets, alpha=0.2), hidden, weight)
    got, got_grads = grads(fused(targets, alpha=0.2, chunk_size=3), hidden, weight)
    assert_close(got, want, 1e-3)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=5e-2)


def test_fused_cross_entropy_is_cross_entropy() -> None:
    hidden, weight, bias, targets, _ = case(4, 3)
    assert targets.labels is not None
    labels = targets.labels

    def reference(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w, b).reshape(-1, V), labels.reshape(-1))

    def got_fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return losses.fused_cross_entropy(h, w, labels, lm_head_bias=b, chunk_size=2)

    want, want_grads = grads(reference, hidden, weight, bias)
    got, got_grads = grads(got_fn, hidden, weight, bias)
    assert_close(got, want, 1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, 1e-5)


def test_item_counts_weigh_micro_batches_by_positions() -> None:
    """Two micro-batches divided by the step's counts sum to the loss of the whole step."""
    hidden, weight, _, targets, _ = case(5, 4)
    whole = fused(targets, alpha=0.3)
    want, want_grads = grads(whole, hidden, weight)
    halves = [
        TeacherTargets(targets.token_ids[i : i + 1], targets.logprobs[i : i + 1],
                       None if targets.mask is None else targets.mask[i : i + 1],
                       None if targets.labels is None else targets.labels[i : i + 1],
                       None if targets.tail_logprobs is None else targets.tail_logprobs[i : i + 1])
        for i in range(B)
    ]  # fmt: skip
    step = losses.ItemCounts(*(sum(c) for c in zip(*map(losses.item_counts, halves), strict=True)))
    assert step == losses.item_counts(targets)

    def accumulated(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sum(
            losses.fused_distillation_loss(h[i : i + 1], w, halves[i], alpha=0.3, num_items=step)
            for i in range(B)
        )  # type: ignore[return-value]

    got, got_grads = grads(accumulated, hidden, weight)
    assert_close(got, want, 1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, 1e-6)


def test_no_grad_upstream_scale_and_refusals() -> None:
    hidden, weight, _, targets, _ = case(6, 4)
    value, (g_h, g_w) = grads(fused(targets), hidden, weight)
    with torch.no_grad():
        assert_close(losses.fused_distillation_loss(hidden, weight, targets), value, 1e-6)
    _, (s_h, s_w) = grads(lambda h, w: 0.5 * fused(targets)(h, w), hidden, weight)
    assert_close(s_h, 0.5 * g_h, 1e-6)
    assert_close(s_w, 0.5 * g_w, 1e-6)
    with pytest.raises(ValueError, match="lm_head_weight"):
        losses.fused_distillation_loss(hidden, weight.t(), targets)
    with pytest.raises(ValueError, match="either TeacherTargets"):
        losses.distillation_loss(hidden @ weight.t(), targets, targets.logprobs)
    with pytest.raises(ValueError, match="kind"):
        losses.fused_distillation_loss(hidden, weight, targets, kind="kl")  # type: ignore[arg-type]


def test_targets_from_a_collated_batch() -> None:
    batch = {
        "teacher_token_ids": torch.zeros(1, 2, 3, dtype=torch.long),
        "teacher_logprobs": torch.zeros(1, 2, 3),
        "teacher_mask": torch.ones(1, 2, dtype=torch.bool),
        "labels": torch.zeros(1, 2, dtype=torch.long),
        "teacher_tail_logprobs": torch.zeros(1, 2),
    }
    targets = TeacherTargets.from_batch(batch)
    assert targets.token_ids is batch["teacher_token_ids"] and targets.counts is None
    assert targets.tail_logprobs is batch["teacher_tail_logprobs"]
