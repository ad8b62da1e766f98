"""The pieces of ``logitcache bench distill`` that decide its figures, on a tiny student: the fused
and logits paths train the same student, and the step's peak memory is measured."""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaForCausalLM

from logitcache.bench import distill
from logitcache.trainer import losses

VOCAB, SEQ, BATCH, STEPS = 4096, 16, 4, 4


def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(distill.student_config(VOCAB, SEQ, 32, 1))


def fixed_batch(step: int):
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return ids, torch.ones_like(ids), distill.next_token_labels(ids), {}


def run(step_loss: distill.StepLoss) -> distill.RunResult:
    args = argparse.Namespace(lr=1e-2, steps=STEPS)
    return distill.train("t", student, fixed_batch, step_loss, None, args, None)


def test_fused_and_logits_cross_entropy_train_the_same_student() -> None:
    on_logits = run(
        distill.on_logits(lambda logits, labels, extra: distill.cross_entropy(logits, labels))
    )
    fused = run(
        distill.fused(lambda h, w, b, labels, extra: losses.fused_cross_entropy(h, w, labels))
    )
    torch.testing.assert_close(fused.losses, on_logits.losses, rtol=1e-4, atol=1e-4)
    for p, q in zip(fused.model.parameters(), on_logits.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    assert fused.positions == on_logits.positions == STEPS * BATCH * SEQ
    runs = {"logits": on_logits, "fused": fused}
    distill.measure_steps(runs, student, 1e-2)
    assert all(r.step_s > 0 for r in runs.values())
    # The logits path holds [B, T, V] logits and their gradient; the fused one never does.
    logits_bytes = BATCH * SEQ * VOCAB * 4
    assert on_logits.peak_bytes > 2 * logits_bytes > fused.peak_bytes > 0


def test_padded_teacher_divergence_ignores_the_padding() -> None:
    log_p = torch.randn(3, 5).log_softmax(-1)
    log_q = torch.randn(3, 9).log_softmax(-1)
    padded = distill.pad_vocabulary(log_p, 9)
    kl = distill.dense_divergence(padded, log_q, "forward_kl")
    assert torch.isfinite(kl).all()
    want = (log_p.exp() * (log_p - log_q[:, :5])).sum(-1)
    torch.testing.assert_close(kl, want)


def test_data_texts_give_disjoint_train_and_held_out_blocks(real_text_teacher, tmp_path) -> None:
    """--data: the held-out blocks are the file's last ones, the training blocks the others in
    order (repeated when more are asked for), all of the teacher's tokens; too little text for
    the held-out blocks is refused."""
    import json

    import numpy as np
    import pytest

    from logitcache.bench.storage import data_sequences
    from logitcache.client.errors import InvalidArgument
    from logitcache.demo.real_text import held_out_path

    data = str(held_out_path(real_text_teacher))
    blocks = np.stack(data_sequences(str(real_text_teacher), data, 1 << 30, 64))
    train, held_out = distill.data_token_sequences(
        str(real_text_teacher), data, len(blocks) + 3, 5, 64
    )
    assert train.dtype == held_out.dtype == torch.int64 and held_out.shape == (5, 64)
    np.testing.assert_array_equal(held_out.numpy(), blocks[-5:])
    np.testing.assert_array_equal(train[: len(blocks) - 5].numpy(), blocks[:-5])
    np.testing.assert_array_equal(train[len(blocks) - 5 :].numpy(), blocks[:8])
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": " ".join(["word"] * 200)}) + "\n")
    with pytest.raises(InvalidArgument, match="eval-sequences"):
        distill.data_token_sequences(str(real_text_teacher), str(short), 4, 100, 16)


def test_held_out_kl_at_a_temperature_is_the_dense_tempered_kl() -> None:
    """The T=2 score compares softmax(logits / T) of teacher and student over the whole
    vocabulary (a padded student vocabulary included), and is the plain KL at T = 1."""
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(4, 6, generator=gen), torch.randn(4, 9, generator=gen)
    log_p = distill.pad_vocabulary(teacher.log_softmax(-1), 9)
    log_q = student.log_softmax(-1)
    p_t = (teacher / 2).softmax(-1)
    want = (p_t * (p_t.log() - (student / 2).log_softmax(-1)[:, :6])).sum(-1)
    torch.testing.assert_close(distill.tempered_kl(log_p, log_q, 2.0), want)
    torch.testing.assert_close(
        distill.tempered_kl(log_p, log_q, 1.0), distill.dense_divergence(log_p, log_q, "forward_kl")
    )
