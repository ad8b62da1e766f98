"""`logitcache precompute` and `inspect` as a user runs them: real CLI processes, real engine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.demo.language import generate_documents

pytestmark = pytest.mark.slow
STEP = 1 / 52  # one quantisation step of the default codec (topk-v5: the contract grid)


def cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "logitcache.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def precompute_args(teacher: Path, data: Path, out: Path) -> list[str]:
    return ["precompute", *command_args(teacher, data, out)]


def command_args(teacher: Path, data: Path, out: Path) -> list[str]:
    """The flags of every run here (after the command's name)."""
    return [
        "--teacher", str(teacher), "--data", str(data), "--out", str(out),
        "--dataset", "demo", "--top-k", "16", "--skip-invalid", "--no-progress",
        "--segment-positions", "1500",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Demo-language documents plus two bad rows that --skip-invalid must skip and count."""
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    lines = [json.dumps({"text": d}) for d in generate_documents(240, seed=7)]
    lines.insert(3, '{"text": "broken')
    lines.insert(10, json.dumps({"text": "  "}))
    lines.append(lines[0])  # a duplicate sequence: stored once
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def complete_store(tmp_path_factory, demo_teacher, data_file) -> Path:
    out = tmp_path_factory.mktemp("store") / "store"
    r = cli(*precompute_args(demo_teacher, data_file, out))
    assert r.returncode == 0, r.stderr
    return out


def test_precompute_stores_exact_teacher_rows(complete_store, data_file, demo_teacher, reference):
    from transformers import AutoTokenizer

    ds = logitcache.open_store(str(complete_store)).dataset("demo")
    rows = [json.loads(line) for line in data_file.read_text().splitlines() if _valid(line)]
    assert len(ds) == len(rows) and ds.complete
    assert len(set(ds.keys)) == len(ds) - 1  # the duplicate row is one record
    tokenizer = AutoTokenizer.from_pretrained(str(demo_teacher))
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        rec = ds[i]
        expected_ids = tokenizer(rows[i]["text"])["input_ids"]
        np.testing.assert_array_equal(rec.input_ids, expected_ids)
        full = reference.full_logprobs(rec.input_ids).numpy()
        at_ids = np.take_along_axis(full, rec.token_ids.astype(np.int64), axis=1)
        # The default codec's bounds (client/codec.py), plus the engine-vs-reference tolerance:
        # 1/104 nats for p >= 1e-3, 1e-4 in probability below.
        big = at_ids >= np.log(1e-3)
        assert np.abs(rec.logprobs - at_ids)[big].max() <= STEP / 2 + 2e-3
        assert np.abs(np.exp(rec.logprobs) - np.exp(at_ids))[~big].max() <= 1e-4 + 1e-5
        assert np.isnan(rec.target_logprobs[-1])
        target = full[np.arange(len(rec) - 1), rec.input_ids[1:]]
        assert np.abs(rec.target_logprobs[:-1] - target).max() <= STEP / 2 + 2e-3
    manifest = ds.provenance
    assert manifest["source"]["skipped_rows"] == {"malformed JSON": 1, "empty text": 1}
    assert manifest["teacher_fingerprint"] == ds.space.teacher_fingerprint


def test_rerun_of_a_complete_dataset_computes_nothing(complete_store, data_file, demo_teacher):
    r = cli(*precompute_args(demo_teacher, data_file, complete_store))
    assert r.returncode == 0, r.stderr
    assert "computed 0 sequences" in r.stdout


def test_inspect_reports_sizes_and_provenance(complete_store):
    r = cli("inspect", str(complete_store))
    assert r.returncode == 0, r.stderr
    assert "demo  [complete]" in r.stdout and "bytes/position" in r.stdout
    summary = json.loads(cli("inspect", str(complete_store), "--json").stdout)
    (space,) = summary["spaces"]
    assert space["k"] == 16 and space["bytes_per_position"] < 8 * 16 / 2
    assert summary["datasets"][0]["sealed_sequences"] == summary["datasets"][0]["sequences"]


def test_resume_after_kill_9_gives_the_same_dataset(
    tmp_path, complete_store, data_file, demo_teacher, precompute_in_process
):
    out = tmp_path / "store"
    args = [
        sys.executable,
        "-P",
        "-m",
        "logitcache.cli",
        *precompute_args(demo_teacher, data_file, out),
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    segments = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        spaces = list(out.glob("spaces/*/segments/*"))
        if len(spaces) >= 2:
            segments = spaces
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its engine process, mid-run
    proc.wait()
    assert segments is not None, "precompute finished or failed before it could be killed"
    killed = logitcache.open_store(str(out))
    assert not killed.dataset("demo").complete
    assert 0 < killed.dataset("demo").sealed_count() < len(killed.dataset("demo"))

    # The same command again resumes, here in this process on the session engine (the killed
    # run was a real process with its own engine; a second engine start would prove nothing more).
    printed = precompute_in_process(*command_args(demo_teacher, data_file, out))
    reused = re.search(r"reused ([\d,]+),", printed)
    assert reused is not None and int(reused[1].replace(",", "")) > 0, printed  # what was sealed
    resumed = logitcache.open_store(str(out)).dataset("demo")
    reference = logitcache.open_store(str(complete_store)).dataset("demo")
    assert resumed.complete and resumed.keys == reference.keys
    for i in range(len(reference)):
        a, b = resumed[i], reference[i]
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        # Batch composition may move fp32 results by ~1e-6, i.e. at most one quantisation step.
        same = a.token_ids == b.token_ids
        assert same.mean() > 0.99
        assert np.abs(a.logprobs - b.logprobs).max() <= STEP + 1e-6


def _valid(line: str) -> bool:
    try:
        return bool(json.loads(line)["text"].strip())
    except ValueError:
        return False
