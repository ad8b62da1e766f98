"""Whether a process that wrote to the store is gone, so what it left half-done can be removed.

A writer names itself in what it leaves while it works (a staging folder's ``writer.json``, a
lease): host, boot, pid namespace, pid and the process's start time. A cleaner removes the
leftovers only of a writer that is provably gone; a writer it cannot judge (another host) only
ages out.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

# A segment is written in seconds: a staging folder this old belongs to no live write, and one
# whose writer never named itself (it failed or died right after creating it) after the grace.
STAGING_MAX_AGE_S = 3600.0
UNNAMED_STAGING_GRACE_S = 600.0


def writer_identity() -> dict[str, Any]:
    """Who writes a staging folder: enough for :func:`writer_gone` to prove the writer dead."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "started": time.time(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "process_start": _process_start(pid),
    }


def writer_gone(identity: dict[str, Any], age_s: float) -> bool:
    """Whether the writer of a staging folder (its :func:`writer_identity`) has certainly
    stopped, so the folder can go: older than :data:`STAGING_MAX_AGE_S`, or written on this host
    by a process that is dead (pid not running, or reused by a process started later), or
    before this host last booted. A writer on another host, or in another pid namespace under
    the same host name (a container), is never judged by pid."""
    if not identity:  # the writer failed or died before it named itself
        return age_s > UNNAMED_STAGING_GRACE_S
    if age_s > STAGING_MAX_AGE_S:
        return True
    if identity.get("host") != socket.gethostname():
        return False
    boot_id = identity.get("boot_id")
    if boot_id and _boot_id() and boot_id != _boot_id():
        return True
    pid_ns = identity.get("pid_ns")
    if pid_ns and _pid_namespace() and pid_ns != _pid_namespace():
        return False
    pid = int(identity.get("pid", -1))
    if not process_alive(pid):
        return True
    started = identity.get("process_start")
    return bool(started) and _process_start(pid) not in (None, started)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that id runs."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
