"""sampled_kl: the forward KL estimated from sampled teacher rows, and its unbiasedness."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache import trainer
from logitcache.client.codecs import TopKRows
from logitcache.server.engine.sampling import sample_rows
from logitcache.trainer import losses

NEG_INF = float("-inf")
VOCAB, POSITIONS, SAMPLES = 50, 6, 12
DRAWS, GROUP = 2000, 50  # draws of the U samples per position; draws per call of the loss
SCALES = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # teacher logit scale per position: flat ... peaked
# A token whose expected number of draws in the whole run is below 5 is often never drawn: its
# gradient entry then has sample variance 0, yet its mean is off by p / P < 5 / (U N P), with no
# bias at all. That much slack on the gradient entries is what the run cannot resolve.
UNSEEN = 5.0 / (SAMPLES * DRAWS * POSITIONS)


# --- data and references --------------------------------------------------------------------------


def teacher_and_student(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense teacher [P, V] (log-probs, from flat to peaked rows) and student logits [P, V]."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor(SCALES, dtype=torch.float64).unsqueeze(-1)
    full = (torch.randn(POSITIONS, VOCAB, generator=gen, dtype=torch.float64) * scale).log_softmax(
        -1
    )
    z = torch.randn(POSITIONS, VOCAB, generator=gen, dtype=torch.float64) * 1.5
    return full, z


def draw(full: torch.Tensor, draws: int, samples: int, seed: int):
    """``draws`` independent sampled captures of every position: ids, counts, log-probs as
    [draws, P, k] tensors (one ``sample_rows`` call, the draws as extra rows)."""
    rows = TopKRows(
        token_ids=np.tile(np.arange(VOCAB, dtype=np.int32), (draws * POSITIONS, 1)),
        logprobs=np.tile(full.numpy(), (draws, 1)),
        target_logprobs=np.full(draws * POSITIONS, np.nan, dtype=np.float32),
    )
    out = sample_rows(rows, samples, np.random.default_rng(seed))
    shape = (draws, POSITIONS, -1)
    return (
        torch.from_numpy(out.token_ids.astype(np.int64)).reshape(shape),
        torch.from_numpy(out.counts.astype(np.int64)).reshape(shape),
        torch.from_numpy(out.logprobs).reshape(shape),
    )


def dense_forward_kl(z: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || softmax(z)) over the whole vocabulary, in fp64."""
    return (full.exp() * (full - z.log_softmax(-1))).sum(-1).mean()


def sampled_reference(z, ids, counts, lp, mask):
    """The documented estimate, written out: (1/U) sum_j c_j (lp_j - log q(id_j)), masked mean."""
    present = counts > 0
    log_q = z.double().log_softmax(-1).gather(-1, ids.clamp(0, z.shape[-1] - 1))
    terms = torch.where(present, counts * (lp.double().nan_to_num(0.0, 0.0, 0.0) - log_q), 0.0)
    per_position = terms.sum(-1) / counts.sum(-1).clamp(min=1)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def value_and_grad(fn, z: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    value = fn(z, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def per_draw_estimates(estimator, z, ids, counts, lp) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``estimator(logits [n, P, V], ids, counts, lp) -> mean over the n*P positions`` on
    groups of GROUP draws. Returns the group means [DRAWS / GROUP] (iid samples of the value) and
    each draw's gradient of its mean over positions w.r.t. z, [DRAWS, P, V]: with the student's
    logits repeated per draw, d(group mean)/d logits[n] = (1/GROUP) * that gradient."""
    values, grads = [], []
    for start in range(0, DRAWS, GROUP):
        sl = slice(start, start + GROUP)
        logits = z.expand(GROUP, -1, -1)
        value, grad = value_and_grad(estimator, logits, ids[sl], counts[sl], lp[sl])
        values.append(value)
        grads.append(grad * GROUP)
    return torch.stack(values), torch.cat(grads)


def consistent(samples: torch.Tensor, want: torch.Tensor, sigmas: float, slack: float) -> bool:
    """Whether the mean of iid ``samples`` (first dim) is within ``sigmas`` standard errors (from
    the sample variance) plus ``slack`` of ``want``, elementwise."""
    mean = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((mean - want).abs() <= sigmas * stderr + slack).all())


def sampled(logits, ids, counts, lp):
    return losses.sampled_kl(logits, ids, counts, lp, None)


def ignores_counts(logits, ids, counts, lp):
    """A buggy estimator: every distinct drawn id weighted equally (the counts dropped)."""
    return losses.sampled_kl(logits, ids, (counts > 0).long(), lp, None)


def as_if_topk(logits, ids, counts, lp):
    """A misuse: the sampled rows treated as a top-k with a (k+1)-bucket tail."""
    return losses.forward_kl(logits, ids, torch.where(counts > 0, lp, NEG_INF), None)


# --- unbiasedness ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def experiment():
    full, z = teacher_and_student()
    ids, counts, lp = draw(full, DRAWS, SAMPLES, seed=1234)
    assert (counts.sum(-1) == SAMPLES).all()
    dense, dense_grad = value_and_grad(dense_forward_kl, z, full)
    return z, (ids, counts, lp), dense, dense_grad


def test_sampled_kl_is_unbiased(experiment) -> None:
    """Over 2000 draws of U = 12 samples, the mean estimate and the mean gradient agree with the
    dense forward KL and its gradient over the full vocabulary within 4 (value) and 5 (each of the
    300 gradient entries) standard errors. The value's slack covers the fp32 log-probs."""
    z, rows, dense, dense_grad = experiment
    values, grads = per_draw_estimates(sampled, z, *rows)
    assert consistent(values, dense, sigmas=4.0, slack=1e-6)
    assert consistent(grads, dense_grad, sigmas=5.0, slack=UNSEEN)
    # The check has power: the standard errors are small next to what they bound.
    assert values.std() / math.sqrt(values.numel()) < 0.01 * dense
    assert (grads.std(0) / math.sqrt(DRAWS)).max() < 0.05 * dense_grad.abs().max()
    # Each group's value is exactly the documented formula on its draws.
    ids, counts, lp = rows
    everywhere = torch.ones(GROUP, POSITIONS, dtype=torch.bool)
    group = (ids[:GROUP], counts[:GROUP], lp[:GROUP], everywhere)
    want = sampled_reference(z.expand(GROUP, -1, -1), *group)
    torch.testing.assert_close(values[0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", [ignores_counts, as_if_topk])
def test_biased_estimators_fail_the_same_check(experiment, estimator) -> None:
    """The check can fail: plausible but biased estimators from the same draws are rejected."""
    z, rows, dense, dense_grad = experiment
    values, grads = per_draw_estimates(estimator, z, *rows)
    assert not consistent(values, dense, sigmas=4.0, slack=1e-6)
    assert not consistent(grads, dense_grad, sigmas=5.0, slack=UNSEEN)


def test_topk_without_tail_fails_the_check(experiment) -> None:
    """The top-U entries' share of the KL (no tail term) is deterministic and biased low."""
    z, _, dense, dense_grad = experiment
    full, _ = teacher_and_student()
    top = full.topk(SAMPLES, -1)

    def topk_no_tail(x: torch.Tensor) -> torch.Tensor:
        log_q = x.log_softmax(-1).gather(-1, top.indices)
        return (top.values.exp() * (top.values - log_q)).sum(-1).mean()

    value, grad = value_and_grad(topk_no_tail, z)
    assert not consistent(value.expand(DRAWS // GROUP), dense, sigmas=4.0, slack=1e-6)
    assert not consistent(grad.expand(DRAWS, -1, -1), dense_grad, sigmas=5.0, slack=UNSEEN)


# --- the formula, masking, padding, memory --------------------------------------------------------


def small_case(seed: int, dtype: torch.dtype = torch.float64):
    """A [2, 5] batch of sampled rows (ragged, padded with id 0 / count 0 / -inf) and a mask."""
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(10, VOCAB, generator=gen, dtype=torch.float64) * 2).log_softmax(-1)
    rows = TopKRows(
        token_ids=np.tile(np.arange(VOCAB, dtype=np.int32), (10, 1)),
        logprobs=full.numpy(),
        target_logprobs=np.full(10, np.nan, dtype=np.float32),
    )
    out = sample_rows(rows, 7, np.random.default_rng(seed))
    ids = torch.from_numpy(out.token_ids.astype(np.int64)).reshape(2, 5, -1)
    counts = torch.from_numpy(out.counts.astype(np.int64)).reshape(2, 5, -1)
    lp = torch.from_numpy(out.logprobs).reshape(2, 5, -1)
    z = (torch.randn(2, 5, VOCAB, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    mask = torch.rand(2, 5, generator=gen) < 0.7
    mask[0, 0], mask[1, 4] = True, False
    return z, ids, counts, lp, mask


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_sampled_kl_matches_the_formula(chunk_size) -> None:
    z, ids, counts, lp, mask = small_case(1)
    assert (counts == 0).any()  # ragged: some rows have fewer distinct ids
    got, grad = value_and_grad(losses.sampled_kl, z, ids, counts, lp, mask, chunk_size=chunk_size)
    want, want_grad = value_and_grad(lambda x: sampled_reference(x, ids, counts, lp, mask), z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    # The gradient is softmax(z) - (counts / U on the drawn ids), per position, over the mean.
    empirical = torch.zeros_like(z).scatter_add_(
        -1, ids, counts / counts.sum(-1, keepdim=True).double()
    )
    expected = (z.softmax(-1) - empirical) * mask.unsqueeze(-1) / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    got32 = losses.sampled_kl(z.float(), ids, counts, lp, mask, chunk_size=chunk_size)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-6)
    assert trainer.sampled_kl is losses.sampled_kl


def test_masked_positions_and_padding_are_ignored() -> None:
    z, ids, counts, lp, mask = small_case(2)
    base, base_grad = value_and_grad(losses.sampled_kl, z, ids, counts, lp, mask)
    z2, ids2, lp2 = z.clone(), ids.clone(), lp.clone()
    z2[~mask] = float("nan")
    lp2[~mask] = float("nan")
    ids2[~mask] = 10**6
    padding = counts == 0
    ids2[padding] = -5  # padding entries: any id, any log-prob
    lp2[padding] = float("nan")
    got, grad = value_and_grad(losses.sampled_kl, z2, ids2, counts, lp2, mask)
    assert torch.equal(got, base) and torch.equal(grad, base_grad)
    assert torch.all(grad[~mask] == 0)
    # extra padding columns change nothing
    wide = [torch.cat([t, torch.full((2, 5, 2), v, dtype=t.dtype)], -1)
            for t, v in ((ids, 3), (counts, 0), (lp, NEG_INF))]  # fmt: skip
    torch.testing.assert_close(losses.sampled_kl(z, *wide, mask), base, rtol=0, atol=1e-15)
    # a position with no draws at all contributes 0 (and still counts in the mean)
    none = counts.clone()
    none[0, 0] = 0
    want = sampled_reference(z, ids, none, lp, mask)
    torch.testing.assert_close(losses.sampled_kl(z, ids, none, lp, mask), want)
    nothing = losses.sampled_kl(z.requires_grad_(True), ids, counts, lp, torch.zeros_like(mask))
    assert nothing.item() == 0.0
    nothing.backward()
    assert torch.all(z.grad == 0)


def test_zero_in_expectation_when_the_student_is_the_teacher() -> None:
    """Each term is lp_j - log q(id_j) = 0 when the student's log-softmax is the teacher's."""
    full, _ = teacher_and_student(3)
    ids, counts, lp = draw(full, 4, SAMPLES, seed=3)
    z = full.expand(4, -1, -1).float()  # fp32 log-probs are what the rows store
    assert abs(losses.sampled_kl(z, ids, counts, lp, None).item()) < 1e-5


def test_autograd_keeps_only_the_gradient_buffer() -> None:
    """Memory: the same chunked machinery as the top-k losses: one logits-shaped buffer."""
    full, z = teacher_and_student(4)
    ids, counts, lp = draw(full, 8, SAMPLES, seed=4)
    logits = z.expand(8, -1, -1).float().clone().requires_grad_(True)
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = losses.sampled_kl(logits, ids, counts, lp, None, chunk_size=4)
    gc.collect()
    alive = [ref() for ref in saved if ref() is not None]
    assert len(saved) > 10
    assert [tuple(t.shape) for t in alive] == [(8 * POSITIONS, VOCAB)]
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_gradcheck() -> None:
    z, ids, counts, lp, mask = small_case(5)
    z_in = z[:, :2, :8].clone().requires_grad_(True)
    ids, counts, lp, mask = ids[:, :2] % 8, counts[:, :2], lp[:, :2], mask[:, :2]
    # ids reduced mod 8 may repeat within a row: the formula is still a sum over entries
    assert torch.autograd.gradcheck(
        lambda x: losses.sampled_kl(x, ids, counts, lp, mask, chunk_size=1), (z_in,)
    )


# --- distillation_loss with teacher_counts --------------------------------------------------------


def test_distillation_loss_with_counts() -> None:
    z, ids, counts, lp, mask = small_case(6, torch.float32)
    labels = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    labels[0, 1] = -100
    nan_tail = torch.full((2, 5), float("nan"))  # what collate gives sampled records
    only_kd = losses.distillation_loss(z, ids, lp, mask, teacher_counts=counts)
    assert torch.equal(only_kd, losses.sampled_kl(z, ids, counts, lp, mask))
    alpha = 0.3

    def mix(x: torch.Tensor) -> torch.Tensor:
        kd = losses.sampled_kl(x, ids, counts, lp, mask)
        ce = F.cross_entropy(x.reshape(-1, VOCAB), labels.reshape(-1))
        return (1 - alpha) * kd + alpha * ce

    got, grad = value_and_grad(
        losses.distillation_loss,
        z,
        ids,
        lp,
        mask,
        labels,
        alpha=alpha,
        chunk_size=3,
        teacher_counts=counts,
        teacher_tail_logprobs=nan_tail,
    )
    want, want_grad = value_and_grad(mix, z)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    # the sampled estimate is not the top-k loss on the same rows
    topk = losses.distillation_loss(z, ids, torch.where(counts > 0, lp, NEG_INF), mask)
    assert abs(topk.item() - only_kd.item()) > 1e-3


def test_sampled_refusals() -> None:
    z, ids, counts, lp, mask = small_case(7)
    for kind in ("reverse_kl", "jsd"):
        with pytest.raises(ValueError, match="forward KL only"):
            losses.distillation_loss(z, ids, lp, mask, kind=kind, teacher_counts=counts)
    with pytest.raises(ValueError, match="temperature 1"):
        losses.distillation_loss(z, ids, lp, mask, temperature=2.0, teacher_counts=counts)
    with pytest.raises(ValueError, match="no tail"):
        losses.distillation_loss(
            z, ids, lp, mask, teacher_counts=counts, teacher_tail_logprobs=torch.zeros(2, 5)
        )
    with pytest.raises(ValueError, match="teacher_counts .* must match"):
        losses.sampled_kl(z, ids, counts[..., :1], lp, mask)
    with pytest.raises(ValueError, match="integers"):
        losses.sampled_kl(z, ids, counts.double(), lp, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.sampled_kl(z, ids, counts, lp, mask, chunk_size=0)
    bad = counts.clone()
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match=">= 0"):
        losses.sampled_kl(z, ids, bad, lp, mask)
    bad_ids = ids.clone()
    bad_ids[0, 0, 0] = VOCAB
    with pytest.raises(ValueError, match="outside"):
        losses.distillation_loss(z, bad_ids, lp, mask, torch.zeros(2, 5).long(), alpha=0.5,
                                 teacher_counts=counts)  # fmt: skip
    bad_lp = lp.clone()
    bad_lp[0, 0, 0] = NEG_INF
    with pytest.raises(ValueError, match="finite at drawn entries"):
        losses.sampled_kl(z, ids, counts, bad_lp, mask)
