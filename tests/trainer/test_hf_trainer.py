"""DistillationTrainer in one process on a real (synthetic) store: resuming a checkpoint continues
with the very next batch, gradient accumulation weighs positions, and the fused path is the
logits path's loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from logitcache.bench.synthetic import synthetic_store
from logitcache.trainer import TeacherStream, losses
from logitcache.trainer.collate import Collator, TeacherTargets

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from logitcache.trainer.hf import DistillationLoss, DistillationTrainer  # noqa: E402

RECORDS, SEQ, BATCH = 22, 8, 4  # an epoch: 6 batches, the last one of 2 records


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return synthetic_store(tmp_path_factory.mktemp("hf") / "store", RECORDS * SEQ, SEQ, 4, 100)


class KeyLoggingCollator(Collator):
    """Collator() that also notes which records went into each batch."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "batches", [])

    def __call__(self, records):  # type: ignore[no-untyped-def]
        self.batches.append([r.key for r in records])  # type: ignore[attr-defined]
        return super().__call__(records)


def student() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def trainer(store: str, out: Path, steps: int, **overrides) -> DistillationTrainer:  # type: ignore[no-untyped-def]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=1e-2, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=1, lr_scheduler_type="constant", **overrides,
    )  # fmt: skip
    return DistillationTrainer(
        student(), args, teacher_stream=TeacherStream(store, "bench", seed=3),
        loss=DistillationLoss(alpha=0.2), collator=KeyLoggingCollator(),
    )  # fmt: skip


def test_resume_continues_with_the_next_batch(store: str, tmp_path: Path) -> None:
    """8 steps cross an epoch boundary; resumed from step 3, steps 4-8 read the same batches and
    end with the same student (a constant learning rate: the same in the 3- and 8-step runs)."""
    whole = trainer(store, tmp_path / "whole", 8)
    whole.train()
    interrupted = trainer(store, tmp_path / "cut", 3)
    interrupted.train()
    assert (tmp_path / "cut/checkpoint-3/teacher_stream-rank0.json").exists()
    resumed = trainer(store, tmp_path / "cut", 8)
    resumed.train(resume_from_checkpoint=True)
    seen = [whole.data_collator.batches, interrupted.data_collator.batches]  # type: ignore[attr-defined]
    assert seen[1] == seen[0][:3]
    assert resumed.data_collator.batches == seen[0][3:]  # type: ignore[attr-defined]
    for p, q in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_accumulated_micro_batches_weigh_every_position_the_same(
    store: str, tmp_path: Path
) -> None:
    t = trainer(store, tmp_path, 1, gradient_accumulation_steps=2)
    batches = [next(iter(t.get_train_dataloader())) for _ in range(1)]
    small = dict(batches[0])
    small["teacher_mask"] = small["teacher_mask"].clone()
    small["teacher_mask"][1:] = False  # far fewer KD positions than the other micro-batch
    micro = [small, batches[0]]
    _, counts = t.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    assert isinstance(counts, losses.ItemCounts)
    assert int(counts.kd) == int(small["teacher_mask"].sum() + batches[0]["teacher_mask"].sum())

    model = t.model
    got = sum(t.compute_loss(model, b, num_items_in_batch=counts) for b in micro)
    both = {name: torch.cat([small[name], batches[0][name]]) for name in small}
    hidden = model.model(input_ids=both["input_ids"], attention_mask=both["attention_mask"])
    want = losses.fused_distillation_loss(
        hidden.last_hidden_state, model.lm_head.weight, TeacherTargets.from_batch(both), alpha=0.2
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]


def test_fused_and_logits_paths_give_the_same_loss(store: str, tmp_path: Path) -> None:
    fused = trainer(store, tmp_path / "f", 1)
    assert fused.fused
    batch = next(iter(fused.get_train_dataloader()))
    on_logits = trainer(store, tmp_path / "l", 1)
    on_logits.fused = False
    torch.testing.assert_close(
        fused.compute_loss(fused.model, batch), on_logits.compute_loss(on_logits.model, batch),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
