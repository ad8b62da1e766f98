"""Batching cached records for a student: right-padded batches, or packed rows of fixed length.

Every field follows the cache's alignment (ARCHITECTURE.md, "Rows"): position t of a batch row is
the student's ``logits[:, t]``, the teacher's row t (its distribution over the token after t), and
``labels[:, t]``, the actual next token. So the tensors go straight into
:mod:`logitcache.trainer.losses` with no shift::

    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = distillation_loss(out.logits, TeacherTargets.from_batch(batch), alpha=0.1)

Fields (B rows of T positions, k = the largest k in the batch)::

    input_ids          int64   [B, T]     pad_token_id on padding
    attention_mask     int64   [B, T]     1 on real tokens
    labels             int64   [B, T]     input_ids[t + 1]; -100 where the next token is unknown
                                          (a sequence's last token) and on padding
    teacher_token_ids  int64   [B, T, k]  0 on padding rows and on padded entries of ragged rows
    teacher_logprobs   float32 [B, T, k]  -inf on padding rows and padded entries (the losses'
                                          padding convention: such entries hold no mass)
    teacher_mask       bool    [B, T]     True on every real position, the last one included
                                          (its teacher row is real even though its label is not)
    target_logprobs    float32 [B, T]     teacher log p(x[t+1]); NaN on padding and last rows
    teacher_tail_logprobs                 log of the teacher's mass outside the row's entries,
                       float32 [B, T]     from records that store it (-inf: no tail); NaN where
                                          the record has none (the losses then derive it from
                                          the entries) and on padding
    teacher_counts     int64   [B, T, k]  sampled records only (``Record.counts``): how often each
                                          entry was drawn; 0 on padding. Absent for top-k records.
    teacher_folded_entries  int64 []      with ``vocab_size`` only: teacher entries on ids the
    teacher_folded_mass   float32 []      student lacks, folded into the tail, and the most mass
                                          folded at one position (see trainer.vocab)
    teacher_tempered_log_tails            records of a space captured with temperatures only
                       float32 [B, T, m]  (``Record.tempered_log_tails``): log of the teacher's
                                          tempered mass outside the row's entries at each
                                          captured temperature (-inf: none); NaN on padding
    teacher_temperatures float32 [m]      the temperature of each column (what
                                          ``trainer.tempered.tempered_batch_loss`` looks up)
    loss_mask          bool    [B, T]     batches with a record of a chat dataset only: True where
                                          the record's ``loss_mask`` is (its target token is the
                                          assistant's), on every real position of records
                                          without one; False on padding

Assistant-only loss (``loss_on``): records of a chat dataset carry ``Record.loss_mask``, which
is about targets (row t counts when token t + 1 is the assistant's). With ``loss_on="assistant"``
(the default) a masked-out position is off in ``teacher_mask`` and its label is -100, so it adds
nothing to the KD term, the CE term or their counts (``losses.item_counts``); records without a
mask (text and token-id datasets) count every position, so the default changes nothing for them.
``loss_on="all"`` ignores the masks and scores every position.

A batch is all sampled or all top-k records (ValueError otherwise): the two need different losses
(the losses read ``teacher_counts`` and then estimate the KL from the draws, see
:func:`logitcache.trainer.losses.sampled_kl`). :class:`TeacherTargets` gathers the fields the
losses read. :func:`pack_records` adds ``position_ids`` and
``sequence_ids`` (see there).

Only a Python loop over records (one slice assignment per field and record) runs per batch; there
is no per-position Python work. Each field is one numpy allocation, handed to torch without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import get_worker_info

from logitcache.client.record import Record
from logitcache.trainer.vocab import fold_padding_ids

__all__ = [
    "IGNORE_INDEX",
    "LOSS_ON",
    "Collator",
    "LossOn",
    "TeacherTargets",
    "collate_records",
    "pack_records",
]

IGNORE_INDEX = -100
"""Label value for positions without a known next token (``F.cross_entropy``'s default)."""

LossOn = Literal["assistant", "all"]
LOSS_ON = ("assistant", "all")


@dataclass(frozen=True)
class TeacherTargets:
    """What a student is scored against at each position: the teacher's rows and the next token.

    Shapes as in the module docstring, over any leading dims (usually [B, T]). ``mask`` None
    counts every position; ``labels`` are needed only to mix in cross-entropy; ``tail_logprobs``
    None (or NaN) derives the tail from the entries; ``counts`` makes the rows sampled ones.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    tail_logprobs: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: Mapping[str, torch.Tensor]) -> TeacherTargets:
        """The targets of a batch from :func:`collate_records` or :func:`pack_records`."""
        return cls(
            token_ids=batch["teacher_token_ids"],
            logprobs=batch["teacher_logprobs"],
            mask=batch["teacher_mask"],
            labels=batch.get("labels"),
            tail_logprobs=batch.get("teacher_tail_logprobs"),
            counts=batch.get("teacher_counts"),
        )


# --- shared machinery ------------------------------------------------------------------------------


def _check_record(rec: Record) -> tuple[int, int]:
    """(T, k) of a record whose arrays agree with each other; ValueError naming it otherwise."""
    t = int(rec.input_ids.shape[0]) if rec.input_ids.ndim == 1 else -1
    tail, counts, loss_mask = rec.tail_logprobs, rec.counts, rec.loss_mask
    if (
        t < 0
        or rec.token_ids.ndim != 2
        or rec.token_ids.shape[0] != t
        or rec.logprobs.shape != rec.token_ids.shape
        or rec.target_logprobs.shape != (t,)
        or (tail is not None and tail.shape != (t,))
        or (counts is not None and counts.shape != rec.token_ids.shape)
        or (loss_mask is not None and loss_mask.shape != (t,))
    ):
        present = [("tail_logprobs", tail), ("counts", counts), ("loss_mask", loss_mask)]
        optional = "".join(f", {name} {a.shape}" for name, a in present if a is not None)
        raise ValueError(
            f"record {rec.key[:16]}: inconsistent shapes input_ids {rec.input_ids.shape}, "
            f"token_ids {rec.token_ids.shape}, logprobs {rec.logprobs.shape}, "
            f"target_logprobs {rec.target_logprobs.shape}{optional} (want [T], [T, k], [T, k], "
            "[T], tail_logprobs [T], counts [T, k], loss_mask [T])"
        )
    return t, int(rec.token_ids.shape[1])


def _sampled(records: Sequence[Record]) -> bool:
    """Whether the batch is of sampled records; ValueError if it mixes sampled and top-k ones."""
    kinds = {rec.counts is not None for rec in records}
    if len(kinds) > 1:
        sampled = [rec.key[:16] for rec in records if rec.counts is not None]
        topk = [rec.key[:16] for rec in records if rec.counts is None]
        raise ValueError(
            f"cannot batch sampled records (with counts, e.g. {sampled[0]}) together with top-k "
            f"records (without, e.g. {topk[0]}): they need different losses; keep one capture "
            "mode per stream"
        )
    return kinds == {True}


# A piece of a record placed in a batch: (record index, start, stop, batch row, column offset).
_Piece = tuple[int, int, int, int, int]


def _alloc(
    rows: int,
    width: int,
    k: int,
    pad_token_id: int,
    sampled: bool,
    masked: bool,
    temperatures: tuple[float, ...] = (),
) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "input_ids": np.full((rows, width), pad_token_id, dtype=np.int64),
        "attention_mask": np.zeros((rows, width), dtype=np.int64),
        "labels": np.full((rows, width), IGNORE_INDEX, dtype=np.int64),
        "teacher_token_ids": np.zeros((rows, width, k), dtype=np.int64),
        "teacher_logprobs": np.full((rows, width, k), -np.inf, dtype=np.float32),
        "teacher_mask": np.zeros((rows, width), dtype=np.bool_),
        "target_logprobs": np.full((rows, width), np.nan, dtype=np.float32),
        "teacher_tail_logprobs": np.full((rows, width), np.nan, dtype=np.float32),
    }
    if sampled:
        arrays["teacher_counts"] = np.zeros((rows, width, k), dtype=np.int64)
    if masked:
        arrays["loss_mask"] = np.zeros((rows, width), dtype=np.bool_)
    if temperatures:
        arrays["teacher_tempered_log_tails"] = np.full(
            (rows, width, len(temperatures)), np.nan, dtype=np.float32
        )
        arrays["teacher_temperatures"] = np.asarray(temperatures, dtype=np.float32)
    return arrays


def _temperatures(records: Sequence[Record]) -> tuple[float, ...]:
    """The temperatures every record has tails at; ValueError if the records differ."""
    found = {rec.temperatures if rec.tempered_log_tails is not None else () for rec in records}
    if len(found) > 1:
        have = ", ".join(sorted(",".join(f"{t:g}" for t in f) or "none" for f in found))
        raise ValueError(
            f"cannot batch records captured with tails at different temperatures ({have}): "
            "keep one capture space per stream"
        )
    return found.pop()


def _masked(records: Sequence[Record]) -> bool:
    return any(rec.loss_mask is not None for rec in records)


def _check_loss_on(loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")


def _fill(
    arrays: dict[str, np.ndarray],
    records: Sequence[Record],
    pieces: list[_Piece],
    vocab_size: int | None,
    loss_on: LossOn,
) -> None:
    """Copy positions [start, stop) of each record to (row, col...): one slice per field.

    With ``loss_on="assistant"``, positions off in a record's loss mask leave ``teacher_mask``
    and get label -100. Then, for a student of ``vocab_size`` rows, fold the teacher's entries
    on ids it lacks.
    """
    for i, start, stop, row, col in pieces:
        if stop <= start:
            continue  # an empty record: its row stays padding
        rec = records[i]
        k, end = rec.token_ids.shape[1], col + stop - start
        arrays["input_ids"][row, col:end] = rec.input_ids[start:stop]
        arrays["attention_mask"][row, col:end] = 1
        # Label t is x[t + 1]: known inside the record, so a cut piece keeps its last label; only
        # the record's own last token has none (never the first token of whatever follows).
        last = min(stop + 1, len(rec))
        arrays["labels"][row, col : col + last - start - 1] = rec.input_ids[start + 1 : last]
        arrays["teacher_token_ids"][row, col:end, :k] = rec.token_ids[start:stop]
        arrays["teacher_logprobs"][row, col:end, :k] = rec.logprobs[start:stop]
        arrays["teacher_mask"][row, col:end] = True
        arrays["target_logprobs"][row, col:end] = rec.target_logprobs[start:stop]
        if rec.tail_logprobs is not None:
            arrays["teacher_tail_logprobs"][row, col:end] = rec.tail_logprobs[start:stop]
        if rec.counts is not None:
            arrays["teacher_counts"][row, col:end, :k] = rec.counts[start:stop]
        if rec.tempered_log_tails is not None:
            arrays["teacher_tempered_log_tails"][row, col:end] = rec.tempered_log_tails[start:stop]
        if "loss_mask" in arrays:
            scored = True if rec.loss_mask is None else rec.loss_mask[start:stop].astype(bool)
            arrays["loss_mask"][row, col:end] = scored
            if loss_on == "assistant" and rec.loss_mask is not None:
                arrays["teacher_mask"][row, col:end] = scored
                arrays["labels"][row, col:end][~scored] = IGNORE_INDEX
    if vocab_size is not None:
        fold_padding_ids(arrays, vocab_size)


def _should_pin(pin_memory: bool | None) -> bool:
    if pin_memory is not None:
        return bool(pin_memory)
    # In a DataLoader worker, pinning is wasted (the batch is copied into shared memory to reach
    # the main process) and touches CUDA in a forked child; DataLoader(pin_memory=True) pins there.
    return torch.cuda.is_available() and get_worker_info() is None


def _to_torch(arrays: dict[str, np.ndarray], pin_memory: bool | None) -> dict[str, torch.Tensor]:
    out = {name: torch.from_numpy(a) for name, a in arrays.items()}
    if _should_pin(pin_memory):
        out = {name: t.pin_memory() for name, t in out.items()}
    return out


def _nonempty(records: Sequence[Record]) -> Sequence[Record]:
    if isinstance(records, Record):
        raise TypeError("pass a sequence of records, not one Record")
    if len(records) == 0:
        raise ValueError("cannot collate an empty list of records")
    return records


# --- padded batches --------------------------------------------------------------------------------


def collate_records(
    records: Sequence[Record],
    *,
    pad_token_id: int = 0,
    max_len: int | None = None,
    pin_memory: bool | None = None,
    vocab_size: int | None = None,
    loss_on: LossOn = "assistant",
) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``records`` (fields in the module docstring).

    ``max_len`` keeps the first ``max_len`` positions of each record. The last kept position keeps
    its teacher row, and its label is the record's next token, which is still known. Records may
    have different k (e.g. adaptive-k captures): k is padded to the batch's largest with id 0 and
    log-prob -inf (and count 0). Records must be all top-k or all sampled. ``pin_memory=None``
    pins when CUDA is available, except inside a DataLoader worker (use
    ``DataLoader(pin_memory=True)`` there, which pins in the main process). ``vocab_size``, the
    student's output size when it is below the teacher's (a padded teacher), folds the teacher's
    entries on ids >= ``vocab_size`` into the tail and counts them (see
    :mod:`logitcache.trainer.vocab`). ``loss_on``: the positions scored, "assistant" (records'
    loss masks apply) or "all" (module docstring).
    """
    records = _nonempty(records)
    _check_loss_on(loss_on)
    if max_len is not None and (
        isinstance(max_len, bool) or int(max_len) != max_len or max_len < 1
    ):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
    shapes = [_check_record(r) for r in records]
    lengths = [t if max_len is None else min(t, int(max_len)) for t, _ in shapes]
    k = max(kk for _, kk in shapes)
    arrays = _alloc(
        len(records),
        max(lengths),
        k,
        pad_token_id,
        _sampled(records),
        _masked(records),
        _temperatures(records),
    )
    _fill(arrays, records, [(i, 0, n, i, 0) for i, n in enumerate(lengths)], vocab_size, loss_on)
    return _to_torch(arrays, pin_memory)


# --- packed rows -----------------------------------------------------------------------------------


def pack_records(
    records: Sequence[Record],
    seq_len: int,
    *,
    pad_token_id: int = 0,
    pin_memory: bool | None = None,
    vocab_size: int | None = None,
    loss_on: LossOn = "assistant",
) -> dict[str, torch.Tensor]:
    """Records packed into rows of exactly ``seq_len`` positions, for students with per-document
    attention.

    Placement is deterministic and greedy in order: a record longer than ``seq_len`` is cut into
    pieces of ``seq_len`` positions (the last piece holds the remainder); then each piece goes
    into the current row if it fits there, and otherwise starts a new row. So no piece is ever
    cut at a row boundary, full pieces fill a row alone, and the last row ends in padding.

    Besides the fields of :func:`collate_records` (``teacher_mask`` and ``labels`` per piece;
    ``vocab_size`` as there):

        position_ids   int64 [R, seq_len]  0, 1, 2, ... restarting at 0 for each piece (and once
                                           more for the padding at the end of a row)
        sequence_ids   int64 [R, seq_len]  index of the piece within its row (0, 1, ...), -1 on
                                           padding

    Labels are -100 at each record's last position, so no position ever predicts the first token
    of the next packed record. At the end of a cut piece the label is the record's next token (it
    is known), and its teacher row is the one captured with the record's full preceding context.

    Requirement on the student: it must not attend across pieces. ``attention_mask`` is 1 on every
    real token and so does *not* separate them; a plain causal model given only ``input_ids`` and
    ``attention_mask`` would let each piece attend to the pieces before it in the row and train on
    wrong contexts. Use a model that takes per-document boundaries: e.g. a Hugging Face model with
    flash-attention 2/3 (``attn_implementation="flash_attention_2"``) given ``position_ids``
    (sequence starts are where position_ids == 0) and no ``attention_mask``, or a block-diagonal
    mask built from ``sequence_ids`` (``seq[:, :, None] == seq[:, None, :]`` and causal).
    Each piece's position ids start at 0, so a continuation piece of a cut record is seen by the
    student as a document of its own (its earlier context is in another row).
    """
    records = _nonempty(records)
    _check_loss_on(loss_on)
    if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    seq_len = int(seq_len)
    shapes = [_check_record(r) for r in records]
    k = max(kk for _, kk in shapes)
    sampled = _sampled(records)

    pieces: list[_Piece] = []
    row, used = -1, seq_len  # no open row yet
    for i, (t, _) in enumerate(shapes):
        for start in range(0, t, seq_len):  # per piece of seq_len positions, not per position
            stop = min(start + seq_len, t)
            if used + stop - start > seq_len:
                row, used = row + 1, 0
            pieces.append((i, start, stop, row, used))
            used += stop - start
    rows = max(row + 1, 1)

    arrays = _alloc(rows, seq_len, k, pad_token_id, sampled, _masked(records),
                    _temperatures(records))  # fmt: skip
    _fill(arrays, records, pieces, vocab_size, loss_on)
    position_ids = np.zeros((rows, seq_len), dtype=np.int64)
    sequence_ids = np.full((rows, seq_len), -1, dtype=np.int64)
    ends = np.zeros(rows, dtype=np.int64)
    count = np.zeros(rows, dtype=np.int64)
    ramp = np.arange(seq_len, dtype=np.int64)
    for _, start, stop, r, col in pieces:
        position_ids[r, col : col + stop - start] = ramp[: stop - start]
        sequence_ids[r, col : col + stop - start] = count[r]
        count[r] += 1
        ends[r] = col + stop - start
    for r in np.flatnonzero(ends < seq_len):  # the trailing padding: one more "document"
        position_ids[r, ends[r] :] = ramp[: seq_len - ends[r]]
    arrays["position_ids"] = position_ids
    arrays["sequence_ids"] = sequence_ids
    return _to_torch(arrays, pin_memory)


# --- a DataLoader collate_fn -----------------------------------------------------------------------


@dataclass(frozen=True)
class Collator:
    """``collate_fn`` for a DataLoader over records, with fixed options; picklable for workers.

    ``mode="pad"`` calls :func:`collate_records` (with ``max_len``), ``mode="pack"`` calls
    :func:`pack_records` (with ``seq_len``, required). ``pin_memory=None``, ``vocab_size`` and
    ``loss_on`` ("assistant" by default: the loss masks of chat records apply, see the module
    docstring): see collate_records.
    """

    mode: Literal["pad", "pack"] = "pad"
    pad_token_id: int = 0
    max_len: int | None = None
    seq_len: int | None = None
    pin_memory: bool | None = None
    vocab_size: int | None = None
    loss_on: LossOn = "assistant"

    def __post_init__(self) -> None:
        if self.mode not in ("pad", "pack"):
            raise ValueError(f"mode must be 'pad' or 'pack', got {self.mode!r}")
        _check_loss_on(self.loss_on)
        if self.mode == "pack" and self.seq_len is None:
            raise ValueError("mode='pack' needs seq_len")
        if self.mode == "pack" and self.max_len is not None:
            raise ValueError("max_len applies to mode='pad'; packing cuts records at seq_len")
        if self.vocab_size is not None and (
            isinstance(self.vocab_size, bool)
            or int(self.vocab_size) != self.vocab_size
            or self.vocab_size < 1
        ):
            raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")
        if self.mode == "pad" and self.seq_len is not None:
            raise ValueError("seq_len applies to mode='pack'; use max_len to truncate padded rows")

    def __call__(self, records: Sequence[Record]) -> dict[str, torch.Tensor]:
        if self.mode == "pack":
            assert self.seq_len is not None
            return pack_records(
                records,
                self.seq_len,
                pad_token_id=self.pad_token_id,
                pin_memory=self.pin_memory,
                vocab_size=self.vocab_size,
                loss_on=self.loss_on,
            )
        return collate_records(
            records,
            pad_token_id=self.pad_token_id,
            max_len=self.max_len,
            pin_memory=self.pin_memory,
            vocab_size=self.vocab_size,
            loss_on=self.loss_on,
        )
