"""Refusing students whose tokenizer or vocabulary does not match the capture space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from logitcache.client.errors import FailedPrecondition
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace
from logitcache.client.tokenizer import legacy_tokenizer_fingerprint, tokenizer_fingerprint
from logitcache.trainer.guards import IncompatibleStudent, check_record_ids, check_student

TEACHER_VOCAB = 151936


def write_tokenizer(path: Path, vocab: dict[str, int]) -> Path:
    path.mkdir()
    tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return path


@pytest.fixture
def tokenizers(tmp_path: Path) -> tuple[Path, Path]:
    teacher = write_tokenizer(tmp_path / "teacher", {"[UNK]": 0, "a": 1, "b": 2})
    student = write_tokenizer(tmp_path / "student", {"[UNK]": 0, "a": 1, "c": 2})
    return teacher, student


def space_for(tokenizer_fp: str, vocab_size: int = TEACHER_VOCAB) -> CaptureSpace:
    return CaptureSpace(
        teacher_fingerprint="t" * 64,
        tokenizer_fingerprint=tokenizer_fp,
        vocab_size=vocab_size,
        mode="topk",
        k=64,
        engine_dtype="bfloat16",
        codec="v1",
    )


def test_matching_student_passes(tokenizers: tuple[Path, Path], tmp_path: Path) -> None:
    teacher, _ = tokenizers
    fp = tokenizer_fingerprint(teacher)
    space = space_for(fp)
    check_student(space, tokenizer_path=teacher, vocab_size=TEACHER_VOCAB)
    check_student(space, tokenizer_path=str(teacher))
    check_student(space, tokenizer_fingerprint=fp, vocab_size=TEACHER_VOCAB)
    # the same files copied elsewhere (JSON re-serialised) have the same fingerprint
    copy = tmp_path / "copy"
    copy.mkdir()
    obj = json.loads((teacher / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(obj, indent=2))
    check_student(space, tokenizer_path=copy)


def test_other_tokenizer_is_refused(tokenizers: tuple[Path, Path]) -> None:
    teacher, student = tokenizers
    teacher_fp, student_fp = tokenizer_fingerprint(teacher), tokenizer_fingerprint(student)
    assert teacher_fp != student_fp
    space = space_for(teacher_fp)
    with pytest.raises(IncompatibleStudent) as err:
        check_student(space, tokenizer_path=student, vocab_size=TEACHER_VOCAB)
    msg = str(err.value)
    assert teacher_fp[:16] in msg and student_fp[:16] in msg
    assert "teacher's tokenizer" in msg
    # One error vocabulary: a FailedPrecondition (the CLI and the service map it as one), and
    # still the ValueError it always was.
    assert isinstance(err.value, FailedPrecondition) and isinstance(err.value, ValueError)
    with pytest.raises(IncompatibleStudent, match=student_fp[:16]):
        check_student(space, tokenizer_fingerprint=student_fp)


def test_missing_tokenizer_and_bad_arguments(tmp_path: Path) -> None:
    space = space_for("f" * 64)
    with pytest.raises(IncompatibleStudent, match="no tokenizer files"):
        check_student(space, tokenizer_path=tmp_path)
    with pytest.raises(IncompatibleStudent, match="not a directory"):
        check_student(space, tokenizer_path=tmp_path / "absent")
    with pytest.raises(TypeError, match="nothing to check"):
        check_student(space)
    with pytest.raises(TypeError, match="not both"):
        check_student(space, tokenizer_path=tmp_path, tokenizer_fingerprint="f" * 64)


def test_vocab_mismatch_is_reported_precisely() -> None:
    space = space_for("f" * 64)
    with pytest.raises(IncompatibleStudent) as err:
        check_student(space, vocab_size=152064)
    msg = str(err.value)
    assert "152064" in msg and "151936" in msg and "128 more" in msg
    with pytest.raises(IncompatibleStudent, match="128 fewer"):
        check_student(space, vocab_size=151808)


def test_vocab_padding_accepts_only_a_larger_student(tokenizers: tuple[Path, Path]) -> None:
    # A space of the file-bytes kind, which does not record the tokenizer's size: a smaller
    # student is then refused (tests/trainer/test_padded_vocab.py has the rule with the size).
    teacher, student = tokenizers
    space = space_for(legacy_tokenizer_fingerprint(teacher))
    check_student(space, tokenizer_path=teacher, vocab_size=152064, allow_vocab_padding=True)
    check_student(space, vocab_size=TEACHER_VOCAB, allow_vocab_padding=True)
    with pytest.raises(IncompatibleStudent, match="151000") as err:
        check_student(space, vocab_size=151000, allow_vocab_padding=True)
    assert "936 fewer" in str(err.value)
    # padding does not excuse a wrong tokenizer; both problems are reported together
    with pytest.raises(IncompatibleStudent) as err:
        check_student(space, tokenizer_path=student, vocab_size=100, allow_vocab_padding=True)
    assert "tokenizer" in str(err.value) and "fewer" in str(err.value)


def test_check_record_ids() -> None:
    ids = np.array([[3, 9, 0], [5, 1, 2]], dtype=np.int32)
    lp = np.log(np.array([[0.5, 0.2, 0.1], [0.6, 0.1, 1.0]], dtype=np.float32))
    lp[1, 2] = -np.inf  # a padding entry (ragged row)
    rec = Record("k" * 64, np.array([1, 4], dtype=np.int32), ids, lp, np.array([-1.0, np.nan]))
    check_record_ids([rec], 10)
    with pytest.raises(IncompatibleStudent, match="teacher id 9"):
        check_record_ids([rec], 9)
    ids_pad = ids.copy()
    ids_pad[1, 2] = 1_000_000  # a -inf (padding) entry may hold any id
    padded = Record(rec.key, rec.input_ids, ids_pad, lp, rec.target_logprobs)
    check_record_ids([padded], 10)
    with pytest.raises(IncompatibleStudent, match="input id 4"):
        check_record_ids([rec], 4)
