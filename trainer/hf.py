"""Distillation with the Hugging Face ``Trainer``: the student learns from cached teacher rows.

:class:`DistillationTrainer` is a ``transformers.Trainer`` whose training data is a
:class:`~logitcache.trainer.stream.TeacherStream`, batched by
:class:`~logitcache.trainer.collate.Collator`, and whose loss is
:func:`~logitcache.trainer.losses.fused_distillation_loss` computed inside the student's output
layer (its [B, T, V] logits never exist), or :func:`~logitcache.trainer.losses.distillation_loss`
on the logits for a model without a plain output layer. Optimizer, schedule, mixed precision,
logging and checkpoints are the Trainer's own::

    args = TrainingArguments("out", max_steps=10_000, per_device_train_batch_size=8)
    stream = TeacherStream("grpc://cache:50051", "web-1b", seed=0)  # after args: see below
    check_student(stream.space, tokenizer_path="student/", vocab_size=student.config.vocab_size)
    trainer = DistillationTrainer(student, args, teacher_stream=stream,
                                  loss=DistillationLoss(kind="forward_kl", alpha=0.1))
    trainer.train()                             # or train(resume_from_checkpoint=True)

- The stream is already this rank's partition, so the trainer builds its DataLoader itself rather
  than passing it through Accelerate, which would partition an IterableDataset a second time (or,
  with dispatched batches, read only rank 0's partition and hand slices of it to every rank).
  Create the stream after ``TrainingArguments``, which initialises torch.distributed under
  torchrun, so that the stream picks up the rank; the trainer refuses a stream of another rank.
- Checkpoints hold the stream's place (``teacher_stream-rank{R}.json`` per rank): resuming
  continues with the very next batch of the interrupted epoch, instead of the Trainer's default
  of re-reading and discarding the batches already trained.
- Gradient accumulation weighs every position the same: each micro-batch's loss is a sum over
  its positions divided by the count over all micro-batches of the step (and all ranks, when
  ``average_tokens_across_devices``), transformers' ``num_items_in_batch`` convention, for the KD
  positions and the CE labels separately (:class:`~logitcache.trainer.losses.ItemCounts`).

The Trainer needs ``accelerate`` (``pip install 'transformers[torch]'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from logitcache.trainer.collate import Collator, TeacherTargets
from logitcache.trainer.losses import (
    ItemCounts,
    Kind,
    check_options,
    distillation_loss,
    fused_distillation_loss,
    item_counts,
)
from logitcache.trainer.output_layer import loss_in_output_layer, output_layer
from logitcache.trainer.stream import TeacherStream

__all__ = ["DistillationLoss", "DistillationTrainer"]

STREAM_STATE_VERSION = 1


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
    """Maps the Trainer's epoch e to the stream's epoch ``first_epoch + e`` (a new order each),
    and counts the batches it has delivered in the current epoch (the stream's place)."""

    def __init__(self, stream: TeacherStream, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self.stream = stream
        self.first_epoch = stream.epoch
        self.batches = 0  # delivered in the stream's current epoch

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer before each epoch
        if self.first_epoch + epoch != self.stream.epoch:  # else keep a loaded mid-epoch state
            self.stream.set_epoch(self.first_epoch + epoch)
            self.batches = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state(self) -> dict[str, Any]:
        return {
            "version": STREAM_STATE_VERSION,
            "dataset": self.stream.dataset,
            "seed": self.stream.seed,
            "partition": [self.stream.rank, self.stream.world_size],
            "epoch": self.stream.epoch,
            "first_epoch": self.first_epoch,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
        }

    def load(self, state: dict[str, Any]) -> None:
        here = self.state()
        for name in ("version", "dataset", "seed", "partition", "batch_size", "num_workers"):
            if state.get(name) != here[name]:
                raise ValueError(
                    f"the checkpoint's stream state has {name}={state.get(name)!r}, this run "
                    f"{here[name]!r}: resume with the same data, batch size, workers and ranks"
                )
        self.first_epoch, self.batches = int(state["first_epoch"]), int(state["batches"])
        self.stream.set_epoch(int(state["epoch"]))
        self.stream.load_batches_taken(self.batches, self.batch_size or 1, self.num_workers)


class _SaveStreamState(transformers.TrainerCallback):
    """Writes each rank's stream state into the checkpoint the Trainer has just saved."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loader = self.trainer._stream_loader
        if loader is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, _state_file(args.process_index))
        with open(path, "w") as f:
            json.dump(loader.state(), f)


def output_size(model: torch.nn.Module) -> int | None:
    """The student's output size: its output layer's rows, else its config's ``vocab_size``.

    The default collator folds teacher entries on ids at or above it into the tail, so that a
    teacher padded beyond its tokenizer distils into a student of the tokenizer's size."""
    head = output_layer(model)
    if head is not None:
        return int(head.out_features)
    inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    size = getattr(getattr(inner, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _state_file(rank: int) -> str:
    return f"teacher_stream-rank{rank}.json"


class DistillationTrainer(transformers.Trainer):
    """A ``Trainer`` that distills ``model`` from ``teacher_stream`` with ``loss``.

    ``collator`` defaults to padded batches (``Collator(vocab_size=output_size(model))``: a
    padded teacher's entries on ids the student lacks fold into the tail); with
    ``Collator(mode="pack")`` rows are given to the model with their ``position_ids`` and no
    attention mask, which separates the packed documents only in models that read document
    starts from position ids (e.g. flash attention 2). ``fused``: compute the loss inside the model's output layer (None: when it has
    a plain linear one, see :func:`~logitcache.trainer.output_layer.output_layer`). Other keyword
    arguments go to ``transformers.Trainer``.
    """

    # compute_loss divides by the step's counts (ItemCounts from get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: torch.nn.Module,
        args: transformers.TrainingArguments,
        teacher_stream: TeacherStream,
        loss: DistillationLoss | None = None,
        collator: Collator | None = None,
        fused: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model=model,
            args=args,
            train_dataset=teacher_stream,
            data_collator=collator or Collator(vocab_size=output_size(model)),
            **kwargs,
        )
        if fused and output_layer(model) is None:
            raise ValueError(
                "fused=True needs a model whose get_output_embeddings() is a plain nn.Linear "
                "that the model returns unchanged"
            )
        self.fused = output_layer(model) is not None if fused is None else fused
        self.teacher_stream = teacher_stream
        self.loss = loss or DistillationLoss()
        self._stream_loader: _EpochDataLoader | None = None
        self._stream_state: dict[str, Any] | None = None
        self.add_callback(_SaveStreamState(self))

    def train(  # type: ignore[override]
        self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; a checkpoint with the stream's state resumes the stream exactly."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir}")
        self._stream_state = None
        if isinstance(resume_from_checkpoint, str):
            path = os.path.join(resume_from_checkpoint, _state_file(self.args.process_index))
            if os.path.exists(path):
                with open(path) as f:
                    self._stream_state = json.load(f)
        if self._stream_state is None:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        # The stream continues by itself: the Trainer must not skip (read and discard) batches.
        skip = self.args.ignore_data_skip
        self.args.ignore_data_skip = True
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.args.ignore_data_skip = skip

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
        loader = _EpochDataLoader(
            stream,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            prefetch_factor=args.dataloader_prefetch_factor,
        )
        if self._stream_state is not None:
            loader.load(self._stream_state)
            self._stream_state = None
        self._stream_loader = loader
        return loader

    def get_batch_samples(  # type: ignore[override]
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], ItemCounts | None]:
        """The step's micro-batches and their KD and CE counts (over all ranks when the Trainer
        averages tokens across devices), by which each micro-batch's loss is divided."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        counts = [item_counts(TeacherTargets.from_batch(b)) for b in batches]
        totals = torch.tensor([[float(c.kd), float(c.ce)] for c in counts], device=device).sum(0)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            totals = self.accelerator.gather(totals.unsqueeze(0)).sum(0)
            # DDP averages the ranks' gradients: undo it, so that the step is one global mean.
            totals = totals / self.args.world_size
        return batches, ItemCounts(totals[0], totals[1])

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        targets = TeacherTargets.from_batch(inputs)
        # From get_batch_samples when training; anything else (evaluation): this batch's mean.
        counts = num_items_in_batch if isinstance(num_items_in_batch, ItemCounts) else None
        options = dict(
            kind=self.loss.kind,
            beta=self.loss.beta,
            alpha=self.loss.alpha,
            temperature=self.loss.temperature,
            num_items=counts,
        )
        # No labels to the model: its own cross-entropy would be wasted work (alpha mixes it in).
        if "position_ids" in inputs:
            model_inputs = {
                "input_ids": inputs["input_ids"],
                "position_ids": inputs["position_ids"],
            }
        else:
            model_inputs = {
                "input_ids": inputs["input_ids"],
                "attention_mask": inputs["attention_mask"],
            }
        head = output_layer(model) if self.fused else None
        if head is None:
            outputs = model(**model_inputs, use_cache=False)
            loss = distillation_loss(outputs.logits, targets, **options)  # type: ignore[arg-type]
            return (loss, outputs) if return_outputs else loss

        def fused_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
            return fused_distillation_loss(hidden, weight, targets, lm_head_bias=bias, **options)  # type: ignore[arg-type]

        with loss_in_output_layer(head, fused_loss) as scored:
            outputs = model(**model_inputs, use_cache=False)
        loss = scored.loss_from(outputs)
        return (loss, outputs) if return_outputs else loss
