"""Hub teachers: a missing, gated or unreachable model is one line that says what to fix, and the
commit a teacher was fetched at is recorded. The hub client runs for real, offline, against a
Hugging Face cache built in the test (nothing can be downloaded here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from logitcache.client.errors import NotFound, PermissionDenied, Unavailable
from logitcache.server.teachers.hub import hub_error

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _response(status: int) -> httpx2.Response:
    url = "https://huggingface.co/api/models/org/model/revision/main"
    return httpx2.Response(status, request=httpx2.Request("GET", url))


def test_gated_model_names_hf_token():
    error = hub_error("org/model", None, GatedRepoError("403 gated", response=_response(403)))
    assert isinstance(error, PermissionDenied)
    assert "gated" in str(error) and "HF_TOKEN" in str(error)


def test_missing_or_private_model_names_hf_token():
    error = hub_error("org/model", None, RepositoryNotFoundError("404", response=_response(404)))
    assert isinstance(error, NotFound)
    assert "no such model" in str(error) and "HF_TOKEN" in str(error)


def test_missing_revision_is_named():
    error = hub_error("org/model", "v9", RevisionNotFoundError("404", response=_response(404)))
    assert isinstance(error, NotFound) and "revision 'v9'" in str(error)


def test_refused_access_names_hf_token():
    error = hub_error("org/model", None, HfHubHTTPError("401", response=_response(401)))
    assert isinstance(error, PermissionDenied) and "HF_TOKEN" in str(error)


def test_unreachable_hub_names_hf_hub_offline():
    error = hub_error("org/model", None, LocalEntryNotFoundError("connection refused"))
    assert isinstance(error, Unavailable)
    assert "could not be reached" in str(error) and "HF_HUB_OFFLINE=1" in str(error)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", **extra}


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    argv = [sys.executable, "-P", "-m", "logitcache.cli", "precompute", "--data", str(data)]
    argv += ["--out", str(tmp_path / "store"), "--dataset", "ds", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_offline_hub_id_not_in_the_cache_is_one_line(tmp_path):
    run = _cli(tmp_path, _env(tmp_path), "--teacher", "someorg/not-cached-model")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "'someorg/not-cached-model'" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "store").exists()


def test_unreachable_hub_is_one_line(tmp_path):
    env = _env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:1")
    run = _cli(tmp_path, env, "--teacher", "someorg/model", "--revision", "v1")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "could not be reached" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]


def _cached_teacher(tmp_path: Path, teacher: Path) -> None:
    """``org/demo`` in a Hugging Face cache, as a download leaves it: a snapshot per commit."""
    repo = tmp_path / "hf" / "hub" / "models--org--demo"
    shutil.copytree(teacher, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def _resolve(tmp_path: Path, revision: str | None) -> dict:
    code = (
        "import json, sys\n"
        "from logitcache.client.errors import LogitCacheError\n"
        "from logitcache.server.teachers.identity import resolve_teacher\n"
        "try:\n"
        f"    info = resolve_teacher('org/demo', {revision!r})\n"
        "    print(json.dumps({'revision': info.revision, 'vocab': info.vocab_size}))\n"
        "except LogitCacheError as e:\n"
        "    print(json.dumps({'error': type(e).__name__, 'message': str(e)}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-P", "-c", code],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_hub_teacher_records_the_commit_it_was_fetched_at(tmp_path, demo_teacher, revision):
    _cached_teacher(tmp_path, demo_teacher)
    resolved = _resolve(tmp_path, revision)
    assert resolved.get("revision") == COMMIT, resolved


def test_a_revision_not_in_the_offline_cache_is_named(tmp_path, demo_teacher):
    _cached_teacher(tmp_path, demo_teacher)
    resolved = _resolve(tmp_path, "v9")
    assert resolved["error"] == "Unavailable", resolved
    assert "revision 'v9'" in resolved["message"] and "HF_HUB_OFFLINE" in resolved["message"]
