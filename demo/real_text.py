"""A teacher of real English text: the demo recipe trained on the Python standard library's
docstrings.

The demo language is peaked and its tails repeat, which flatters a codec; a small model of real
text is much flatter. Benchmarks need both. The text must exist on every machine after
``make install`` and be written by nobody here: the docstrings of the interpreter's own standard
library qualify, and the interpreter's version pins them (it is part of the cache name, and the
corpus digest is recorded next to the teacher). Whole source files are held out, so the
held-out documents are text the teacher never saw; they are written next to the teacher as
``held_out.jsonl`` (one ``{"text": ...}`` per line, what ``precompute`` and ``bench storage
--data`` read).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
from functools import cache
from pathlib import Path

from logitcache.demo import model_card, teacher

MIN_DOCSTRING_CHARS = 100  # shorter docstrings are mostly one-line summaries
HELD_OUT_EVERY = 10  # every tenth source file (in sorted order) is held out
TRAIN_STEPS = 1000  # ~3 minutes on two idle cores
HELD_OUT_FILE = "held_out.jsonl"
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_sources() -> list[Path]:
    """The standard library's own .py files in sorted order, without tests and installed
    packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts)
    )


def docstrings(source: Path) -> list[str]:
    """The module, class and function docstrings of one file that are long enough to be prose."""
    try:
        tree = ast.parse(source.read_bytes())
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [d for d in found if d and len(d) >= MIN_DOCSTRING_CHARS]


@cache
def stdlib_documents() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, held-out) docstrings; a docstring seen earlier (in either part) is dropped."""
    seen: set[str] = set()
    parts: tuple[list[str], list[str]] = ([], [])
    for index, source in enumerate(stdlib_sources()):
        for doc in docstrings(source):
            if doc not in seen:
                seen.add(doc)
                parts[index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1].append(doc)
    return tuple(parts[0]), tuple(parts[1])


def _documents(seed: int) -> tuple[list[str], list[str]]:
    train, held_out = stdlib_documents()
    return list(train), list(held_out)


REAL_TEXT = teacher.Corpus("real-text", _documents, train_steps=TRAIN_STEPS)


def corpus_digest() -> str:
    """sha256 of the corpus, so two builds can tell whether they learned the same text."""
    h = hashlib.sha256()
    for part in stdlib_documents():
        for doc in part:
            h.update(doc.encode())
            h.update(b"\0")
        h.update(b"\1")
    return h.hexdigest()


def build_real_text_teacher(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the teacher into out_dir, with its held-out texts and corpus facts beside it."""
    path = teacher.build_demo_teacher(out_dir, seed=seed, corpus=REAL_TEXT)
    train, held_out = stdlib_documents()
    lines = "".join(json.dumps({"text": doc}) + "\n" for doc in held_out)
    (path / HELD_OUT_FILE).write_text(lines)
    facts = json.loads((path / teacher.METADATA_FILE).read_text())
    facts.update(
        corpus="python stdlib docstrings",
        python=platform.python_version(),
        corpus_sha256=corpus_digest(),
        train_documents=len(train),
        held_out_documents=len(held_out),
    )
    (path / teacher.METADATA_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    return path


def real_text_teacher_path(seed: int = 0) -> Path:
    """The real-text teacher for ``seed`` under the cache directory, built on first use.

    Named after the Python version (which fixes the corpus), how the corpus is cut from it, and
    the demo recipe's numbers.
    """
    from logitcache.demo import assets

    recipe = dict(
        python=platform.python_version(),
        corpus=[MIN_DOCSTRING_CHARS, HELD_OUT_EVERY, sorted(_SKIPPED_DIRS)],
        teacher=teacher.recipe(REAL_TEXT),
    )
    entry = f"real-text-teacher-seed{seed}-{assets.recipe_digest(recipe)}"
    path = assets.cached_build(entry, HELD_OUT_FILE, lambda out: build_real_text_teacher(out, seed))
    model_card.ensure_model_card(path, "logitcache real-text teacher", model_card.REAL_TEXT_DATA)
    return path


def held_out_path(teacher_path: str | os.PathLike[str]) -> Path:
    """The held-out texts of a real-text teacher directory."""
    return Path(teacher_path) / HELD_OUT_FILE
