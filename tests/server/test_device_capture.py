"""Engine-side capture (``device_capture``): draws from the full distribution, reproducible by
key whatever the batch, exact log-normalisers, and the self-check that refuses a wrong output
layer. Plain torch and a small transformers model; the vLLM side is test_device_capture_vllm."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.client.errors import FailedPrecondition
from logitcache.server.engine.columns import (
    CapturedColumns,
    CaptureRequest,
    check_agreement,
    seed_of_key,
)
from logitcache.server.engine.device_capture import (
    capture_columns,
    draw_rows_for_key,
    seed_tensor,
    top_k,
    uniforms,
)
from logitcache.server.engine.reference import TransformersReference
from logitcache.server.engine.sampling import group_draws

V = 300


def columns_of(logits: torch.Tensor, request: CaptureRequest, rows: torch.Tensor | None = None,
               seeds: torch.Tensor | None = None) -> CapturedColumns:  # fmt: skip
    n = logits.shape[0]
    rows = torch.arange(n) if rows is None else rows
    seeds = seed_tensor(request.seed, n) if seeds is None else seeds
    targets = torch.cat([torch.arange(1, n) % logits.shape[1], torch.tensor([-1])])
    return CapturedColumns.split(capture_columns(logits, targets, rows, seeds, request).numpy(),
                                 request)  # fmt: skip


def chi_square(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over cells expected >= 5 (the rest pooled) and its degrees of freedom."""
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def chi_square_bound(df: int) -> float:
    """About the 0.9999 quantile of chi-square(df) (Wilson-Hilferty, z = 3.72)."""
    z = 3.72
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# Flat; and peaked with a long tail, drawn from the terms at T = 1 as the squares of T = 2's.
@pytest.mark.parametrize(("scale", "temperatures"), [(0.5, ()), (3.0, (2.0, 4.0))])
def test_draws_follow_the_full_distribution(scale: float, temperatures: tuple[float, ...]) -> None:
    """Pooled over 3,000 positions of one distribution x 12 draws: a chi-square test against the
    exact probabilities; the same draws fail it against the distribution at T = 2."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(V, generator=gen) * scale
    n, u = 3000, 12
    request = CaptureRequest(samples=u, seed=12345, temperatures=temperatures)
    cols = columns_of(logits.expand(n, V).clone(), request)
    counts = np.bincount(cols.draw_ids.ravel(), minlength=V)
    p = torch.softmax(logits.double(), 0).numpy()
    stat, df = chi_square(counts, p * n * u)
    assert stat < chi_square_bound(df), (stat, df)
    tempered = torch.softmax(logits.double() / 2, 0).numpy()
    wrong, df_wrong = chi_square(counts, tempered * n * u)
    assert wrong > chi_square_bound(df_wrong)
    # Each draw carries its token's exact log-prob.
    lp = torch.log_softmax(logits, 0).numpy()
    np.testing.assert_allclose(cols.draw_logprobs, lp[cols.draw_ids], atol=1e-6)


def test_draws_are_reproducible_by_key_whatever_the_batch() -> None:
    """A record's draws are the same alone, chunked in two steps, or batched with another record;
    another key draws differently; the uniforms of a fixed key are pinned (the scheme of stored
    records must not drift between versions)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, V, generator=gen), torch.randn(25, V, generator=gen)
    key_a, key_b = b"record-a-key-0123456789abcdef012", b"record-b-key-0123456789abcdef012"
    req_a = CaptureRequest(samples=12, seed=seed_of_key(key_a))
    alone = columns_of(a, req_a).draw_ids
    first, rest = columns_of(a[:17], req_a), columns_of(a[17:], req_a, rows=torch.arange(17, 40))
    np.testing.assert_array_equal(np.concatenate([first.draw_ids, rest.draw_ids]), alone)
    seeds = torch.cat([seed_tensor(seed_of_key(key_b), 25), seed_tensor(req_a.seed, 40)])
    rows = torch.cat([torch.arange(25), torch.arange(40)])
    batched = columns_of(torch.cat([b, a]), req_a, rows=rows, seeds=seeds).draw_ids
    np.testing.assert_array_equal(batched[25:], alone)
    other = columns_of(a, CaptureRequest(samples=12, seed=seed_of_key(key_b))).draw_ids
    assert (other != alone).mean() > 0.5
    pinned = uniforms(seed_tensor(seed_of_key(key_a), 2), torch.arange(2), 3).numpy()
    np.testing.assert_allclose(pinned, PINNED_UNIFORMS, rtol=0, atol=1e-12)


PINNED_UNIFORMS = [
    [0.6026852312121491, 0.7727777584017304, 0.8925954975039758],
    [0.4166099796781282, 0.6828192580702535, 0.5388667945136376],
]


@pytest.mark.parametrize(("vocab", "scale"), [(V, 4.0), (1 << 15, 12.0)])
def test_log_normalisers_are_exact(vocab: int, scale: float) -> None:
    """The dense float64 formula at T below, at and above 1: where T halves (the terms squared)
    and where it does not (a softmax of its own), past the squarings one softmax allows
    (16 -> 8 -> 4 -> 2), in several blocks of rows at the larger vocabulary, whose peaked rows'
    tails underflow at T = 1 but not at T = 16."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(40, vocab, generator=gen) * scale
    temps = (0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    cols = columns_of(logits, CaptureRequest(top_k=8, temperatures=temps))
    lp = torch.log_softmax(logits.double(), 1)
    want = torch.stack([torch.logsumexp(lp / t, 1) for t in temps], 1).numpy()
    np.testing.assert_allclose(cols.log_normalisers, want, atol=2e-5)
    np.testing.assert_allclose(cols.log_normalisers[:, temps.index(1.0)], 0.0, atol=2e-5)
    top = torch.topk(lp, 8, 1)
    np.testing.assert_allclose(cols.top_logprobs, top.values.numpy(), atol=1e-5)
    np.testing.assert_array_equal(cols.top_ids, top.indices.numpy())
    assert np.isnan(cols.target_logprobs[-1])


def test_t1_alone_stays_on_vllms_softmax_and_temperatures_are_exact() -> None:
    """Rows of one large logit and a flat tail at V = 131,072, where float32 softmax (vLLM's
    log-probs) normalises with an error above the start-up check's 1e-4: T = 1 alone gives
    vLLM's values, and with temperatures the log-probs and normalisers are float64's."""
    logits = torch.full((4, 1 << 17), -12.0) + torch.arange(4.0)[:, None] * 0.25
    logits[:, 0] = 0.0
    exact = torch.log_softmax(logits.double(), 1)
    vllm = torch.log_softmax(logits, 1).double()
    assert (vllm - exact).abs().max() > 1e-4  # the premise: float32's own error
    plain = columns_of(logits, CaptureRequest(top_k=4))
    np.testing.assert_allclose(plain.top_logprobs, vllm.topk(4, 1).values.numpy(), atol=1e-6)
    temps = (1.0, 2.0, 4.0)
    tempered = columns_of(logits, CaptureRequest(top_k=4, temperatures=temps))
    np.testing.assert_allclose(tempered.top_logprobs, exact.topk(4, 1).values.numpy(), atol=3e-6)
    want = torch.stack([torch.logsumexp(exact / t, 1) for t in temps], 1).numpy()
    np.testing.assert_allclose(tempered.log_normalisers, want, atol=3e-6)


@pytest.mark.parametrize(("vocab", "k"), [(1785, 64), (4099, 8), (300, 64)])
def test_top_k_in_groups_equals_torch_topk(vocab: int, k: int) -> None:
    """Rows that are views of wider rows (vLLM's padded output layer), a vocabulary that groups
    do not divide, and rows of ties: the values of torch.topk, ids of those values."""
    gen = torch.Generator().manual_seed(vocab)
    padded = torch.randn(50, vocab + 11, generator=gen) * 3
    padded[:5] = padded[:5].round()  # many ties
    x = padded[:, :vocab]
    values, ids = top_k(x, k)
    want = torch.topk(x, k, dim=1)
    assert torch.equal(values, want.values)
    assert torch.equal(x.gather(1, ids), want.values)
    assert (ids.sort(1).values.diff(dim=1) > 0).all()  # distinct ids
    np.testing.assert_array_equal(ids[5:], want.indices[5:])


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A small random Llama (tied embeddings, as the demo teacher), saved as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-teacher")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_self_check_refuses_a_wrong_output_layer(tiny_teacher: Path) -> None:
    """The check passes the model's own engine-side columns, and refuses those of the same model
    with a wrong output layer: scaled logits (a missing logit scale or soft-cap), and an
    untied copy of the output layer with one row perturbed."""
    ids = np.random.default_rng(0).integers(0, V, 40)
    request = CaptureRequest(top_k=8, samples=4, seed=1, temperatures=(1.0,))
    model = TransformersReference(tiny_teacher)
    expected = model.capture(ids, 8)
    check_agreement(expected, model.capture_columns(ids, request))

    head = model.model.lm_head
    scaled = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    scaled.weight = torch.nn.Parameter(head.weight.detach() * 1.5)
    model.model.lm_head = scaled
    with pytest.raises(FailedPrecondition, match="disagrees with vLLM"):
        check_agreement(expected, model.capture_columns(ids, request))
    perturbed = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    weight = head.weight.detach().clone()
    weight[int(expected.token_ids[0, 0])] *= 0.5
    perturbed.weight = torch.nn.Parameter(weight)
    model.model.lm_head = perturbed
    with pytest.raises(FailedPrecondition, match="top-k"):
        check_agreement(expected, model.capture_columns(ids, request))


def test_requested_ids_are_scored(tiny_teacher: Path) -> None:
    """Log-probs of ids chosen per position (a student's top-k, say), -inf where none (< 0)."""
    model = TransformersReference(tiny_teacher)
    ids = np.random.default_rng(2).integers(0, V, 30)
    wanted = np.random.default_rng(3).integers(-1, V, (30, 5))
    cols = model.capture_columns(ids, CaptureRequest(top_k=4).scoring(wanted))
    full = model.full_logprobs(ids).numpy()
    at = np.take_along_axis(full, np.maximum(wanted, 0), axis=1)
    np.testing.assert_allclose(cols.scored_logprobs, np.where(wanted < 0, -np.inf, at), atol=1e-6)


def test_host_replica_of_the_draws(tiny_teacher: Path) -> None:
    """``draw_rows_for_key`` repeats the engine's draws from full rows (a fidelity check's
    re-derivation), and they group into the sampled rows that precompute stores."""
    model = TransformersReference(tiny_teacher)
    ids = np.random.default_rng(1).integers(0, V, 50)
    key = b"\x07" * 32
    cols = model.capture_columns(ids, CaptureRequest(samples=12, seed=seed_of_key(key)))
    engine_rows = group_draws(cols.draw_ids, cols.draw_logprobs, cols.target_logprobs)
    again = draw_rows_for_key(model.capture(ids, -1), 12, key)
    np.testing.assert_array_equal(again.token_ids, engine_rows.token_ids)
    np.testing.assert_array_equal(again.counts, engine_rows.counts)
    np.testing.assert_allclose(again.logprobs, engine_rows.logprobs, atol=1e-6)
    assert (engine_rows.counts.sum(1) == 12).all()
