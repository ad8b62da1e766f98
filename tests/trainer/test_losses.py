"""Sparse top-k distillation losses against explicit fp64 references (dense and (k+1)-bucket)."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.trainer import losses

KINDS = ("forward_kl", "reverse_kl", "jsd")
NEG_INF = float("-inf")


# --- data and references --------------------------------------------------------------------------


def make_case(
    seed: int, b: int, t: int, vocab: int, k: int, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits (fp64), the teacher's full log-probs (fp64), its sorted top-k, a mask."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, vocab, generator=gen, dtype=torch.float64) * 1.5
    full = (torch.randn(b, t, vocab, generator=gen, dtype=torch.float64) * scale).log_softmax(-1)
    lp, ids = full.sort(-1, descending=True)
    mask = torch.rand(b, t, generator=gen) < 0.75
    mask.view(-1)[0] = True
    return z, full, ids[..., :k], lp[..., :k], mask


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum a (log a - log b), 0 log 0 = 0 (safe inputs so the reference's gradient is finite)."""
    present = a > 0
    a_safe, b_safe = torch.where(present, a, 1.0), torch.where(present, b, 1.0)
    return torch.where(present, a_safe * (a_safe.log() - b_safe.log()), 0.0).sum(-1)


def divergence(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def dense_reference(z, full_logprobs, mask, kind, beta=0.5):
    """The dense divergence over the whole vocabulary, in fp64."""
    p, q = full_logprobs.double().exp(), z.double().softmax(-1)
    return masked_mean(divergence(p, q, kind, beta), mask)


def bucket_reference(z, ids, lp, mask, kind, beta=0.5):
    """The documented (k+1)-bucket divergence, built explicitly in fp64 (floors included)."""
    z, lp = z.double(), lp.double()
    valid = lp > NEG_INF
    ids = ids.clamp(0, z.shape[-1] - 1)
    p_ids = torch.where(valid, lp.exp(), 0.0)
    q_ids = torch.where(valid, z.softmax(-1).gather(-1, ids), 0.0)
    p_tail = (1 - p_ids.sum(-1)).clamp(min=0) + losses.TAIL_FLOOR
    q_tail = 1 - q_ids.sum(-1) + losses.TAIL_FLOOR
    p = torch.cat([p_ids, p_tail.unsqueeze(-1)], -1)
    q = torch.cat([q_ids, q_tail.unsqueeze(-1)], -1)
    return masked_mean(divergence(p, q, kind, beta), mask)


def tempered_reference(z, ids, lp, mask, kind, temperature, beta=0.5):
    """T != 1: both sides renormalised over the teacher's valid ids at temperature T, times T^2."""
    z, lp = z.double(), lp.double()
    valid = lp > NEG_INF
    p = torch.where(valid, lp / temperature, NEG_INF).softmax(-1)
    z_ids = z.gather(-1, ids.clamp(0, z.shape[-1] - 1))
    q = torch.where(valid, z_ids / temperature, NEG_INF).softmax(-1)
    return masked_mean(divergence(p, q, kind, beta), mask) * temperature**2


def loss_fn(kind: str):
    return getattr(losses, kind)


def value_and_grad(fn, z: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    value = fn(z, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def assert_matches(got, want, atol: float, rtol: float = 1e-6) -> None:
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


# --- k = V: exactly the dense divergence ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_vocabulary_equals_dense(kind: str, dtype: torch.dtype) -> None:
    z, full, ids, lp, mask = make_case(0, 3, 3, 17, 17)
    z, lp = z.to(dtype), lp.to(dtype)
    # The reference sees the stored (rounded) teacher values, scattered back to vocabulary order.
    stored = torch.empty_like(lp).scatter_(-1, ids, lp)
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    got, got_grad = value_and_grad(loss_fn(kind), z, ids, lp, mask, chunk_size=4)
    want, want_grad = value_and_grad(lambda x: dense_reference(x, stored, mask, kind), z.double())
    assert_matches(got, want, atol)
    assert_matches(got_grad, want_grad, atol)
    assert got.dtype == dtype and got_grad.dtype == dtype


# --- k < V: the (k+1)-bucket distributions --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 4, 11])
def test_bucket_formula(kind: str, k: int) -> None:
    z, _, ids, lp, mask = make_case(k, 2, 3, 12, k)
    got, got_grad = value_and_grad(loss_fn(kind), z, ids, lp, mask, chunk_size=2)
    want, want_grad = value_and_grad(lambda x: bucket_reference(x, ids, lp, mask, kind), z)
    assert_matches(got, want, 1e-12)
    assert_matches(got_grad, want_grad, 1e-12)
    # fp32 inputs: the same numbers to fp32 precision.
    got32, grad32 = value_and_grad(loss_fn(kind), z.float(), ids, lp.float(), mask)
    assert_matches(got32, want, 1e-6, 1e-5)
    assert_matches(grad32, want_grad, 1e-6, 1e-5)


def test_bucketed_is_at_most_dense() -> None:
    """Merging the tail into one bucket can only lose information (data processing inequality)."""
    z, full, ids, lp, mask = make_case(7, 2, 3, 30, 5)
    for kind in KINDS:
        assert loss_fn(kind)(z, ids, lp, mask) <= dense_reference(z, full, mask, kind) + 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_size_does_not_change_the_result(kind: str) -> None:
    z, _, ids, lp, mask = make_case(3, 3, 3, 20, 6)
    z = z.float()
    base, base_grad = value_and_grad(loss_fn(kind), z, ids, lp.float(), mask, chunk_size=None)
    for chunk_size in (1, 3, 4096):
        got, grad = value_and_grad(loss_fn(kind), z, ids, lp.float(), mask, chunk_size=chunk_size)
        torch.testing.assert_close(got, base, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, base_grad, rtol=1e-6, atol=1e-9)


# --- masking --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_do_not_count(kind: str) -> None:
    z, _, ids, lp, mask = make_case(5, 3, 3, 10, 4)
    assert not mask.all()
    base, base_grad = value_and_grad(loss_fn(kind), z, ids, lp, mask, chunk_size=2)
    # Garbage at masked positions: NaN/inf logits, NaN log-probs, ids far outside the vocabulary.
    z2, ids2, lp2 = z.clone(), ids.clone(), lp.clone()
    z2[~mask] = float("nan")
    z2[~mask, 0] = float("inf")
    lp2[~mask] = float("nan")
    ids2[~mask] = 10**6
    got, grad = value_and_grad(loss_fn(kind), z2, ids2, lp2, mask, chunk_size=2)
    assert torch.equal(got, base)
    assert torch.equal(grad, base_grad)
    assert torch.all(grad[~mask] == 0)
    assert grad[mask].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_is_zero_with_a_working_backward(kind: str) -> None:
    z, _, ids, lp, mask = make_case(6, 2, 2, 8, 3)
    z = z.float().requires_grad_(True)
    loss = loss_fn(kind)(z, ids, lp.float(), torch.zeros_like(mask))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert z.grad is not None and torch.all(z.grad == 0)


# --- padding along k ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_padding_entries_are_ignored(kind: str) -> None:
    z, _, ids, lp, mask = make_case(8, 2, 3, 9, 4)
    base, base_grad = value_and_grad(loss_fn(kind), z, ids, lp, mask)
    pad_ids = torch.tensor([0, -1, 9 + 100], dtype=ids.dtype).expand(2, 3, 3)
    padded_ids = torch.cat([ids, pad_ids], -1)
    padded_lp = torch.cat([lp, torch.full((2, 3, 3), NEG_INF, dtype=lp.dtype)], -1)
    got, grad = value_and_grad(loss_fn(kind), z, padded_ids, padded_lp, mask)
    assert_matches(got, base, 1e-14)
    assert_matches(grad, base_grad, 1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_ragged_rows_match_the_reference(kind: str) -> None:
    """Rows with different k (including none) in one tensor, padded with -inf and odd ids."""
    z, _, ids, lp, mask = make_case(9, 2, 4, 10, 10)
    mask = torch.ones_like(mask)
    keep = torch.tensor([[10, 3, 0, 1], [5, 9, 2, 7]])  # entries kept per row
    pad = torch.arange(10) >= keep.unsqueeze(-1)
    ids = torch.where(pad, torch.tensor(-7), ids)
    lp = torch.where(pad, NEG_INF, lp)
    got, grad = value_and_grad(loss_fn(kind), z, ids, lp, mask, chunk_size=3)
    want, want_grad = value_and_grad(lambda x: bucket_reference(x, ids, lp, mask, kind), z)
    assert_matches(got, want, 1e-12)
    assert_matches(grad, want_grad, 1e-12)


def test_listed_ids_outside_the_vocabulary_are_refused() -> None:
    z, _, ids, lp, mask = make_case(10, 1, 2, 6, 3)
    ids[0, 0, 1] = 6
    with pytest.raises(ValueError, match="outside"):
        losses.forward_kl(z, ids, lp, mask)


# --- invariants -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 5, 16])
def test_nonnegative(kind: str, k: int) -> None:
    for seed in range(3):
        z, _, ids, lp, mask = make_case(100 + seed, 2, 3, 16, k, scale=4.0)
        assert loss_fn(kind)(z.float(), ids, lp.float(), mask).item() >= -1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_zero_when_the_student_is_the_teacher(kind: str) -> None:
    _, full, ids, lp, mask = make_case(11, 2, 3, 12, 12)
    got = loss_fn(kind)(full.float(), ids, lp.float(), mask)
    assert abs(got.item()) < 1e-6
    got64 = loss_fn(kind)(full, ids, lp, mask)
    assert abs(got64.item()) < 1e-14


def test_teacher_mass_above_one_is_renormalised() -> None:
    """Rounding or quantisation can push the stored mass over 1; that must stay finite and >= 0."""
    _, full, ids, lp, mask = make_case(12, 2, 2, 8, 8)
    lp = lp + 1e-3
    for kind in KINDS:
        got = loss_fn(kind)(full, ids, lp, mask)
        assert math.isfinite(got.item()) and abs(got.item()) < 1e-12


def test_student_without_a_tail_where_the_teacher_has_one_is_finite() -> None:
    """q_tail = 0 against p_tail > 0 (and vice versa) is +inf in theory; the floor keeps it finite."""
    z, _, ids, lp, mask = make_case(13, 1, 2, 6, 3)
    z = z.clone()
    outside = torch.ones_like(z, dtype=torch.bool).scatter_(-1, ids, False)
    z[outside] = NEG_INF  # the student puts all its mass on the teacher's ids
    for kind in KINDS:
        got, grad = value_and_grad(loss_fn(kind), z, ids, lp, mask)
        assert math.isfinite(got.item()) and torch.isfinite(grad).all()
    assert losses.forward_kl(z, ids, lp, mask) > 1.0  # p_tail * log(p_tail / 1e-12): large


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_logits(dtype: torch.dtype, kind: str) -> None:
    z, _, ids, lp, mask = make_case(14, 2, 3, 24, 6)
    z_half = z.to(dtype)
    got, grad = value_and_grad(loss_fn(kind), z_half, ids, lp.float(), mask, chunk_size=2)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    # Computed in fp32: the same as fp32 logits holding the same (rounded) values...
    same, same_grad = value_and_grad(loss_fn(kind), z_half.float(), ids, lp.float(), mask)
    torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), same_grad, rtol=1e-2, atol=1e-4)
    # ...and close to the unrounded fp32 logits.
    full, _ = value_and_grad(loss_fn(kind), z.float(), ids, lp.float(), mask)
    torch.testing.assert_close(got, full, rtol=2e-2, atol=2e-3)


def test_jsd_endpoints_and_symmetry() -> None:
    z, _, ids, lp, mask = make_case(15, 2, 2, 10, 4)
    for beta in (0.0, 1.0):
        got, grad = value_and_grad(losses.jsd, z, ids, lp, mask, beta)
        assert got.item() == 0.0 and torch.all(grad == 0)
    assert losses.jsd(z, ids, lp, mask).item() <= math.log(2)
    for beta in (0.1, 0.9):
        got = losses.jsd(z, ids, lp, mask, beta)
        assert_matches(got, bucket_reference(z, ids, lp, mask, "jsd", beta), 1e-12)


def test_gradcheck() -> None:
    """Numerical vs analytical gradient in fp64, k < V with a padded entry (also backs gradcheck's
    reentrancy check: backward can run twice with retain_graph)."""
    z, _, ids, lp, mask = make_case(16, 1, 3, 5, 3)
    lp = lp.clone()
    lp[0, 1, 2] = NEG_INF
    for kind in KINDS:
        for temperature in (1.0, 2.0):
            z_in = z.clone().requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda x, kind=kind, t=temperature: loss_fn(kind)(
                    x, ids, lp, mask, temperature=t, chunk_size=2
                ),
                (z_in,),
            )


def test_upstream_gradient_scale_and_no_grad() -> None:
    z, _, ids, lp, mask = make_case(17, 2, 2, 8, 3)
    value, grad = value_and_grad(losses.forward_kl, z, ids, lp, mask)
    scaled, scaled_grad = value_and_grad(lambda x: 0.25 * losses.forward_kl(x, ids, lp, mask), z)
    assert_matches(scaled_grad, 0.25 * grad, 1e-15)
    with torch.no_grad():
        assert torch.equal(losses.forward_kl(z.requires_grad_(True), ids, lp, mask), value)


def test_autograd_keeps_only_the_gradient_buffer() -> None:
    """Memory: after forward, the graph holds no chunk's [chunk, V] intermediates, only one
    tensor shaped like the logits (their gradient, computed chunk by chunk during forward)."""
    z, _, ids, lp, mask = make_case(22, 2, 16, 64, 8)
    z = z.float().requires_grad_(True)
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = losses.forward_kl(z, ids, lp.float(), mask, chunk_size=4)
    gc.collect()
    alive = [ref() for ref in saved if ref() is not None]
    assert len(saved) > 10  # the chunks did save intermediates for their own backward...
    assert [tuple(t.shape) for t in alive] == [(2 * 16, 64)]  # ...and only the buffer is left
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_bad_options_are_refused() -> None:
    z, _, ids, lp, mask = make_case(18, 1, 2, 6, 3)
    with pytest.raises(ValueError, match="temperature"):
        losses.forward_kl(z, ids, lp, mask, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.reverse_kl(z, ids, lp, mask, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        losses.jsd(z, ids, lp, mask, beta=1.5)
    with pytest.raises(ValueError, match="mask"):
        losses.forward_kl(z, ids, lp, mask[:, :1])
    with pytest.raises(ValueError, match="teacher_token_ids"):
        losses.forward_kl(z, ids[..., :2], lp, mask)


# --- temperature ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_one_is_the_default(kind: str) -> None:
    z, _, ids, lp, mask = make_case(19, 2, 3, 10, 4)
    assert torch.equal(
        loss_fn(kind)(z, ids, lp, mask, temperature=1.0), loss_fn(kind)(z, ids, lp, mask)
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_formula(kind: str, temperature: float) -> None:
    z, _, ids, lp, mask = make_case(20, 2, 3, 12, 5)
    lp = lp.clone()
    lp[0, 0, 3:] = NEG_INF  # a ragged row: its padding must be dropped before renormalising
    ids = ids.clone()
    ids[0, 0, 3:] = -1
    got, grad = value_and_grad(loss_fn(kind), z, ids, lp, mask, temperature=temperature)

    def ref(x: torch.Tensor) -> torch.Tensor:
        return tempered_reference(x, ids, lp, mask, kind, temperature)

    want, want_grad = value_and_grad(ref, z)
    assert_matches(got, want, 1e-12)
    assert_matches(grad, want_grad, 1e-12)
    got32, grad32 = value_and_grad(loss_fn(kind), z.float(), ids, lp.float(), mask, temperature=2.0)
    assert torch.isfinite(got32) and torch.isfinite(grad32).all() and grad32.abs().sum() > 0


# --- distillation_loss ----------------------------------------------------------------------------


def labelled_case(seed: int = 21):
    z, _, ids, lp, mask = make_case(seed, 2, 4, 11, 4)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 11, (2, 4), generator=gen)
    labels[0, 1] = labels[1, 3] = -100
    return z.float(), ids, lp.float(), mask, labels


@pytest.mark.parametrize("kind", KINDS)
def test_distillation_loss_alpha_zero_is_the_kd_loss(kind: str) -> None:
    z, ids, lp, mask, labels = labelled_case()
    got = losses.distillation_loss(z, ids, lp, mask, labels, kind=kind, beta=0.3, chunk_size=3)
    kwargs = {"chunk_size": 3} | ({"beta": 0.3} if kind == "jsd" else {})
    assert torch.equal(got, loss_fn(kind)(z, ids, lp, mask, **kwargs))
    assert torch.equal(
        got, losses.distillation_loss(z, ids, lp, mask, kind=kind, beta=0.3, chunk_size=3)
    )


def test_distillation_loss_alpha_one_is_cross_entropy() -> None:
    z, ids, lp, mask, labels = labelled_case()
    got, grad = value_and_grad(
        losses.distillation_loss, z, ids, lp, mask, labels, alpha=1.0, chunk_size=3
    )
    want, want_grad = value_and_grad(
        lambda x: F.cross_entropy(x.reshape(-1, 11), labels.reshape(-1), ignore_index=-100), z
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    # A different ignore_index.
    relabelled = torch.where(labels == -100, 7, labels)
    got7 = losses.distillation_loss(z, ids, lp, mask, relabelled, alpha=1.0, ignore_index=7)
    want7 = F.cross_entropy(z.reshape(-1, 11), relabelled.reshape(-1), ignore_index=7)
    torch.testing.assert_close(got7, want7, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_distillation_loss_mix(kind: str) -> None:
    z, ids, lp, mask, labels = labelled_case()
    alpha = 0.3

    def mix(x: torch.Tensor) -> torch.Tensor:
        kd = loss_fn(kind)(x, ids, lp, mask)
        ce = F.cross_entropy(x.reshape(-1, 11), labels.reshape(-1))
        return (1 - alpha) * kd + alpha * ce

    got, grad = value_and_grad(
        losses.distillation_loss, z, ids, lp, mask, labels, kind=kind, alpha=alpha, chunk_size=3
    )
    want, want_grad = value_and_grad(mix, z)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_distillation_loss_refusals() -> None:
    z, ids, lp, mask, labels = labelled_case()
    with pytest.raises(ValueError, match="labels"):
        losses.distillation_loss(z, ids, lp, mask, alpha=0.5)
    with pytest.raises(ValueError, match="kind"):
        losses.distillation_loss(z, ids, lp, mask, labels, kind="kl")
    with pytest.raises(ValueError, match="alpha"):
        losses.distillation_loss(z, ids, lp, mask, labels, alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        losses.distillation_loss(z, ids, lp, mask, torch.full_like(labels, 11), alpha=0.5)


def test_distillation_loss_nothing_to_count() -> None:
    z, ids, lp, mask, labels = labelled_case()
    z = z.requires_grad_(True)
    none = torch.full_like(labels, -100)
    loss = losses.distillation_loss(z, ids, lp, torch.zeros_like(mask), none, alpha=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(z.grad == 0)


# --- property: random shapes against the explicit bucket formula -----------------------------------


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 3),
    vocab=st.integers(2, 40),
    k_fraction=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 1.0, 3.0, 8.0]),
    chunk_size=st.sampled_from([1, 2, 5, None]),
    seed=st.integers(0, 2**16),
)
def test_forward_kl_matches_bucket_formula(
    b: int, t: int, vocab: int, k_fraction: float, scale: float, chunk_size, seed: int
) -> None:
    k = 1 + round(k_fraction * (vocab - 1))
    z, _, ids, lp, mask = make_case(seed, b, t, vocab, k, scale=scale)
    got, grad = value_and_grad(losses.forward_kl, z, ids, lp, mask, chunk_size=chunk_size)
    want, want_grad = value_and_grad(lambda x: bucket_reference(x, ids, lp, mask, "forward_kl"), z)
    assert_matches(got, want, 1e-10)
    assert_matches(grad, want_grad, 1e-10)
    got32 = losses.forward_kl(z.float(), ids, lp.float(), mask, chunk_size=chunk_size)
    assert_matches(got32, want, 2e-6, 1e-5)


# --- explicit tail --------------------------------------------------------------------------------


def explicit_tail_reference(z, ids, lp, tail, mask, kind, beta=0.5):
    """The documented buckets with an explicit tail: entries and exp(tail) renormalised to sum to
    1, then the floor; NaN tails fall back to the derived 1 - P_k (as bucket_reference)."""
    z, lp, tail = z.double(), lp.double(), tail.double()
    valid = lp > NEG_INF
    ids = ids.clamp(0, z.shape[-1] - 1)
    p_ids = torch.where(valid, lp.exp(), 0.0)
    q_ids = torch.where(valid, z.softmax(-1).gather(-1, ids), 0.0)
    given = ~tail.isnan()
    p_tail = torch.where(given, tail.nan_to_num(0.0).exp(), (1 - p_ids.sum(-1)).clamp(min=0))
    total = torch.where(given, p_ids.sum(-1) + p_tail, 1.0)
    p = torch.cat(
        [p_ids / total.unsqueeze(-1), (p_tail / total + losses.TAIL_FLOOR)[..., None]], -1
    )
    q = torch.cat([q_ids, (1 - q_ids.sum(-1) + losses.TAIL_FLOOR).unsqueeze(-1)], -1)
    return masked_mean(divergence(p, q, kind, beta), mask)


def tail_case(seed: int):
    """Ragged rows (one all padding) with explicit tails: rounded ones, -inf, NaN (derive)."""
    z, full, ids, lp, mask = make_case(seed, 2, 4, 12, 6)
    mask = torch.ones_like(mask)
    keep = torch.tensor([[6, 3, 0, 1], [5, 6, 2, 4]])
    pad = torch.arange(6) >= keep.unsqueeze(-1)
    ids, lp = torch.where(pad, torch.tensor(-3), ids), torch.where(pad, NEG_INF, lp)
    exact = torch.log1p(-torch.where(pad, 0.0, lp.exp()).sum(-1))  # the mass outside the entries
    gen = torch.Generator().manual_seed(seed)
    tail = exact + 0.3 * torch.randn(exact.shape, generator=gen, dtype=exact.dtype)
    tail[0, 1] = NEG_INF  # no tail: the entries are all of it
    tail[1, 0] = float("nan")  # derive this one
    tail[1, 2] = 0.0  # all the mass outside the two entries
    return z, ids, lp, tail, mask


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_tail_matches_reference(kind: str) -> None:
    z, ids, lp, tail, mask = tail_case(23)
    got, grad = value_and_grad(
        loss_fn(kind), z, ids, lp, mask, teacher_tail_logprobs=tail, chunk_size=3
    )
    want, want_grad = value_and_grad(
        lambda x: explicit_tail_reference(x, ids, lp, tail, mask, kind), z
    )
    assert_matches(got, want, 1e-12)
    assert_matches(grad, want_grad, 1e-12)
    assert abs(got - loss_fn(kind)(z, ids, lp, mask)) > 1e-3  # the tails do change the result
    got32 = loss_fn(kind)(z.float(), ids, lp.float(), mask, teacher_tail_logprobs=tail.float())
    assert_matches(got32, want, 1e-6, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_passing_the_derived_tail_changes_nothing(kind: str) -> None:
    z, ids, lp, _, mask = tail_case(24)
    derived = losses.log1mexp(torch.logsumexp(lp, -1))  # all-padding row: log 1 = 0
    base, base_grad = value_and_grad(loss_fn(kind), z, ids, lp, mask)
    got, grad = value_and_grad(loss_fn(kind), z, ids, lp, mask, teacher_tail_logprobs=derived)
    assert_matches(got, base, 1e-12)
    assert_matches(grad, base_grad, 1e-12)
    # fp32, as collate hands it over
    base32 = loss_fn(kind)(z.float(), ids, lp.float(), mask)
    got32 = loss_fn(kind)(z.float(), ids, lp.float(), mask, teacher_tail_logprobs=derived.float())
    assert_matches(got32, base32, 1e-6, 1e-5)
    # all NaN: exactly today's derivation
    nan = torch.full_like(derived, float("nan"))
    assert torch.equal(loss_fn(kind)(z, ids, lp, mask, teacher_tail_logprobs=nan), base)


@pytest.mark.parametrize("kind", KINDS)
def test_tail_is_dropped_at_other_temperatures(kind: str) -> None:
    z, ids, lp, tail, mask = tail_case(25)
    got = loss_fn(kind)(z, ids, lp, mask, temperature=2.0, teacher_tail_logprobs=tail)
    assert torch.equal(got, loss_fn(kind)(z, ids, lp, mask, temperature=2.0))


def test_tail_at_masked_positions_is_ignored_and_bad_tails_are_refused() -> None:
    z, ids, lp, tail, mask = tail_case(26)
    mask = mask.clone()
    mask[0, 0] = False
    base = losses.jsd(z, ids, lp, mask, teacher_tail_logprobs=tail)
    garbage = tail.clone()
    garbage[0, 0] = float("inf")
    assert torch.equal(losses.jsd(z, ids, lp, mask, teacher_tail_logprobs=garbage), base)
    with pytest.raises(ValueError, match=r"\+inf"):
        losses.forward_kl(z, ids, lp, None, teacher_tail_logprobs=garbage)
    with pytest.raises(ValueError, match="teacher_tail_logprobs must be"):
        losses.reverse_kl(z, ids, lp, mask, teacher_tail_logprobs=tail[:, :2])


@pytest.mark.parametrize("kind", KINDS)
def test_distillation_loss_passes_the_tail(kind: str) -> None:
    z, ids, lp, tail, mask = tail_case(27)
    gen = torch.Generator().manual_seed(27)
    labels = torch.randint(0, 12, (2, 4), generator=gen)
    alpha = 0.3

    def mix(x: torch.Tensor) -> torch.Tensor:
        kd = loss_fn(kind)(x, ids, lp, mask, teacher_tail_logprobs=tail)
        return (1 - alpha) * kd + alpha * F.cross_entropy(x.reshape(-1, 12), labels.reshape(-1))

    got, grad = value_and_grad(
        losses.distillation_loss,
        z,
        ids,
        lp,
        mask,
        labels,
        kind=kind,
        alpha=alpha,
        chunk_size=3,
        teacher_tail_logprobs=tail,
    )
    want, want_grad = value_and_grad(mix, z)
    assert_matches(got, want, 1e-12)
    assert_matches(grad, want_grad, 1e-12)
    only_kd = losses.distillation_loss(z, ids, lp, mask, kind=kind, teacher_tail_logprobs=tail)
    assert torch.equal(only_kd, loss_fn(kind)(z, ids, lp, mask, teacher_tail_logprobs=tail))
