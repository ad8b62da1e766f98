"""Leases on real files, between owners of one process and between real processes.

One owner at a time; renewal keeps it; another owner takes it only once it expired, or at once
when its holder's process on this host is gone; of many processes acquiring at once exactly one
wins.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logitcache.client.errors import FailedPrecondition
from logitcache.server.leases import FileLeaseStore, busy, claimed


def test_one_owner_until_the_lease_expires(tmp_path: Path) -> None:
    a, b = FileLeaseStore(tmp_path), FileLeaseStore(tmp_path)
    assert a.owner != b.owner
    held = a.acquire("datasets/d", 0.6, "job 1")
    assert held is not None and held.note == "job 1" and held.pid == os.getpid()
    assert b.acquire("datasets/d", 0.6, "job 2") is None
    assert b.holder("datasets/d") == held
    assert a.acquire("datasets/d", 0.6, "job 1") is not None  # its own owner again: fine
    time.sleep(0.4)
    assert a.renew("datasets/d", 0.6) is not None  # renewed: still a's after the first expiry
    time.sleep(0.4)
    assert b.acquire("datasets/d", 0.6, "job 2") is None
    time.sleep(0.7)  # no renewal: expired
    assert b.holder("datasets/d") is None
    taken = b.acquire("datasets/d", 0.6, "job 2")
    assert taken is not None and taken.owner == b.owner
    assert a.renew("datasets/d", 0.6) is None  # a learns it lost the lease
    a.release("datasets/d")  # not a's: nothing happens
    assert b.holder("datasets/d") == taken
    b.release("datasets/d")
    assert a.holder("datasets/d") is None


def test_busy_names_the_holder_and_what_to_do(tmp_path: Path) -> None:
    a, b = FileLeaseStore(tmp_path), FileLeaseStore(tmp_path)
    with claimed(a, "datasets/d", "logitcache precompute", what="dataset 'd'", todo="wait"):
        with pytest.raises(FailedPrecondition) as refused:
            with claimed(b, "datasets/d", "other", what="dataset 'd'", todo="wait"):
                pass
    message = str(refused.value)
    assert "logitcache precompute" in message and f"pid {os.getpid()}" in message
    assert message.endswith("; wait")
    assert b.acquire("datasets/d", 5.0, "other") is not None  # released on leaving
    assert "try again" in busy("dataset 'd'", None, "wait")


HOLD = """
import sys, time
from pathlib import Path
from logitcache.server.leases import FileLeaseStore
lease = FileLeaseStore(Path(sys.argv[1])).acquire("datasets/d", 3600.0, "holder")
print("held" if lease else "refused", flush=True)
time.sleep(3600)
"""


def test_a_killed_holder_on_this_host_is_replaced_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        mine = FileLeaseStore(tmp_path)
        holder = mine.holder("datasets/d")
        assert holder is not None and holder.pid == proc.pid
        assert mine.acquire("datasets/d", 5.0, "me") is None  # an hour left, and it runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert mine.acquire("datasets/d", 5.0, "me") is not None  # its process is gone


def _race(root: str, start: float, queue) -> None:
    while time.time() < start:
        time.sleep(0.001)
    lease = FileLeaseStore(Path(root)).acquire("datasets/d", 60.0, f"racer {os.getpid()}")
    queue.put(lease is not None)
    time.sleep(1.0)  # stay alive: a dead holder's lease would be free again


def test_of_processes_acquiring_at_once_exactly_one_wins(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start = time.time() + 3.0  # after every racer has started
    racers = [context.Process(target=_race, args=(str(tmp_path), start, queue)) for _ in range(6)]
    for p in racers:
        p.start()
    won = [queue.get(timeout=60) for _ in racers]
    for p in racers:
        p.join(timeout=60)
    assert sum(won) == 1
