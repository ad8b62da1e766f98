"""Where the demo teacher lives when a command needs it and none was given: built once, reused."""

from __future__ import annotations

import os
from pathlib import Path


def demo_teacher_path(seed: int = 0) -> Path:
    """The demo teacher for ``seed`` under the cache directory, built on first use."""
    from logitcache.server.demo_teacher import build_demo_teacher

    cache = Path(os.environ.get("LOGITCACHE_CACHE", Path.home() / ".cache" / "logitcache"))
    path = cache / f"demo-teacher-seed{seed}"
    if not (path / "config.json").is_file():
        build_demo_teacher(path, seed=seed)
    return path
