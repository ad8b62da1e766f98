"""DistillationTrainer's default collator takes the student's output size, so that a teacher
padded beyond the student's vocabulary distils without a hand-made Collator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from logitcache.bench.synthetic import synthetic_store
from logitcache.trainer import TeacherStream

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from logitcache.trainer.hf import DistillationTrainer, output_size  # noqa: E402

TEACHER_VOCAB = 100


def llama(vocab_size: int, **config: object) -> torch.nn.Module:
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=32, **config,
        )
    )  # fmt: skip


def test_output_size_is_the_output_layers_rows_else_the_configs_vocab_size() -> None:
    assert output_size(llama(90)) == 90
    capped = llama(80)
    capped.config.final_logit_softcapping = 30.0  # no plain output layer: the config says
    assert output_size(capped) == 80
    assert output_size(torch.nn.Linear(4, 4)) is None


def test_the_default_collator_folds_the_ids_a_smaller_student_lacks(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path / "store", 64, 8, 8, TEACHER_VOCAB)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True
    )
    stream = TeacherStream(store, "bench", seed=0)
    trainer = DistillationTrainer(llama(90), args, teacher_stream=stream)
    assert trainer.data_collator.vocab_size == 90  # type: ignore[attr-defined]
    with pytest.warns(RuntimeWarning, match="folded into the tail"):
        batch = trainer.data_collator(list(stream)[:4])
    folded = batch["teacher_token_ids"][batch["teacher_logprobs"] > -torch.inf]
    assert int(folded.max()) < 90
    assert int(batch["teacher_folded_entries"]) > 0  # ids 90..99 were in the rows
