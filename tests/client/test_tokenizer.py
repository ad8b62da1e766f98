"""Tokenizer fingerprints: the values stores already hold, canonical JSON, the files that count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logitcache.client.errors import InvalidArgument, NotFound
from logitcache.client.tokenizer import TOKENIZER_FILES, tokenizer_fingerprint

# Computed by the server's fingerprint function before it moved into the client
# (logitcache.server.teachers.identity at 6b58e8d) on the directories written below. Every capture
# space records such a value, so a change here would orphan every existing store.
EVERY_FILE_FINGERPRINT = "8c5e5732102f5e028f2ca8e31728ae6e08f2435701f6590622b17b6bf7cd85f0"
ONE_FILE_FINGERPRINT = "bffa1302db90dbe95987b4f5bdf2a46059434b81eb347ca180929176b2a8e31d"


def write_every_file(path: Path) -> Path:
    """One file of each kind: JSON (non-ASCII, indented), JSON that does not parse, binary, text."""
    path.mkdir()
    vocab = {"[UNK]": 0, "é": 1, "ab": 2, "a": 3, "b": 4}
    tok = {
        "version": "1.0",
        "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]},
        "added_tokens": [],
    }
    (path / "tokenizer.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 512, "bos_token": null}')
    (path / "special_tokens_map.json").write_text("{not json")
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\na b\n")
    (path / "tokenizer.model").write_bytes(bytes(range(256)))
    (path / "config.json").write_text('{"ignored": true}')
    return path


def test_fingerprints_keep_their_stored_values(tmp_path: Path) -> None:
    assert tokenizer_fingerprint(write_every_file(tmp_path / "every")) == EVERY_FILE_FINGERPRINT
    one = tmp_path / "one"
    one.mkdir()
    (one / "tokenizer.json").write_text('{"b": 1, "a": [1, 2]}')
    assert tokenizer_fingerprint(str(one)) == ONE_FILE_FINGERPRINT


def test_json_is_hashed_in_canonical_form(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "tokenizer.json").write_text('{\n  "a": [1,   2],\n  "b": 1\n}\n')
    assert tokenizer_fingerprint(one) == ONE_FILE_FINGERPRINT


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_every_tokenizer_file_counts(tmp_path: Path, name: str) -> None:
    path = write_every_file(tmp_path / "tok")
    (path / name).write_bytes((path / name).read_bytes() + b" x")
    assert tokenizer_fingerprint(path) != EVERY_FILE_FINGERPRINT


def test_other_files_do_not_count(tmp_path: Path) -> None:
    path = write_every_file(tmp_path / "tok")
    (path / "config.json").write_text('{"ignored": false}')
    (path / "model.safetensors").write_bytes(b"weights")
    assert tokenizer_fingerprint(path) == EVERY_FILE_FINGERPRINT


def test_missing_directory_and_missing_files_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a directory"):
        tokenizer_fingerprint(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="no tokenizer files"):
        tokenizer_fingerprint(tmp_path)
