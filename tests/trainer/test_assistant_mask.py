"""Assistant-only loss: records' loss masks through the wire, the collator and the losses.

A masked-out position must change nothing: not the KD term, not the CE term, not the counts a
step divides by. ``loss_on="all"`` and records without masks score every position.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from logitcache.client.codecs import TopKRows, codec_for
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace
from logitcache.client.wire import decode_batch, encode_batch
from logitcache.trainer.collate import Collator, TeacherTargets, collate_records, pack_records
from logitcache.trainer.losses import distillation_loss, fused_distillation_loss, item_counts

VOCAB, K = 40, 4


def _record(seed: int, t: int, mask: list[int] | None) -> Record:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, VOCAB))
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_ids = np.argsort(-full, axis=1)[:, :K].astype(np.int32)
    input_ids = rng.integers(0, VOCAB, size=t).astype(np.int32)
    target = np.append(full[np.arange(t - 1), input_ids[1:]], np.nan).astype(np.float32)
    return Record(
        key=f"{seed:064x}",
        input_ids=input_ids,
        token_ids=token_ids,
        logprobs=np.take_along_axis(full, token_ids, 1).astype(np.float32),
        target_logprobs=target,
        loss_mask=None if mask is None else np.asarray(mask, dtype=np.uint8),
    )


@pytest.fixture
def records() -> list[Record]:
    return [
        _record(1, 6, [0, 0, 1, 1, 0, 0]),
        _record(2, 4, None),  # a text row's record: every position counts
        _record(3, 5, [1, 0, 0, 1, 0]),
    ]


def test_collated_masks_follow_loss_on(records: list[Record]) -> None:
    batch = collate_records(records, pin_memory=False)
    assert batch["loss_mask"].dtype == torch.bool
    assert batch["loss_mask"].tolist() == [
        [False, False, True, True, False, False],
        [True, True, True, True, False, False],
        [True, False, False, True, False, False],
    ]
    assert torch.equal(batch["teacher_mask"], batch["loss_mask"])
    labels = batch["labels"]
    assert labels[0].tolist() == [-100, -100, *records[0].input_ids[3:5].tolist(), -100, -100]
    assert labels[1, :3].tolist() == records[1].input_ids[1:].tolist()
    assert labels[2].tolist() == [int(records[2].input_ids[1]), -100, -100, int(records[2].input_ids[4]), -100, -100]  # fmt: skip

    everything = collate_records(records, pin_memory=False, loss_on="all")
    assert torch.equal(everything["loss_mask"], batch["loss_mask"])  # still there to read
    assert torch.equal(everything["teacher_mask"], everything["attention_mask"].bool())
    assert (everything["labels"][0, :5] >= 0).all()

    plain = collate_records([replace(r, loss_mask=None) for r in records], pin_memory=False)
    assert "loss_mask" not in plain
    assert torch.equal(plain["teacher_mask"], everything["teacher_mask"])
    assert torch.equal(plain["labels"], everything["labels"])


def test_packed_rows_cut_masks_with_their_pieces(records: list[Record]) -> None:
    batch = pack_records(records, 4, pin_memory=False)
    real = batch["attention_mask"].bool()
    expected = np.concatenate(
        [r.loss_mask if r.loss_mask is not None else np.ones(len(r)) for r in records]
    ).astype(bool)
    # Pieces in order (6 -> 4 + 2, then 4, then 5 -> 4 + 1): the flattened real positions are
    # the records' positions in order, so their masks are too.
    assert batch["loss_mask"][real].tolist() == expected.tolist()
    assert batch["teacher_mask"][real].tolist() == expected.tolist()
    assert Collator(mode="pack", seq_len=4, pin_memory=False)(records)["loss_mask"].tolist() == (
        batch["loss_mask"].tolist()
    )


def test_bad_masks_and_options_are_refused(records: list[Record]) -> None:
    with pytest.raises(ValueError, match=r"loss_mask \(5,\)"):
        collate_records([replace(records[0], loss_mask=np.ones(5, dtype=np.uint8))])
    with pytest.raises(ValueError, match="loss_on must be one of"):
        Collator(loss_on="prompt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_on must be one of"):
        collate_records(records, loss_on="assistants")  # type: ignore[arg-type]


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_a_masked_position_changes_nothing(records: list[Record], alpha: float) -> None:
    """The loss, its gradient and the counts ignore every position the masks leave out, and
    are the loss of the assistant positions alone."""
    batch = collate_records(records, pin_memory=False)
    targets = TeacherTargets.from_batch(batch)
    counts = item_counts(targets)
    assert int(counts.kd) == int(batch["loss_mask"].sum()) == 8
    assert int(counts.ce) == 7  # the scored positions with a known next token

    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB, requires_grad=True)
    loss = distillation_loss(logits, targets, alpha=alpha)
    (grad,) = torch.autograd.grad(loss, logits)
    off = ~batch["loss_mask"]
    assert (grad[off] == 0).all() and (grad[~off].abs().sum(-1) > 0).all()

    moved = logits.detach().clone()
    moved[off] += 5 * torch.randn_like(moved[off])
    assert torch.equal(distillation_loss(moved, targets, alpha=alpha), loss)
    on = batch["loss_mask"].nonzero()[0]
    moved[on[0], on[1]] += 5.0 * torch.randn(VOCAB)
    assert not torch.allclose(distillation_loss(moved, targets, alpha=alpha), loss)

    everything = TeacherTargets.from_batch(collate_records(records, loss_on="all"))
    assert not torch.allclose(distillation_loss(logits, everything, alpha=alpha), loss)
    # The same value from the scored positions alone (one row each, nothing else counted).
    keep = batch["loss_mask"]
    alone = TeacherTargets(
        targets.token_ids[keep][None], targets.logprobs[keep][None], None,
        targets.labels[keep][None],
    )  # fmt: skip
    torch.testing.assert_close(distillation_loss(logits[keep][None], alone, alpha=alpha), loss)

    hidden_size = 8
    hidden = torch.randn(*batch["input_ids"].shape, hidden_size)
    weight = torch.randn(VOCAB, hidden_size)
    fused = fused_distillation_loss(hidden, weight, targets, alpha=alpha)
    torch.testing.assert_close(fused, distillation_loss(hidden @ weight.T, targets, alpha=alpha))
    hidden_moved = hidden.clone()
    hidden_moved[off] = torch.randn_like(hidden_moved[off])
    torch.testing.assert_close(fused_distillation_loss(hidden_moved, weight, targets, alpha=alpha), fused)  # fmt: skip


def test_masks_cross_the_wire(records: list[Record]) -> None:
    space = CaptureSpace("t" * 64, "tok", VOCAB, "topk", K, "float32", "topk-q64-delta-v1")
    codec = codec_for(space.codec, VOCAB)
    masked = [records[0], records[2]]
    rows = TopKRows(
        np.concatenate([r.token_ids for r in masked]),
        np.concatenate([r.logprobs for r in masked]),
        np.concatenate([r.target_logprobs for r in masked]),
    )
    batch = encode_batch(
        space,
        [bytes.fromhex(r.key)[:16] for r in masked],
        np.concatenate([r.input_ids for r in masked]),
        np.asarray([len(r) for r in masked]),
        codec.encode(rows),
        loss_mask=np.concatenate([r.loss_mask for r in masked]),
    )
    decoded = decode_batch(batch)
    for got, sent in zip(decoded, masked, strict=True):
        np.testing.assert_array_equal(got.loss_mask, sent.loss_mask)
    batch.loss_mask = batch.loss_mask[:-1]
    with pytest.raises(ValueError, match="loss_mask does not match lengths"):
        decode_batch(batch)
    batch.loss_mask = b""
    assert all(r.loss_mask is None for r in decode_batch(batch))
