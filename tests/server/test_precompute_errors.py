"""Bad input to `logitcache precompute`: one clear line naming file and row, and nothing written.

All of these are caught before any engine starts, so they run in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from logitcache.cli import main

GOOD = json.dumps({"text": "the cat sees a dog ."})


def run_precompute(capsys, teacher: Path, data: Path, store: Path, *extra: str) -> tuple[int, str]:
    code = main(
        ["precompute", "--teacher", str(teacher), "--data", str(data), "--out", str(store),
         "--dataset", "d", "--top-k", "4", "--no-progress", *extra]
    )  # fmt: skip
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated', "malformed JSON"),
        ('["not", "an", "object"]', "JSON object"),
        (json.dumps({"txt": "typo"}), "missing field"),
        (json.dumps({"text": ""}), "empty text"),
        (json.dumps({"input_ids": []}), "non-empty list"),
        (json.dumps({"input_ids": [1, 2.5]}), "list of integers"),
        (json.dumps({"input_ids": [1, 999999]}), "outside the teacher's vocabulary"),
        (json.dumps({"input_ids": [5, -1]}), "outside the teacher's vocabulary"),
    ],
)
def test_bad_row_names_file_and_line_and_writes_nothing(
    capsys, tmp_path, demo_teacher, bad_line, message
):
    data = tmp_path / "data.jsonl"
    data.write_text(f"{GOOD}\n{bad_line}\n{GOOD}\n")
    code, err = run_precompute(capsys, demo_teacher, data, tmp_path / "store")
    assert code == 2
    assert f"{data}:2:" in err and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "store" / "datasets" / "d").exists()


def test_sequence_over_max_len_fails_unless_truncated_or_split(capsys, tmp_path, demo_teacher):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": list(range(3, 40))}) + "\n")
    code, err = run_precompute(capsys, demo_teacher, data, tmp_path / "store", "--max-len", "16")
    assert code == 2 and f"{data}:1:" in err and "--overflow" in err
    assert not (tmp_path / "store" / "datasets" / "d").exists()


def test_missing_data_file(capsys, tmp_path, demo_teacher):
    code, err = run_precompute(capsys, demo_teacher, tmp_path / "nope.jsonl", tmp_path / "store")
    assert code == 2 and "does not exist" in err


def test_invalid_dataset_name(capsys, tmp_path, demo_teacher):
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD + "\n")
    code = main(["precompute", "--teacher", str(demo_teacher), "--data", str(data), "--out",
                 str(tmp_path / "s"), "--dataset", "../escape", "--top-k", "4"])  # fmt: skip
    assert code == 2 and "dataset name" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "not_causal", "file"])
def test_bad_teacher_is_one_line_not_a_traceback(tmp_path, kind):
    teacher = tmp_path / "teacher"
    if kind == "not_causal":
        teacher.mkdir()
        (teacher / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    elif kind == "file":
        teacher.write_text("weights?")
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD + "\n")
    r = subprocess.run(
        [sys.executable, "-P", "-m", "logitcache.cli", "precompute", "--teacher", str(teacher),
         "--data", str(data), "--out", str(tmp_path / "store"), "--dataset", "d", "--top-k", "4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("logitcache: error: teacher")
