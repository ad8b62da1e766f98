"""Tokenizer identity: the fingerprint that a capture space records and a trainer must match.

Cached rows name tokens by id, so a student can learn from them only with the teacher's
tokenizer. The server fingerprints the teacher's tokenizer files when it resolves a teacher and
the trainer fingerprints the student's the same way, so both sides live here. JSON files are
hashed in canonical form (sorted keys, no whitespace), so a file re-serialised with another
indentation keeps its identity; every other file is hashed byte for byte. The values are stored
in every capture space: this function must keep giving the same answer for the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from logitcache.client.errors import InvalidArgument, NotFound

# The files that define a tokenizer, in hashing order; model weights and configs are not here.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def tokenizer_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) over the tokenizer files that exist in the directory ``path``.

    NotFound if ``path`` is not a directory, InvalidArgument if it holds no tokenizer file.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise NotFound(f"{str(directory)!r} is not a directory")
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = directory / name
        if f.is_file():
            found = True
            h.update(name.encode())
            h.update(canonical_json(f) if f.suffix == ".json" else f.read_bytes())
    if not found:
        raise InvalidArgument(
            f"{str(directory)!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})"
        )
    return h.hexdigest()


def canonical_json(f: Path) -> bytes:
    """The bytes of a JSON file in canonical form; a file that is not JSON, as it is."""
    try:
        return json.dumps(json.loads(f.read_text()), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        return f.read_bytes()
