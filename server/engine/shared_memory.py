"""Shared memory that dead engines left behind, found and removed where that is safe.

vLLM's engine processes share memory through POSIX shared-memory objects (Python's ``psm_*`` in
/dev/shm, for message queues and caches, up to hundreds of MB each). An engine killed with -9
never unlinks them, and they hold RAM until the machine reboots. The vLLM engine removes them
when it starts and after it shuts down: only objects that no running process holds.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)
SHARED_MEMORY = Path("/dev/shm")
SHARED_MEMORY_PREFIX = "psm_"  # multiprocessing.shared_memory's names, which vLLM uses
# An object younger than this may be being created, or handed to a process about to open it.
LEFTOVER_MIN_AGE_S = 60.0


def remove_leftover_shared_memory(
    directory: Path = SHARED_MEMORY,
    *,
    prefix: str = SHARED_MEMORY_PREFIX,
    min_age_s: float = LEFTOVER_MIN_AGE_S,
) -> list[str]:
    """Remove this user's shared-memory objects that no running process holds; their names.

    An object is a leftover only if it is older than ``min_age_s`` and no process maps it or
    has it open (seen in /proc/PID/maps and /proc/PID/fd): the process that created it is dead,
    and so is every process it was shared with. Objects of other users are never touched
    (Python creates them mode 0600, so only their owner's processes can hold them).
    """
    uid, now = os.getuid(), time.time()
    candidates: dict[str, Path] = {}
    for path in directory.glob(f"{prefix}*"):
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_uid == uid and now - st.st_mtime >= min_age_s:
            candidates[os.path.realpath(path)] = path
    if not candidates:
        return []
    held = _held_paths()
    removed = []
    for real, path in candidates.items():
        if real not in held:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.info("removed %d shared-memory objects left by dead engines: %s",
                 len(removed), ", ".join(sorted(removed)))  # fmt: skip
    return removed


def _held_paths() -> set[str]:
    """Every file that a process we may inspect maps or has open."""
    held: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            maps = (proc / "maps").read_text()
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:  # gone meanwhile, or another user's process
            continue
        held.update(fields[5] for fields in (line.split(maxsplit=5) for line in maps.splitlines())
                    if len(fields) == 6)  # fmt: skip
        held.update(fds)
    return held
