"""Where the demo teachers live when a command needs one and none was given: built once, reused.

A cache entry is named after the seed and a digest of the teacher's recipe (its sizes, steps and
rates, and a version that its module bumps when the same numbers would build something else), so
a changed recipe never reuses a stale build and an edit that changes nothing built (a docstring)
never forces a rebuild. A build holds a lock beside its entry: a second process that wants the
same teacher waits for the first and then uses its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def demo_teacher_path(seed: int = 0) -> Path:
    """The demo teacher for ``seed`` under the cache directory, built on first use."""
    from logitcache.demo import model_card, teacher

    entry = f"demo-teacher-seed{seed}-{recipe_digest(teacher.recipe(teacher.DEMO_LANGUAGE))}"
    path = cached_build(entry, "config.json", lambda out: teacher.build_demo_teacher(out, seed))
    model_card.ensure_model_card(path, "logitcache demo teacher", model_card.DEMO_LANGUAGE_DATA)
    return path


def recipe_digest(recipe: Any) -> str:
    """12 hex digits of sha256 over ``recipe`` (JSON-able values) written as sorted JSON."""
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_build(entry: str, marker: str, build: Callable[[Path], object]) -> Path:
    """``cache_dir() / entry``, built by ``build(path)`` unless its file ``marker`` is there.

    The build runs under an exclusive lock on ``.{entry}.lock`` beside the entry, and the marker
    is checked again once the lock is held, so of two processes that want one teacher only the
    first builds it. The builders stage their output and rename it into place, so a crashed
    build leaves no marker behind (and its lock is released with its process).
    """
    path = cache_dir() / entry
    if (path / marker).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{entry}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / marker).is_file():
            build(path)
    return path


def cache_dir() -> Path:
    """Where built teachers are kept: $LOGITCACHE_CACHE, else ~/.cache/logitcache."""
    return Path(os.environ.get("LOGITCACHE_CACHE", Path.home() / ".cache" / "logitcache"))
