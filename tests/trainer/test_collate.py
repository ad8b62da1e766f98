"""Collation of cached records: padded batches, packed rows, the DataLoader collate_fn."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from logitcache.client.codecs import TopKRows
from logitcache.client.record import Record
from logitcache.server.engine.sampling import sample_rows
from logitcache.trainer import losses
from logitcache.trainer.collate import Collator, collate_records, pack_records

VOCAB = 50


def make_record(seed: int, t: int, k: int, *, ragged_tail: int = 0) -> Record:
    """A record of t tokens with top-k rows; the last ``ragged_tail`` entries of each row are
    padding (-inf log-prob, id -1), as an adaptive-k capture would store them."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, VOCAB, size=t).astype(np.int32)
    token_ids = np.stack([rng.permutation(VOCAB)[:k] for _ in range(t)]).reshape(t, k)
    logits = rng.normal(size=(t, VOCAB))
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logprobs = -np.sort(-np.take_along_axis(full, token_ids, 1), axis=1)
    if ragged_tail:
        logprobs[:, k - ragged_tail :] = -np.inf
        token_ids[:, k - ragged_tail :] = -1
    target = np.full(t, np.nan, dtype=np.float32)
    target[:-1] = full[np.arange(t - 1), input_ids[1:]]
    return Record(
        key=f"{seed:064x}",
        input_ids=input_ids,
        token_ids=token_ids.astype(np.int32),
        logprobs=logprobs.astype(np.float32),
        target_logprobs=target,
    )


@pytest.fixture
def records() -> list[Record]:
    return [make_record(1, 5, 4), make_record(2, 9, 6, ragged_tail=2), make_record(3, 1, 3)]


FIELDS = {
    "input_ids": torch.int64,
    "attention_mask": torch.int64,
    "labels": torch.int64,
    "teacher_token_ids": torch.int64,
    "teacher_logprobs": torch.float32,
    "teacher_mask": torch.bool,
    "target_logprobs": torch.float32,
    "teacher_tail_logprobs": torch.float32,
}


def test_padded_batch_fields(records: list[Record]) -> None:
    batch = collate_records(records, pad_token_id=7, pin_memory=False)
    assert set(batch) == set(FIELDS)
    for name, dtype in FIELDS.items():
        assert batch[name].dtype == dtype, name
        assert batch[name].shape[:2] == (3, 9), name
    assert batch["teacher_token_ids"].shape == batch["teacher_logprobs"].shape == (3, 9, 6)
    for b, rec in enumerate(records):
        n, k = len(rec), rec.k
        ids = batch["input_ids"][b]
        assert ids[:n].tolist() == rec.input_ids.tolist()
        assert (ids[n:] == 7).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (9 - n)
        assert batch["teacher_mask"][b].tolist() == [True] * n + [False] * (9 - n)
        # labels[t] == input_ids[t + 1]; -100 on the last real position and on padding
        labels = batch["labels"][b]
        assert labels[: n - 1].tolist() == ids[1:n].tolist()
        assert (labels[n - 1 :] == -100).all()
        # teacher rows exactly as stored; k padding with id 0 / -inf; padding rows likewise
        np.testing.assert_array_equal(batch["teacher_token_ids"][b, :n, :k].numpy(), rec.token_ids)
        np.testing.assert_array_equal(batch["teacher_logprobs"][b, :n, :k].numpy(), rec.logprobs)
        assert (batch["teacher_token_ids"][b, :, k:] == 0).all()
        assert (batch["teacher_token_ids"][b, n:] == 0).all()
        assert torch.isneginf(batch["teacher_logprobs"][b, :, k:]).all()
        assert torch.isneginf(batch["teacher_logprobs"][b, n:]).all()
        np.testing.assert_array_equal(batch["target_logprobs"][b, :n].numpy(), rec.target_logprobs)
        assert torch.isnan(batch["target_logprobs"][b, n - 1 :]).all()
        assert torch.isnan(batch["teacher_tail_logprobs"][b]).all()  # no record stores a tail
        assert not batch["input_ids"].is_pinned()


def test_max_len_truncates_and_keeps_the_next_label(records: list[Record]) -> None:
    batch = collate_records(records, max_len=4, pin_memory=False)
    assert batch["input_ids"].shape == (3, 4)
    long = records[1]  # 9 tokens cut to 4: its last kept label is the real next token
    assert batch["labels"][1].tolist() == long.input_ids[1:5].tolist()
    assert batch["teacher_mask"][1].all()
    np.testing.assert_array_equal(batch["teacher_logprobs"][1, :, :6].numpy(), long.logprobs[:4])
    assert batch["target_logprobs"][1, 3].item() == pytest.approx(float(long.target_logprobs[3]))
    short = records[0]  # 5 tokens cut to 4: same
    assert batch["labels"][0].tolist() == short.input_ids[1:5].tolist()
    assert batch["labels"][2].tolist() == [-100] * 4  # 1 token: no label at all
    with pytest.raises(ValueError, match="max_len"):
        collate_records(records, max_len=0)


def test_bad_input_is_refused(records: list[Record]) -> None:
    with pytest.raises(ValueError, match="empty"):
        collate_records([])
    rec = records[0]
    broken = Record(rec.key, rec.input_ids, rec.token_ids[:-1], rec.logprobs, rec.target_logprobs)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        collate_records([broken])


def check_packed(batch: dict[str, torch.Tensor], records: list[Record], seq_len: int) -> None:
    """Every position of every record appears exactly once, in order, with its teacher row."""
    sampled = any(rec.counts is not None for rec in records)
    extra = {"teacher_counts"} if sampled else set()
    assert set(batch) == {*FIELDS, "position_ids", "sequence_ids", *extra}
    rows = batch["input_ids"].shape[0]
    for name, t in batch.items():
        assert t.shape[:2] == (rows, seq_len), name
    real = batch["attention_mask"].bool()
    assert torch.equal(real, batch["teacher_mask"])
    assert torch.equal(real, batch["sequence_ids"] >= 0)
    flat_ids = batch["input_ids"][real]
    flat_pos = batch["position_ids"][real]
    flat_labels = batch["labels"][real]
    flat_lp = batch["teacher_logprobs"][real]
    flat_tok = batch["teacher_token_ids"][real]
    flat_tail = batch["teacher_tail_logprobs"][real]
    assert flat_ids.tolist() == np.concatenate([r.input_ids for r in records]).tolist()
    k = batch["teacher_logprobs"].shape[-1]
    at = 0
    for rec in records:
        n = len(rec)
        np.testing.assert_array_equal(flat_lp[at : at + n, : rec.k].numpy(), rec.logprobs)
        np.testing.assert_array_equal(flat_tok[at : at + n, : rec.k].numpy(), rec.token_ids)
        assert torch.isneginf(flat_lp[at : at + n, rec.k : k]).all()
        tail = rec.tail_logprobs if rec.tail_logprobs is not None else np.full(n, np.nan)
        np.testing.assert_array_equal(flat_tail[at : at + n].numpy(), tail.astype(np.float32))
        if sampled:
            flat_counts = batch["teacher_counts"][real]
            np.testing.assert_array_equal(flat_counts[at : at + n, : rec.k].numpy(), rec.counts)
            assert (flat_counts[at : at + n, rec.k :] == 0).all()
        # labels never cross a record boundary: the next token within the record, then -100
        assert flat_labels[at : at + n - 1].tolist() == rec.input_ids[1:].tolist()
        assert flat_labels[at + n - 1].item() == -100
        # positions restart at 0 for each record and for each seq_len piece of a long one
        assert flat_pos[at : at + n].tolist() == [i % seq_len for i in range(n)]
        at += n
    # padding: id 0, -100, -inf, NaN, sequence -1
    pad = ~real
    assert (batch["input_ids"][pad] == 0).all() and (batch["labels"][pad] == -100).all()
    assert torch.isneginf(batch["teacher_logprobs"][pad]).all()
    assert torch.isnan(batch["target_logprobs"][pad]).all()
    assert torch.isnan(batch["teacher_tail_logprobs"][pad]).all()
    if sampled:
        assert (batch["teacher_counts"][pad] == 0).all()
    # sequence ids count the pieces within each row, from 0
    for r in range(rows):
        seq = batch["sequence_ids"][r][real[r]]
        starts = batch["position_ids"][r][real[r]] == 0
        assert seq.tolist() == (torch.cumsum(starts.long(), 0) - 1).tolist()


def test_pack_short_records(records: list[Record]) -> None:
    recs = [records[0], records[2], make_record(4, 3, 4), make_record(5, 6, 2)]  # 5, 1, 3, 6
    batch = pack_records(recs, 10, pin_memory=False)
    check_packed(batch, recs, 10)
    # greedy in order: [5, 1, 3] fills 9 of row 0; 6 does not fit and starts row 1
    assert batch["sequence_ids"][0].tolist() == [0] * 5 + [1] + [2] * 3 + [-1]
    assert batch["sequence_ids"][1].tolist() == [0] * 6 + [-1] * 4
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 0]
    assert batch["labels"][0, 4].item() == -100  # never predicts the next record's first token


def test_pack_splits_a_long_record(records: list[Record]) -> None:
    recs = [records[2], records[1], records[0]]  # 1, 9 (split 4+4+1), 5 (split 4+1)
    batch = pack_records(recs, 4, pin_memory=False)
    check_packed(batch, recs, 4)
    assert batch["input_ids"].shape == (6, 4)  # [1] [4] [4] [1] [4] [1]
    # a cut piece keeps the record's next token as its last label
    assert batch["labels"][1, 3].item() == int(records[1].input_ids[4])
    with pytest.raises(ValueError, match="seq_len"):
        pack_records(recs, 0)


def test_collator_pickles_and_feeds_a_dataloader(records: list[Record]) -> None:
    collator = pickle.loads(pickle.dumps(Collator(max_len=8, pin_memory=False)))
    data = records * 3
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collator, num_workers=0)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 1]
    assert batches[0]["input_ids"].shape[1] == 8
    packer = pickle.loads(pickle.dumps(Collator(mode="pack", seq_len=6, pin_memory=False)))
    check_packed(packer(records), records, 6)
    with pytest.raises(ValueError, match="seq_len"):
        Collator(mode="pack")


def test_batch_feeds_the_losses_and_padding_is_ignored(records: list[Record]) -> None:
    batch = collate_records(records, pin_memory=False)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB, generator=gen)
    args = (batch["teacher_token_ids"], batch["teacher_logprobs"], batch["teacher_mask"])
    loss = losses.forward_kl(logits, *args)
    assert math.isfinite(loss.item()) and loss.item() > 0
    changed = logits.clone()
    changed[~batch["teacher_mask"]] = torch.randn(
        int((~batch["teacher_mask"]).sum()), VOCAB, generator=gen
    )
    assert losses.forward_kl(changed, *args).item() == loss.item()
    mixed = losses.distillation_loss(logits, *args, batch["labels"], alpha=0.5)
    assert math.isfinite(mixed.item())
    packed = pack_records(records, 8, pin_memory=False)
    z = torch.randn(*packed["input_ids"].shape, VOCAB, generator=gen)
    packed_args = (packed["teacher_token_ids"], packed["teacher_logprobs"])
    assert math.isfinite(losses.forward_kl(z, *packed_args, packed["teacher_mask"]).item())


def test_empty_record_is_a_padding_row(records: list[Record]) -> None:
    empty = Record(
        "e" * 64,
        *(np.zeros(s, d) for s, d in [(0, np.int32), ((0, 2), np.int32)]),
        np.zeros((0, 2), np.float32),
        np.zeros(0, np.float32),
    )
    batch = collate_records([empty, records[0]], pin_memory=False)
    assert batch["input_ids"].shape == (2, 5)
    assert not batch["teacher_mask"][0].any() and (batch["labels"][0] == -100).all()
    check_packed(pack_records([empty, records[0], empty], 6, pin_memory=False), [records[0]], 6)


# --- ragged rows, explicit tails, sampled records --------------------------------------------------


def make_ragged_record(seed: int, t: int, k: int, *, tail: bool = False) -> Record:
    """A top-k record whose rows hold between 1 and k entries (padding id 0, log-prob -inf), as an
    adaptive-k capture stores them. With ``tail``: an explicit tail per row, deliberately not
    1 - sum(entries) (as after the codec's rounding), and -inf ("no tail") on one row."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, VOCAB)) * 2.0
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    pad = np.arange(k) >= rng.integers(1, k + 1, size=t)[:, None]
    logprobs = np.where(pad, -np.inf, np.take_along_axis(full, order, 1))
    tail_logprobs = None
    if tail:
        exact = np.log1p(-np.exp(logprobs).sum(-1))
        tail_logprobs = (exact + rng.normal(scale=0.5, size=t)).astype(np.float32)
        tail_logprobs[t // 2] = -np.inf
    input_ids = rng.integers(1, VOCAB, size=t).astype(np.int32)
    target = np.full(t, np.nan, dtype=np.float32)
    target[:-1] = full[np.arange(t - 1), input_ids[1:]]
    return Record(
        key=f"{seed:064x}",
        input_ids=input_ids,
        token_ids=np.where(pad, 0, order).astype(np.int32),
        logprobs=logprobs.astype(np.float32),
        target_logprobs=target,
        tail_logprobs=tail_logprobs,
    )


def make_sampled_record(seed: int, t: int, samples: int) -> Record:
    """A sampled record: ``samples`` draws per position from a random teacher (ragged rows)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, VOCAB)) * 2.0
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = TopKRows(
        token_ids=np.tile(np.arange(VOCAB, dtype=np.int32), (t, 1)),
        logprobs=full,
        target_logprobs=np.full(t, np.nan, dtype=np.float32),
    )
    drawn = sample_rows(rows, samples, rng)
    return Record(
        key=f"{seed:064x}",
        input_ids=rng.integers(1, VOCAB, size=t).astype(np.int32),
        token_ids=drawn.token_ids,
        logprobs=drawn.logprobs,
        target_logprobs=drawn.target_logprobs,
        counts=drawn.counts,
    )


def per_row_loss(logits: torch.Tensor, records: list[Record], **kwargs) -> torch.Tensor:
    """The reference: each real position on its own, with only its unpadded entries (and its
    record's tail), then the mean over all of them. Records sit at batch rows 0, 1, ..."""
    values = []
    for b, rec in enumerate(records):
        for t, n in enumerate(rec.row_lengths.tolist()):
            z = logits[b, t][None, None]
            ids = torch.from_numpy(rec.token_ids[t, :n].astype(np.int64))[None, None]
            lp = torch.from_numpy(rec.logprobs[t, :n])[None, None]
            if rec.counts is not None:
                counts = torch.from_numpy(rec.counts[t, :n].astype(np.int64))[None, None]
                values.append(losses.sampled_kl(z, ids, counts, lp, None))
                continue
            tail = None
            if rec.tail_logprobs is not None:
                tail = torch.tensor([[float(rec.tail_logprobs[t])]], dtype=torch.float32)
            values.append(losses.forward_kl(z, ids, lp, None, teacher_tail_logprobs=tail, **kwargs))
    return torch.stack(values).mean()


def test_ragged_batch_equals_each_row_on_its_own_entries() -> None:
    records = [make_ragged_record(30, 5, 7), make_ragged_record(31, 3, 4), make_record(32, 4, 5)]
    assert len({tuple(r.row_lengths) for r in records[:2]}) == 2
    assert len(set(records[0].row_lengths.tolist())) > 1  # ragged within a record too
    batch = collate_records(records, pin_memory=False)
    logits = torch.randn(
        *batch["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(3)
    )
    logits = logits.double()
    args = (batch["teacher_token_ids"], batch["teacher_logprobs"], batch["teacher_mask"])
    tail = batch["teacher_tail_logprobs"]
    for kwargs in ({}, {"temperature": 2.0}):
        got = losses.forward_kl(logits, *args, teacher_tail_logprobs=tail, **kwargs)
        torch.testing.assert_close(got, per_row_loss(logits, records, **kwargs), rtol=0, atol=1e-12)


def test_explicit_tail_flows_into_the_loss() -> None:
    records = [make_ragged_record(40, 6, 5, tail=True), make_record(41, 4, 3)]  # with / without
    batch = collate_records(records, pin_memory=False)
    tail = batch["teacher_tail_logprobs"]
    np.testing.assert_array_equal(tail[0].numpy(), records[0].tail_logprobs)
    assert torch.isneginf(tail[0, 3]) and torch.isnan(tail[1]).all()
    logits = torch.randn(
        2, 6, VOCAB, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    args = (batch["teacher_token_ids"], batch["teacher_logprobs"], batch["teacher_mask"])
    got = losses.forward_kl(logits, *args, teacher_tail_logprobs=tail)
    torch.testing.assert_close(got, per_row_loss(logits, records), rtol=0, atol=1e-12)
    assert abs(got.item() - losses.forward_kl(logits, *args).item()) > 1e-3  # it does change it
    mixed = losses.distillation_loss(
        logits, *args, batch["labels"], alpha=0.5, teacher_tail_logprobs=tail
    )
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))
    torch.testing.assert_close(mixed, 0.5 * got + 0.5 * ce, rtol=1e-12, atol=1e-12)


def test_sampled_records_collate_with_counts() -> None:
    records = [make_sampled_record(50, 5, 6), make_sampled_record(51, 3, 12)]
    assert records[0].k != records[1].k  # different widths: padded to the larger
    batch = collate_records(records, pin_memory=False)
    assert set(batch) == {*FIELDS, "teacher_counts"}
    counts = batch["teacher_counts"]
    assert counts.dtype == torch.int64 and counts.shape == batch["teacher_token_ids"].shape
    for b, rec in enumerate(records):
        np.testing.assert_array_equal(counts[b, : len(rec), : rec.k].numpy(), rec.counts)
        assert (counts[b, len(rec) :] == 0).all() and (counts[b, :, rec.k :] == 0).all()
    assert (counts.sum(-1)[batch["teacher_mask"]] == torch.tensor([6] * 5 + [12] * 3)).all()
    assert torch.isnan(batch["teacher_tail_logprobs"]).all()
    logits = torch.randn(
        2, 5, VOCAB, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    got = losses.distillation_loss(
        logits,
        batch["teacher_token_ids"],
        batch["teacher_logprobs"],
        batch["teacher_mask"],
        teacher_tail_logprobs=batch["teacher_tail_logprobs"],
        teacher_counts=counts,
    )
    torch.testing.assert_close(got, per_row_loss(logits, records), rtol=0, atol=1e-12)


def test_pack_with_tails_and_counts() -> None:
    topk = [make_ragged_record(60, 7, 5, tail=True), make_record(61, 3, 4)]
    batch = pack_records(topk, 4, pin_memory=False)  # 7 is cut into 4 + 3
    check_packed(batch, topk, 4)
    sampled = [make_sampled_record(62, 6, 8), make_sampled_record(63, 2, 3)]
    packed = pack_records(sampled, 5, pin_memory=False)
    check_packed(packed, sampled, 5)
    check_packed(Collator(mode="pack", seq_len=3, pin_memory=False)(sampled), sampled, 3)
    # the loss over the packed rows is the loss over every record position
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(*packed["input_ids"].shape, VOCAB, generator=gen, dtype=torch.float64)
    real = packed["teacher_mask"]
    got = losses.sampled_kl(
        logits,
        packed["teacher_token_ids"],
        packed["teacher_counts"],
        packed["teacher_logprobs"],
        real,
    )
    flat = logits[real]  # record positions in order: lay them out as one row per record
    rows = torch.nn.utils.rnn.pad_sequence(list(flat.split([len(r) for r in sampled])), True)
    torch.testing.assert_close(got, per_row_loss(rows, sampled), rtol=0, atol=1e-12)


def test_mixed_sampled_and_topk_is_refused(records: list[Record]) -> None:
    mixed = [records[0], make_sampled_record(70, 3, 4)]
    with pytest.raises(ValueError, match="sampled records .* top-k"):
        collate_records(mixed)
    with pytest.raises(ValueError, match="sampled records .* top-k"):
        pack_records(mixed, 8)
    with pytest.raises(ValueError, match="sampled records .* top-k"):
        Collator(pin_memory=False)(mixed)


def test_inconsistent_tail_or_counts_is_refused(records: list[Record]) -> None:
    rec = records[0]
    args = (rec.key, rec.input_ids, rec.token_ids, rec.logprobs, rec.target_logprobs)
    with pytest.raises(ValueError, match="inconsistent shapes.*tail_logprobs"):
        collate_records([Record(*args, tail_logprobs=np.zeros(len(rec) + 1, np.float32))])
    with pytest.raises(ValueError, match="inconsistent shapes.*counts"):
        pack_records([Record(*args, counts=np.ones((len(rec), rec.k + 1), np.int32))], 8)
