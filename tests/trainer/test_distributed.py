"""Data-parallel training under torchrun on CPU (gloo): the ranks split each epoch between them
(each rank's DataLoader workers split it again), and DDP keeps their students identical; a
dataset the world size does not divide still gives every rank the same batches (no hang); FSDP2
trains and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import logitcache
from logitcache.bench.synthetic import synthetic_store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECORDS, BATCH = 32, 4  # 16 records per rank, 8 per worker: an epoch is exactly 4 full batches
STEPS = RECORDS // 2 // BATCH
UNEVEN = 33  # 17 records per rank after wrapping (rank 1 reads the epoch's first record again)

# DistillationTrainer in each rank; writes the keys it trained on and a parameter checksum.
HF_SCRIPT = """
import hashlib, json, sys
import torch, transformers
from logitcache.trainer import TeacherStream
from logitcache.trainer.collate import Collator
from logitcache.trainer.hf import DistillationTrainer

store, steps, batch, report = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
length = {"max_steps": steps} if steps > 0 else {"num_train_epochs": 2}  # 0: two epochs
args = transformers.TrainingArguments(
    output_dir=report + ".out", per_device_train_batch_size=batch, **length,
    learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
)
stream = TeacherStream(store, "bench")  # after TrainingArguments: it reads the rank from there
keys = []

class KeyLoggingCollator(Collator):
    def __call__(self, records):
        keys.extend(r.key for r in records)
        return super().__call__(records)

torch.manual_seed(args.process_index)  # different initial weights: DDP broadcasts rank 0's
student = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=stream.space.vocab_size, hidden_size=32, intermediate_size=64,
    num_hidden_layers=1, num_attention_heads=2))
DistillationTrainer(student, args, teacher_stream=stream, collator=KeyLoggingCollator()).train()
checksum = hashlib.sha256()
for p in student.parameters():
    checksum.update(p.detach().numpy().tobytes())
with open(report.format(rank=args.process_index), "w") as f:
    json.dump({"rank": args.process_index, "world_size": args.world_size, "keys": keys,
               "parameters_sha256": checksum.hexdigest()}, f)
print("final loss", flush=True)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return synthetic_store(tmp_path_factory.mktemp("dist") / "store", RECORDS * 8, 8, 4, vocab=100)


@pytest.fixture(scope="module")
def uneven_store(tmp_path_factory) -> str:
    """UNEVEN records: 2 ranks cannot split them evenly."""
    return synthetic_store(tmp_path_factory.mktemp("odd") / "store", UNEVEN * 8, 8, 4, vocab=100)


def torchrun(*args: str) -> str:
    """Run ``torchrun --standalone --nproc-per-node 2 ARGS`` on CPU; its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        launcher.terminate()  # torchrun stops its ranks (each in a session of its own) on SIGTERM
        output, _ = launcher.communicate(timeout=60)
        pytest.fail(f"torchrun did not finish in 180 s:\n{output[-3000:]}")
    assert launcher.returncode == 0, output[-3000:]
    assert "final loss" in output
    return output


def check_runs(report: Path, store: str) -> list[dict]:
    """Disjoint halves of one epoch, and the same parameters on both ranks."""
    runs = [json.loads(Path(str(report).format(rank=r)).read_text()) for r in (0, 1)]
    assert [(run["rank"], run["world_size"]) for run in runs] == [(0, 2), (1, 2)]
    halves = [set(run["keys"]) for run in runs]
    assert [len(run["keys"]) for run in runs] == [len(h) for h in halves] == [RECORDS // 2] * 2
    assert not halves[0] & halves[1]
    assert halves[0] | halves[1] == set(logitcache.open_store(store).dataset("bench").keys)
    # Different data on each rank, yet the same parameters: DDP averaged the gradients.
    assert runs[0]["parameters_sha256"] == runs[1]["parameters_sha256"]
    return runs


def test_example_ranks_read_disjoint_halves_and_end_with_the_same_student(
    store: str, tmp_path: Path
) -> None:
    report = tmp_path / "rank{rank}.json"
    torchrun(str(REPO / "examples/distill_loop.py"), "--source", store, "--dataset", "bench",
             "--steps", str(STEPS), "--batch-size", str(BATCH), "--workers", "2",
             "--report", str(report))  # fmt: skip
    runs = check_runs(report, store)
    assert runs[0]["losses"] != runs[1]["losses"]  # the ranks did see different batches
    assert runs[0]["final_loss"] == runs[1]["final_loss"]  # averaged over ranks


def test_hf_trainer_ranks_read_disjoint_halves_and_end_with_the_same_student(
    store: str, tmp_path: Path
) -> None:
    pytest.importorskip("accelerate")
    script = tmp_path / "hf_distill.py"
    script.write_text(HF_SCRIPT)
    report = tmp_path / "rank{rank}.json"
    torchrun(str(script), store, str(STEPS), str(BATCH), str(report))
    check_runs(report, store)


def test_hf_trainer_on_a_dataset_the_ranks_cannot_split_evenly_finishes(
    uneven_store: str, tmp_path: Path
) -> None:
    """Two epochs, each rank computing its own steps per epoch from len(): before the stream
    evened the shares out, rank 0 had one batch more per epoch and waited for rank 1 forever."""
    pytest.importorskip("accelerate")
    script = tmp_path / "hf_distill.py"
    script.write_text(HF_SCRIPT)
    report = tmp_path / "rank{rank}.json"
    torchrun(str(script), uneven_store, "0", str(BATCH), str(report))
    runs = [json.loads(Path(str(report).format(rank=r)).read_text()) for r in (0, 1)]
    per_epoch = -(-UNEVEN // 2)
    assert [len(run["keys"]) for run in runs] == [2 * per_epoch] * 2  # same batches on each rank
    everything = set(logitcache.open_store(uneven_store).dataset("bench").keys)
    for epoch in (0, 1):  # each epoch covers every record; one of them twice (the wrap)
        seen = [k for run in runs for k in run["keys"][epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert set(seen) == everything and len(seen) == len(everything) + 1
    assert runs[0]["parameters_sha256"] == runs[1]["parameters_sha256"]


def test_fsdp2_example_trains_and_resumes_exactly(store: str, tmp_path: Path) -> None:
    """4 steps in one go, or 3 steps, a checkpoint, and 1 more in a new job: the same records
    and the same student (FSDP2 on gloo, 2 DataLoader workers per rank)."""

    def example(steps: int, report: str, *extra: str) -> list[dict]:
        torchrun(str(REPO / "examples/distill_loop.py"), "--source", store, "--dataset", "bench",
                 "--steps", str(steps), "--batch-size", str(BATCH), "--workers", "2", "--fsdp",
                 "--report", str(tmp_path / report), *extra)  # fmt: skip
        return [json.loads((tmp_path / report.format(rank=r)).read_text()) for r in (0, 1)]

    whole = example(4, "whole{rank}.json")
    checkpoint = str(tmp_path / "ckpt")
    first = example(3, "first{rank}.json", "--checkpoint", checkpoint)
    resumed = example(4, "resumed{rank}.json", "--checkpoint", checkpoint)
    for w, f, r in zip(whole, first, resumed, strict=True):
        assert f["keys"] + r["keys"] == w["keys"]  # exactly the next records, in order
        assert len(r["losses"]) == 1
        assert r["parameter_sums"] == pytest.approx(w["parameter_sums"], rel=1e-5, abs=1e-6)
    assert whole[0]["parameters_sha256"] == whole[1]["parameters_sha256"]  # one student
