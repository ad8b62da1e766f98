"""Distillation with the Hugging Face ``Trainer``: the student learns from cached teacher rows.

:class:`DistillationTrainer` is a ``transformers.Trainer`` whose training data is a
:class:`~logitcache.trainer.stream.TeacherStream`, batched by
:class:`~logitcache.trainer.collate.Collator`, and whose loss is
:func:`~logitcache.trainer.losses.distillation_loss`. Optimizer, schedule, mixed precision,
logging and checkpoints are the Trainer's own::

    args = TrainingArguments("out", max_steps=10_000, per_device_train_batch_size=8)
    stream = TeacherStream("grpc://cache:50051", "web-1b", seed=0)  # after args: see below
    check_student(stream.space, tokenizer_path="student/", vocab_size=student.config.vocab_size)
    trainer = DistillationTrainer(student, args, teacher_stream=stream,
                                  loss=DistillationLoss(kind="forward_kl", alpha=0.1))
    trainer.train()

The stream is already this rank's partition, so the trainer builds its DataLoader itself rather
than passing it through Accelerate, which would partition an IterableDataset a second time (or,
with dispatched batches, read only rank 0's partition and hand slices of it to every rank).
Create the stream after ``TrainingArguments``, which initialises torch.distributed under
torchrun, so that the stream picks up the rank; the trainer refuses a stream of another rank.

The Trainer needs ``accelerate`` (``pip install 'transformers[torch]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader

from logitcache.trainer.collate import Collator
from logitcache.trainer.losses import Kind, check_options, distillation_loss
from logitcache.trainer.stream import TeacherStream

__all__ = ["DistillationLoss", "DistillationTrainer"]


@dataclass(frozen=True)
class DistillationLoss:
    """``(1 - alpha) * KD + alpha * CE``; the fields are those of ``distillation_loss``.

    ``kind``: forward_kl, reverse_kl or jsd (``beta`` weights the teacher's side of jsd).
    ``temperature`` != 1 compares both sides on the teacher's k ids only (see losses).
    """

    kind: Kind = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:  # fail when the job is set up, not at its first step
        check_options(self.kind, self.alpha, self.beta, self.temperature)


class _EpochDataLoader(DataLoader):
    """Maps the Trainer's epoch e to the stream's epoch ``first_epoch + e`` (a new order each)."""

    def __init__(self, stream: TeacherStream, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self.stream = stream
        self.first_epoch = stream.epoch

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer before each epoch
        if self.first_epoch + epoch != self.stream.epoch:  # else keep a loaded mid-epoch state
            self.stream.set_epoch(self.first_epoch + epoch)


class DistillationTrainer(transformers.Trainer):
    """A ``Trainer`` that distills ``model`` from ``teacher_stream`` with ``loss``.

    ``collator`` defaults to padded batches (``Collator()``); ``Collator(mode="pack")`` rows are
    given to the model with their ``position_ids`` and no attention mask, which separates the
    packed documents only in models that read document starts from position ids (e.g. flash
    attention 2). Other keyword arguments go to ``transformers.Trainer``.
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: torch.nn.Module,
        args: transformers.TrainingArguments,
        teacher_stream: TeacherStream,
        loss: DistillationLoss | None = None,
        collator: Collator | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model=model,
            args=args,
            train_dataset=teacher_stream,
            data_collator=collator or Collator(),
            **kwargs,
        )
        self.teacher_stream = teacher_stream
        self.loss = loss or DistillationLoss()

    def get_train_dataloader(self) -> DataLoader:
        stream, args = self.teacher_stream, self.args
        if (stream.rank, stream.world_size) != (args.process_index, args.world_size):
            raise ValueError(
                f"teacher_stream reads partition {stream.rank} of {stream.world_size}, but this "
                f"process is rank {args.process_index} of {args.world_size}: create the stream "
                "after TrainingArguments (which initialises torch.distributed), or pass rank= "
                "and world_size="
            )
        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            raise ValueError(
                "dataloader_persistent_workers would keep each worker's copy of the stream in "
                "its first epoch; leave it off"
            )
        return _EpochDataLoader(
            stream,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            prefetch_factor=args.dataloader_prefetch_factor,
        )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        # No labels to the model: its own cross-entropy would be wasted work (alpha mixes it in).
        if "position_ids" in inputs:
            outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
        else:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = distillation_loss(
            outputs.logits,
            inputs["teacher_token_ids"],
            inputs["teacher_logprobs"],
            inputs["teacher_mask"],
            inputs["labels"],
            kind=self.loss.kind,
            beta=self.loss.beta,
            alpha=self.loss.alpha,
            temperature=self.loss.temperature,
            teacher_tail_logprobs=inputs.get("teacher_tail_logprobs"),
            teacher_counts=inputs.get("teacher_counts"),
        )
        return (loss, outputs) if return_outputs else loss
