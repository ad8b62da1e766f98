"""End to end through a real server: the demo teacher's distributions teach a small student.

One precompute job on the shared server builds the dataset; the example's plain loop and
``DistillationTrainer`` then each train a student on it over gRPC, and the distillation loss must
go down.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from declared_use import USE

from logitcache.client.client import Client
from logitcache.demo.language import generate_documents
from logitcache.server.launcher import ServerProcess
from logitcache.trainer import TeacherStream
from logitcache.trainer.collate import Collator
from logitcache.trainer.guards import IncompatibleStudent

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATASET = "trainer-distill"
STEPS, BATCH, MAX_LEN = 20, 4, 64  # 2 epochs of the 40 records, cut to 64 tokens


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("distill_loop", REPO / "examples/distill_loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(server: ServerProcess) -> str:
    """``grpc://`` URL of DATASET: 40 demo documents through the demo teacher (top-16)."""
    with Client(server.target, use=USE) as client:
        client.wait(client.precompute(DATASET, texts=generate_documents(40, seed=2024)))
    return "grpc://" + server.target


def assert_decreases(losses: list[float]) -> None:
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)


def test_example_loop_distills(source: str, demo_teacher: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    final = load_example().main(
        ["--source", source, "--dataset", DATASET, "--steps", str(STEPS),
         "--batch-size", str(BATCH), "--max-len", str(MAX_LEN), "--hidden-size", "64",
         "--tokenizer", str(demo_teacher),
         "--report", str(report)]
    )  # fmt: skip
    run = json.loads(report.read_text())
    assert_decreases(run["losses"])
    assert final == pytest.approx(run["losses"][-1])
    assert run["world_size"] == 1
    first_epoch, second_epoch = run["keys"][:40], run["keys"][40:]
    assert len(set(first_epoch)) == 40 and sorted(second_epoch) == sorted(first_epoch)
    assert second_epoch != first_epoch  # each epoch has its own order


def test_example_refuses_a_student_with_another_vocabulary(source: str, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    vocab = TeacherStream(source, DATASET).space.vocab_size
    config = LlamaConfig(vocab_size=vocab - 1, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    config.save_pretrained(tmp_path)
    with pytest.raises(IncompatibleStudent, match="fewer"):
        load_example().main(
            ["--source", source, "--dataset", DATASET, "--student-config", str(tmp_path)]
        )


def small_student(vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                    max_position_embeddings=1024)
    )  # fmt: skip


def training_args(tmp_path: Path, **overrides):
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, **overrides,
    )  # fmt: skip


def test_hf_trainer_distills(source: str, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from logitcache.trainer.hf import DistillationLoss, DistillationTrainer

    stream = TeacherStream(source, DATASET, seed=1)
    trainer = DistillationTrainer(
        small_student(stream.space.vocab_size),
        training_args(tmp_path),
        teacher_stream=stream,
        loss=DistillationLoss(kind="forward_kl", alpha=0.1),
        collator=Collator(max_len=MAX_LEN),
    )
    trainer.train()
    assert_decreases([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert stream.epoch == 1  # the Trainer's second epoch read the stream's second order


def test_hf_trainer_refuses_a_stream_of_another_rank(source: str, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from logitcache.trainer.hf import DistillationLoss, DistillationTrainer

    stream = TeacherStream(source, DATASET, rank=1, world_size=2)
    trainer = DistillationTrainer(
        small_student(stream.space.vocab_size), training_args(tmp_path), teacher_stream=stream
    )
    with pytest.raises(ValueError, match="partition 1 of 2"):
        trainer.train()
    with pytest.raises(ValueError, match="kind"):
        DistillationLoss(kind="kl")  # type: ignore[arg-type]
