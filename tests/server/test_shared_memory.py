"""Shared memory left by killed engines is removed; objects that a live process holds are not.

Real processes and real POSIX shared memory (/dev/shm), under a prefix of this test's own so
that no other process's objects are ever candidates: one object's creator is killed with -9
(as an engine is), another's creator is alive and maps it, a third is only held open by a
process that unmapped it, and a fourth is younger than the age bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from logitcache.server.engine.shared_memory import SHARED_MEMORY, remove_leftover_shared_memory

HOLD = """
import mmap, os, sys, time
from multiprocessing import shared_memory, resource_tracker
shm = shared_memory.SharedMemory(name=sys.argv[1], create=True, size=1 << 20)
resource_tracker.unregister(shm._name, "shared_memory")  # as vLLM's engine core: no tracker
if sys.argv[2] == "fd-only":
    fd = os.open("/dev/shm/" + sys.argv[1], os.O_RDWR)
    shm.close()
print("ready", flush=True)
time.sleep(600)
"""


def hold(name: str, how: str = "mapped") -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, name, how], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_only_objects_no_live_process_holds_are_removed() -> None:
    prefix = f"lctest_{uuid.uuid4().hex[:8]}_"
    names = {k: f"{prefix}{k}" for k in ("killed", "alive", "fd-only", "young")}
    killed, alive = hold(names["killed"]), hold(names["alive"])
    fd_only, young = hold(names["fd-only"], "fd-only"), hold(names["young"])
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        young.kill()
        young.wait()
        old = time.time() - 3600
        for key in ("killed", "alive", "fd-only"):
            os.utime(SHARED_MEMORY / names[key], (old, old))
        removed = remove_leftover_shared_memory(prefix=prefix, min_age_s=60)
        assert removed == [names["killed"]]
        left = sorted(p.name for p in Path(SHARED_MEMORY).glob(f"{prefix}*"))
        assert left == sorted(names[k] for k in ("alive", "fd-only", "young"))
    finally:
        for proc in (alive, fd_only):
            proc.kill()
            proc.wait()
        for name in names.values():
            (SHARED_MEMORY / name).unlink(missing_ok=True)
