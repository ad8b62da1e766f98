"""Where the demo teacher lives when a command needs it and none was given: built once, reused.

The cache entry is named after the seed and a hash of the code that builds the teacher, so a
change to the demo language or the model recipe never reuses a stale build.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def demo_teacher_path(seed: int = 0) -> Path:
    """The demo teacher for ``seed`` under the cache directory, built on first use."""
    from logitcache.demo import language, model_card, teacher

    recipe = hashlib.sha256()
    for module in (language, teacher):
        recipe.update(Path(module.__file__).read_bytes())
    path = cache_dir() / f"demo-teacher-seed{seed}-{recipe.hexdigest()[:12]}"
    if not (path / "config.json").is_file():
        teacher.build_demo_teacher(path, seed=seed)
    model_card.ensure_model_card(path, "logitcache demo teacher", model_card.DEMO_LANGUAGE_DATA)
    return path


def cache_dir() -> Path:
    """Where built teachers are kept: $LOGITCACHE_CACHE, else ~/.cache/logitcache."""
    return Path(os.environ.get("LOGITCACHE_CACHE", Path.home() / ".cache" / "logitcache"))
